"""Where and how a process computes: the device, the autocast precision, the seeds.

    device = resolve_device(cfg.train.device)          # "auto" -> cuda if available, else cpu
    with autocast_context(cfg.train.precision, device):
        ...
    with seeded(cfg.train.seed, threads=cfg.train.threads):   # one thread at a time: its model's init is its seed's
        model = build_model(cfg)
    with on_own_stream(device, slot):                          # this thread's CUDA work on stream number `slot`
        ...
"""
from __future__ import annotations

import random
import threading
from contextlib import contextmanager, nullcontext

import torch

from lsm.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:N`; asking for CUDA without one is a `ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for, but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device, cache_enabled: bool = True):
    """bf16 autocast on GPU (or when asked for), plain float32 otherwise (`cache_enabled=False` inside CUDA graphs)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return nullcontext()


def seed_everything(seed: int, threads: int = 0) -> None:
    """Seed torch's and Python's RNGs (every device); `threads > 0` also sets torch's CPU thread count."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)


_SEEDED = threading.Lock()


@contextmanager
def seeded(seed: int, threads: int = 0):
    """`seed_everything`, then the block, under one lock: threads that build models side by side (`ablate.streams`)
    each draw their initialisation from their own seed, not from an interleaving of the global RNG."""
    with _SEEDED:
        seed_everything(seed, threads)
        yield


_STREAMS: dict[tuple[str, int], "torch.cuda.Stream"] = {}
_STREAMS_LOCK = threading.Lock()


def on_own_stream(device: str | torch.device, slot: int):
    """On a CUDA device, make this process's CUDA stream number `slot` the calling thread's current one for the block
    (kernels that threads queue on different streams can overlap on the GPU); nothing elsewhere. One stream per slot
    for the life of the process: threads that hold different slots never share a stream, whatever ran before."""
    device = resolve_device(device) if isinstance(device, str) else device
    if device.type != "cuda":
        return nullcontext()
    key = (str(device), slot)
    with _STREAMS_LOCK:
        if key not in _STREAMS:
            _STREAMS[key] = torch.cuda.Stream(device)
    return torch.cuda.stream(_STREAMS[key])
