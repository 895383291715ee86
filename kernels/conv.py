"""Fused short causal convolution: depthwise conv over time + bias + SiLU (+ per-head L2 norm), fwd and bwd.

    u_t = b + sum_{j<W} w_j * x_{t-(W-1-j)}      (taps that would reach before the sequence start read 0)
    a_t = silu(u_t)                              (ACT)
    y_t = a_t / max(||a_t||_head, eps)           (NORM: each group of `head` channels, as F.normalize)

Rows are tokens, `x [R, C]` with R = B * T; a row's position inside its own sequence is `r mod T`
(a dense batch) or `pos[r]` (a packed batch, from `cu_seqlens` on the device): one kernel for both,
no host synchronisation. Backward recomputes u from x (nothing but x is saved):
    G  = dL/du          (_bwd_g; also per-program partial sums of dL/dw and dL/db)
    dx_r = sum_j w_j G_{r+(W-1-j)} over the later rows of the same sequence      (_bwd_dx)
The layer's conv in training replaces torch's conv1d + transposes + SiLU + normalize (six passes
over the activations, more in backward) with one pass forward and two backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsm_kernels._common import _check_device

EPS = tl.constexpr(1e-12)  # F.normalize's default


@triton.jit
def _pos(pos, t, m_t, T, HAS_POS: tl.constexpr):
    """Position of token t inside its own sequence."""
    if HAS_POS:
        return tl.load(pos + t, mask=m_t, other=0).to(tl.int64)
    return t % T


@triton.jit
def _rows(src, o_r, m_r, MS: tl.constexpr, MAP: tl.constexpr):
    """Row r's source in x viewed as [L * MS, CX]: (flat row xr, token t, group m)."""
    if MAP:
        xr = tl.load(src + o_r, mask=m_r, other=0).to(tl.int64)
    else:
        xr = o_r
    return xr, xr // MS, xr % MS


@triton.jit
def _pre(x, w, b, xr, m_r, p, g, o_c, m_c, CX, MS: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr,
         MAP: tl.constexpr, ACC: tl.constexpr):
    """u = b + sum_j w_j x_{t-(W-1-j)} for a [BR, BC] tile of rows xr (group g of each row when MAP)."""
    m = m_r[:, None] & m_c[None, :]
    u = tl.zeros([xr.shape[0], o_c.shape[0]], dtype=ACC)
    if MAP:  # rows of different groups (memories) in one tile: per-row weights
        cc = g[:, None] * CX + o_c[None, :]
        if HAS_BIAS:
            u += tl.load(b + cc, mask=m, other=0.).to(ACC)
    else:
        if HAS_BIAS:
            u += tl.load(b + o_c, mask=m_c, other=0.).to(ACC)[None, :]
    for j in tl.static_range(W):
        s = W - 1 - j
        ms = m & (p >= s)[:, None]
        xs = tl.load(x + (xr - s * MS)[:, None] * CX + o_c[None, :], mask=ms, other=0.).to(ACC)
        if MAP:
            u += xs * tl.load(w + cc * W + j, mask=m, other=0.).to(ACC)
        else:
            u += xs * tl.load(w + o_c * W + j, mask=m_c, other=0.).to(ACC)[None, :]
    return u


@triton.jit
def _tile(x, w, b, pos, src, R, T, CX, MS: tl.constexpr, W: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
          CT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, MAP: tl.constexpr, ACC: tl.constexpr):
    """This program's output tile: rows o_r, channels o_c (the CT <= BC channels from i_c * CT: one whole head
    when normalising, whatever its size), their masks, and u (before the activation)."""
    i_r, i_c = tl.program_id(0), tl.program_id(1)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_c = i_c * CT + tl.arange(0, BC)
    m_r, m_c = o_r < R, (tl.arange(0, BC) < CT) & (o_c < CX)
    xr, t, g = _rows(src, o_r, m_r, MS, MAP)
    p = _pos(pos, t, m_r, T, HAS_POS)
    return o_r, o_c, m_r, m_c, _pre(x, w, b, xr, m_r, p, g, o_c, m_c, CX, MS, W, HAS_BIAS, MAP, ACC)


@triton.jit
def _conv_fwd(x, w, b, pos, src, y, R, T, CX, MS: tl.constexpr, W: tl.constexpr, BR: tl.constexpr,
              BC: tl.constexpr, CT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, MAP: tl.constexpr,
              ACT: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr):
    o_r, o_c, m_r, m_c, u = _tile(x, w, b, pos, src, R, T, CX, MS, W, BR, BC, CT, HAS_BIAS, HAS_POS, MAP, ACC)
    if ACT:
        u = u * tl.sigmoid(u)
    if NORM:
        u = u / tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), EPS)[:, None]
    tl.store(y + o_r[:, None] * CX + o_c[None, :], u.to(y.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


@triton.jit
def _conv_bwd_g(x, w, b, pos, src, dy, gr, R, T, CX, MS: tl.constexpr, W: tl.constexpr, BR: tl.constexpr,
                BC: tl.constexpr, CT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, MAP: tl.constexpr,
                ACT: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr):
    """G = dL/du of every output row (u recomputed from x)."""
    o_r, o_c, m_r, m_c, u = _tile(x, w, b, pos, src, R, T, CX, MS, W, BR, BC, CT, HAS_BIAS, HAS_POS, MAP, ACC)
    m = m_r[:, None] & m_c[None, :]
    d = tl.load(dy + o_r[:, None] * CX + o_c[None, :], mask=m, other=0.).to(ACC)
    a = u
    if ACT:
        sig = tl.sigmoid(u)
        a = u * sig
    if NORM:
        n = tl.sqrt(tl.sum(a * a, axis=1))
        nn = tl.maximum(n, EPS)
        yv = a / nn[:, None]
        d = d / nn[:, None] - tl.where(n > EPS, tl.sum(yv * d, axis=1) / nn, 0.)[:, None] * yv
    if ACT:
        d = d * sig * (1 + u * (1 - sig))
    tl.store(gr + o_r[:, None] * CX + o_c[None, :], d.to(gr.dtype.element_ty), mask=m)


@triton.jit
def _g_at(gr, inv, t, m_t, g, c, m_c, CX, MS: tl.constexpr, MAP: tl.constexpr, ACC: tl.constexpr):
    """G of tokens t, group g, channels c (in token order): the packed row of (t, g), 0 where not routed."""
    if MAP:
        row = tl.load(inv + t * MS + g, mask=m_t, other=-1)
        m_t = m_t & (row >= 0)
    else:
        row = t
    return tl.load(gr + row[:, None] * CX + c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.).to(ACC)


@triton.jit
def _conv_bwd_dx(gr, x, w, pos, inv, dx, part, L, T, CX, MS: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                 BR: tl.constexpr, BC: tl.constexpr, NSUB: tl.constexpr, HAS_POS: tl.constexpr,
                 MAP: tl.constexpr, ACC: tl.constexpr):
    """In token order ([L, MS * CX], a channel tile inside one group: BC divides CX):
    dx_t = sum_j w_j G_{t+s} (s = W-1-j, t+s in t's sequence), and this program's partial dL/dw
    (rows 0..W-1 of `part[program]`) and dL/db (row WP). W <= 4."""
    i_p, i_c = tl.program_id(0), tl.program_id(1)
    CC = CX * MS
    cc = i_c * BC + tl.arange(0, BC)
    m_c = cc < CC
    g = (i_c * BC) // CX
    c = cc - g * CX
    o_w = tl.arange(0, WP)
    dw0 = tl.zeros([BR, BC], dtype=ACC)
    dw1 = tl.zeros([BR, BC], dtype=ACC)
    dw2 = tl.zeros([BR, BC], dtype=ACC)
    dw3 = tl.zeros([BR, BC], dtype=ACC)
    db = tl.zeros([BR, BC], dtype=ACC)
    for i_s in range(NSUB):
        t = (i_p.to(tl.int64) * NSUB + i_s) * BR + tl.arange(0, BR)
        m_t = t < L
        p = _pos(pos, t, m_t, T, HAS_POS)
        g0 = _g_at(gr, inv, t, m_t, g, c, m_c, CX, MS, MAP, ACC)
        db += g0
        acc = tl.zeros([BR, BC], dtype=ACC)
        for j in tl.static_range(W):
            s = W - 1 - j
            w_j = tl.load(w + cc * W + j, mask=m_c, other=0.).to(ACC)
            # dx: the later token t+s reads x_t through tap j
            t_n = t + s
            m_n = (t_n < L) & (_pos(pos, t_n, t_n < L, T, HAS_POS) >= s)
            acc += _g_at(gr, inv, t_n, m_n, g, c, m_c, CX, MS, MAP, ACC) * w_j[None, :]
            # dw: token t reads x_{t-s} through tap j
            ms = (m_t & (p >= s))[:, None] & m_c[None, :]
            prod = tl.load(x + (t - s)[:, None] * CC + cc[None, :], mask=ms, other=0.).to(ACC) * g0
            if j == 0:
                dw0 += prod
            elif j == 1:
                dw1 += prod
            elif j == 2:
                dw2 += prod
            else:
                dw3 += prod
        tl.store(dx + t[:, None] * CC + cc[None, :], acc.to(dx.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])
    b_dw = (tl.where(o_w == 0, 1., 0.).to(ACC)[:, None] * tl.sum(dw0, axis=0)[None, :]
            + tl.where(o_w == 1, 1., 0.).to(ACC)[:, None] * tl.sum(dw1, axis=0)[None, :]
            + tl.where(o_w == 2, 1., 0.).to(ACC)[:, None] * tl.sum(dw2, axis=0)[None, :]
            + tl.where(o_w == 3, 1., 0.).to(ACC)[:, None] * tl.sum(dw3, axis=0)[None, :])
    base = i_p.to(tl.int64) * (WP + 1) * CC
    tl.store(part + base + o_w[:, None] * CC + cc[None, :], b_dw, mask=(o_w < W)[:, None] & m_c[None, :])
    tl.store(part + base + WP * CC + cc, tl.sum(db, axis=0), mask=m_c)


def _blocks(C: int, head: int | None) -> tuple[int, int, int, int]:
    """(rows, channel lanes BC, channels CT) of a tile and its warps: exactly one head per tile when normalising
    (CT = head <= BC, the lanes past it masked: a head of any size, a power of two or not)."""
    BC = triton.next_power_of_2(head) if head else min(triton.next_power_of_2(C), 128)
    BR = max(1, min(64, 4096 // BC))
    return BR, BC, head or BC, 8 if BR * BC >= 4096 else 4


class ShortConvFunction(torch.autograd.Function):
    """Autograd wrapper; see `short_conv`."""

    @staticmethod
    def forward(ctx, x, weight, bias, pos, src, inv, T, MS, act, head):
        L, CC = x.shape
        CX = CC // MS
        R = L if src is None else src.shape[0]
        W = weight.shape[1]
        acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        BR, BC, CT, warps = _blocks(CX, head)
        y = x.new_empty(R, CX)
        _conv_fwd[(triton.cdiv(R, BR), triton.cdiv(CX, CT))](
            x, weight, bias, pos, src, y, R, T, CX, MS, W, BR, BC, CT, bias is not None, pos is not None, src is not None,
            act, head is not None, acc, num_warps=warps)
        ctx.save_for_backward(x, weight, bias, pos, src, inv)
        ctx.cfg = (T, MS, act, head, acc)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, pos, src, inv = ctx.saved_tensors
        T, MS, act, head, acc = ctx.cfg
        L, CC = x.shape
        CX = CC // MS
        R = dy.shape[0]
        W = weight.shape[1]
        BR, BC, CT, warps = _blocks(CX, head)
        gr = torch.empty_like(dy)
        _conv_bwd_g[(triton.cdiv(R, BR), triton.cdiv(CX, CT))](
            x, weight, bias, pos, src, dy.contiguous(), gr, R, T, CX, MS, W, BR, BC, CT, bias is not None,
            pos is not None, src is not None, act, head is not None, acc, num_warps=warps)
        BC = min(128, CX & -CX)                                               # a power of two dividing CX
        BR, warps = max(1, min(64, 2048 // BC)), 4
        NSUB = max(1, min(16, triton.cdiv(L, BR * 256)))
        n_prog = triton.cdiv(L, BR * NSUB)
        WP = triton.next_power_of_2(W)
        part = x.new_empty(n_prog, WP + 1, CC, dtype=torch.float64 if acc == tl.float64 else torch.float32)
        dx = torch.empty_like(x)
        _conv_bwd_dx[(n_prog, triton.cdiv(CC, BC))](gr, x, weight, pos, inv, dx, part, L, T, CX, MS, W, WP, BR, BC,
                                                    NSUB, pos is not None, src is not None, acc, num_warps=warps)
        part = part.sum(0)                                                    # [WP + 1, CC]
        dw = part[:W].t().to(weight.dtype)
        db = part[WP].to(bias.dtype) if bias is not None else None
        return dx, dw, db, None, None, None, None, None, None, None


def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               pos: torch.Tensor | None = None, activation: bool = True, head: int | None = None,
               gather: tuple | None = None) -> torch.Tensor:
    """Causal depthwise convolution over time, fused with SiLU and an optional per-head L2 norm.

    Args:
        x: `[B, T, C]` (a packed batch: B = 1 with `pos`).
        weight: `[C, W]` taps, the last one at the current token. bias: `[C]` or None.
        pos: `[B * T]` position of each token inside its own sequence (packed batches), else None.
        activation: apply SiLU. head: L2-normalise each group of `head` consecutive output channels.
        gather: `(src [R], inv [B*T*G], G)`: the C channels are G groups (memories) of C/G, and only
            R (token, group) pairs are wanted: output row r is group src[r] % G of token src[r] // G,
            and inv[t * G + g] is that row, or -1 for a pair not wanted. The convolution still runs
            over the token stream; unwanted pairs are never computed (MoM's routed keys and values).
    Returns y `[B, T, C]` in x's dtype, or `[R, C/G]` with `gather`; gradients reach x, weight and bias.
    """
    _check_device(x)
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"short_conv: x must be [B, T, C] and weight [C, W], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    B, T, C = x.shape
    src, inv, G = gather if gather is not None else (None, None, 1)
    if weight.shape[1] > 4:
        raise ValueError(f"short_conv: the kernel takes widths up to 4, got {weight.shape[1]} (use the torch form)")
    if C % G or (head is not None and ((C // G) % head or head > 1024)):
        raise ValueError(f"short_conv: `head` ({head}) must divide the channels per group ({C} / {G}) and be at "
                         f"most 1024")
    if pos is not None and pos.numel() != B * T:
        raise ValueError(f"short_conv: `pos` must hold one position per token ({B * T}), got {pos.numel()}")
    if gather is not None and inv.numel() != B * T * G:
        raise ValueError(f"short_conv: `inv` must hold one entry per (token, group) ({B * T * G}), got {inv.numel()}")
    if B * T == 0 or (src is not None and src.numel() == 0):
        return x.new_zeros(0, C // G) if gather is not None else x.clone()
    y = ShortConvFunction.apply(x.reshape(B * T, C).contiguous(), weight.contiguous(),
                                None if bias is None else bias.contiguous(), pos,
                                None if src is None else src.contiguous(), None if inv is None else inv.contiguous(),
                                max(T, 1), G, bool(activation), head)
    return y if gather is not None else y.view(B, T, C)
