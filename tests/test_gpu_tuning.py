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
