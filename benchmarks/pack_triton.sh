#!/usr/bin/env bash
# Pack the triton 3.7.1 wheel for the GPU machine in one carry (see gpu_session.sh): its files without the debug
# sections of the compiled libraries, without cupti (the profiler's) and ptxas-blackwell (sm_100), xz -9:
# 198 MB of wheel -> 54 MB.   Usage: bash benchmarks/pack_triton.sh [DIR]   (writes .tw/triton371.tar.xz)
set -euo pipefail
D=${1:-/tmp/triton_wheel}; W=/tmp/triton371_tree
mkdir -p "$D" .tw
ls "$D"/triton-3.7.1-cp312-*.whl > /dev/null 2>&1 || pip download -q --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --python-version 3.12 --implementation cp "triton==3.7.1" -d "$D"
rm -rf $W && mkdir -p $W && (cd $W && unzip -q "$D"/triton-3.7.1-cp312-*.whl)
strip --strip-debug $W/triton/_C/*.so
rm -rf $W/triton/backends/nvidia/lib/cupti $W/triton/backends/nvidia/bin/ptxas-blackwell \
  $W/triton/instrumentation/libGPUInstrumentationTestLib.so
tar -C $W -cf - . | xz -9 -T0 > .tw/triton371.tar.xz.part && mv .tw/triton371.tar.xz.part .tw/triton371.tar.xz
ls -l .tw/triton371.tar.xz
