"""Autotuning controls shared by the GPU benchmarks (ours and fla's kernels are treated alike).

Triton autotunes every kernel on its first call for a new key: it compiles each config (CPU-bound,
seconds each, cached on disk in TRITON_CACHE_DIR) and times it with `do_bench` (25 ms warm-up +
100 ms of repetitions per config by default). fla's kernels carry 10-40 configs each, so a cold
fwd+bwd of one rule can spend minutes there. Two controls, both applied to every Triton kernel
in the process:

    LSM_TUNE_MS="5,25"   autotuning times each config with 5 ms warm-up + 25 ms of repetitions
                          (the kernels here take 0.05-5 ms: still >= 5 timed runs per config)
    LSM_WARM_SHARD="i/n" warm-up processes only: each config list is cut to configs[i::n], so n
                          processes compile disjoint shares of the configs into the shared disk cache
                          (their timings and choices are thrown away; run with FLA_CACHE_RESULTS=0)
    LSM_TUNE_FIRST=1     correctness runs only (gpu_check.py --quick-tune, the GPU test matrix): every
                          autotuner keeps its first config, so nothing is timed and one variant per kernel
                          and shape is compiled (results do not depend on the config; timings do)
"""
from __future__ import annotations

import functools
import os


def configure_autotuning() -> None:
    import triton.testing
    from triton.runtime import autotuner, driver

    ms = os.environ.get("LSM_TUNE_MS")
    if ms:
        warmup, rep = (int(x) for x in ms.split(","))
        bench = functools.partial(triton.testing.do_bench, warmup=warmup, rep=rep)
        type(driver.active).get_benchmarker = lambda self: bench
    shard = os.environ.get("LSM_WARM_SHARD")
    if os.environ.get("LSM_TUNE_FIRST") == "1":
        shard = "0/1000000"   # configs[0::n] with n past any config count: the first config alone
    if shard:
        i, n = (int(x) for x in shard.split("/"))
        prune = autotuner.Autotuner.prune_configs

        def prune_shard(self, kwargs, *args, **kw):
            configs = prune(self, kwargs, *args, **kw)
            return configs[i::n] or configs[:1]

        autotuner.Autotuner.prune_configs = prune_shard
