"""Fused gated RMSNorm of the readout, forward and backward.

    y = x * rsqrt(mean(x^2) + eps) * w * silu(g)      over the last dim (V) of every row

x, g `[N, V]` (g optional), w `[V]`. Forward saves the per-row rstd (float32); backward, with
xh = x * rstd and e = dy * w * silu(g):
    dx = rstd * (e - xh * mean(e * xh)),   dg = dy * xh * w * silu'(g),   dw = sum_rows dy * xh * silu(g)
(dw as per-program partial sums, added up outside: deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lsm_kernels._common import _check_device


@triton.jit
def _norm_fwd(x, g, w, y, rstd, N, V, eps, BR: tl.constexpr, BV: tl.constexpr, GATE: tl.constexpr,
              ACC: tl.constexpr):
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_v = tl.arange(0, BV)
    m = (o_r < N)[:, None] & (o_v < V)[None, :]
    p = o_r[:, None] * V + o_v[None, :]
    b_x = tl.load(x + p, mask=m, other=0.).to(ACC)
    r = 1. / tl.sqrt(tl.sum(b_x * b_x, axis=1) / V + eps)
    b_y = b_x * r[:, None] * tl.load(w + o_v, mask=o_v < V, other=0.).to(ACC)[None, :]
    if GATE:
        b_g = tl.load(g + p, mask=m, other=0.).to(ACC)
        b_y = b_y * b_g * tl.sigmoid(b_g)
    tl.store(y + p, b_y.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + o_r, r, mask=o_r < N)


@triton.jit
def _norm_bwd(x, g, w, rstd, dy, dx, dg, part, N, V, BR: tl.constexpr, BV: tl.constexpr, NSUB: tl.constexpr,
              GATE: tl.constexpr, ACC: tl.constexpr):
    i_p = tl.program_id(0).to(tl.int64)
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    b_w = tl.load(w + o_v, mask=m_v, other=0.).to(ACC)
    b_dw = tl.zeros([BV], dtype=ACC)
    for i_s in range(NSUB):
        o_r = (i_p * NSUB + i_s) * BR + tl.arange(0, BR)
        m = (o_r < N)[:, None] & m_v[None, :]
        p = o_r[:, None] * V + o_v[None, :]
        b_x = tl.load(x + p, mask=m, other=0.).to(ACC)
        r = tl.load(rstd + o_r, mask=o_r < N, other=0.).to(ACC)
        xh = b_x * r[:, None]
        d = tl.load(dy + p, mask=m, other=0.).to(ACC)
        if GATE:
            b_g = tl.load(g + p, mask=m, other=0.).to(ACC)
            sig = tl.sigmoid(b_g)
            dg_ = d * xh * b_w[None, :] * sig * (1 + b_g * (1 - sig))
            tl.store(dg + p, dg_.to(dg.dtype.element_ty), mask=m)
            d = d * b_g * sig
        b_dw += tl.sum(d * xh, axis=0)
        e = d * b_w[None, :]
        b_dx = r[:, None] * (e - xh * (tl.sum(e * xh, axis=1) / V)[:, None])
        tl.store(dx + p, b_dx.to(dx.dtype.element_ty), mask=m)
    tl.store(part + i_p * V + o_v, b_dw, mask=m_v)


class GatedRMSNormFunction(torch.autograd.Function):
    """Autograd wrapper; see `gated_rms_norm`."""

    @staticmethod
    def forward(ctx, x, g, w, eps):
        N, V = x.shape
        acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        BV = triton.next_power_of_2(V)
        BR = max(1, min(64, 4096 // BV))
        y = torch.empty_like(x)
        rstd = x.new_empty(N, dtype=torch.float64 if acc == tl.float64 else torch.float32)
        _norm_fwd[(triton.cdiv(N, BR),)](x, g, w, y, rstd, N, V, eps, BR, BV, g is not None, acc)
        ctx.save_for_backward(x, g, w, rstd)
        ctx.acc = acc
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, w, rstd = ctx.saved_tensors
        N, V = x.shape
        BV = triton.next_power_of_2(V)
        BR = max(1, min(64, 4096 // BV))
        NSUB = max(1, min(16, triton.cdiv(N, BR * 128)))
        n_prog = triton.cdiv(N, BR * NSUB)
        dx = torch.empty_like(x)
        dg = torch.empty_like(g) if g is not None else None
        part = x.new_empty(n_prog, V, dtype=rstd.dtype)
        _norm_bwd[(n_prog,)](x, g, w, rstd, dy.contiguous(), dx, dg, part, N, V, BR, BV, NSUB, g is not None, ctx.acc)
        return dx, dg, part.sum(0).to(w.dtype), None


def gated_rms_norm(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of x `[..., V]`, times `weight [V]`, times `silu(gate)` when given."""
    _check_device(x)
    V = x.shape[-1]
    if weight.shape != (V,) or (gate is not None and gate.shape != x.shape):
        raise ValueError(f"gated_rms_norm: weight must be [{V}] and gate like x {tuple(x.shape)}, got "
                         f"{tuple(weight.shape)} and {None if gate is None else tuple(gate.shape)}")
    if x.numel() == 0:
        return x.clone()
    flat = lambda t: t.reshape(-1, V).contiguous()
    y = GatedRMSNormFunction.apply(flat(x), None if gate is None else flat(gate.to(x.dtype)), weight.contiguous(),
                                   float(eps))
    return y.view(x.shape)
