"""Triton kernels of TTT-Linear (lsm/rules/ttt.py): the chunked mini-batch dual form, forward and backward,
plain and LayerNorm form (a compile-time switch `LN`), and the fused one-token decode step.

The rule: the memory S `[K, V]` takes one gradient step per token on l(S; k, v) = 1/2 ||f(k; S) - v||^2,
every gradient of a mini-batch of b tokens taken at the state S0 the mini-batch starts from (mini-batches
aligned to each sequence's start). Plain form f(x; S) = S^T x; LN form f(x; S) = x + LN_{w,b}(S^T x) (K == V).
Per mini-batch (Q, K `[b, K]`, V `[b, V]`, eta `[b]`, per head), with A = tril(Q K^T) diag(eta):

    Z = K S0,  E = dl/dZ  (plain: Z - V;  LN: LN'(Z)^T (w * (K + LN(Z) - V)) row-wise)
    R = Q S0 - A E,   o = scale R  (LN: Q + LN(scale R)),   S1 = S0 - K^T diag(eta) E       (_fwd_kernel)

One program per (V tile, sequence x head) walks the sequence's mini-batches with the state tile
`[K, BV]` in float32 registers (K <= 256; the LN form keeps all of V in one tile, as its row statistics
span V). Backward, given dO and dS1 (the gradient of the state leaving the mini-batch), with the readout's
gradient dR (plain: scale dO; LN: scale LN'(scale R)^T (w * dO)):

    _bwd_dh_kernel  (per V tile, sequence x head, mini-batches in reverse; stores dS1, E, dZ)
        G = -A^T dR - diag(eta) K dS1 (= dl/dE),   dZ = G (plain) or the LN loss gradient's backward (LN),
        dv = -dZ (plain) / -dt (LN, dt = w * LN'(Z) G),   dS0 = dS1 + Q^T dR + K^T dZ
    _bwd_dqk_kernel (per K tile, mini-batch, head), with dA = -tril(dR E^T):
        dq = dR S0^T + (dA diag(eta)) K,   dk = dZ S0^T + (dA diag(eta))^T Q - diag(eta) E dS1^T,
        deta_j = sum_i dA_ij (q_i . k_j) - k_j . (dS1 e_j)
    LN form: dq += dO and dk += dt (the residuals over the V columns), dw and db summed per program.

The forward of an autograd pass stores S0 of every mini-batch (`[#mini-batches, H, K, V]` in the
input dtype), as the backward reads it. q, k `[B, T, H, K]`, v `[B, T, H, V]`, eta `[B, T, H]`;
states `[N, H, K, V]` float32; packed sequences with `cu_seqlens` on the device, no host sync
(`lsm_kernels._common.chunk_layout` with the mini-batch as the chunk). The reference is `TTT._chunk_torch`.

`ttt_step` (_step_kernel) advances the decode state (S0, S, n) of `TTT.init_state` by one token, both forms,
forward only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsm_kernels._common import _check_device, _chunk_rows, _prec, _scale, _tune, chunk_layout

MAX_K = 256
MAX_MB = 64


@triton.jit
def _ln_center(x, m_v, V: tl.constexpr, eps):
    """Row-wise LayerNorm statistics over the V columns of x `[BT, BV]` (padding columns masked):
    (x - mean, masked to the valid columns; 1 / sqrt(biased variance + eps) `[BT]`)."""
    x = tl.where(m_v[None, :], x, 0.)
    xc = tl.where(m_v[None, :], x - tl.sum(x, axis=1)[:, None] / V, 0.)
    return xc, 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / V + eps)


@triton.jit
def _ln_proj(g, xh, r, m_v, V: tl.constexpr):
    """The LayerNorm backward projection r (g - mean(g) - xh mean(xh g)) row-wise (xh the normalised input)."""
    g = tl.where(m_v[None, :], g, 0.)
    p = r[:, None] * (g - tl.sum(g, axis=1)[:, None] / V - xh * (tl.sum(xh * g, axis=1)[:, None] / V))
    return tl.where(m_v[None, :], p, 0.)


@_tune(["H", "K", "V", "MB", "BT", "BK", "BV", "LN"])
@triton.jit
def _fwd_kernel(q, k, v, eta, lnw, lnb, o, h, h0, ht, cu, coff, scale, eps, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_H0: tl.constexpr, STORE_H: tl.constexpr, STORE_HT: tl.constexpr, LN: tl.constexpr,
                PREC: tl.constexpr):
    """One program per (V tile, sequence x head): walk the mini-batches of MB tokens (BT >= MB rows).
    LN form: one V tile holds all of V (the LayerNorm's statistics span it) and K == V."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    nb = (eos - bos + MB - 1) // MB
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0 + i_nh * K * V + p_kv, mask=m_kv, other=0.)
    if STORE_H:
        off = tl.load(coff + i_n).to(tl.int64)
    if LN:
        b_w = tl.load(lnw + i_h * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_b = tl.load(lnb + i_h * V + o_v, mask=m_v, other=0.).to(tl.float32)
    causal = o_t[:, None] >= o_t[None, :]
    for i in range(0, nb):
        if STORE_H:
            tl.store(h + ((off + i) * H + i_h) * K * V + p_kv, b_S.to(h.dtype.element_ty), mask=m_kv)
        rows = bos + i * MB + o_t
        m_t = (o_t < MB) & (rows < eos)
        p_tk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        p_tv = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.).to(tl.float32)
        b_eta = tl.load(eta + rows * H + i_h, mask=m_t, other=0.).to(tl.float32)
        b_S0 = b_S.to(b_k.dtype)
        if LN:   # E = dl/dz of 1/2 ||k + LN(z) - v||^2 at z = S0^T k
            p_tkv = rows[:, None] * (H * K) + i_h * K + o_v[None, :]                 # k, q over the V columns
            b_kv = tl.load(k + p_tkv, mask=m_tv, other=0.).to(tl.float32)
            b_zc, b_r = _ln_center(tl.dot(b_k, b_S0, input_precision=PREC), m_v, V, eps)
            b_zh = b_zc * b_r[:, None]
            b_gh = b_w[None, :] * tl.where(m_tv, b_w[None, :] * b_zh + b_b[None, :] + b_kv - b_v, 0.)
            b_E = tl.where(m_tv, _ln_proj(b_gh, b_zh, b_r, m_v, V), 0.)
        else:
            b_E = tl.dot(b_k, b_S0, input_precision=PREC) - b_v                       # [BT, BV]
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)                      # [BT, BT]
        b_A = tl.where(causal, b_A * b_eta[None, :], 0.)
        b_R = tl.dot(b_q, b_S0, input_precision=PREC) - tl.dot(b_A.to(b_k.dtype), b_E.to(b_k.dtype),
                                                              input_precision=PREC)
        if LN:   # o = q + LN(scale R)
            b_yc, b_ry = _ln_center(b_R * scale, m_v, V, eps)
            b_o = tl.load(q + p_tkv, mask=m_tv, other=0.).to(tl.float32) + b_yc * b_ry[:, None] * b_w[None, :] \
                + b_b[None, :]
        else:
            b_o = b_R * scale
        tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)
        b_ke = (b_k.to(tl.float32) * b_eta[:, None]).to(b_k.dtype)
        b_S -= tl.dot(tl.trans(b_ke), b_E.to(b_k.dtype), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + p_kv, b_S, mask=m_kv)


@_tune(["H", "K", "V", "MB", "BT", "BK", "BV", "LN"])
@triton.jit
def _bwd_dh_kernel(q, k, v, eta, lnw, lnb, h, do, dh, E, dE, dR, dT, dv, dwp, dbp, dht, dh0, cu, coff, scale, eps,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                   LN: tl.constexpr, PREC: tl.constexpr):
    """Walk a sequence's mini-batches backwards (one V tile, all of K); dS = gradient of the state leaving
    the mini-batch. Stores dh = dS, E and dE (float32; dE holds dZ, the gradient of Z = K S0), dv.
    LN form (one V tile, K == V): also dR (the readout's gradient), dT = dl/d(residual k) = -dv, and this
    program's sums of the LayerNorm parameters' gradients dwp, dbp `[N, H, V]`."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    nb = (eos - bos + MB - 1) // MB
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
    if LN:
        b_w = tl.load(lnw + i_h * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_b = tl.load(lnb + i_h * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_dw = tl.zeros([BV], dtype=tl.float32)
        b_db = tl.zeros([BV], dtype=tl.float32)
    causal_t = o_t[:, None] <= o_t[None, :]                                          # [j, i], j <= i
    for ii in range(0, nb):
        i = nb - 1 - ii
        p_h = ((off + i) * H + i_h) * K * V + p_kv
        tl.store(dh + p_h, b_dS.to(dh.dtype.element_ty), mask=m_kv)
        rows = bos + i * MB + o_t
        m_t = (o_t < MB) & (rows < eos)
        p_tk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        p_tv = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.).to(tl.float32)
        b_eta = tl.load(eta + rows * H + i_h, mask=m_t, other=0.).to(tl.float32)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.)
        b_S0 = tl.load(h + p_h, mask=m_kv, other=0.).to(b_k.dtype)
        b_At = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)                     # [j, i] = k_j . q_i
        b_At = tl.where(causal_t, b_At * b_eta[:, None], 0.)                         # A^T
        b_ke = (b_k.to(tl.float32) * b_eta[:, None]).to(b_k.dtype)
        if LN:
            # recompute the forward: E through the LayerNorm, the readout R and its LayerNorm
            b_kv = tl.load(k + rows[:, None] * (H * K) + i_h * K + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
            b_zc, b_r = _ln_center(tl.dot(b_k, b_S0, input_precision=PREC), m_v, V, eps)
            b_zh = b_zc * b_r[:, None]
            b_t = tl.where(m_tv, b_w[None, :] * b_zh + b_b[None, :] + b_kv - b_v, 0.)  # k + LN(z) - v
            b_gh = b_w[None, :] * b_t
            b_E = tl.where(m_tv, _ln_proj(b_gh, b_zh, b_r, m_v, V), 0.)
            tl.store(E + p_tv, b_E, mask=m_tv)
            b_R = tl.dot(b_q, b_S0, input_precision=PREC) - tl.dot(tl.trans(b_At).to(b_k.dtype),
                                                                  b_E.to(b_k.dtype), input_precision=PREC)
            b_yc, b_ry = _ln_center(b_R * scale, m_v, V, eps)
            b_yh = b_yc * b_ry[:, None]
            b_do = b_do.to(tl.float32)
            b_dR = tl.where(m_tv, _ln_proj(b_do * b_w[None, :], b_yh, b_ry, m_v, V), 0.) * scale
            tl.store(dR + p_tv, b_dR, mask=m_tv)
            b_dw += tl.sum(b_do * b_yh, axis=0)
            b_db += tl.sum(b_do, axis=0)
            # G = dl/dE, then back through E = LN'(z)^T (w * t)
            b_G = -tl.dot(b_At.to(b_k.dtype), b_dR.to(b_k.dtype), input_precision=PREC) \
                - tl.dot(b_ke, b_dS.to(b_k.dtype), input_precision=PREC)
            b_u = _ln_proj(b_G, b_zh, b_r, m_v, V)                                   # d(w * t)
            b_dt = tl.where(m_tv, b_w[None, :] * b_u, 0.)                            # dt
            b_dzh = b_w[None, :] * b_dt
            b_s = tl.sum(b_gh * b_zc, axis=1) / V
            b_gc = tl.where(m_v[None, :], b_gh - tl.sum(b_gh, axis=1)[:, None] / V, 0.)
            b_Gzc = tl.sum(b_G * b_zc, axis=1)
            b_r3 = b_r * b_r * b_r
            b_dr = tl.sum(b_G * b_gc, axis=1) - 3. * b_r * b_r * b_s * b_Gzc + tl.sum(b_dzh * b_zc, axis=1)
            b_dzc = -(b_r3 * b_s)[:, None] * b_G - (b_r3 * b_Gzc / V)[:, None] * b_gh + b_r[:, None] * b_dzh \
                - (b_dr * b_r3 / V)[:, None] * b_zc
            b_dzc = tl.where(m_tv, b_dzc, 0.)
            b_dZ = tl.where(m_tv, b_dzc - tl.sum(b_dzc, axis=1)[:, None] / V, 0.)
            b_dw += tl.sum(b_t * b_u + b_dt * b_zh, axis=0)
            b_db += tl.sum(b_dt, axis=0)
            tl.store(dE + p_tv, b_dZ, mask=m_tv)
            tl.store(dT + p_tv, b_dt, mask=m_tv)
            tl.store(dv + p_tv, (-b_dt).to(dv.dtype.element_ty), mask=m_tv)
            b_dS += tl.dot(tl.trans(b_q), b_dR.to(b_q.dtype), input_precision=PREC) \
                + tl.dot(tl.trans(b_k), b_dZ.to(b_k.dtype), input_precision=PREC)
        else:
            b_E = tl.dot(b_k, b_S0, input_precision=PREC) - b_v
            tl.store(E + p_tv, b_E, mask=m_tv)
            b_dE = -tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC) * scale \
                - tl.dot(b_ke, b_dS.to(b_k.dtype), input_precision=PREC)
            tl.store(dE + p_tv, b_dE, mask=m_tv)
            tl.store(dv + p_tv, (-b_dE).to(dv.dtype.element_ty), mask=m_tv)
            b_dS += tl.dot(tl.trans(b_q), b_do, input_precision=PREC) * scale \
                + tl.dot(tl.trans(b_k), b_dE.to(b_k.dtype), input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + p_kv, b_dS, mask=m_kv)
    if LN:
        tl.store(dwp + i_nh * V + o_v, b_dw, mask=m_v)
        tl.store(dbp + i_nh * V + o_v, b_db, mask=m_v)


@_tune(["H", "K", "V", "MB", "BT", "BK", "BV"])
@triton.jit
def _bwd_dqk_kernel(q, k, eta, h, dh, do, E, dE, dq, dk, deta, cu, cseq, cloc, N, T_all, scale, H: tl.constexpr,
                    K: tl.constexpr, V: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, PREC: tl.constexpr):
    """dq, dk and this K tile's share of deta (`[NK, B*T, H]`) for one (K tile, mini-batch, head)."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, MB)
    o_t = tl.arange(0, BT)
    rows = t0 + o_t
    m_t = (o_t < MB) & (rows < eos)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_tk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_EdS = tl.zeros([BT, BK], dtype=tl.float32)
    b_dM = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_tv = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.)
        b_E = tl.load(E + p_tv, mask=m_tv, other=0.).to(b_do.dtype)
        b_dE = tl.load(dE + p_tv, mask=m_tv, other=0.).to(b_do.dtype)
        p_vk = (i_t * H + i_h).to(tl.int64) * K * V + o_k[None, :] * V + o_v[:, None]   # [BV, BK] view of [K, V]
        b_h = tl.load(h + p_vk, mask=m_k[None, :] & m_v[:, None] & (eos > t0), other=0.).to(b_do.dtype)
        b_dh = tl.load(dh + p_vk, mask=m_k[None, :] & m_v[:, None] & (eos > t0), other=0.).to(b_do.dtype)
        b_dq += tl.dot(b_do, b_h, input_precision=PREC)
        b_dM += tl.dot(b_do, tl.trans(b_E), input_precision=PREC)
        b_dk += tl.dot(b_dE, b_h, input_precision=PREC)
        b_EdS += tl.dot(b_E, b_dh, input_precision=PREC)
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.)
    b_eta = tl.load(eta + rows * H + i_h, mask=m_t, other=0.).to(tl.float32)
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_dA = tl.where(causal, -b_dM * scale, 0.)                                       # dA = -tril(dR E^T)
    b_QK = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    b_x = tl.sum(b_dA * b_QK, axis=0) - tl.sum(b_k.to(tl.float32) * b_EdS, axis=1)
    tl.store(deta + (i_k * T_all + rows) * H + i_h, b_x, mask=m_t)
    b_dAe = (b_dA * b_eta[None, :]).to(b_q.dtype)
    b_dq = b_dq * scale + tl.dot(b_dAe, b_k, input_precision=PREC)
    b_dk += tl.dot(tl.trans(b_dAe), b_q, input_precision=PREC) - b_EdS * b_eta[:, None]
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)


def _blocks(K: int, V: int, b: int, ln: bool = False) -> tuple[int, int, int]:
    """(BT, BK, BV): BT covers a mini-batch, BK all of K, BV keeps the state tile <= 8K floats (the LN form:
    all of V, whose LayerNorm statistics one program must see)."""
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V)) if ln else max(16, min(64, triton.next_power_of_2(V), 8192 // BK))
    return max(16, triton.next_power_of_2(b)), BK, BV


class TTTLinearFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels; see `chunk_ttt_linear`."""

    @staticmethod
    def forward(ctx, q, k, v, eta, initial_state, ln_weight, ln_bias, scale, cu_seqlens, mini_batch_size,
                output_final_state, ln_eps):
        q, k, v, eta = q.contiguous(), k.contiguous(), v.contiguous(), eta.contiguous()
        B, T, H, K = q.shape
        V = v.shape[-1]
        MB = mini_batch_size
        ln = ln_weight is not None
        if ln:
            ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
        BT, BK, BV = _blocks(K, V, MB, ln)
        meta = chunk_layout(B, T, cu_seqlens, MB, q.device)                          # a mini-batch is a chunk
        cu, cseq, cloc, coff, N, NT = meta
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        store_h = any(ctx.needs_input_grad[:7])
        h = q.new_empty(NT, H, K, V) if store_h else None
        o = torch.empty_like(v)
        ht = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
        _fwd_kernel[(triton.cdiv(V, BV), N * H)](q, k, v, eta, ln_weight, ln_bias, o, h, h0, ht, cu, coff, scale,
                                                 ln_eps, H, K, V, MB, BT, BK, BV, h0 is not None, store_h,
                                                 output_final_state, ln, _prec(q.dtype))
        if store_h:
            ctx.save_for_backward(q, k, v, eta, h, h0, ln_weight, ln_bias, *meta[:4])
            ctx.meta_n = meta[4:]
            ctx.cfg = (scale, MB, eta.dtype, initial_state.dtype if initial_state is not None else None, ln_eps)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, eta, h, h0, ln_weight, ln_bias, cu, cseq, cloc, coff = ctx.saved_tensors
        N, NT = ctx.meta_n
        scale, MB, eta_dtype, h0_dtype, ln_eps = ctx.cfg
        ln = ln_weight is not None
        B, T, H, K = q.shape
        V = v.shape[-1]
        BT, BK, BV = _blocks(K, V, MB, ln)
        prec = _prec(q.dtype)
        do = do.contiguous()
        dht = dht.float().contiguous() if dht is not None else None
        f32 = dict(device=q.device, dtype=torch.float32)
        dh = torch.empty_like(h)
        E, dE = torch.empty(B, T, H, V, **f32), torch.empty(B, T, H, V, **f32)
        dR, dT = (torch.empty(B, T, H, V, **f32), torch.empty(B, T, H, V, **f32)) if ln else (None, None)
        dwp, dbp = (torch.empty(N, H, V, **f32), torch.empty(N, H, V, **f32)) if ln else (None, None)
        dv = torch.empty_like(v)
        dh0 = torch.empty(N, H, K, V, **f32) if h0 is not None else None
        _bwd_dh_kernel[(triton.cdiv(V, BV), N * H)](q, k, v, eta, ln_weight, ln_bias, h, do, dh, E, dE, dR, dT, dv,
                                                    dwp, dbp, dht, dh0, cu, coff, scale, ln_eps, H, K, V, MB, BT, BK,
                                                    BV, dht is not None, h0 is not None, ln, prec)
        BKq = min(64, BK)
        NK = triton.cdiv(K, BKq)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        deta = torch.empty(NK, B * T, H, **f32)
        # the LN form hands the readout's gradient dR (scale 1) where the plain form reads scale * do
        _bwd_dqk_kernel[(NK, NT, H)](q, k, eta, h, dh, dR if ln else do, E, dE, dq, dk, deta, cu, cseq, cloc, N,
                                     B * T, 1.0 if ln else scale, H, K, V, MB, BT, BKq, min(64, BV), prec)
        deta = deta.sum(0).view(B, T, H).to(eta_dtype)
        dw = db = None
        if ln:   # the residuals q (readout) and k (loss) over the V columns (K == V)
            dq = (dq.float() + do.float()).to(q.dtype)
            dk = (dk.float() + dT).to(k.dtype)
            dw, db = dwp.sum(0).to(ln_weight.dtype), dbp.sum(0).to(ln_bias.dtype)
        return (dq, dk, dv, deta, (dh0.to(h0_dtype) if dh0 is not None else None), dw, db,
                None, None, None, None, None)


def chunk_ttt_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     mini_batch_size: int = 16, ln_weight: torch.Tensor | None = None,
                     ln_bias: torch.Tensor | None = None, ln_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TTT-Linear by mini-batch gradient descent (Triton), differentiable in q, k, v, eta, initial_state (and
    ln_weight, ln_bias).

    q, k `[B, T, H, K]` (k L2-normalised by the caller), v `[B, T, H, V]`, eta `[B, T, H]` >= 0;
    initial_state `[N, H, K, V]`; cu_seqlens `[N+1]` with B = 1 (stays on the device). Plain form, or the
    LayerNorm form (f(x) = x + LN(S^T x), o = q + LN(scale S^T q); K == V) when `ln_weight` and/or `ln_bias`
    `[H, V]` are given (a missing one defaults to ones / zeros). Returns (o `[B, T, H, V]` in v's dtype, final
    state `[N, H, K, V]` float32 or None). K up to 256, mini_batch_size up to 64.
    """
    _check_device(q)
    if q.shape[-1] > MAX_K:
        raise ValueError(f"chunk_ttt_linear: the key head dim K must be <= {MAX_K}, got {q.shape[-1]}")
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or not 1 <= mini_batch_size <= MAX_MB:
        raise ValueError(f"chunk_ttt_linear: `mini_batch_size` must be an int in [1, {MAX_MB}], got {mini_batch_size!r}")
    if ln_weight is not None or ln_bias is not None:
        if q.shape[-1] != v.shape[-1]:
            raise ValueError(f"chunk_ttt_linear: the LayerNorm form needs K == V, got K={q.shape[-1]}, V={v.shape[-1]}")
        H, V = v.shape[-2:]
        ln_weight = torch.ones(H, V, device=q.device) if ln_weight is None else ln_weight
        ln_bias = torch.zeros(H, V, device=q.device) if ln_bias is None else ln_bias
    return TTTLinearFunction.apply(q, k, v, eta, initial_state, ln_weight, ln_bias, _scale(scale, q.shape[-1]), cu_seqlens,
                                   mini_batch_size, bool(output_final_state), float(ln_eps))


# ----------------------------------------------------------------------------------------- decode step
@triton.jit
def _step_kernel(q, k, v, eta, lnw, lnb, S0, S, n, S0_out, S_out, n_out, o, scale, eps, MB, H: tl.constexpr,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LN: tl.constexpr):
    """One token of TTT's decode state (S0, S, n) for one (V tile, batch row x head); the key dim in BK tiles.

    e = dl/dz at z = S0^T k (plain: z - v; LN form: through the LayerNorm, the V tile is all of V),
    S' = S - eta k e^T, o = scale S'^T q (LN form: q + LN(scale S'^T q)); after MB tokens S0' = S', n' = 0."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_eta = tl.load(eta + i_bh).to(tl.float32)
    b_n = tl.load(n + i_bh).to(tl.float32)
    # 1. z = S0^T k over this V tile
    b_z = tl.zeros([BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        p_kv = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
        b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_S0 = tl.load(S0 + p_kv, mask=m_k[:, None] & m_v[None, :], other=0.).to(tl.float32)
        b_z += tl.sum(b_k[:, None] * b_S0, axis=0)
    b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0.).to(tl.float32)
    # 2. e = dl/dz (the token's gradient is k e^T)
    if LN:
        b_w = tl.load(lnw + i_h * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_b = tl.load(lnb + i_h * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_kv = tl.load(k + i_bh * K + o_v, mask=m_v, other=0.).to(tl.float32)      # k over V (K == V)
        b_zc = tl.where(m_v, b_z - tl.sum(b_z, axis=0) / V, 0.)
        b_r = 1.0 / tl.sqrt(tl.sum(b_zc * b_zc, axis=0) / V + eps)
        b_zh = b_zc * b_r
        b_gh = tl.where(m_v, b_w * (b_w * b_zh + b_b + b_kv - b_v), 0.)
        b_e = b_r * (b_gh - tl.sum(b_gh, axis=0) / V - b_zh * (tl.sum(b_gh * b_zh, axis=0) / V))
    else:
        b_e = b_z - b_v
    full = b_n + 1.0 >= MB
    # 3. descend, mini-batch boundary, read out
    b_y = tl.zeros([BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_kv = m_k[:, None] & m_v[None, :]
        p_kv = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
        b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_S = tl.load(S + p_kv, mask=m_kv, other=0.).to(tl.float32) - b_eta * b_k[:, None] * b_e[None, :]
        b_S0 = tl.load(S0 + p_kv, mask=m_kv, other=0.).to(tl.float32)
        tl.store(S_out + p_kv, b_S.to(S_out.dtype.element_ty), mask=m_kv)
        tl.store(S0_out + p_kv, tl.where(full, b_S, b_S0).to(S0_out.dtype.element_ty), mask=m_kv)
        b_y += tl.sum(b_q[:, None] * b_S, axis=0)
    b_o = b_y * scale
    if LN:
        b_qv = tl.load(q + i_bh * K + o_v, mask=m_v, other=0.).to(tl.float32)
        b_oc = tl.where(m_v, b_o - tl.sum(b_o, axis=0) / V, 0.)
        b_o = b_qv + b_oc / tl.sqrt(tl.sum(b_oc * b_oc, axis=0) / V + eps) * b_w + b_b
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(n_out + i_bh, tl.where(full, 0., b_n + 1.0).to(n_out.dtype.element_ty), mask=i_v == 0)


def ttt_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
             state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scale: float | None = None,
             mini_batch_size: int = 16, ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None,
             ln_eps: float = 1e-6) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One decoding token of TTT-Linear (plain form, or the LayerNorm form when `ln_weight`/`ln_bias` are
    given; forward only, not differentiable).

    q, k `[B, H, K]`, v `[B, H, V]`, eta `[B, H]`; state (S0 `[B, H, K, V]`, S `[B, H, K, V]`, n `[B, H]`) as
    `TTT.init_state` (the state at the current mini-batch's start, the current state, the tokens already in
    the current mini-batch); ln_weight, ln_bias `[H, V]` (LN form, K == V). Returns (o `[B, H, V]` in v's
    dtype, the new state in new tensors of the state's dtypes; computed in float32).
    """
    _check_device(q)
    B, H, K = q.shape
    V = v.shape[-1]
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"ttt_step: `mini_batch_size` must be a positive int, got {mini_batch_size!r}")
    ln = ln_weight is not None or ln_bias is not None
    if ln:
        if K != V:
            raise ValueError(f"ttt_step: the LayerNorm form needs K == V, got K={K}, V={V}")
        ln_weight = torch.ones(H, V, device=q.device) if ln_weight is None else ln_weight.contiguous()
        ln_bias = torch.zeros(H, V, device=q.device) if ln_bias is None else ln_bias.contiguous()
    S0, S, n = (x.contiguous() for x in state)
    scale = _scale(scale, K)
    BV = triton.next_power_of_2(V) if ln else max(16, min(64, triton.next_power_of_2(V)))   # LN: all of V
    BK = max(16, min(triton.next_power_of_2(K), max(1, 4096 // BV)))
    o = torch.empty(B, H, V, device=q.device, dtype=v.dtype)
    S0_out, S_out, n_out = torch.empty_like(S0), torch.empty_like(S), torch.empty_like(n)
    _step_kernel[(triton.cdiv(V, BV), B * H)](q.contiguous(), k.contiguous(), v.contiguous(), eta.contiguous(),
                                              ln_weight, ln_bias, S0, S, n, S0_out, S_out, n_out, o, scale,
                                              float(ln_eps), mini_batch_size, H, K, V, BK, BV, ln)
    return o, (S0_out, S_out, n_out)
