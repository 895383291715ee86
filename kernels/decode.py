"""Fused recurrent decode steps (one token), updating float32 states in place.

One kernel serves the diagonal-decay family and the delta rule, single memories and
Mixture-of-Memories, through compile-time switches:

    DECAY  0 none | 1 constant per head (g_gamma [H]) | 2 per-token scalar (g) | 3 per-token vector (g [.., K])
    DELTA  False: S' = D S + k v^T                 (diag family)
           True:  S' = D S + k (beta (v - k^T D S))^T  = a (I - beta k k^T) S + beta k v^T  (delta rule, D = a)

and o = scale * sum_s w_s S'_s^T q over the memories s a token updates (one for a plain layer).
A program owns one (V tile, batch row x head) and the whole key dimension (K <= 256), so the
delta rule's k^T S needs no second pass. Memories that a token does not select are not touched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsm_kernels._common import GAMMA, NONE, SCALAR, VECTOR, _check_device, _scale


@triton.jit
def _step_kernel(q, k, v, g, gamma, beta, S, S_out, idx, w, o, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 M1: tl.constexpr, NS: tl.constexpr, TOPK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 DECAY: tl.constexpr, DELTA: tl.constexpr, ROUTED: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_o = tl.zeros([BV], dtype=tl.float32)
    for s in tl.static_range(NS):
        if ROUTED:
            if s < TOPK:
                slot = tl.load(idx + i_b * TOPK + s).to(tl.int64)
                b_w = tl.load(w + i_b * TOPK + s).to(tl.float32)
            else:                                                                 # the always-on shared memory
                slot = M1 - 1
                b_w = 1.0
        else:
            slot = 0
            b_w = 1.0
        i_bs = i_b * M1 + slot                                                    # row of this memory's inputs
        p_S = (i_bs * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        b_S = tl.load(S + p_S, mask=m_kv, other=0.)
        b_k = tl.load(k + (i_bs * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + (i_bs * H + i_h) * V + o_v, mask=m_v, other=0.).to(tl.float32)
        if DECAY == 1:
            b_S *= tl.exp(tl.load(gamma + i_h).to(tl.float32))
        elif DECAY == 2:
            b_S *= tl.exp(tl.load(g + i_bs * H + i_h).to(tl.float32))
        elif DECAY == 3:
            b_S *= tl.exp(tl.load(g + (i_bs * H + i_h) * K + o_k, mask=m_k, other=0.).to(tl.float32))[:, None]
        if DELTA:
            b_beta = tl.load(beta + i_bs * H + i_h).to(tl.float32)
            b_v = b_beta * (b_v - tl.sum(b_k[:, None] * b_S, axis=0))
        b_S += b_k[:, None] * b_v[None, :]
        tl.store(S_out + p_S, b_S, mask=m_kv)
        b_o += b_w * tl.sum(b_q[:, None] * b_S, axis=0)
    tl.store(o + i_bh * V + o_v, (b_o * scale).to(o.dtype.element_ty), mask=m_v)


def _launch(q, k, v, S, S_out, scale, g, g_gamma, beta, idx, w, NS, topk, routed):
    _check_device(q)
    B, H, K = q.shape
    V = v.shape[-1]
    if K > 256:
        raise ValueError(f"decode kernels hold the whole key dimension: K must be <= 256, got {K}")
    if S.dtype != torch.float32 or not S.is_contiguous():
        raise ValueError("the decode state must be a contiguous float32 tensor (it is updated in place)")
    if g is not None and g_gamma is not None:
        raise ValueError("pass either `g` (per token) or `g_gamma` (per head), not both")
    kind = GAMMA if g_gamma is not None else NONE if g is None else VECTOR if g.dim() == k.dim() else SCALAR
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), 4096 // BK))
    o = torch.empty(B, H, V, device=q.device, dtype=v.dtype)
    c = lambda x: None if x is None else x.contiguous()
    _step_kernel[(triton.cdiv(V, BV), B * H)](
        q.contiguous(), k.contiguous(), v.contiguous(), c(g), c(g_gamma), c(beta), S, S_out, c(idx), c(w), o, float(scale),
        H, K, V, S.shape[1] if routed else 1, NS, topk, BK, BV, kind, beta is not None, routed)
    return o


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, scale: float | None = None,
                   g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                   beta: torch.Tensor | None = None, inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of a diag-family rule (beta None) or the delta rule (beta `[B, H]`).

    q, k `[B, H, K]`, v `[B, H, V]`, state `[B, H, K, V]`, g None / `[B, H]` / `[B, H, K]` (log-decays)
    or g_gamma `[H]`. Returns (o `[B, H, V]` in v's dtype, the new state, float32). With `inplace` a
    contiguous float32 state is updated in place and returned; otherwise the new state goes to a new
    tensor (the same memory traffic: the kernel reads the old state once and writes the new one once).
    """
    scale = _scale(scale, q.shape[-1])
    if state.dtype != torch.float32 or not state.is_contiguous():
        state = state.float().contiguous()
    out = state if inplace else torch.empty_like(state)
    return _launch(q, k, v, state, out, scale, g, g_gamma, beta, None, None, 1, 0, False), out


def mom_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, states: torch.Tensor, indices: torch.Tensor,
             weights: torch.Tensor, scale: float | None = None, g: torch.Tensor | None = None,
             g_gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None, shared: bool = True) -> torch.Tensor:
    """One token of a Mixture-of-Memories layer; only the selected memories (and the shared one) are updated in place.

    q `[B, H, K]` (shared query); states `[B, Ms, H, K, V]` float32, Ms = M (+1: the shared memory, last);
    indices `[B, topk]` (distinct memory slots < M per row), weights `[B, topk]`; every memory's inputs
    k `[B, Ms, H, K]`, v `[B, Ms, H, V]`, g `[B, Ms, H]` / `[B, Ms, H, K]`, beta `[B, Ms, H]` (as one
    projection computes them; the kernel reads the rows of the memories it updates, no gather). Returns
    o = sum_s w_s scale S_s^T q over the selected memories (and the shared one with weight 1), `[B, H, V]`.
    """
    scale = _scale(scale, q.shape[-1])
    B, Ms = states.shape[:2]
    topk = indices.shape[1]
    if indices.shape != (B, topk) or weights.shape != (B, topk):
        raise ValueError(f"indices and weights must be [B, topk] = [{B}, topk], got {tuple(indices.shape)} and "
                         f"{tuple(weights.shape)}")
    if topk + int(shared) > Ms:
        raise ValueError(f"topk ({topk}){' + the shared memory' if shared else ''} exceeds the {Ms} memories in `states`")
    for name, t in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if t is not None and tuple(t.shape[:2]) != (B, Ms):
            raise ValueError(f"`{name}` must hold every memory's row, [B, Ms, ...] = [{B}, {Ms}, ...], got {tuple(t.shape)}")
    return _launch(q, k, v, states, states, scale, g, g_gamma, beta, indices, weights, topk + int(shared), topk, True)
