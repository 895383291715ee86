"""Chunked Triton kernels of the delta family (deltanet, gated_deltanet), forward and backward.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t,

with `a_t = exp(g_t)`, `g [B, T, H] <= 0` for gated_deltanet (`GATED`, a compile-time switch) and
`a_t = 1` for deltanet. The torch reference is `lsm.rules._delta.delta_chunk`; the algorithm is its
WY/UT form (Yang et al., 2024, "Parallelizing Linear Transformers with the Delta Rule"). Per chunk
of BT tokens entered with state S0, with the in-chunk cumulative log-decay G (G = 0 ungated) and
`D_ij = exp(G_i - G_j)` (j <= i, every exponent <= 0):

    1. _fwd_wy_kernel  (per chunk, head)
       A = strictly_lower(diag(beta) K K^T * D),  T = (I + A)^{-1} by forward substitution in
       registers, W = T diag(beta exp(G)) K, U = T diag(beta) V
    2. _fwd_h_kernel   (per V tile, sequence x head: the only loop, over the sequence's chunks)
       h_c = S0 (stored),  V_new = U - W S0,  S_end = exp(G_L) S0 + (K exp(G_L - G))^T V_new
    3. lsm_kernels.diag._fwd_o_kernel (per V tile, chunk, head), the diagonal-decay output kernel
       with V_new as values: o = scale ((Q exp(G)) S0 + tril(Q K^T * D) V_new)

Layout: q, k `[B, T, H, K]`, v `[B, T, H, V]`, beta / g `[B, T, H]`; states `[N, H, K, V]` float32.
Batches are packed sequences as in `lsm_kernels.diag` (`chunk_layout`): grids come from static
shapes, the chunk -> sequence maps live on the device, nothing synchronises with the host.
K (the key head dim) is at most 256: the state kernel holds a full `[K, BV]` state tile; V is tiled.

Backward (what is Triton and what is torch). The backward recomputes the forward instead of
storing per-chunk states:
    - torch: the per-chunk pieces W, U, K exp(G_L - G), Q exp(G), tril(Q K^T * D) are recomputed
      in float32 from the saved inputs, batched over all chunks and heads at once (one
      `torch.linalg.solve_triangular` for T; a gather into a chunk-slot layout, no loops over
      tokens, heads or sequences, no host synchronisation), and differentiated by torch autograd;
    - Triton: the chunk-state recurrence, forward (`_fwd_h_kernel`, recomputing h and V_new) and in
      reverse (`_bwd_state_kernel`), walking each sequence's chunks backwards with dS (the
      gradient of the state leaving chunk c):
          dV_new^tot = dV_new + (K exp(G_L - G)) dS,    dU = dV_new^tot,   dW = -dV_new^tot S0^T,
          d(K exp(G_L - G)) = V_new dS^T,               dG_L = exp(G_L) <S0, dS>,
          dS0 = exp(G_L) dS - W^T dV_new^tot + dh_c     (dh_c: gradient of the stored h_c).
The float32 torch pieces cost O(BT^2) memory per chunk and head during the backward; fusing them
into kernels (as the diagonal family does) is the next step.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lsm_kernels.diag import NONE, SCALAR, _blocks, _chunk_rows, _fwd_o_kernel, _load_G_head, _local_cumsum, _prec, \
    _tune, chunk_layout

MAX_K = 256


def _check_inputs(q: torch.Tensor, v: torch.Tensor) -> None:
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels run on a CUDA device, got a tensor on {q.device} "
                         "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU, slowly)")
    if q.shape[-1] > MAX_K:
        raise ValueError(f"chunk_delta: the key head dim K (last dim of `q`, `k`) must be <= {MAX_K}, "
                         f"got {q.shape[-1]} (the state kernel holds a full [K, BV] state tile)")


def _state_blocks(K: int, V: int) -> tuple[int, int]:
    """(BK, BV) of the state kernels: BK covers all of K; BV keeps the state tile <= 8K floats."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, max(16, min(64, triton.next_power_of_2(V), 8192 // BK))


# ----------------------------------------------------------------------------------------- forward
@_tune(["H", "K", "V", "BT", "BK", "BV", "GATED"])
@triton.jit
def _fwd_wy_kernel(k, v, beta, G, w, u, cu, cseq, cloc, N, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr):
    """W = T diag(beta exp(G)) K, U = T diag(beta) V with T = (I + strictly_lower(diag(beta) K K^T * D))^{-1},
    for one (chunk, head)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = _chunk_rows(cu, cseq, cloc, i_t, N, BT)
    o_t = tl.arange(0, BT)
    rows = t0 + o_t
    m_t = rows < eos
    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.).to(tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = tl.load(k + rows[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                      other=0.)
        b_A += tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
    strict = (o_t[:, None] > o_t[None, :]) & m_t[:, None] & m_t[None, :]
    if GATED:
        b_G = tl.load(G + rows * H + i_h, mask=m_t, other=0.)
        b_A *= tl.exp(tl.where(strict, b_G[:, None] - b_G[None, :], float("-inf")))
    # forward substitution: row i of L = T - I is -a_i - sum_{j<i} a_ij L_j (rows j < i are final)
    b_A = tl.where(strict, -b_A * b_beta[:, None], 0.)
    for i in range(1, BT):
        m_i = o_t == i
        b_a = tl.sum(tl.where(m_i[:, None], b_A, 0.), 0)
        b_a += tl.sum(b_a[:, None] * b_A, 0)
        b_A = tl.where(m_i[:, None], b_a[None, :], b_A)
    b_T = (b_A + (o_t[:, None] == o_t[None, :]).to(tl.float32)).to(k.dtype.element_ty)
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


@_tune(["H", "K", "V", "BT", "BK", "BV", "GATED", "K_DECAYED"])
@triton.jit
def _fwd_h_kernel(k, w, u, G, h, vn, h0, ht, cu, coff, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, K_DECAYED: tl.constexpr,
                  USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr):
    """One program per (V tile, sequence x head): walk the sequence's chunks; store h_c (the state entering
    chunk c) and V_new = U - W h_c; S <- exp(G_L) S + (K exp(G_L - G))^T V_new. With K_DECAYED, `k` already
    holds K exp(G_L - G). Sequence n spans rows cu[n] .. cu[n+1] and chunk slots coff[n] ...."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
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
            if not K_DECAYED:
                b_k = (b_k * tl.exp(tl.where(m_t, b_Gl - b_G, float("-inf")))[:, None]).to(b_k.dtype)
            b_h *= tl.exp(b_Gl)
        b_h += tl.dot(tl.trans(b_k), b_vn.to(b_k.dtype), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + p_kv, b_h, mask=m_kv)


# ----------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_state_kernel(w, kd, vn, G, h, dh, dvn, dht, dh0, du, dw, dkd, dGl, cu, coff, R, NT,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, GATED: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                      PREC: tl.constexpr):
    """Reverse of _fwd_h_kernel (K_DECAYED) for one (V tile, sequence x head); dS = gradient of the state
    leaving the current chunk. dw, dkd `[NV, R, H, K]` and dGl `[NV, NT, H]` are this V tile's partial sums."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
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
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dS += tl.load(dht + i_nh * K * V + p_kv, mask=m_kv, other=0.)
    for ii in range(0, nt):
        i = nt - 1 - ii
        p_h = ((off + i) * H + i_h) * K * V + p_kv
        t0 = bos + i * BT
        rows = t0 + tl.arange(0, BT)
        m_t = rows < eos
        p_tk = rows[:, None] * (H * K) + i_h * K + o_k[None, :]
        p_tv = rows[:, None] * (H * V) + i_h * V + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_h = tl.load(h + p_h, mask=m_kv, other=0.)
        b_kd = tl.load(kd + p_tk, mask=m_tk, other=0.)
        b_w = tl.load(w + p_tk, mask=m_tk, other=0.)
        b_vn = tl.load(vn + p_tv, mask=m_tv, other=0.)
        b_dv = tl.load(dvn + p_tv, mask=m_tv, other=0.) + tl.dot(b_kd, b_dS, input_precision=PREC)
        tl.store(du + p_tv, b_dv, mask=m_tv)
        p_part = i_v * R * H * K + p_tk
        tl.store(dw + p_part, -tl.dot(b_dv, tl.trans(b_h), input_precision=PREC), mask=m_tk)
        tl.store(dkd + p_part, tl.dot(b_vn, tl.trans(b_dS), input_precision=PREC), mask=m_tk)
        if GATED:
            b_G, b_Gl = _load_G_head(G, G, t0, eos, i_h, H, BT, 2)
            b_e = tl.exp(b_Gl)
            tl.store(dGl + (i_v * NT + off + i) * H + i_h, b_e * tl.sum(tl.sum(b_h * b_dS, axis=1), axis=0))
            b_dS *= b_e
        b_dS += tl.load(dh + p_h, mask=m_kv, other=0.) - tl.dot(tl.trans(b_w), b_dv, input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + i_nh * K * V + p_kv, b_dS, mask=m_kv)


# ----------------------------------------------------------------------------------------- launchers
def _states(k, w, u, G, h0, cu, coff, N, NT, BT, gated, k_decayed, h_dtype, vn_dtype, prec, zero_fill=False):
    """Launch _fwd_h_kernel: (h `[NT, H, K, V]`, V_new `[B, T, H, V]`, final states `[N, H, K, V]` float32)."""
    H, K = k.shape[-2:]
    V = u.shape[-1]
    BK, BV = _state_blocks(K, V)
    alloc = torch.zeros if zero_fill else torch.empty
    h = alloc(NT, H, K, V, device=k.device, dtype=h_dtype)
    vn = alloc(u.shape, device=k.device, dtype=vn_dtype)
    ht = torch.empty(N, H, K, V, device=k.device, dtype=torch.float32)
    _fwd_h_kernel[(triton.cdiv(V, BV), N * H)](k, w, u, G, h, vn, h0, ht, cu, coff, H, K, V, BT, BK, BV, gated,
                                               k_decayed, h0 is not None, True, prec)
    return h, vn, ht


def delta_fwd(q, k, v, beta, G, h0, scale, meta, BT, output_final_state):
    """Forward kernels 1-3. G: in-chunk cumulative log-decay `[B, T, H]` float32 or None."""
    cu, cseq, cloc, coff, N, NT = meta
    B, T, H, K = q.shape
    V = v.shape[-1]
    gated = G is not None
    prec = _prec(q.dtype)
    BKw, BVw = _blocks(K, V)
    w, u = torch.empty_like(k), torch.empty_like(v)
    _fwd_wy_kernel[(NT, H)](k, v, beta, G, w, u, cu, cseq, cloc, N, H, K, V, BT, BKw, BVw, gated, prec)
    h, vn, ht = _states(k, w, u, G, h0, cu, coff, N, NT, BT, gated, False, k.dtype, v.dtype, prec)
    o = torch.empty_like(v)
    _fwd_o_kernel[(triton.cdiv(V, BVw), NT, H)](q, k, vn, G, G, h, None, o, cu, cseq, cloc, N, scale, H, K, V, BT,
                                                BKw, BVw, SCALAR if gated else NONE, prec)
    return o, (ht if output_final_state else None)


class _StatePass(torch.autograd.Function):
    """The chunk-state recurrence on the chunk-slot layout (float32), differentiable in w, u, kd, G, h0.

    w, kd `[R, H, K]`, u `[R, H, V]`, G `[R, H]` (only each chunk's last row matters), h0 `[N, H, K, V]` or
    None, R = NT * BT; sequence n spans rows cu[n] .. cu[n+1] (chunk-aligned) and slots coff[n] ....
    Returns h `[NT, H, K, V]` (zero in unused slots), V_new `[R, H, V]`, final states `[N, H, K, V]`."""

    @staticmethod
    def forward(ctx, w, u, kd, G, h0, cu, coff, N, BT, prec):
        NT = w.shape[0] // BT
        h, vn, ht = _states(kd, w, u, G, h0, cu, coff, N, NT, BT, G is not None, True, torch.float32,
                            torch.float32, prec, zero_fill=True)
        ctx.save_for_backward(w, kd, G, h, vn, cu, coff)
        ctx.cfg = (N, BT, prec, h0 is not None)
        return h, vn, ht

    @staticmethod
    def backward(ctx, dh, dvn, dht):
        w, kd, G, h, vn, cu, coff = ctx.saved_tensors
        N, BT, prec, has_h0 = ctx.cfg
        R, H, K = w.shape
        V = vn.shape[-1]
        NT = R // BT
        BK, BV = _state_blocks(K, V)
        NV = triton.cdiv(V, BV)
        f32 = dict(device=w.device, dtype=torch.float32)
        dh = torch.zeros(NT, H, K, V, **f32) if dh is None else dh.float().contiguous()
        dvn = torch.zeros(R, H, V, **f32) if dvn is None else dvn.float().contiguous()
        dht = dht.float().contiguous() if dht is not None else None
        du = torch.zeros(R, H, V, **f32)
        dw, dkd = torch.zeros(NV, R, H, K, **f32), torch.zeros(NV, R, H, K, **f32)
        dGl = torch.zeros(NV, NT, H, **f32)
        dh0 = torch.empty(N, H, K, V, **f32) if has_h0 else None
        _bwd_state_kernel[(NV, N * H)](w, kd, vn, G, h, dh, dvn, dht, dh0, du, dw, dkd, dGl, cu, coff, R, NT, H, K,
                                       V, BT, BK, BV, G is not None, dht is not None, has_h0, prec)
        dG = None
        if G is not None:
            dG = torch.zeros(NT, BT, H, **f32)
            dG[:, -1] = dGl.sum(0)
            dG = dG.view(R, H)
        return dw.sum(0), du, dkd.sum(0), dG, dh0, None, None, None, None, None


def _slot_maps(meta, BT: int, BT_all: int):
    """Token <-> chunk-slot maps (device-side): src `[NT*BT]` token row of each slot row, valid `[NT*BT]`,
    dest `[B*T]` slot row of each token, and the slot-aligned sequence bounds cu_r `[N+1]`."""
    cu, cseq, cloc, coff, N, NT = meta
    cu = cu.long()
    n = cseq.long().clamp(max=N - 1)
    src = cu[n][:, None] + cloc.long()[:, None] * BT + torch.arange(BT, device=cu.device)   # [NT, BT]
    valid = (cseq < N)[:, None] & (src < cu[n + 1][:, None])
    src = torch.where(valid, src, 0).reshape(-1)
    t = torch.arange(BT_all, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True).clamp(max=N - 1)                        # [B*T]
    pos = t - cu[seq]
    dest = (coff.long()[seq] + pos // BT) * BT + pos % BT
    nch = (cu[1:] - cu[:-1] + BT - 1) // BT
    cu_r = (torch.cat([coff.long(), (coff.long()[-1:] + nch[-1:])]) * BT).to(torch.int32)
    return src, valid.reshape(-1), dest, cu_r


def _recompute(q, k, v, beta, g, h0, scale, meta, BT, prec):
    """Differentiable recomputation (torch per-chunk pieces + _StatePass): (o `[B, T, H, V]`, final states)."""
    cu, cseq, cloc, coff, N, NT = meta
    B, T, H, K = q.shape
    V = v.shape[-1]
    src, valid, dest, cu_r = _slot_maps(meta, BT, B * T)

    def slots(x):                                                                 # [B, T, H, *] -> [NT, H, BT, *]
        x = x.reshape(B * T, *x.shape[2:]).float()[src]
        x = torch.where(valid.view(-1, *([1] * (x.dim() - 1))), x, 0.)
        return x.view(NT, BT, *x.shape[1:]).transpose(1, 2)

    def rows(x):                                                                  # [NT, H, BT, *] -> [NT*BT, H, *]
        return x.transpose(1, 2).reshape(NT * BT, *x.shape[1:2], *x.shape[3:])

    qc, kc, vc, bc = slots(q), slots(k), slots(v), slots(beta)                    # [NT, H, BT, K|V], [NT, H, BT]
    lower = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()
    strict = lower.tril(-1)
    if g is None:
        G = None
        D = lower.float()                                                         # [BT, BT]
        qg, kd, kb = qc, kc, bc[..., None] * kc
    else:
        G = slots(g).cumsum(-1)                                                   # [NT, H, BT]
        D = torch.where(lower, G[..., :, None] - G[..., None, :], float("-inf")).exp()
        qg = qc * G.exp()[..., None]
        kd = kc * (G[..., -1:] - G).exp()[..., None]
        kb = (bc * G.exp())[..., None] * kc
    A = torch.where(strict, bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * D, 0.) + torch.eye(BT, device=q.device)
    UW = torch.linalg.solve_triangular(A, torch.cat([bc[..., None] * vc, kb], -1), upper=False, unitriangular=True)
    U, W = UW[..., :V], UW[..., V:]                                               # [NT, H, BT, V], [NT, H, BT, K]
    P = (qc @ kc.transpose(-1, -2)) * D                                           # [NT, H, BT, BT]
    h, vn, ht = _StatePass.apply(rows(W).contiguous(), rows(U).contiguous(), rows(kd).contiguous(),
                                 None if G is None else rows(G).contiguous(), h0, cu_r, coff, N, BT, prec)
    vn = vn.view(NT, BT, H, V).transpose(1, 2)                                    # [NT, H, BT, V]
    o = scale * (qg @ h + P @ vn)                                                 # [NT, H, BT, V]
    return rows(o)[dest].view(B, T, H, V), ht


class DeltaChunkFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels; see `chunk_delta`."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, cu_seqlens, chunk_size, output_final_state):
        q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
        B, T = q.shape[:2]
        meta = chunk_layout(B, T, cu_seqlens, chunk_size, q.device)
        G = _local_cumsum(g.contiguous(), meta, chunk_size) if g is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        o, ht = delta_fwd(q, k, v, beta, G, h0, scale, meta, chunk_size, output_final_state)
        ctx.save_for_backward(q, k, v, beta, g, h0, *meta[:4])
        ctx.meta_n = meta[4:]
        ctx.cfg = (scale, chunk_size, initial_state.dtype if initial_state is not None else None)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, h0, *maps = ctx.saved_tensors
        meta = (*maps, *ctx.meta_n)
        scale, BT, h0_dtype = ctx.cfg
        leaves = [x.detach().requires_grad_() for x in (q, k, v, beta)]
        lg = g.detach().requires_grad_() if g is not None else None
        lh0 = h0.detach().requires_grad_() if h0 is not None else None
        with torch.enable_grad():
            o, ht = _recompute(*leaves, lg, lh0, scale, meta, BT, _prec(q.dtype))
            outs, grads_out = [o], [do.float()]
            if dht is not None:
                outs.append(ht)
                grads_out.append(dht.float())
            inputs = leaves + [x for x in (lg, lh0) if x is not None]
            grads = list(torch.autograd.grad(outs, inputs, grads_out, allow_unused=True))
        dq, dk, dv, dbeta = (gr.to(x.dtype) for gr, x in zip(grads[:4], (q, k, v, beta)))
        rest = grads[4:]
        dg = rest.pop(0).to(g.dtype) if g is not None else None
        dh0 = rest.pop(0) if h0 is not None else None
        if dh0 is not None:
            dh0 = dh0.to(h0_dtype)
        return dq, dk, dv, dbeta, dg, dh0, None, None, None, None


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
    _check_inputs(q, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    BT = min(64, max(16, triton.next_power_of_2(int(chunk_size))))
    return DeltaChunkFunction.apply(q, k, v, beta, g, initial_state, float(scale), cu_seqlens, BT,
                                    bool(output_final_state))
