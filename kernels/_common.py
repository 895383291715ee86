"""Helpers shared by every kernel file: tuning, device check, chunk layout, precision, decay kinds.

    _tune(key)              autotune decorator on a GPU, the identity under TRITON_INTERPRET=1
    _check_device(x)        a CUDA tensor, or the interpreter on: else a ValueError saying how to run
    chunk_layout(...)       device-side chunk maps of a (packed) batch, no host synchronisation
    _chunk_rows (jit)       a chunk slot's first and end row in such a layout
    _scale(scale, K)        the readout scale: K ** -0.5 when None
    _prec(dtype)            tl.dot precision: "ieee" for float32 inputs, "tf32" for half types
    _chunk_size(chunk_size) the chunked kernels' BT: a power of two in [16, 64]
    _blocks(K, V)           (BK, BV) tiles of the chunked kernels
    NONE GAMMA SCALAR VECTOR  the decay kinds (compile-time `DECAY`), `decay_kind(g, g_gamma)`;
    _load_G_head (jit)      a head decay's in-chunk cumulative log-decay

Importing this module imports triton; `lsm_kernels` itself does not.
"""
from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------- launch
def _tune(key: list[str], warps=(2, 4, 8), stages=(2, 3, 4)):
    """Autotune launch parameters on a GPU (the interpreter has nothing to tune). Every tuned kernel
    writes its outputs without reading them, so the tuning runs cannot corrupt results.

    One launch of a kernel at a time across threads: triton's autotuner keeps the launch's arguments on
    itself while it benchmarks, so two threads tuning one kernel at once (several runs of a process side by
    side, `ablate.streams`) would mix them up. The lock is held for the Python side of a launch only."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return lambda fn: fn
    tune = triton.autotune([triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages], key=key)

    def one_launch_at_a_time(fn):
        tuner = tune(fn)
        tuner.run = _Serialized(tuner.run)   # `kernel[grid](...)` calls `self.run`
        return tuner
    return one_launch_at_a_time


class _Serialized:
    """`fn`, called by one thread at a time."""

    def __init__(self, fn):
        self.fn, self.lock = fn, threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            return self.fn(*args, **kwargs)


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels run on a CUDA device, got a tensor on {x.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU, slowly)")


def _scale(scale: float | None, K: int) -> float:
    return K ** -0.5 if scale is None else float(scale)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk_size(chunk_size: int) -> int:
    return min(64, max(16, triton.next_power_of_2(int(chunk_size))))


def _blocks(K: int, V: int) -> tuple[int, int]:
    return min(64, max(16, triton.next_power_of_2(K))), min(64, max(16, triton.next_power_of_2(V)))


# ----------------------------------------------------------------------------------------- layout
_DENSE_LAYOUTS: dict = {}


def chunk_layout(B: int, T: int, cu_seqlens: torch.Tensor | None, BT: int, device) -> tuple:
    """Device-side chunk maps of a (packed) batch, without host synchronisation.

    Returns (cu `[N+1]`, chunk_seq `[NT]`, chunk_loc `[NT]`, chunk_off `[N]`, N, NT): chunk slot c
    belongs to sequence chunk_seq[c] (= N for unused slots) as its chunk_loc[c]-th chunk, and
    sequence n's chunks occupy slots chunk_off[n] ... . NT is static: B * ceil(T / BT), or the
    bound ceil(T / BT) + N for packed sequences.
    """
    i32 = torch.int32
    if cu_seqlens is None:  # depends on shapes only: built once per (B, T, BT, device, stream)
        # per CUDA stream: a stream that reads tensors another thread's stream is still writing would race
        # (lsm.ablate's streams train several runs of one process side by side, each on its own stream)
        cuda = torch.device(device).type == "cuda"
        key = (B, T, BT, str(device), torch.cuda.current_stream(device).stream_id if cuda else 0)
        if key in _DENSE_LAYOUTS:
            return _DENSE_LAYOUTS[key]
        nt = triton.cdiv(T, BT)
        N, NT = B, B * nt
        cu = torch.arange(B + 1, device=device, dtype=i32) * T
        c = torch.arange(NT, device=device, dtype=i32)
        layout = (cu, c // max(nt, 1), c % max(nt, 1), torch.arange(B, device=device, dtype=i32) * nt, N, NT)
        # built inside a graph capture, the tensors are filled only by the graph's replays: not for later launches
        if not (cuda and torch.cuda.is_current_stream_capturing()):
            _DENSE_LAYOUTS[key] = layout
        return layout
    cu = cu_seqlens.to(device=device, dtype=i32)
    N = cu.numel() - 1
    nch = (cu[1:] - cu[:-1] + BT - 1) // BT                              # [N] chunks per sequence
    ends = torch.cumsum(nch, 0)
    off = (ends - nch).to(i32)                                           # [N] first slot of each sequence
    NT = triton.cdiv(T, BT) + N                                          # >= sum(nch)
    c = torch.arange(NT, device=device, dtype=i32)
    seq = torch.searchsorted(ends, c, right=True).to(i32)                # [NT], N past the last chunk
    loc = c - off[seq.clamp(max=N - 1)]
    return cu, seq, loc.to(i32), off, N, NT


@triton.jit
def _chunk_rows(cu, cseq, cloc, i_t, N, BT: tl.constexpr):
    """First row, end row (exclusive) of chunk slot i_t; an unused slot gets an empty range."""
    i_n = tl.load(cseq + i_t)
    ok = i_n < N
    i_n = tl.minimum(i_n, N - 1)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    t0 = tl.where(ok, bos + tl.load(cloc + i_t).to(tl.int64) * BT, 0)
    eos = tl.where(ok, eos, 0)
    return t0, eos


# ----------------------------------------------------------------------------------------- decay kinds
NONE, GAMMA, SCALAR, VECTOR = 0, 1, 2, 3


def decay_kind(g: torch.Tensor | None, g_gamma: torch.Tensor | None) -> int:
    if g is not None and g_gamma is not None:
        raise ValueError("pass either `g` (per token) or `g_gamma` (per head), not both")
    if g_gamma is not None:
        return GAMMA
    if g is None:
        return NONE
    return VECTOR if g.dim() == 4 else SCALAR


@triton.jit
def _load_G_head(G, gamma, t0, eos, i_h, H: tl.constexpr, BT: tl.constexpr, DECAY: tl.constexpr):
    """In-chunk cumulative log-decay of a head decay: (G `[BT]`, G at the chunk's last valid row)."""
    o_t = tl.arange(0, BT)
    last = tl.minimum(t0 + BT, eos) - 1
    if DECAY == 1:
        b_gam = tl.load(gamma + i_h).to(tl.float32)
        b_G = (o_t + 1).to(tl.float32) * b_gam
        b_Gl = (last - t0 + 1).to(tl.float32) * b_gam
    else:
        b_G = tl.load(G + (t0 + o_t) * H + i_h, mask=t0 + o_t < eos, other=0.)
        b_Gl = tl.load(G + tl.maximum(last, t0) * H + i_h, mask=last >= t0, other=0.)
    return b_G, b_Gl
