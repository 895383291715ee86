#!/usr/bin/env bash
# One GPU session on the lent H100/H200 (see benchmarks/README.md): install the carried wheels
# (fla 0.6.0, triton 3.7.1 reassembled from /tmp/tw), then run the GPU-marked tests and the benchmarks.
# Logs go to $OUT. Usage: bash benchmarks/gpu_session.sh [tests|kernels|mom|all]...
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -d /tmp/site/fla ]; then
  cat /tmp/tw/part.* > /tmp/triton-3.7.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    /tmp/triton-3.7.1-*.whl .whl/*.whl || exit 1
  ln -sfn "$PWD/kernels" /tmp/site/lsm_kernels
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, torch.cuda.get_device_name())"
for what in "$@"; do
  case $what in
    tests)   timeout 420 python3 -m pytest -n 0 -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -30 ;;
    kernels) timeout 500 python3 benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json" --plot "$OUT/bench_kernels.png" 2>&1 | tee "$OUT/bench_kernels.log" | tail -40 ;;
    mom)     timeout 500 python3 benchmarks/bench_mom.py 2>&1 | tee "$OUT/bench_mom.log" | tail -40 ;;
  esac
done
