"""Chunked Triton kernels of the diagonal-decay family, forward and backward.

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t,   g = log(alpha) <= 0

written once for four decay kinds, a compile-time switch (`DECAY`):

    NONE   (linear_attention)  no decay
    GAMMA  (retnet, lightning) a constant log-decay per head, `g_gamma [H]`
    SCALAR (mamba2)            a per-token log-decay per head, `g [B, T, H]`
    VECTOR (gla, hgrn2)        a per-token log-decay per key channel, `g [B, T, H, K]`

Layout: q, k `[B, T, H, K]`, v `[B, T, H, V]`; states `[N, H, K, V]` float32. A batch is always
handled as packed sequences: without `cu_seqlens` the B rows are B sequences of length T. Every
launch grid is sized from static shapes (for packed batches the number of chunks is bounded by
`ceil(T / BT) + N`), and the chunk -> sequence map is built on the device, so nothing here
synchronises with the host. Programs of unused chunk slots mask all their loads and stores.

Per chunk of BT tokens, with the in-chunk cumulative log-decay `G_i = sum_{j<=i} g_j` (G_L at the
chunk's last token), the kernels compute
    states:  h_{c+1} = exp(G_L) h_c + sum_j (k_j exp(G_L - G_j)) v_j^T             (_fwd_h)
    output:  o_i = scale [(q_i exp(G_i)) h_c + sum_{j<=i} A_ij v_j],
             A_ij = sum_k q_ik k_jk exp(G_ik - G_jk)                               (_fwd_o, _fwd_A)
and only ever exponentiate non-positive differences of G, so strong decays cannot overflow. For
VECTOR decays A needs one exponent per (i, j, k): blocks of BC x BC sub-chunks off the diagonal
factor through the cumulative decay at a row between them, diagonal blocks are formed elementwise, one row
or column of the sub-chunk at a time.

Backward (dH_c = gradient of the state at the end of chunk c):
    dH_{c-1} = exp(G_L) dH_c + scale (q exp(G))^T do                              (_bwd_dh)
    dv_j = scale sum_{i>=j} A_ij do_i + (k_j exp(G_L - G_j)) dH_c                  (_bwd_dv)
    dq_i = scale [exp(G_i) (do_i h_c^T) + sum_{j<=i} dA_ij k_j exp(G_i - G_j)]     (_bwd_dqk, _bwd_intra)
    dk_j = exp(G_L - G_j) (v_j dH_c^T) + sum_{i>=j} dA_ij q_i exp(G_i - G_j),  dA_ij = do_i . v_j
    dg_t = sum_{u>=t in chunk} (q_u dq_u - k_u dk_u) + exp(G_L) rowsum(h_c dH_c) + sum_j k_j dk^state_j   (_bwd_dg)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsm_kernels._common import (
    GAMMA,
    NONE,
    SCALAR,
    VECTOR,
    _blocks,
    _check_device,
    _chunk_rows,
    _chunk_size,
    _load_G_head,
    _prec,
    _scale,
    _tune,
    chunk_layout,
    decay_kind,
)


# ----------------------------------------------------------------------------------------- forward
@triton.jit
def _cumsum_kernel(g, G, cu, cseq, cloc, N, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, VEC: tl.constexpr):
    """G = in-chunk cumulative sum of g, float32."""
    i_t, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    rows = t0 + tl.arange(0, BT)
    m_t = rows < eos
    if VEC:
        o_k = i_k * BK + tl.arange(0, BK)
        p = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        m = m_t[:, None] & (o_k < K)[None, :]
        b_g = tl.load(g + p, mask=m, other=0.).to(tl.float32)
        tl.store(G + p, tl.cumsum(b_g, axis=0), mask=m)
    else:
        b_g = tl.load(g + rows * H + i_h, mask=m_t, other=0.).to(tl.float32)
        tl.store(G + rows * H + i_h, tl.cumsum(b_g, axis=0), mask=m_t)


@_tune(["H", "K", "V", "BT", "BK", "BV", "DECAY"])
@triton.jit
def _fwd_h_kernel(k, v, G, gamma, h, h0, ht, cu, coff, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                  USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr):
    """One program per (K tile, V tile, sequence x head): walk the sequence's chunks, store h_c."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    nt = (eos - bos + BT - 1) // BT
    off = tl.load(coff + i_n).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh * K * V + p_kv, mask=m_kv, other=0.).to(tl.float32)
    for i in range(0, nt):
        tl.store(h + ((off + i) * H + i_h) * K * V + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        t0 = bos + i * BT
        rows = t0 + tl.arange(0, BT)
        m_t = rows < eos
        b_k = tl.load(k + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.)
        b_v = tl.load(v + rows[:, None] * (H * V) + i_h * V + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :], other=0.)
        if DECAY == 1 or DECAY == 2:
            b_G, b_Gl = _load_G_head(G, gamma, t0, eos, i_h, H, BT, DECAY)
            b_k = (b_k * tl.exp(tl.where(m_t, b_Gl - b_G, float("-inf")))[:, None]).to(b_v.dtype)
            b_h *= tl.exp(b_Gl)
        elif DECAY == 3:
            last = tl.minimum(t0 + BT, eos) - 1
            b_G = tl.load(G + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.)
            b_Gl = tl.load(G + last * (H * K) + i_h * K + o_k, mask=o_k < K, other=0.)
            b_k = (b_k * tl.exp(tl.where(m_t[:, None], b_Gl[None, :] - b_G, float("-inf")))).to(b_v.dtype)
            b_h *= tl.exp(b_Gl)[:, None]
        b_h += tl.dot(tl.trans(b_k), b_v, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + p_kv, b_h, mask=m_kv)


@_tune(["H", "K", "BT", "BC", "BK"])
@triton.jit
def _fwd_A_kernel(q, k, G, A, cu, cseq, cloc, N, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                  BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """VECTOR decay: A_ij = sum_k q_ik k_jk exp(G_ik - G_jk) (i >= j) for the rows of one BC sub-chunk."""
    i_c, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    o_c = tl.arange(0, BC)
    r0 = t0 + i_c * BC
    rows_i = r0 + o_c
    m_i = rows_i < eos
    p_A = A + rows_i[:, None] * (H * BT) + i_h * BT
    for j_c in range(0, i_c):
        rows_j = t0 + j_c * BC + o_c
        m_j = (rows_j < eos) & (r0 < eos)  # a sub-chunk past the end has no r0: exp(-G_j) would overflow
        b_A = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            p_i = rows_i[:, None] * (H * K) + i_h * K + o_k[None, :]
            p_j = rows_j[:, None] * (H * K) + i_h * K + o_k[None, :]
            b_q = tl.load(q + p_i, mask=m_i[:, None] & m_k[None, :], other=0.).to(tl.float32)
            b_Gi = tl.load(G + p_i, mask=m_i[:, None] & m_k[None, :], other=0.)
            b_k = tl.load(k + p_j, mask=m_j[:, None] & m_k[None, :], other=0.).to(tl.float32)
            b_Gj = tl.load(G + p_j, mask=m_j[:, None] & m_k[None, :], other=0.)
            b_Gr = tl.load(G + r0 * (H * K) + i_h * K + o_k, mask=m_k & (r0 < eos), other=0.)
            # folded factors are <= 1: the operands go back to the input dtype (bf16 tensor cores)
            b_qg = (b_q * tl.exp(tl.where(m_i[:, None], b_Gi - b_Gr[None, :], float("-inf")))).to(q.dtype.element_ty)
            b_kg = (b_k * tl.exp(tl.where(m_j[:, None], b_Gr[None, :] - b_Gj, float("-inf")))).to(k.dtype.element_ty)
            b_A += tl.dot(b_qg, tl.trans(b_kg), input_precision=PREC)
        tl.store(p_A + (j_c * BC + o_c)[None, :], b_A, mask=m_i[:, None])
    # the diagonal block, one column j at a time on [BC, BK] tiles (no [BC, BC, BK] broadcast): one exponent per
    # (i, j, k) with i >= j, each of a non-positive difference
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_i = rows_i[:, None] * (H * K) + i_h * K + o_k[None, :]
        b_q = tl.load(q + p_i, mask=m_i[:, None] & m_k[None, :], other=0.).to(tl.float32)
        b_G = tl.load(G + p_i, mask=m_i[:, None] & m_k[None, :], other=0.)
        for j in range(0, BC):
            m_r = r0 + j < eos
            p_r = (r0 + j) * (H * K) + i_h * K + o_k
            b_kr = tl.load(k + p_r, mask=m_k & m_r, other=0.).to(tl.float32)
            b_Gr = tl.load(G + p_r, mask=m_k & m_r, other=0.)
            m_c = (o_c >= j) & m_i & m_r
            b_col = tl.sum(b_q * b_kr[None, :] * tl.exp(tl.where(m_c[:, None], b_G - b_Gr[None, :], float("-inf"))), axis=1)
            b_A += tl.where(o_c[None, :] == j, b_col[:, None], 0.)
    tl.store(p_A + (i_c * BC + o_c)[None, :], b_A, mask=m_i[:, None])
    for j_c in range(i_c + 1, NC):
        tl.store(p_A + (j_c * BC + o_c)[None, :], tl.zeros([BC, BC], dtype=tl.float32), mask=m_i[:, None])


@_tune(["H", "K", "V", "BT", "BK", "BV", "DECAY"])
@triton.jit
def _fwd_o_kernel(q, k, v, G, gamma, h, A, o, cu, cseq, cloc, N, scale, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                  PREC: tl.constexpr):
    """o = scale [(q exp(G)) h_c + A v] for one (V tile, chunk, head)."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    o_t = tl.arange(0, BT)
    rows = t0 + o_t
    m_t = rows < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_qk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        b_q = tl.load(q + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.)
        b_h = tl.load(h + (i_t * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :] & (eos > t0), other=0.).to(b_q.dtype)
        if DECAY == 3:
            b_G = tl.load(G + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.)
            b_o += tl.dot((b_q * tl.exp(b_G)).to(b_q.dtype), b_h, input_precision=PREC)
        else:
            b_o += tl.dot(b_q, b_h, input_precision=PREC)
            b_k = tl.load(k + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.)
            b_A += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if DECAY == 0:
        b_A = tl.where(causal, b_A, 0.)
    elif DECAY == 1 or DECAY == 2:
        b_G, b_Gl = _load_G_head(G, gamma, t0, eos, i_h, H, BT, DECAY)
        b_o *= tl.exp(b_G)[:, None]
        b_A *= tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
    else:
        b_A = tl.load(A + rows[:, None] * (H * BT) + i_h * BT + o_t[None, :], mask=m_t[:, None], other=0.)
    b_v = tl.load(v + rows[:, None] * (H * V) + i_h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
    b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
    tl.store(o + rows[:, None] * (H * V) + i_h * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------- backward
@_tune(["H", "K", "V", "BT", "BK", "BV", "DECAY"])
@triton.jit
def _bwd_dh_kernel(q, do, G, gamma, dh, dht, dh0, cu, coff, scale, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                   USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr):
    """Walk a sequence's chunks backwards; store dH_c, the gradient of the state at the end of chunk c."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    nt = (eos - bos + BT - 1) // BT
    off = tl.load(coff + i_n).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh * K * V + p_kv, mask=m_kv, other=0.).to(tl.float32)
    for ii in range(0, nt):
        i = nt - 1 - ii
        tl.store(dh + ((off + i) * H + i_h) * K * V + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        t0 = bos + i * BT
        rows = t0 + tl.arange(0, BT)
        m_t = rows < eos
        b_q = tl.load(q + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.)
        b_do = tl.load(do + rows[:, None] * (H * V) + i_h * V + o_v[None, :], mask=m_t[:, None] & (o_v < V)[None, :], other=0.)
        if DECAY == 1 or DECAY == 2:
            b_G, b_Gl = _load_G_head(G, gamma, t0, eos, i_h, H, BT, DECAY)
            b_q = (b_q * tl.exp(b_G)[:, None]).to(b_do.dtype)
            b_dh *= tl.exp(b_Gl)
        elif DECAY == 3:
            last = tl.minimum(t0 + BT, eos) - 1
            b_G = tl.load(G + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.)
            b_Gl = tl.load(G + last * (H * K) + i_h * K + o_k, mask=o_k < K, other=0.)
            b_q = (b_q * tl.exp(b_G)).to(b_do.dtype)
            b_dh *= tl.exp(b_Gl)[:, None]
        b_dh += tl.dot(tl.trans(b_q), b_do, input_precision=PREC) * scale
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + p_kv, b_dh, mask=m_kv)


@_tune(["H", "K", "V", "BT", "BK", "BV", "DECAY"])
@triton.jit
def _bwd_dv_kernel(q, k, do, G, gamma, dh, A, dv, cu, cseq, cloc, N, scale, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                   PREC: tl.constexpr):
    """dv = scale A^T do + (k exp(G_L - G)) dH_c for one (V tile, chunk, head)."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    o_t = tl.arange(0, BT)
    rows = t0 + o_t
    m_t = rows < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    if DECAY == 1 or DECAY == 2:
        b_G, b_Gl = _load_G_head(G, gamma, t0, eos, i_h, H, BT, DECAY)
    last = tl.minimum(t0 + BT, eos) - 1
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_At = tl.zeros([BT, BT], dtype=tl.float32)                            # [j, i]
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_qk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        b_k = tl.load(k + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.)
        b_dh = tl.load(dh + (i_t * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                       mask=m_k[:, None] & m_v[None, :] & (eos > t0), other=0.).to(b_k.dtype)
        if DECAY == 0:
            b_kd = b_k
        elif DECAY == 3:
            b_Gk = tl.load(G + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.)
            b_Glk = tl.load(G + last * (H * K) + i_h * K + o_k, mask=m_k & (last >= t0), other=0.)
            b_kd = (b_k * tl.exp(tl.where(m_t[:, None], b_Glk[None, :] - b_Gk, float("-inf")))).to(b_k.dtype)
        else:
            b_kd = (b_k * tl.exp(tl.where(m_t, b_Gl - b_G, float("-inf")))[:, None]).to(b_k.dtype)
        b_dv += tl.dot(b_kd, b_dh, input_precision=PREC)
        if DECAY != 3:
            b_q = tl.load(q + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.)
            b_At += tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
    causal_t = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if DECAY == 0:
        b_At = tl.where(causal_t, b_At, 0.)
    elif DECAY == 1 or DECAY == 2:
        b_At *= tl.exp(tl.where(causal_t, b_G[None, :] - b_G[:, None], float("-inf")))
    else:
        b_At = tl.load(A + rows[None, :] * (H * BT) + i_h * BT + o_t[:, None], mask=m_t[None, :], other=0.)
    b_do = tl.load(do + rows[:, None] * (H * V) + i_h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
    b_dv += tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC) * scale
    tl.store(dv + rows[:, None] * (H * V) + i_h * V + o_v[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@_tune(["H", "K", "V", "BT", "BK", "BV", "DECAY"])
@triton.jit
def _bwd_dqk_kernel(q, k, v, do, G, gamma, h, dh, dq, dk, dA, Dc, dgx, cu, cseq, cloc, N, T_all, scale,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr):
    """dq, dk for one (K tile, chunk, head). VECTOR decays write float32 partial dq, dk and dA, and leave
    the intra-chunk part to _bwd_intra_kernel. For dg: Dc = exp(G_L) rowsum(h_c dH_c) + sum_j k_j dk^state_j
    and, for head decays, this K tile's share of sum_k (q dq - k dk) per row, dgx `[NK, B*T, H]`."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    o_t = tl.arange(0, BT)
    rows = t0 + o_t
    m_t = rows < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_qk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
    m_qk = m_t[:, None] & m_k[None, :]
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_tv = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        b_do = tl.load(do + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.)
        b_v = tl.load(v + p_tv, mask=m_t[:, None] & m_v[None, :], other=0.)
        p_vk = (i_t * H + i_h).to(tl.int64) * K * V + o_k[None, :] * V + o_v[:, None]   # [BV, BK] view of [K, V]
        b_h = tl.load(h + p_vk, mask=m_k[None, :] & m_v[:, None] & (eos > t0), other=0.)   # unused slots hold garbage
        b_dh = tl.load(dh + p_vk, mask=m_k[None, :] & m_v[:, None] & (eos > t0), other=0.)
        b_dq += tl.dot(b_do, b_h.to(b_do.dtype), input_precision=PREC)
        b_dk += tl.dot(b_v, b_dh.to(b_v.dtype), input_precision=PREC)
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        if DECAY != 0:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
    b_q = tl.load(q + p_qk, mask=m_qk, other=0.)
    b_k = tl.load(k + p_qk, mask=m_qk, other=0.)
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if DECAY == 0:
        b_dq *= scale
        b_dA = tl.where(causal, b_dA * scale, 0.).to(b_q.dtype)
        b_dq += tl.dot(b_dA, b_k, input_precision=PREC)
        b_dk += tl.dot(tl.trans(b_dA), b_q, input_precision=PREC)
    elif DECAY == 1 or DECAY == 2:
        b_G, b_Gl = _load_G_head(G, gamma, t0, eos, i_h, H, BT, DECAY)
        b_dq *= scale * tl.exp(b_G)[:, None]
        b_dk *= tl.exp(tl.where(m_t, b_Gl - b_G, float("-inf")))[:, None]
        tl.store(Dc + (i_t * H + i_h).to(tl.int64) * K + o_k,
                 tl.exp(b_Gl) * b_hdh + tl.sum(b_k.to(tl.float32) * b_dk, axis=0), mask=m_k)
        b_dA = (b_dA * scale * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))).to(b_q.dtype)
        b_dq += tl.dot(b_dA, b_k, input_precision=PREC)
        b_dk += tl.dot(tl.trans(b_dA), b_q, input_precision=PREC)
        b_x = tl.sum(b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, axis=1)
        tl.store(dgx + (i_k * T_all + rows) * H + i_h, b_x, mask=m_t)
    else:
        last = tl.minimum(t0 + BT, eos) - 1
        b_G = tl.load(G + p_qk, mask=m_qk, other=0.)
        b_Gl = tl.load(G + last * (H * K) + i_h * K + o_k, mask=m_k & (last >= t0), other=0.)
        b_dq *= scale * tl.exp(b_G)
        b_dk *= tl.exp(tl.where(m_t[:, None], b_Gl[None, :] - b_G, float("-inf")))
        tl.store(Dc + (i_t * H + i_h).to(tl.int64) * K + o_k,
                 tl.exp(b_Gl) * b_hdh + tl.sum(b_k.to(tl.float32) * b_dk, axis=0), mask=m_k)
        if i_k == 0:
            tl.store(dA + rows[:, None] * (H * BT) + i_h * BT + o_t[None, :], tl.where(causal, b_dA * scale, 0.),
                     mask=m_t[:, None])
    tl.store(dq + p_qk, b_dq.to(dq.dtype.element_ty), mask=m_qk)
    tl.store(dk + p_qk, b_dk.to(dk.dtype.element_ty), mask=m_qk)


@triton.jit
def _bwd_intra_kernel(q, k, G, dA, dq32, dk32, dq, dk, dgx, cu, cseq, cloc, N, H: tl.constexpr, K: tl.constexpr,
                      BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """VECTOR decay, rows of one BC sub-chunk: dq_i = dq32_i + sum_{j<=i} dA_ij k_j exp(G_i - G_j),
    dk_j = dk32_j + sum_{i>=j} dA_ij q_i exp(G_i - G_j); also dgx = q dq - k dk (float32)."""
    i_c, i_t, i_hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    NK: tl.constexpr = (K + BK - 1) // BK
    i_h, i_k = i_hk // NK, i_hk % NK
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    o_c = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    r0 = t0 + i_c * BC
    rows_i = r0 + o_c
    m_i = rows_i < eos
    p_i = rows_i[:, None] * (H * K) + i_h * K + o_k[None, :]
    m_ik = m_i[:, None] & m_k[None, :]
    b_q = tl.load(q + p_i, mask=m_ik, other=0.).to(tl.float32)
    b_k = tl.load(k + p_i, mask=m_ik, other=0.).to(tl.float32)
    b_G = tl.load(G + p_i, mask=m_ik, other=0.)
    # dq: earlier sub-chunks factor through the decay at row r0
    b_Gr = tl.load(G + r0 * (H * K) + i_h * K + o_k, mask=m_k & (r0 < eos), other=0.)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    for j_c in range(0, i_c):
        rows_j = t0 + j_c * BC + o_c
        m_j = (rows_j < eos) & (r0 < eos)  # a sub-chunk past the end has no r0: exp(-G_j) would overflow
        p_j = rows_j[:, None] * (H * K) + i_h * K + o_k[None, :]
        b_kj = tl.load(k + p_j, mask=m_j[:, None] & m_k[None, :], other=0.).to(tl.float32)
        b_Gj = tl.load(G + p_j, mask=m_j[:, None] & m_k[None, :], other=0.)
        b_dAb = tl.load(dA + rows_i[:, None] * (H * BT) + i_h * BT + (j_c * BC + o_c)[None, :], mask=m_i[:, None], other=0.)
        b_dq += tl.dot(b_dAb, b_kj * tl.exp(tl.where(m_j[:, None], b_Gr[None, :] - b_Gj, float("-inf"))),
                       input_precision=PREC)
    b_dq *= tl.exp(tl.where(m_i[:, None], b_G - b_Gr[None, :], float("-inf")))
    # dk: later sub-chunks factor through the decay at this sub-chunk's last valid row
    rl = tl.maximum(tl.minimum(r0 + BC, eos) - 1, t0)
    b_Grl = tl.load(G + rl * (H * K) + i_h * K + o_k, mask=m_k & (rl < eos), other=0.)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    for i_c2 in range(i_c + 1, NC):
        rows_2 = t0 + i_c2 * BC + o_c
        m_2 = rows_2 < eos
        p_2 = rows_2[:, None] * (H * K) + i_h * K + o_k[None, :]
        b_q2 = tl.load(q + p_2, mask=m_2[:, None] & m_k[None, :], other=0.).to(tl.float32)
        b_G2 = tl.load(G + p_2, mask=m_2[:, None] & m_k[None, :], other=0.)
        b_dAb = tl.load(dA + rows_2[:, None] * (H * BT) + i_h * BT + (i_c * BC + o_c)[None, :], mask=m_2[:, None], other=0.)
        b_dk += tl.dot(tl.trans(b_dAb), b_q2 * tl.exp(tl.where(m_2[:, None], b_G2 - b_Grl[None, :], float("-inf"))),
                       input_precision=PREC)
    b_dk *= tl.exp(tl.where(m_i[:, None], b_Grl[None, :] - b_G, float("-inf")))
    # the diagonal block, one row r of the sub-chunk at a time on [BC, BK] tiles (no [BC, BC, BK] broadcast, no
    # reduction across rows): dq_i += dA_ir k_r exp(G_i - G_r) for i >= r, dk_i += dA_ri q_r exp(G_r - G_i) for i <= r
    for j in range(0, BC):
        m_r = r0 + j < eos
        p_r = (r0 + j) * (H * K) + i_h * K + o_k
        b_kr = tl.load(k + p_r, mask=m_k & m_r, other=0.).to(tl.float32)
        b_qr = tl.load(q + p_r, mask=m_k & m_r, other=0.).to(tl.float32)
        b_Gx = tl.load(G + p_r, mask=m_k & m_r, other=0.)
        b_dAc = tl.load(dA + rows_i * (H * BT) + i_h * BT + i_c * BC + j, mask=m_i & m_r, other=0.)       # dA[i, r]
        b_dAr = tl.load(dA + (r0 + j) * (H * BT) + i_h * BT + i_c * BC + o_c, mask=m_i & m_r, other=0.)   # dA[r, i]
        m_lo = (o_c >= j) & m_i & m_r
        m_up = (o_c <= j) & m_i & m_r
        b_dq += b_dAc[:, None] * b_kr[None, :] * tl.exp(tl.where(m_lo[:, None], b_G - b_Gx[None, :], float("-inf")))
        b_dk += b_dAr[:, None] * b_qr[None, :] * tl.exp(tl.where(m_up[:, None], b_Gx[None, :] - b_G, float("-inf")))
    b_dq += tl.load(dq32 + p_i, mask=m_ik, other=0.)
    b_dk += tl.load(dk32 + p_i, mask=m_ik, other=0.)
    tl.store(dq + p_i, b_dq.to(dq.dtype.element_ty), mask=m_ik)
    tl.store(dk + p_i, b_dk.to(dk.dtype.element_ty), mask=m_ik)
    tl.store(dgx + p_i, b_q * b_dq - b_k * b_dk, mask=m_ik)


@triton.jit
def _bwd_dg_kernel(dgx, Dc, dg, cu, cseq, cloc, N, T_all, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, NX: tl.constexpr, VEC: tl.constexpr):
    """dg_t = sum_{u>=t in chunk} x_u + Dc, x = q dq - k dk (summed over K for head decays)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    rows = t0 + tl.arange(0, BT)
    m_t = rows < eos
    if VEC:
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            p = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
            m = m_t[:, None] & m_k[None, :]
            b_x = tl.load(dgx + p, mask=m, other=0.)
            b_Dc = tl.load(Dc + (i_t * H + i_h).to(tl.int64) * K + o_k, mask=m_k, other=0.)
            b_r = tl.sum(b_x, axis=0)[None, :] - tl.cumsum(b_x, axis=0) + b_x
            tl.store(dg + p, b_r + b_Dc[None, :], mask=m)
    else:
        b_x = tl.zeros([BT], dtype=tl.float32)
        for i_x in range(0, NX):
            b_x += tl.load(dgx + (i_x * T_all + rows) * H + i_h, mask=m_t, other=0.)
        b_d = tl.zeros([BK], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_d += tl.load(Dc + (i_t * H + i_h).to(tl.int64) * K + o_k, mask=o_k < K, other=0.)
        b_r = tl.sum(b_x, axis=0) - tl.cumsum(b_x, axis=0) + b_x
        tl.store(dg + rows * H + i_h, b_r + tl.sum(b_d, axis=0), mask=m_t)


# ----------------------------------------------------------------------------------------- launchers
def _local_cumsum(g: torch.Tensor, meta, BT: int) -> torch.Tensor:
    cu, cseq, cloc, _, N, NT = meta
    H = g.shape[2]
    vec = g.dim() == 4
    K = g.shape[3] if vec else 1
    BK = min(64, triton.next_power_of_2(K))
    G = torch.empty(g.shape, device=g.device, dtype=torch.float32)
    _cumsum_kernel[(NT, H, triton.cdiv(K, BK))](g, G, cu, cseq, cloc, N, H, K, BT, BK, vec)
    return G


def _fwd_states(k, v, G, g_gamma, h0, meta, BT, kind, output_final_state):
    cu, cseq, cloc, coff, N, NT = meta
    B, T, H, K = k.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    h = k.new_empty(NT, H, K, V)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    _fwd_h_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), N * H)](
        k, v, G, g_gamma, h, h0, ht, cu, coff, H, K, V, BT, BK, BV, kind, h0 is not None, output_final_state,
        _prec(k.dtype))
    return h, ht


def _intra_A(q, k, G, meta, BT):
    cu, cseq, cloc, _, N, NT = meta
    B, T, H, K = q.shape
    BC = 16
    A = q.new_empty(B, T, H, BT, dtype=torch.float32)
    _fwd_A_kernel[(BT // BC, NT, H)](q, k, G, A, cu, cseq, cloc, N, H, K, BT, BC, min(32, _blocks(K, K)[0]),
                                     _prec(q.dtype))
    return A


def diag_fwd(q, k, v, G, g_gamma, h0, scale, meta, BT, kind, output_final_state):
    cu, cseq, cloc, _, N, NT = meta
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    h, ht = _fwd_states(k, v, G, g_gamma, h0, meta, BT, kind, output_final_state)
    A = _intra_A(q, k, G, meta, BT) if kind == VECTOR else None
    o = torch.empty_like(v)
    _fwd_o_kernel[(triton.cdiv(V, BV), NT, H)](q, k, v, G, g_gamma, h, A, o, cu, cseq, cloc, N, scale, H, K, V, BT,
                                               BK, BV, kind, _prec(q.dtype))
    return o, ht, A


def diag_bwd(q, k, v, G, g_gamma, h0, do, dht, scale, meta, BT, kind, need_dg=True, A=None):
    """Returns dq, dk, dv (input dtype), dg (float32, per token; None for NONE), dh0 (float32 or None).
    A: VECTOR decays' intra-chunk scores as the forward computed them (recomputed when None)."""
    cu, cseq, cloc, coff, N, NT = meta
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    prec = _prec(q.dtype)
    h, _ = _fwd_states(k, v, G, g_gamma, h0, meta, BT, kind, False)
    dh = q.new_empty(NT, H, K, V)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if h0 is not None else None
    _bwd_dh_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), N * H)](
        q, do, G, g_gamma, dh, dht, dh0, cu, coff, scale, H, K, V, BT, BK, BV, kind, dht is not None, h0 is not None,
        prec)
    if kind == VECTOR and A is None:
        A = _intra_A(q, k, G, meta, BT)
    dv = torch.empty_like(v)
    _bwd_dv_kernel[(triton.cdiv(V, BV), NT, H)](q, k, do, G, g_gamma, dh, A, dv, cu, cseq, cloc, N, scale, H, K, V,
                                                BT, BK, BV, kind, prec)
    NK = triton.cdiv(K, BK)
    vec = kind == VECTOR
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dq32 = q.new_empty(q.shape, dtype=torch.float32) if vec else dq        # VECTOR: partial, finished by _bwd_intra
    dk32 = q.new_empty(q.shape, dtype=torch.float32) if vec else dk
    dA = q.new_empty(B, T, H, BT, dtype=torch.float32) if vec else None
    Dc = q.new_empty(NT, H, K, dtype=torch.float32) if kind != NONE else None
    dgx = None                                                               # x = q dq - k dk for dg
    if kind != NONE:
        dgx = q.new_empty(q.shape if vec else (NK, B * T, H), dtype=torch.float32)
    _bwd_dqk_kernel[(NK, NT, H)](q, k, v, do, G, g_gamma, h, dh, dq32, dk32, dA, Dc, dgx, cu, cseq, cloc, N, B * T,
                                 scale, H, K, V, BT, BK, BV, kind, prec)
    if vec:
        BKi = min(32, BK)
        _bwd_intra_kernel[(BT // 16, NT, H * triton.cdiv(K, BKi))](q, k, G, dA, dq32, dk32, dq, dk, dgx, cu, cseq,
                                                                   cloc, N, H, K, BT, 16, BKi, prec)
    dg = None
    if kind != NONE and need_dg:
        dg = q.new_empty(q.shape if vec else q.shape[:3], dtype=torch.float32)
        _bwd_dg_kernel[(NT, H)](dgx, Dc, dg, cu, cseq, cloc, N, B * T, H, K, BT, BK, NK, vec)
    return dq, dk, dv, dg, dh0


class DiagChunkFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels; see `chunk_diag`."""

    @staticmethod
    def forward(ctx, q, k, v, g, g_gamma, initial_state, scale, cu_seqlens, chunk_size, output_final_state):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        kind = decay_kind(g, g_gamma)
        B, T = q.shape[:2]
        meta = chunk_layout(B, T, cu_seqlens, chunk_size, q.device)
        G = _local_cumsum(g.contiguous(), meta, chunk_size) if kind in (SCALAR, VECTOR) else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        gam = g_gamma.float().contiguous() if g_gamma is not None else None
        o, ht, A = diag_fwd(q, k, v, G, gam, h0, scale, meta, chunk_size, kind, output_final_state)
        # VECTOR decays: the intra-chunk scores A (float32, BT per token and head) are kept for the backward
        # rather than formed again there (their diagonal blocks take one exponent per (i, j, k))
        ctx.save_for_backward(q, k, v, G, gam, h0, A, *meta[:4])
        ctx.meta_n = meta[4:]
        ctx.cfg = (scale, chunk_size, kind, g.dtype if g is not None else None,
                   g_gamma.dtype if g_gamma is not None else None, initial_state.dtype if initial_state is not None else None)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, G, gam, h0, A, *maps = ctx.saved_tensors
        meta = (*maps, *ctx.meta_n)
        scale, BT, kind, g_dtype, gamma_dtype, h0_dtype = ctx.cfg
        dht = dht.float().contiguous() if dht is not None else None
        need_dg = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dq, dk, dv, dg, dh0 = diag_bwd(q, k, v, G, gam, h0, do.contiguous(), dht, scale, meta, BT, kind, need_dg, A)
        dgg = None
        if kind == GAMMA:
            dgg = dg.sum((0, 1)).to(gamma_dtype) if dg is not None else None
            dg = None
        elif dg is not None:
            dg = dg.to(g_dtype)
        if dh0 is not None:
            dh0 = dh0.to(h0_dtype)
        return dq, dk, dv, dg, dgg, dh0, None, None, None, None


def chunk_diag(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
               g_gamma: torch.Tensor | None = None, scale: float | None = None,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked diagonal-decay recurrence (Triton), differentiable in q, k, v, g, g_gamma, initial_state.

    q, k `[B, T, H, K]`, v `[B, T, H, V]`; g None / `[B, T, H]` / `[B, T, H, K]` or g_gamma `[H]`
    (log-decays <= 0); initial_state `[N, H, K, V]`; cu_seqlens `[N+1]` with B = 1 (stays on the device).
    chunk_size is rounded to a power of two in [16, 64]. Returns (o `[B, T, H, V]` in v's dtype,
    final state `[N, H, K, V]` float32 or None). K and V up to 256 (tiled).
    """
    _check_device(q)
    o, ht = DiagChunkFunction.apply(q, k, v, g, g_gamma, initial_state, _scale(scale, q.shape[-1]), cu_seqlens,
                                    _chunk_size(chunk_size), bool(output_final_state))
    return o, ht
