#!/usr/bin/env bash
# One GPU session on the lent H100/H200 (see benchmarks/README.md): install the carried wheels
# (fla 0.6.0, triton 3.7.1 reassembled from /tmp/tw), then run the steps named on the command line.
# Logs go to $OUT.   Usage: bash benchmarks/gpu_session.sh [warm|console|check|mom|profile|kernels|kernels2048|kernels8192|tests|sweep|mps|zoopilot|zoo|zoobg|zoofetch]...
# (TEST_JOBS, TESTS, TESTS_S, TEST_K, TEST_TIMEOUT, TEST_TAG: pytest workers, paths, time limit, -k expression,
#  per-test limit and log-name suffix of `tests`; RACE_RULES, RACE_S: the race's rules and limit; RACE_PROFILE=1: the
#  race also writes each rule's kernel-by-kernel profile to $OUT/kernel_profile_<T>.txt; WARM_RULES, WARM_SHARDS,
#  CHECK_RULES, WARM_MOM=0: what `warm` compiles, in how many processes per rule, the rules gpu_check.py checks
#  beside it (first autotune config), and no MoM warm-up)
#
#   warm     compile every kernel variant the timed steps need, in parallel processes sharing the disk
#            cache (benchmarks/_gpu.py: LSM_WARM_SHARD splits each autotuner's configs), while the GPU
#            correctness checks run beside them. Nothing timed here; autotune choices are not kept (the timed steps'
#            are: TRITON_CACHE_AUTOTUNING=1 keeps ours on disk as fla keeps its own, so a later call on the warm
#            machine, e.g. `profile` after `kernels2048`, does not tune the same shapes again).
#   mom      benchmarks/bench_mom.py (issue table: MoM vs single layer vs fla, decode, syncs; MOM_ARGS: more options,
#            e.g. "--backend triton" for our rule kernel inside the layers)
#   profile  where the time goes: bench_kernels.py --profile (T = 2048, PROFILE_RULES (PROFILE_S), default the rules behind fla:
#            gla deltanet gated_deltanet), ours and fla's fwd+bwd kernel by kernel, then profile_mom.py --real
#            --backend triton (the MoM layer and the single layer by operator) and profile_mom.py --decode (the eager
#            decoding step by host time, its kernel count) -> $OUT/kernel_profile.txt, profile_mom.txt, profile_mom_decode.txt
#   kernels* benchmarks/bench_kernels.py (ours vs fla vs SDPA, every rule), T = 2048 and/or 8192
#   sweep    benchmarks/bench_sweep_gpu.py: steps/s of the recall study's model, SWEEP_PROCS processes sharing the GPU
#   mps      start the CUDA MPS control daemon (see start_mps)
#   zoo      a shard of the recall study (configs/zoology_mqar.yaml) into $ZOO_DIR (/tmp/zoology_mqar: a later call on
#            the warm machine sees its finished runs and plans the second stage from them; a fresh machine starts from
#            docs/zoology_mqar/runs.csv): ZOO_RULES ("[deltanet,gla]"), ZOO_WIDTHS ("[64]"), ZOO_SHARD ("1/1"), ZOO_JOBS
#            (default: the preset's ablate.jobs), ZOO_GRID (the whole ablate.grid, in place of ZOO_WIDTHS's; spaces
#            allowed), ZOO_EXTRA (more overrides, split at spaces), ZOO_S (time limit; a cut sweep keeps its
#            finished rows), ZOO_MPS (1: start MPS first, the default; 0: time slices).
#   zoobg    the same in a process session of its own: it runs on after the call returns, while the machine is held;
#            several zoobg steps (one per call or several in one) queue: each starts when the ones before it end, and
#            its ZOO_S counts from its start
#            Sweeps in different ZOO_DIRs run side by side (each folder's queue is its own).
#   zoofetch waits up to ZOO_WAIT s for the sweeps (of every folder in ZOO_DIRS, default ZOO_DIR's), then packs every shard's rows (shards/<rules_widths_shard>/runs.csv),
#            each cell's metrics.jsonl and config.yaml, and the sweep logs into $OUT/zoo.tgz. Here: unpack it into
#            runs/zoology_mqar, then `lsm ablate configs/zoology_mqar.yaml --merge` (with ZOO_EXTRA's overrides, if any:
#            cells are hashed from their resolved config, ablate.* aside).
# Timed steps autotune alone on the GPU, with LSM_TUNE_MS=5,25 for ours and fla's kernels alike.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Triton 3.7.1 in one call: `.tw/triton371.tar.xz` (54 MB: the wheel's files with libtriton's debug sections
# stripped and without cupti (profiler only) and ptxas-blackwell, xz -9; make it with benchmarks/pack_triton.sh),
# carried as [".whl", ".tw"], is unpacked into /tmp/site.
# Or the wheel itself (198 MB) in 4 parts of 50 MB, one per call, each as `.tw/part.a?` (carry [".whl",
# ".tw"], with only that call's part in .tw): here: split -b 50M triton-3.7.1-*.whl .tw/part. and keep one at a time.
if [ -f .tw/triton371.tar.xz ] && [ ! -d /tmp/site/fla ]; then
  mkdir -p /tmp/site && xz -dc .tw/triton371.tar.xz | tar -xf - -C /tmp/site \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
[ -d .tw ] && mkdir -p /tmp/tw && cp -n .tw/part.a? /tmp/tw/ 2>/dev/null && echo "triton parts here: $(ls /tmp/tw | tr '\n' ' ')"
# Until triton 3.7.1 is there (unpacked, or all four parts of the wheel (/tmp/tw/part.aa..ad) arrived), the carried
# pure-Python wheels run on the image's triton (our kernels compile on 3.6; fla's gated backward refuses it on
# Hopper): /tmp/site_light.
if [ -d /tmp/site/fla ]; then SITE=/tmp/site
elif [ "$(ls /tmp/tw/part.a[a-d] 2>/dev/null | wc -l)" = 4 ]; then   # all four parts on this machine
  SITE=/tmp/site
  if [ ! -d $SITE/fla ]; then
    cat /tmp/tw/part.* > /tmp/triton-3.7.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE \
      /tmp/triton-3.7.1-*.whl .whl/*.whl || exit 1
  fi
else
  SITE=/tmp/site_light
  [ -d $SITE/fla ] || python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .whl/*.whl || exit 1
fi
ln -sfn "$PWD/kernels" $SITE/lsm_kernels   # every call runs in a fresh copy of the tree
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TRITON_CACHE_DIR=/tmp/triton-cache
export LSM_TUNE_MS=${LSM_TUNE_MS:-5,25} TRITON_CACHE_AUTOTUNING=1
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, torch.cuda.get_device_name())"
RULES="linear_attention retnet lightning gla hgrn2 mamba2 deltanet gated_deltanet ttt"
Z=${ZOO_DIR:-/tmp/zoology_mqar}   # the study's sweep folder, outside the tree that every call copies afresh
# CUDA MPS: one server runs every process's kernels, so the tiny kernels of several training processes can overlap on
# the SMs instead of taking turns (time slices). The control daemon is a process of this user (device settings stay as
# they are); processes started after it use it, until the machine goes back. Started once per machine.
start_mps() {
  if ! command -v nvidia-cuda-mps-control > /dev/null; then
    echo "no nvidia-cuda-mps-control in this image: processes share the GPU by time slices"
  elif pgrep -x nvidia-cuda-mps-control > /dev/null; then echo "MPS control daemon already running"
  else nvidia-cuda-mps-control -d && sleep 1 && echo "MPS control daemon started"; fi
}
for what in "$@"; do
  t0=$(date +%s)
  case $what in
    warm)
      W=/tmp/warm; mkdir -p $W
      n=${WARM_SHARDS:-2}
      for r in ${WARM_RULES:-$RULES}; do
        for i in $(seq 0 $(( n - 1 ))); do
          ( export FLA_CACHE_RESULTS=0 TRITON_CACHE_AUTOTUNING=0 LSM_WARM_SHARD=$i/$n
            # B = 16 (T=2048 timed) and B = 4 (T=8192 timed): same integer specialisations, smaller T
            timeout ${WARM_S:-300} python3 benchmarks/bench_kernels.py --rules $r --T 1024 --tokens 16384 --no-check
            timeout ${WARM_S:-300} python3 benchmarks/bench_kernels.py --rules $r --T 1024 --tokens 4096 --no-check
          ) > $W/$r.$i.log 2>&1 &
        done
      done
      [ "${WARM_MOM:-1}" = 1 ] && for i in 0 1; do
        FLA_CACHE_RESULTS=0 TRITON_CACHE_AUTOTUNING=0 LSM_WARM_SHARD=$i/2 timeout ${WARM_S:-300} python3 benchmarks/bench_mom.py --shapes 2x2048 \
          --reps 1 --out $W/mom_$i.md > $W/mom.$i.log 2>&1 &
      done
      FLA_CACHE_RESULTS=0 TRITON_CACHE_AUTOTUNING=0 timeout ${WARM_S:-300} python3 benchmarks/gpu_check.py --quick-tune \
        --rules ${CHECK_RULES:-ttt} > "$OUT/gpu_check_warm.log" 2>&1 &
      wait
      cat "$OUT/gpu_check_warm.log"
      for f in $W/*.log; do echo "$f: $(grep -c '^rule' $f) tables, $(grep -c 'Error' $f) errors"; done
      grep -h "Error" $W/*.log | sort | uniq -c | head -20 ;;
    console) # a training console on the GPU (issue 16), the run exported and read back through transformers
      timeout 240 python3 -m lsm train configs/mqar_gdn_mom.yaml model.mixer.type=mom model.mixer.backend=triton \
        train.steps=400 train.log_every=100 train.progress=false train.out_dir=/tmp/gpu_mom 2>&1 | tee "$OUT/console.log" | tail -14
      python3 -m lsm export /tmp/gpu_mom /tmp/gpu_mom_hf 2>&1 | tee -a "$OUT/console.log" | tail -3
      timeout 120 python3 scripts/hf_generate.py /tmp/gpu_mom_hf --device cuda 2>&1 | tee "$OUT/hf_generate.log" | tail -12 ;;
    check)   timeout 500 python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log" | tail -40 ;;
    # every gpu-marked test (the GPU matrix included); tiny shapes leave the GPU launch-bound, so
    # TEST_JOBS pytest workers share it
    tests)   LSM_FAILURE_LOG="$OUT/gpu_failures${TEST_TAG:-}.log" timeout ${TESTS_S:-420} python3 -m pytest -n ${TEST_JOBS:-0} -m gpu -p no:cacheprovider -o addopts= -q -rf \
               --timeout ${TEST_TIMEOUT:-300} -k "${TEST_K:-not nothing}" ${TESTS:-tests} 2>&1 \
               | tee "$OUT/gpu_tests${TEST_TAG:-}.log" | tail -${TEST_TAIL:-40} ;;
    mom)     timeout ${MOM_S:-560} python3 benchmarks/bench_mom.py ${MOM_ARGS:-} --out "$OUT/bench_mom.md" 2>&1 | tee "$OUT/bench_mom.log" | tail -40 ;;
    profile) if [ -n "${PROFILE_RULES-gla deltanet gated_deltanet}" ]; then   # PROFILE_RULES="": the MoM profiles only
               timeout ${PROFILE_S:-250} python3 benchmarks/bench_kernels.py --T 2048 --no-check \
                 --rules ${PROFILE_RULES-gla deltanet gated_deltanet} --profile "$OUT/kernel_profile.txt" 2>&1 | tail -8
               grep -h "^##" "$OUT/kernel_profile.txt"
             fi
             timeout ${PROFILE_MOM_S:-200} python3 benchmarks/profile_mom.py --real --backend triton > "$OUT/profile_mom.txt" 2>&1
             grep -h "fwd+bwd" "$OUT/profile_mom.txt"
             timeout 120 python3 benchmarks/profile_mom.py --decode --backend triton > "$OUT/profile_mom_decode.txt" 2>&1
             grep -h "decode step" "$OUT/profile_mom_decode.txt" ;;
    kernels) timeout 580 python3 benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json" --plot "$OUT/bench_kernels.png" 2>&1 | tee "$OUT/bench_kernels.log" | tail -40 ;;
    kernels2048|kernels8192)
      T=${what#kernels}
      timeout ${RACE_S:-580} python3 benchmarks/bench_kernels.py --T $T --rules ${RACE_RULES:-$RULES} --out "$OUT/bench_kernels_$T.json" \
        ${RACE_PROFILE:+--profile "$OUT/kernel_profile_$T.txt"} 2>&1 | tee "$OUT/bench_kernels_$T.log" | tail -40 ;;
    sweep)   # the n-th sweep step of the command line writes $OUT/sweep_n (e.g. before and after `mps`)
      n_sweep=$(( ${n_sweep:-0} + 1 )); mkdir -p "$OUT/sweep_$n_sweep"
      timeout ${SWEEP_S:-560} python3 benchmarks/bench_sweep_gpu.py --procs ${SWEEP_PROCS:-1 4 8} ${SWEEP_ARGS:-} \
        --out "$OUT/sweep_$n_sweep" 2>&1 | tee "$OUT/sweep_$n_sweep/bench_sweep_gpu.log" | tail -20 ;;
    mps)     start_mps ;;
    zoo|zoobg)  # zoobg: the same sweep in its own process session, so it outlives this call (see zoofetch)
      mkdir -p $Z
      # the study's finished rows (tracked, re-keyed by `lsm ablate --merge`): the sweep skips their cells and plans
      # its second stage from them, so a shard picks up where the last session's left off
      [ -f $Z/runs.csv ] || cp docs/zoology_mqar/runs.csv $Z/runs.csv
      # and the configs their runs stored: rows of an older cell id (a config key added since) are re-identified
      # from them (lsm.ablate.identify)
      [ -d $Z/cells ] || for f in docs/zoology_mqar/shards/*.tgz; do tar -xzf $f -C $Z ./cells; done
      [ "${ZOO_MPS:-1}" = 1 ] && start_mps
      GRID=${ZOO_GRID:-"{model.hidden_size: ${ZOO_WIDTHS:-[64,128]}}"}
      TAG=$(echo "${ZOO_RULES:?set ZOO_RULES, e.g. [deltanet]}_${ZOO_WIDTHS:-all}${ZOO_GRID:+_$ZOO_GRID}${ZOO_EXTRA:+_$ZOO_EXTRA}_${ZOO_SHARD:-1/1}" \
            | tr -c 'a-z0-9\n' '_')
      echo "$TAG ${ZOO_SHARD:-1/1}" >> $Z/tags
      CMD=(timeout ${ZOO_S:-540} python3 -m lsm ablate configs/zoology_mqar.yaml ablate.rules=${ZOO_RULES}
           "ablate.grid=$GRID" ${ZOO_JOBS:+ablate.jobs=$ZOO_JOBS} ablate.out_dir=$Z
           ${ZOO_EXTRA:-} --shard ${ZOO_SHARD:-1/1})
      if [ $what = zoobg ]; then   # queued behind the sweeps still running: shards of one index share a runs.csv
        prev=$(cat $Z/pids 2>/dev/null | tr '\n' ' ')
        setsid nohup bash -c 'for p in $0; do while kill -0 $p 2>/dev/null; do sleep 5; done; done; exec "$@"' \
          "$prev" "${CMD[@]}" > $Z/log_$TAG.txt 2>&1 < /dev/null &
        echo $! >> $Z/pids; echo "queued behind [${prev}]: ${CMD[*]}"
      else "${CMD[@]}" 2>&1 | tee $Z/log_$TAG.txt | tail -30; fi ;;
    zoofetch)  # wait (ZOO_WAIT seconds at most) for the sweeps zoo/zoobg started, then pack what they finished
      dirs=${ZOO_DIRS:-$Z}   # sweeps side by side in folders of their own: ZOO_DIRS lists them all
      end=$(( $(date +%s) + ${ZOO_WAIT:-0} ))
      running() { for p in $(for d in $dirs; do cat $d/pids; done 2>/dev/null); do kill -0 $p 2>/dev/null && return 0; done
                  return 1; }
      while running && [ $(date +%s) -lt $end ]; do sleep 5; done
      running && echo "a sweep is still running (its finished rows come back)"
      # each shard's rows under a name of their own (rules, widths, shard), so no later fetch overwrites them here
      rm -rf /tmp/zoo_pack; mkdir -p /tmp/zoo_pack/shards
      for d in $dirs; do
        while read -r tag S; do
          f=$d/shards/${S%/*}of${S#*/}/runs.csv
          [ -f $f ] && mkdir -p /tmp/zoo_pack/shards/$tag && cp $f /tmp/zoo_pack/shards/$tag/runs.csv
        done < $d/tags
        cp $d/log_*.txt /tmp/zoo_pack/ 2>/dev/null
        (cd $d && find cells -name metrics.jsonl -o -name config.yaml | grep -v checkpoints | tar -cf - -T - \
          | tar -xf - -C /tmp/zoo_pack)
        tail -q -n 4 $d/log_*.txt
      done
      tar -czf "$OUT/zoo.tgz" -C /tmp/zoo_pack .
      echo "$OUT/zoo.tgz: $(cat /tmp/zoo_pack/shards/*/runs.csv 2>/dev/null | grep -c ',ok,') finished rows" ;;
  esac
  echo "# step $what took $(( $(date +%s) - t0 )) s"
done
