"""Triton forward kernel of TTT-Linear's mini-batch dual form, plain form (no LayerNorm), no autograd.

The rule (lsm/rules/ttt.py): the memory S `[K, V]` takes one gradient step per token on
1/2 ||S^T k - v||^2, every gradient of a mini-batch of b tokens taken at the state S0 the
mini-batch starts from (mini-batches aligned to each sequence's start). Per mini-batch
(Q, K `[b, K]`, V `[b, V]`, eta `[b]`, per head):

    E = K S0 - V,   o = scale (Q S0 - (tril(Q K^T) diag(eta)) E),   S = S0 - K^T diag(eta) E

One program per (V tile, sequence x head) walks the sequence's mini-batches with the state tile
`[K, BV]` in float32 registers (K <= 256). q, k `[B, T, H, K]`, v `[B, T, H, V]`, eta `[B, T, H]`;
states `[N, H, K, V]` float32; packed sequences with `cu_seqlens` on the device, no host sync.
The reference is `TTT._chunk_torch`; the backward and the LayerNorm form are not written yet.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lsm_kernels.diag import _prec, _tune, chunk_layout

MAX_K = 256


@_tune(["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def _ttt_fwd_kernel(q, k, v, eta, o, h0, ht, cu, scale, b, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                    STORE_HT: tl.constexpr, PREC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    nb = (eos - bos + b - 1) // b
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + i_nh * K * V + p_kv, mask=m_kv, other=0.)
    causal = o_t[:, None] >= o_t[None, :]
    for i in range(0, nb):
        rows = bos + i * b + o_t
        m_t = (o_t < b) & (rows < eos)
        p_tk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        p_tv = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.).to(tl.float32)
        b_eta = tl.load(eta + rows * H + i_h, mask=m_t, other=0.).to(tl.float32)
        b_S0 = b_S.to(b_k.dtype)
        b_E = tl.dot(b_k, b_S0, input_precision=PREC) - b_v                       # [BT, BV]
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)                      # [BT, BT]
        b_A = tl.where(causal, b_A * b_eta[None, :], 0.)
        b_R = tl.dot(b_q, b_S0, input_precision=PREC) - tl.dot(b_A.to(b_k.dtype), b_E.to(b_k.dtype),
                                                              input_precision=PREC)
        tl.store(o + p_tv, (b_R * scale).to(o.dtype.element_ty), mask=m_tv)
        b_ke = (b_k.to(tl.float32) * b_eta[:, None]).to(b_k.dtype)
        b_S -= tl.dot(tl.trans(b_ke), b_E.to(b_k.dtype), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + p_kv, b_S, mask=m_kv)


def ttt_linear_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, scale: float | None = None,
                   initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                   cu_seqlens: torch.Tensor | None = None,
                   mini_batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TTT-Linear (plain form) by mini-batch gradient descent, forward only.

    q, k `[B, T, H, K]` (k L2-normalised by the caller), v `[B, T, H, V]`, eta `[B, T, H]` >= 0;
    initial_state `[N, H, K, V]`; cu_seqlens `[N+1]` with B = 1. Returns (o `[B, T, H, V]` in v's
    dtype, final state `[N, H, K, V]` float32 or None). Raises if a gradient would be needed.
    """
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels run on a CUDA device, got a tensor on {q.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU, slowly)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, eta, initial_state)):
        raise NotImplementedError("ttt_linear_fwd has no backward yet: call it under torch.no_grad(), or use the "
                                  "rule's backend='torch' for gradients")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_K:
        raise ValueError(f"ttt_linear_fwd: the key head dim K must be <= {MAX_K}, got {K}")
    if not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"ttt_linear_fwd: `mini_batch_size` must be a positive int, got {mini_batch_size!r}")
    scale = K ** -0.5 if scale is None else float(scale)
    BT = max(16, triton.next_power_of_2(mini_batch_size))
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, triton.next_power_of_2(V), 8192 // BK))
    cu, _, _, _, N, _ = chunk_layout(B, T, cu_seqlens, BT, q.device)
    q, k, v, eta = q.contiguous(), k.contiguous(), v.contiguous(), eta.contiguous()
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    o = torch.empty_like(v)
    ht = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    _ttt_fwd_kernel[(triton.cdiv(V, BV), N * H)](q, k, v, eta, o, h0, ht, cu, scale, mini_batch_size, H, K, V, BT, BK,
                                                 BV, h0 is not None, output_final_state, _prec(q.dtype))
    return o, ht
