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


def kernel_profile(fn, calls: int = 3, top: int = 12, device: str = "cuda") -> list[dict]:
    """Where one call of fn goes, kernel by kernel: torch.profiler over `calls` calls (after one untimed call),
    the `top` kernels by self time, as {"name", "ms" (per call of fn), "launches" (per call)}; "(all)" first.
    device "cpu" profiles the CPU operators instead (what the tests can run)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if device == "cuda":
            us = getattr(e, "self_device_time_total", None)
            us = us if us is not None else e.self_cuda_time_total
            if getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
                continue
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key, "ms": us / 1e3 / calls, "launches": e.count / calls})
    rows.sort(key=lambda r: -r["ms"])
    total = {"name": "(all)", "ms": sum(r["ms"] for r in rows), "launches": sum(r["launches"] for r in rows)}
    return [total] + rows[:top]


def format_profile(title: str, rows: list[dict], width: int = 72) -> str:
    """kernel_profile's rows as a text block: ms per call, share of the total, launches per call, name."""
    total = rows[0]["ms"] or 1.0
    lines = [f"## {title}: {rows[0]['ms']:.3f} ms of kernels per call, {rows[0]['launches']:.0f} launches"]
    lines += [f"  {r['ms']:8.3f} ms {100 * r['ms'] / total:5.1f}% {r['launches']:4.0f}x  {r['name'][:width]}" for r in rows[1:]]
    return "\n".join(lines)
