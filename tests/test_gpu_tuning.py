"""benchmarks/_gpu.py's autotuning controls, checked on a stand-in autotuner (no GPU needed)."""
import importlib.util
import types
from pathlib import Path

import pytest

A = pytest.importorskip("triton.runtime.autotuner")


def _gpu_module():
    spec = importlib.util.spec_from_file_location("_lsm_gpu", Path(__file__).parents[1] / "benchmarks" / "_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("env,expected", [({"LSM_TUNE_FIRST": "1"}, ["a"]), ({"LSM_WARM_SHARD": "1/2"}, ["b", "d"]),
                                          ({}, ["a", "b", "c", "d"])])
def test_config_pruning(monkeypatch, env, expected):
    """LSM_TUNE_FIRST keeps the first config of every autotuner (correctness runs); LSM_WARM_SHARD i/n keeps
    configs[i::n] (warm-up processes); neither: every config."""
    monkeypatch.setattr(A.Autotuner, "prune_configs", A.Autotuner.prune_configs)  # restored after the test
    for k in ("LSM_TUNE_FIRST", "LSM_WARM_SHARD", "LSM_TUNE_MS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _gpu_module().configure_autotuning()
    tuner = types.SimpleNamespace(configs=list("abcd"), early_config_prune=None, perf_model=None)
    assert A.Autotuner.prune_configs(tuner, {}) == expected


def test_tuned_kernels_launch_one_thread_at_a_time(monkeypatch):
    """On a GPU, `_tune` wraps every autotuner's launch in `_Serialized` (triton's autotuner keeps a launch's arguments
    on itself while it benchmarks; runs of one process on several threads, `ablate.streams`, launch the same kernels):
    the wrapping on a stand-in kernel, and one caller at a time out of 4 threads."""
    import threading
    import time

    import triton
    import triton.language as tl

    import lsm_kernels._common as C

    monkeypatch.setenv("TRITON_INTERPRET", "0")     # _tune reads it when it decorates

    @triton.jit
    def kernel(x, N: tl.constexpr):
        tl.store(x + tl.arange(0, N), tl.zeros([N], dtype=tl.float32))

    tuner = C._tune(["N"])(kernel)
    assert isinstance(tuner, A.Autotuner) and isinstance(tuner.run, C._Serialized)
    inside, most = [0], [0]

    def call(i):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.01)
        inside[0] -= 1
        return i

    serial = C._Serialized(call)
    threads = [threading.Thread(target=serial, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and serial(7) == 7


def test_kernel_profile_rows_on_cpu():
    """kernel_profile (the benchmarks' kernel-by-kernel breakdown) on CPU operators: the total first, then the
    operators by self time, per call of the function; format_profile prints them with their shares."""
    import torch
    gpu = _gpu_module()
    a = torch.randn(64, 64)

    def fn():
        return (a @ a).relu().sum()

    rows = gpu.kernel_profile(fn, calls=2, top=5, device="cpu")
    assert rows[0]["name"] == "(all)" and rows[0]["ms"] > 0
    names = [r["name"] for r in rows[1:]]
    assert any("mm" in n for n in names) and any("relu" in n for n in names)
    assert all(r["ms"] >= s["ms"] for r, s in zip(rows[1:], rows[2:]))       # by time, largest first
    assert rows[0]["ms"] >= sum(r["ms"] for r in rows[1:]) - 1e-9                 # the total counts every operator
    mm = next(r for r in rows[1:] if "mm" in r["name"])
    assert mm["launches"] == 1                                                # per call of fn, not per profile
    text = gpu.format_profile("matmul", rows)
    assert text.splitlines()[0].startswith("## matmul:") and "%" in text and len(text.splitlines()) == len(rows)
