"""Chunked Triton kernels of the delta family (deltanet, gated_deltanet), forward and backward.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t,

with `a_t = exp(g_t)`, `g [B, T, H] <= 0` for gated_deltanet (`GATED`, a compile-time switch) and
`a_t = 1` for deltanet. The torch reference is `lsm.rules._delta.delta_chunk`; the algorithm is its
WY/UT form (Yang et al., 2024, "Parallelizing Linear Transformers with the Delta Rule"). Per chunk
of BT tokens entered with state S0, with the in-chunk cumulative log-decay G (G = 0 ungated) and
`D_ij = exp(G_i - G_j)` (j <= i, every exponent <= 0):

    1. _fwd_wy_kernel  (per chunk, head)
       A = strictly_lower(diag(beta) K K^T * D),  T = (I + A)^{-1} blockwise in registers (below),
       W = T diag(beta exp(G)) K, U = T diag(beta) V
    2. _fwd_h_kernel   (per V tile, sequence x head: the only loop, over the sequence's chunks)
       h_c = S0 (stored),  V_new = U - W S0,  S_end = exp(G_L) S0 + (K exp(G_L - G))^T V_new
    3. lsm_kernels.diag._fwd_o_kernel (per V tile, chunk, head), the diagonal-decay output kernel
       with V_new as values: o = scale ((Q exp(G)) S0 + tril(Q K^T * D) V_new)

Layout: q, k `[B, T, H, K]`, v `[B, T, H, V]`, beta / g `[B, T, H]`; states `[N, H, K, V]` float32.
Batches are packed sequences as in `lsm_kernels.diag` (`chunk_layout`): grids come from static
shapes, the chunk -> sequence maps live on the device, nothing synchronises with the host.
K (the key head dim) is at most 256: the state kernel holds a full `[K, BV]` state tile; V is tiled.

Backward: all Triton. When a gradient is needed the forward keeps T (`[B, T, H, BT]` float32); the
backward recomputes W, U from it (kernel 1) and h_c, V_new (kernel 2) instead of storing them.
With dS the gradient of the state leaving chunk c and dV_new the gradient of V_new:

    4. _bwd_dhu_kernel  (per V tile, sequence x head, chunks in reverse; stores dh_c = dS)
       dV_new = scale tril(Q K^T * D)^T dO + (K exp(G_L - G)) dS
       dS    <- exp(G_L) dS + scale (Q exp(G))^T dO - W^T dV_new        (dh0 = dS at the start)
    5. _bwd_dqkw_kernel (per K tile, chunk, head), with M = scale tril(dO V_new^T * D):
       dq = scale exp(G) (dO h_c^T) + M K,   dk = M^T Q + exp(G_L - G) (V_new dS^T),   dW = -dV_new h_c^T
       dG_i = q_i . dq_i - k_i . dk_i, plus exp(G_L) <h_c, dS> + sum_j k_j . dk^state_j at the last row
    6. _bwd_wy_kernel   (per chunk, head; T as the forward kept it)
       dT = dW (diag(beta exp(G)) K)^T + dU (diag(beta) V)^T  (dU = dV_new),  dA = -T^T dT T^T (strictly lower)
       dv = beta T^T dU,   dk += beta exp(G) T^T dW + (dA * D * beta) K + (dA * D * beta)^T K,
       dbeta_i = (T^T dU)_i . v_i + exp(G_i) (T^T dW)_i . k_i + sum_j dA_ij (K K^T * D)_ij,
       dG_i += beta_i exp(G_i) (T^T dW)_i . k_i + sum_j dA_ij A_ij - sum_j dA_ji A_ji,
       dg = the in-chunk reverse cumulative sum of dG.
The inverse T is formed once per chunk on 16 x 16 tiles (the idea of fla's solve_tril): with Dg the block
diagonal of I + A and Lo its strictly block-lower part, the BT / 16 diagonal blocks are inverted together by
forward substitution (16 steps of [BT / 16, 16, 16] work, not BT steps of [BT, BT]), then
T = (I + N)^{-1} Dg^{-1} = sum_{p < BT/16} (-N)^p Dg^{-1} with N = Dg^{-1} Lo, whose powers vanish past
BT / 16 - 1: BT / 16 matmuls on the tensor cores assemble the off-diagonal blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsm_kernels._common import (
    NONE,
    SCALAR,
    _blocks,
    _check_device,
    _chunk_rows,
    _chunk_size,
    _load_G_head,
    _prec,
    _scale,
    _tune,
    chunk_layout,
)
from lsm_kernels.diag import _fwd_o_kernel, _local_cumsum

MAX_K = 256


def _check_inputs(q: torch.Tensor) -> None:
    _check_device(q)
    if q.shape[-1] > MAX_K:
        raise ValueError(f"chunk_delta: the key head dim K (last dim of `q`, `k`) must be <= {MAX_K}, "
                         f"got {q.shape[-1]} (the state kernel holds a full [K, BV] state tile)")


def _state_blocks(K: int, V: int) -> tuple[int, int]:
    """(BK, BV) of the state kernels: BK covers all of K; BV keeps the state tile <= 8K floats."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, max(16, min(64, triton.next_power_of_2(V), 8192 // BK))


# ----------------------------------------------------------------------------------------- forward
@triton.jit
def _wy_solve(k, beta, G, Tm, rows, m_t, i_h, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
              GATED: tl.constexpr, T_MODE: tl.constexpr, PREC: tl.constexpr):
    """One chunk's beta `[BT]`, G `[BT]` (0 ungated), D (strictly lower, exp(G_i - G_j)), K K^T `[BT, BT]` and
    T = (I + strictly_lower(diag(beta) K K^T * D))^{-1} (float32): blockwise in registers (T_MODE 0), the same
    and stored to Tm `[B, T, H, BT]` (1), or loaded from Tm (2). BT is 16, 32 or 64."""
    o_t = tl.arange(0, BT)
    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.).to(tl.float32)
    b_KK = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = tl.load(k + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                      other=0.)
        b_KK += tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
    strict = (o_t[:, None] > o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if GATED:
        b_G = tl.load(G + rows * H + i_h, mask=m_t, other=0.)
        b_D = tl.exp(tl.where(strict, b_G[:, None] - b_G[None, :], float("-inf")))
    else:
        b_G = tl.zeros([BT], dtype=tl.float32)
        b_D = strict.to(tl.float32)
    # Tm is None unless T_MODE > 0: form its pointers only where it is used (triton 3.6 rejects None + tensor)
    if T_MODE == 2:
        b_T = tl.load(Tm + rows[:, None] * (H * BT) + i_h * BT + o_t[None, :], mask=m_t[:, None], other=0.)
    else:
        # blocked inverse on 16 x 16 tiles: I + A = Dg (I + N), Dg its block diagonal, N = Dg^{-1} Lo with Lo
        # the strictly block-lower part of A, so T = sum_{p < NS} (-N)^p Dg^{-1} (N^NS = 0, NS = BT / 16)
        NS: tl.constexpr = BT // 16
        b_A = b_KK * b_D * b_beta[:, None]                                      # strictly lower
        o_c = tl.arange(0, 16)
        o_s = tl.arange(0, NS)
        same = o_s[:, None, None, None] == o_s[None, None, :, None]             # [NS, 1, NS, 1] diagonal blocks
        # 1. the NS diagonal blocks at once: row i of L = Dg^{-1} - I is -a_i - sum_{j<i} a_ij L_j
        b_L = tl.sum(tl.where(same, tl.reshape(-b_A, [NS, 16, NS, 16]), 0.), axis=2)   # [NS, 16, 16]
        for i in range(1, 16):
            m_i = (o_c == i)[None, :, None]
            b_a = tl.sum(tl.where(m_i, b_L, 0.), axis=1)                        # [NS, 16] row i of every block
            b_a += tl.sum(b_a[:, :, None] * b_L, axis=1)
            b_L = tl.where(m_i, b_a[:, None, :], b_L)
        b_Di = tl.reshape(tl.where(same, b_L[:, :, None, :], 0.), [BT, BT]) + (o_t[:, None] == o_t[None, :]).to(tl.float32)
        # 2. the off-diagonal blocks: NS - 1 matmuls of the block-nilpotent N
        b_N = tl.dot(b_Di, tl.where(o_t[:, None] // 16 > o_t[None, :] // 16, b_A, 0.), input_precision=PREC)
        b_P = b_Di
        b_T = b_Di
        for _ in tl.static_range(1, NS):
            b_P = -tl.dot(b_N, b_P, input_precision=PREC)
            b_T += b_P
        if T_MODE == 1:
            tl.store(Tm + rows[:, None] * (H * BT) + i_h * BT + o_t[None, :], b_T, mask=m_t[:, None])
    return b_beta, b_G, b_D, b_KK, b_T


@_tune(["H", "K", "V", "BT", "BK", "BV", "GATED", "T_MODE"])
@triton.jit
def _fwd_wy_kernel(k, v, beta, G, Tm, w, u, cu, cseq, cloc, N, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, T_MODE: tl.constexpr,
                   PREC: tl.constexpr):
    """W = T diag(beta exp(G)) K, U = T diag(beta) V with T = (I + strictly_lower(diag(beta) K K^T * D))^{-1},
    for one (chunk, head)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    rows = t0 + tl.arange(0, BT)
    m_t = rows < eos
    b_beta, b_G, b_D, b_KK, b_T = _wy_solve(k, beta, G, Tm, rows, m_t, i_h, H, K, BT, BK, GATED, T_MODE, PREC)
    b_T = b_T.to(k.dtype.element_ty)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p, mask=m, other=0.).to(tl.float32)
        if GATED:
            b_kb = b_k * (b_beta * tl.exp(b_G))[:, None]
        else:
            b_kb = b_k * b_beta[:, None]
        b_w = tl.dot(b_T, b_kb.to(b_T.dtype), input_precision=PREC)
        tl.store(w + p, b_w.to(w.dtype.element_ty), mask=m)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m = m_t[:, None] & (o_v < V)[None, :]
        b_vb = tl.load(v + p, mask=m, other=0.).to(tl.float32) * b_beta[:, None]
        b_u = tl.dot(b_T, b_vb.to(b_T.dtype), input_precision=PREC)
        tl.store(u + p, b_u.to(u.dtype.element_ty), mask=m)


@_tune(["H", "K", "V", "BT", "BK", "BV", "GATED"])
@triton.jit
def _fwd_h_kernel(k, w, u, G, h, vn, h0, ht, cu, coff, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                  USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr):
    """One program per (V tile, sequence x head): walk the sequence's chunks; store h_c (the state entering
    chunk c) and V_new = U - W h_c; S <- exp(G_L) S + (K exp(G_L - G))^T V_new."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    nt = (eos - bos + BT - 1) // BT
    off = tl.load(coff + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh * K * V + p_kv, mask=m_kv, other=0.).to(tl.float32)
    for i in range(0, nt):
        tl.store(h + ((off + i) * H + i_h) * K * V + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        t0 = bos + i * BT
        rows = t0 + tl.arange(0, BT)
        m_t = rows < eos
        p_tk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        p_tv = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_w = tl.load(w + p_tk, mask=m_tk, other=0.)
        b_u = tl.load(u + p_tv, mask=m_tv, other=0.)
        b_vn = b_u.to(tl.float32) - tl.dot(b_w, b_h.to(b_w.dtype), input_precision=PREC)
        tl.store(vn + p_tv, b_vn.to(vn.dtype.element_ty), mask=m_tv)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.)
        if GATED:
            b_G, b_Gl = _load_G_head(G, G, t0, eos, i_h, H, BT, 2)
            b_k = (b_k * tl.exp(tl.where(m_t, b_Gl - b_G, float("-inf")))[:, None]).to(b_k.dtype)
            b_h *= tl.exp(b_Gl)
        b_h += tl.dot(tl.trans(b_k), b_vn.to(b_k.dtype), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + p_kv, b_h, mask=m_kv)


# ----------------------------------------------------------------------------------------- backward
@_tune(["H", "K", "V", "BT", "BK", "BV", "GATED"])
@triton.jit
def _bwd_dhu_kernel(q, k, w, G, do, dh, dv, dht, dh0, cu, coff, scale, H: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr):
    """Walk a sequence's chunks backwards (one V tile, all of K); dS = gradient of the state leaving chunk c.
    Stores dh_c = dS and dV_new = scale tril(Q K^T * D)^T dO + (K exp(G_L - G)) dS (float32), then
    dS <- exp(G_L) dS + scale (Q exp(G))^T dO - W^T dV_new."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    nt = (eos - bos + BT - 1) // BT
    off = tl.load(coff + i_n).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dS += tl.load(dht + i_nh * K * V + p_kv, mask=m_kv, other=0.)
    for ii in range(0, nt):
        i = nt - 1 - ii
        tl.store(dh + ((off + i) * H + i_h) * K * V + p_kv, b_dS.to(dh.dtype.element_ty), mask=m_kv)
        t0 = bos + i * BT
        rows = t0 + o_t
        m_t = rows < eos
        p_tk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        p_tv = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.)
        b_w = tl.load(w + p_tk, mask=m_tk, other=0.)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.)
        b_At = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)                    # [j, i] = k_j . q_i
        causal_t = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]
        if GATED:
            b_G, b_Gl = _load_G_head(G, G, t0, eos, i_h, H, BT, 2)
            b_At *= tl.exp(tl.where(causal_t, b_G[None, :] - b_G[:, None], float("-inf")))
            b_kd = (b_k * tl.exp(tl.where(m_t, b_Gl - b_G, float("-inf")))[:, None]).to(b_k.dtype)
            b_qg = (b_q * tl.exp(b_G)[:, None]).to(b_q.dtype)
        else:
            b_At = tl.where(causal_t, b_At, 0.)
            b_kd = b_k
            b_qg = b_q
        b_dv = tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC) * scale \
            + tl.dot(b_kd, b_dS.to(b_kd.dtype), input_precision=PREC)
        tl.store(dv + p_tv, b_dv, mask=m_tv)
        if GATED:
            b_dS *= tl.exp(b_Gl)
        b_dS += tl.dot(tl.trans(b_qg), b_do, input_precision=PREC) * scale \
            - tl.dot(tl.trans(b_w), b_dv.to(b_w.dtype), input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + p_kv, b_dS, mask=m_kv)


@_tune(["H", "K", "V", "BT", "BK", "BV", "GATED"])
@triton.jit
def _bwd_dqkw_kernel(q, k, vn, G, h, dh, do, dv, dq, dk, dw, dG, cu, cseq, cloc, N, T_all, scale, H: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     GATED: tl.constexpr, PREC: tl.constexpr):
    """One (K tile, chunk, head): dq (final); the output and state parts of dk and dW = -dV_new h_c^T (float32);
    this K tile's share of dG (gradient of the cumulative log-decay through the output and the state),
    dG `[NK, B*T, H]`."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    o_t = tl.arange(0, BT)
    rows = t0 + o_t
    m_t = rows < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_tk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dM = tl.zeros([BT, BT], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_tv = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.)
        b_vn = tl.load(vn + p_tv, mask=m_tv, other=0.)
        b_dv = tl.load(dv + p_tv, mask=m_tv, other=0.)
        p_vk = (i_t * H + i_h).to(tl.int64) * K * V + o_k[None, :] * V + o_v[:, None]   # [BV, BK] view of [K, V]
        b_h = tl.load(h + p_vk, mask=m_k[None, :] & m_v[:, None] & (eos > t0), other=0.)  # unused slots: garbage
        b_dh = tl.load(dh + p_vk, mask=m_k[None, :] & m_v[:, None] & (eos > t0), other=0.)
        b_dq += tl.dot(b_do, b_h.to(b_do.dtype), input_precision=PREC)
        b_dM += tl.dot(b_do, tl.trans(b_vn), input_precision=PREC)
        b_dks += tl.dot(b_vn, b_dh.to(b_vn.dtype), input_precision=PREC)
        b_dw -= tl.dot(b_dv.to(b_do.dtype), b_h.to(b_do.dtype), input_precision=PREC)
        if GATED:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.)
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if GATED:
        b_G, b_Gl = _load_G_head(G, G, t0, eos, i_h, H, BT, 2)
        b_dq *= scale * tl.exp(b_G)[:, None]
        b_dks *= tl.exp(tl.where(m_t, b_Gl - b_G, float("-inf")))[:, None]
        b_M = b_dM * scale * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
    else:
        b_dq *= scale
        b_M = tl.where(causal, b_dM * scale, 0.)
    b_M = b_M.to(b_q.dtype)
    b_dq += tl.dot(b_M, b_k, input_precision=PREC)
    b_dk = b_dks + tl.dot(tl.trans(b_M), b_q, input_precision=PREC)
    if GATED:
        b_kf = b_k.to(tl.float32)
        b_x = tl.sum(b_q.to(tl.float32) * b_dq - b_kf * b_dk, axis=1)
        last = tl.minimum(t0 + BT, eos) - 1
        b_last = tl.exp(b_Gl) * tl.sum(b_hdh, axis=0) + tl.sum(tl.sum(b_kf * b_dks, axis=1), axis=0)
        b_x += tl.where(rows == last, b_last, 0.)
        tl.store(dG + (i_k * T_all + rows) * H + i_h, b_x, mask=m_t)
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_tk, b_dk, mask=m_tk)
    tl.store(dw + p_tk, b_dw, mask=m_tk)


@_tune(["H", "K", "V", "BT", "BK", "BV", "NK", "GATED"])
@triton.jit
def _bwd_wy_kernel(k, v, beta, G, Tm, dw, du, dk_in, dG_in, dk, dv, dbeta, dg, cu, cseq, cloc, N, T_all,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, NK: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr):
    """One (chunk, head), T loaded as the forward stored it: back through W = T diag(beta exp(G)) K,
    U = T diag(beta) V, T = (I + A)^{-1}:
    dT = dW (beta exp(G) K)^T + dU (beta V)^T, dA = -strictly_lower(T^T dT T^T); finishes dk, dv, dbeta and
    dg (the in-chunk reverse cumulative sum of dG)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    rows = t0 + tl.arange(0, BT)
    m_t = rows < eos
    b_beta, b_G, b_D, b_KK, b_T = _wy_solve(k, beta, G, Tm, rows, m_t, i_h, H, K, BT, BK, GATED, 2, PREC)
    b_bg = b_beta * tl.exp(b_G)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + p, mask=m, other=0.).to(tl.float32)
        b_du = tl.load(du + p, mask=m, other=0.)
        b_dT += tl.dot(b_du, tl.trans(b_v * b_beta[:, None]), input_precision=PREC)
        b_dvb = tl.dot(tl.trans(b_T), b_du, input_precision=PREC)
        b_db += tl.sum(b_dvb * b_v, axis=1)
        tl.store(dv + p, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p, mask=m, other=0.).to(tl.float32)
        b_dw = tl.load(dw + p, mask=m, other=0.)
        b_dT += tl.dot(b_dw, tl.trans(b_k * b_bg[:, None]), input_precision=PREC)
    b_dA = -tl.dot(tl.dot(tl.trans(b_T), b_dT, input_precision=PREC), tl.trans(b_T), input_precision=PREC)
    b_dA = b_dA * b_D                                                                # strictly lower, times D
    b_dAk = b_dA * b_KK
    b_db += tl.sum(b_dAk, axis=1)
    b_dA *= b_beta[:, None]                                                           # dA_ij beta_i D_ij
    b_dGx = tl.zeros([BT], dtype=tl.float32)
    if GATED:
        b_dAk *= b_beta[:, None]                                                      # dA_ij A_ij
        b_dGx += tl.sum(b_dAk, axis=1) - tl.sum(b_dAk, axis=0)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        p = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + p, mask=m, other=0.).to(tl.float32)
        b_dw = tl.load(dw + p, mask=m, other=0.)
        b_dkb = tl.dot(tl.trans(b_T), b_dw, input_precision=PREC)                 # d(beta exp(G) K)
        b_x = tl.sum(b_dkb * b_k, axis=1) * tl.exp(b_G)
        b_db += b_x
        b_dGx += b_x * b_beta
        b_dk = tl.load(dk_in + p, mask=m, other=0.) + b_dkb * b_bg[:, None] \
            + tl.dot(b_dA, b_k, input_precision=PREC) + tl.dot(tl.trans(b_dA), b_k, input_precision=PREC)
        tl.store(dk + p, b_dk.to(dk.dtype.element_ty), mask=m)
    tl.store(dbeta + rows * H + i_h, b_db, mask=m_t)
    if GATED:
        for i_x in range(0, NK):
            b_dGx += tl.load(dG_in + (i_x * T_all + rows) * H + i_h, mask=m_t, other=0.)
        tl.store(dg + rows * H + i_h, tl.sum(b_dGx, axis=0) - tl.cumsum(b_dGx, axis=0) + b_dGx, mask=m_t)


# ----------------------------------------------------------------------------------------- launchers
def _states(k, w, u, G, h0, cu, coff, N, NT, BT, gated, prec):
    """Launch _fwd_h_kernel: (h `[NT, H, K, V]`, V_new `[B, T, H, V]`, final states `[N, H, K, V]` float32)."""
    H, K = k.shape[-2:]
    V = u.shape[-1]
    BK, BV = _state_blocks(K, V)
    h = k.new_empty(NT, H, K, V)
    vn = torch.empty_like(u)
    ht = torch.empty(N, H, K, V, device=k.device, dtype=torch.float32)
    _fwd_h_kernel[(triton.cdiv(V, BV), N * H)](k, w, u, G, h, vn, h0, ht, cu, coff, H, K, V, BT, BK, BV, gated,
                                               h0 is not None, True, prec)
    return h, vn, ht


def delta_fwd(q, k, v, beta, G, h0, scale, meta, BT, output_final_state, keep_T=False):
    """Forward kernels 1-3. G: in-chunk cumulative log-decay `[B, T, H]` float32 or None. Returns (o, final
    states or None, T `[B, T, H, BT]` float32 for the backward if keep_T else None)."""
    cu, cseq, cloc, coff, N, NT = meta
    B, T, H, K = q.shape
    V = v.shape[-1]
    gated = G is not None
    prec = _prec(q.dtype)
    BKw, BVw = _blocks(K, V)
    w, u = torch.empty_like(k), torch.empty_like(v)
    Tm = q.new_empty(B, T, H, BT, dtype=torch.float32) if keep_T else None
    _fwd_wy_kernel[(NT, H)](k, v, beta, G, Tm, w, u, cu, cseq, cloc, N, H, K, V, BT, BKw, BVw, gated, int(keep_T),
                            prec)
    h, vn, ht = _states(k, w, u, G, h0, cu, coff, N, NT, BT, gated, prec)
    o = torch.empty_like(v)
    _fwd_o_kernel[(triton.cdiv(V, BVw), NT, H)](q, k, vn, G, G, h, None, o, cu, cseq, cloc, N, scale, H, K, V, BT,
                                                BKw, BVw, SCALAR if gated else NONE, prec)
    return o, (ht if output_final_state else None), Tm


def delta_bwd(q, k, v, beta, G, Tm, h0, do, dht, scale, meta, BT):
    """Backward kernels: returns dq, dk, dv (input dtype), dbeta, dg (float32; dg None ungated), dh0 (float32)."""
    cu, cseq, cloc, coff, N, NT = meta
    B, T, H, K = q.shape
    V = v.shape[-1]
    gated = G is not None
    prec = _prec(q.dtype)
    BKw, BVw = _blocks(K, V)
    BKs, BVs = _state_blocks(K, V)
    NK = triton.cdiv(K, BKw)
    w, u = torch.empty_like(k), torch.empty_like(v)
    _fwd_wy_kernel[(NT, H)](k, v, beta, G, Tm, w, u, cu, cseq, cloc, N, H, K, V, BT, BKw, BVw, gated, 2, prec)
    h, vn, _ = _states(k, w, u, G, h0, cu, coff, N, NT, BT, gated, prec)
    f32 = dict(device=q.device, dtype=torch.float32)
    dh = q.new_empty(NT, H, K, V)
    du = torch.empty(B, T, H, V, **f32)
    dh0 = torch.empty(N, H, K, V, **f32) if h0 is not None else None
    _bwd_dhu_kernel[(triton.cdiv(V, BVs), N * H)](q, k, w, G, do, dh, du, dht, dh0, cu, coff, scale, H, K, V, BT,
                                                  BKs, BVs, gated, dht is not None, h0 is not None, prec)
    dq = torch.empty_like(q)
    dk32, dw = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32)
    dG = torch.empty(NK, B * T, H, **f32) if gated else None
    _bwd_dqkw_kernel[(NK, NT, H)](q, k, vn, G, h, dh, do, du, dq, dk32, dw, dG, cu, cseq, cloc, N, B * T, scale, H, K,
                                  V, BT, BKw, BVw, gated, prec)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dbeta = torch.empty(B, T, H, **f32)
    dg = torch.empty(B, T, H, **f32) if gated else None
    _bwd_wy_kernel[(NT, H)](k, v, beta, G, Tm, dw, du, dk32, dG, dk, dv, dbeta, dg, cu, cseq, cloc, N, B * T, H, K, V,
                            BT, BKw, BVw, NK, gated, prec)
    return dq, dk, dv, dbeta, dg, dh0


class DeltaChunkFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels; see `chunk_delta`."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, cu_seqlens, chunk_size, output_final_state):
        q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
        B, T = q.shape[:2]
        meta = chunk_layout(B, T, cu_seqlens, chunk_size, q.device)
        G = _local_cumsum(g.contiguous(), meta, chunk_size) if g is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        o, ht, Tm = delta_fwd(q, k, v, beta, G, h0, scale, meta, chunk_size, output_final_state,
                              keep_T=any(ctx.needs_input_grad[:6]))
        ctx.save_for_backward(q, k, v, beta, G, Tm, h0, *meta[:4])
        ctx.meta_n = meta[4:]
        ctx.cfg = (scale, chunk_size, beta.dtype, g.dtype if g is not None else None,
                   initial_state.dtype if initial_state is not None else None)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, G, Tm, h0, *maps = ctx.saved_tensors
        meta = (*maps, *ctx.meta_n)
        scale, BT, beta_dtype, g_dtype, h0_dtype = ctx.cfg
        dht = dht.float().contiguous() if dht is not None else None
        dq, dk, dv, dbeta, dg, dh0 = delta_bwd(q, k, v, beta, G, Tm, h0, do.contiguous(), dht, scale, meta, BT)
        return (dq, dk, dv, dbeta.to(beta_dtype), dg.to(g_dtype) if dg is not None else None,
                dh0.to(h0_dtype) if dh0 is not None else None, None, None, None, None)


def chunk_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None = None,
                scale: float | None = None, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked delta rule (Triton), differentiable in q, k, v, beta, g, initial_state.

    q, k `[B, T, H, K]` (k L2-normalised by the caller), v `[B, T, H, V]`, beta `[B, T, H]` >= 0,
    g None (deltanet) or `[B, T, H]` log-decays <= 0 (gated_deltanet); initial_state `[N, H, K, V]`;
    cu_seqlens `[N+1]` with B = 1 (stays on the device). chunk_size is rounded to a power of two in
    [16, 64]. Returns (o `[B, T, H, V]` in v's dtype, final state `[N, H, K, V]` float32 or None).
    K up to 256; V any size (tiled).
    """
    _check_inputs(q)
    return DeltaChunkFunction.apply(q, k, v, beta, g, initial_state, _scale(scale, q.shape[-1]), cu_seqlens,
                                    _chunk_size(chunk_size),
                                    bool(output_final_state))
