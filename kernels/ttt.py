"""Chunked Triton kernels of TTT-Linear's mini-batch dual form, plain form (no LayerNorm), forward and backward.

The rule (lsm/rules/ttt.py): the memory S `[K, V]` takes one gradient step per token on
1/2 ||S^T k - v||^2, every gradient of a mini-batch of b tokens taken at the state S0 the
mini-batch starts from (mini-batches aligned to each sequence's start). Per mini-batch
(Q, K `[b, K]`, V `[b, V]`, eta `[b]`, per head), with A = tril(Q K^T) diag(eta):

    E = K S0 - V,   o = scale (Q S0 - A E),   S1 = S0 - K^T diag(eta) E             (_fwd_kernel)

One program per (V tile, sequence x head) walks the sequence's mini-batches with the state tile
`[K, BV]` in float32 registers (K <= 256). Backward, given dO and dS1 (the gradient of the state
leaving the mini-batch), with dR = scale dO:

    _bwd_dh_kernel  (per V tile, sequence x head, mini-batches in reverse; stores dS1, E, dE)
        dE = -A^T dR - diag(eta) K dS1,   dv = -dE,   dS0 = dS1 + Q^T dR + K^T dE
    _bwd_dqk_kernel (per K tile, mini-batch, head), with dA = -tril(dR E^T):
        dq = dR S0^T + (dA diag(eta)) K,   dk = dE S0^T + (dA diag(eta))^T Q - diag(eta) E dS1^T,
        deta_j = sum_i dA_ij (q_i . k_j) - k_j . (dS1 e_j)

The forward of an autograd pass stores S0 of every mini-batch (`[#mini-batches, H, K, V]` in the
input dtype), as the backward reads it. q, k `[B, T, H, K]`, v `[B, T, H, V]`, eta `[B, T, H]`;
states `[N, H, K, V]` float32; packed sequences with `cu_seqlens` on the device, no host sync
(`lsm_kernels.diag.chunk_layout` with the mini-batch as the chunk). The reference is
`TTT._chunk_torch`; the LayerNorm form is not written yet.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lsm_kernels.diag import _check_device, _chunk_rows, _prec, _tune, chunk_layout

MAX_K = 256


@_tune(["H", "K", "V", "MB", "BT", "BK", "BV"])
@triton.jit
def _fwd_kernel(q, k, v, eta, o, h, h0, ht, cu, coff, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                MB: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                STORE_H: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr):
    """One program per (V tile, sequence x head): walk the mini-batches of MB tokens (BT >= MB rows)."""
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


@_tune(["H", "K", "V", "MB", "BT", "BK", "BV"])
@triton.jit
def _bwd_dh_kernel(q, k, v, eta, h, do, dh, E, dE, dv, dht, dh0, cu, coff, scale, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr):
    """Walk a sequence's mini-batches backwards (one V tile, all of K); dS = gradient of the state leaving
    the mini-batch. Stores dh = dS, E and dE (float32), dv = -dE."""
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
        b_E = tl.dot(b_k, b_S0, input_precision=PREC) - b_v
        tl.store(E + p_tv, b_E, mask=m_tv)
        b_At = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)                     # [j, i] = k_j . q_i
        b_At = tl.where(causal_t, b_At * b_eta[:, None], 0.)                         # A^T
        b_ke = (b_k.to(tl.float32) * b_eta[:, None]).to(b_k.dtype)
        b_dE = -tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC) * scale \
            - tl.dot(b_ke, b_dS.to(b_k.dtype), input_precision=PREC)
        tl.store(dE + p_tv, b_dE, mask=m_tv)
        tl.store(dv + p_tv, (-b_dE).to(dv.dtype.element_ty), mask=m_tv)
        b_dS += tl.dot(tl.trans(b_q), b_do, input_precision=PREC) * scale \
            + tl.dot(tl.trans(b_k), b_dE.to(b_k.dtype), input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + p_kv, b_dS, mask=m_kv)


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


def _blocks(K: int, V: int, b: int) -> tuple[int, int, int]:
    """(BT, BK, BV): BT covers a mini-batch, BK all of K, BV keeps the state tile <= 8K floats."""
    BK = max(16, triton.next_power_of_2(K))
    return max(16, triton.next_power_of_2(b)), BK, max(16, min(64, triton.next_power_of_2(V), 8192 // BK))


class TTTLinearFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels; see `chunk_ttt_linear`."""

    @staticmethod
    def forward(ctx, q, k, v, eta, initial_state, scale, cu_seqlens, mini_batch_size, output_final_state):
        q, k, v, eta = q.contiguous(), k.contiguous(), v.contiguous(), eta.contiguous()
        B, T, H, K = q.shape
        V = v.shape[-1]
        MB = mini_batch_size
        BT, BK, BV = _blocks(K, V, MB)
        meta = chunk_layout(B, T, cu_seqlens, MB, q.device)                          # a mini-batch is a chunk
        cu, cseq, cloc, coff, N, NT = meta
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        store_h = any(ctx.needs_input_grad[:5])
        h = q.new_empty(NT, H, K, V) if store_h else None
        o = torch.empty_like(v)
        ht = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
        _fwd_kernel[(triton.cdiv(V, BV), N * H)](q, k, v, eta, o, h, h0, ht, cu, coff, scale, H, K, V, MB, BT, BK, BV,
                                                 h0 is not None, store_h, output_final_state, _prec(q.dtype))
        if store_h:
            ctx.save_for_backward(q, k, v, eta, h, h0, *meta[:4])
            ctx.meta_n = meta[4:]
            ctx.cfg = (scale, MB, eta.dtype, initial_state.dtype if initial_state is not None else None)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, eta, h, h0, cu, cseq, cloc, coff = ctx.saved_tensors
        N, NT = ctx.meta_n
        scale, MB, eta_dtype, h0_dtype = ctx.cfg
        B, T, H, K = q.shape
        V = v.shape[-1]
        BT, BK, BV = _blocks(K, V, MB)
        prec = _prec(q.dtype)
        do = do.contiguous()
        dht = dht.float().contiguous() if dht is not None else None
        f32 = dict(device=q.device, dtype=torch.float32)
        dh = torch.empty_like(h)
        E, dE = torch.empty(B, T, H, V, **f32), torch.empty(B, T, H, V, **f32)
        dv = torch.empty_like(v)
        dh0 = torch.empty(N, H, K, V, **f32) if h0 is not None else None
        _bwd_dh_kernel[(triton.cdiv(V, BV), N * H)](q, k, v, eta, h, do, dh, E, dE, dv, dht, dh0, cu, coff, scale, H,
                                                    K, V, MB, BT, BK, BV, dht is not None, h0 is not None, prec)
        BKq = min(64, BK)
        NK = triton.cdiv(K, BKq)
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        deta = torch.empty(NK, B * T, H, **f32)
        _bwd_dqk_kernel[(NK, NT, H)](q, k, eta, h, dh, do, E, dE, dq, dk, deta, cu, cseq, cloc, N, B * T, scale, H, K,
                                     V, MB, BT, BKq, min(64, BV), prec)
        deta = deta.sum(0).view(B, T, H).to(eta_dtype)
        return dq, dk, dv, deta, (dh0.to(h0_dtype) if dh0 is not None else None), None, None, None, None


def chunk_ttt_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     mini_batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TTT-Linear (plain form) by mini-batch gradient descent (Triton), differentiable in q, k, v, eta,
    initial_state.

    q, k `[B, T, H, K]` (k L2-normalised by the caller), v `[B, T, H, V]`, eta `[B, T, H]` >= 0;
    initial_state `[N, H, K, V]`; cu_seqlens `[N+1]` with B = 1 (stays on the device). Returns
    (o `[B, T, H, V]` in v's dtype, final state `[N, H, K, V]` float32 or None). K up to 256.
    """
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels run on a CUDA device, got a tensor on {q.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU, slowly)")
    if q.shape[-1] > MAX_K:
        raise ValueError(f"chunk_ttt_linear: the key head dim K must be <= {MAX_K}, got {q.shape[-1]}")
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"chunk_ttt_linear: `mini_batch_size` must be a positive int, got {mini_batch_size!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return TTTLinearFunction.apply(q, k, v, eta, initial_state, scale, cu_seqlens, mini_batch_size,
                                   bool(output_final_state))


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
    scale = K ** -0.5 if scale is None else float(scale)
    BV = triton.next_power_of_2(V) if ln else max(16, min(64, triton.next_power_of_2(V)))   # LN: all of V
    BK = max(16, min(triton.next_power_of_2(K), max(1, 4096 // BV)))
    o = torch.empty(B, H, V, device=q.device, dtype=v.dtype)
    S0_out, S_out, n_out = torch.empty_like(S0), torch.empty_like(S), torch.empty_like(n)
    _step_kernel[(triton.cdiv(V, BV), B * H)](q.contiguous(), k.contiguous(), v.contiguous(), eta.contiguous(),
                                              ln_weight, ln_bias, S0, S, n, S0_out, S_out, n_out, o, scale,
                                              float(ln_eps), mini_batch_size, H, K, V, BK, BV, ln)
    return o, (S0_out, S_out, n_out)
