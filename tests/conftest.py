"""Test-session setup: Triton's CPU interpreter when no GPU is present, bounded hypothesis runs."""
import os

try:  # must happen before triton is imported anywhere
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # tests use tiny tensors: one thread per pytest-xdist worker beats oversubscribing the cores
        torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

import pytest
from hypothesis import HealthCheck, settings

# CI runs on 2 CPU cores: a bounded number of examples per property, no per-example deadline
# (the first example pays for compilation / interpreter warm-up).
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """LSM_FAILURE_LOG=path appends each failure (test id, phase, first error line) the moment it happens: a GPU
    call cut short by its time limit keeps what failed and why (pytest prints its summary only at the end)."""
    path = os.environ.get("LSM_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    errors = [ln for ln in str(report.longrepr).splitlines() if ln.startswith("E ")]
    with open(path, "a") as f:
        f.write(f"{report.nodeid} [{report.when}]: {errors[0][1:].strip() if errors else str(report.longrepr)[-300:]}\n")
