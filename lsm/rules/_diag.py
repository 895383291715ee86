"""The diagonal-decay family: `S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`.

One implementation serves linear_attention (no decay), retnet / lightning (a constant per-head
decay), mamba2 (a data-dependent scalar per head) and gla / hgrn2 (a data-dependent vector over K):
`diag_step` (the definition), `diag_chunk` (the torch chunked form) and `DiagonalDecayRule`, the
class whose configurations those rules are (the backend plumbing written once).
Decays are log-space `g = log(alpha) <= 0`: `None`, `[B, T, H]` (scalar) or `[B, T, H, K]` (vector).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lsm.dtypes import at_least_float32
from lsm.rules._chunking import ChunkLayout
from lsm.rules._fla import fla_chunk
from lsm.rules.base import UpdateRule, _check


def diag_step(q: Tensor, k: Tensor, v: Tensor, S: Tensor, scale: float, g: Tensor | None) -> tuple[Tensor, Tensor]:
    """One token. q, k `[B, H, K]`, v `[B, H, V]`, S `[B, H, K, V]`, g None / `[B, H]` / `[B, H, K]`."""
    dt = S.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if g is not None:
        g = g.to(dt)
        decay = g.exp()[..., None, None] if g.dim() == 2 else g.exp()[..., None]  # [B, H, 1|K, 1]
        S = decay * S
    S = S + k[..., :, None] * v[..., None, :]                                     # [B, H, K, V]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, S)
    return o, S


def _intra_vector(q: Tensor, k: Tensor, v: Tensor, G: Tensor) -> Tensor:
    """Intra-chunk output under a per-key decay, without the `[C, C, K]` decay tensor.

    q, k `[..., C, K]`, v `[..., C, V]`, G `[..., C, K]` (in-chunk cumulative log-decay) ->
    `o_i = sum_{j<=i} (sum_k q_ik k_jk exp(G_ik - G_jk)) v_j`, `[..., C, V]`.

    Sub-chunks, halved level by level: at block size s, every block of 2s tokens is a first and a
    second half, and a pair (i in the second half, j in the first) factors through `r`, the
    cumulative decay at the second half's first token: `exp(G_i - r) * exp(r - G_j)`, both exponents
    <= 0. So each level is one matmul of decay-folded q and k, no value exceeds exp(0) however strong
    the decay (a factor that underflows bounds a product that underflows too), and the exact per-key
    decay is needed only on the diagonal, where it is exp(0) = 1. Every pair j < i is met at exactly
    one level: the one whose block first holds both i and j. Work: log2(C) passes over `[C, K]`.
    """
    *lead, C, K = q.shape
    P = 1 << (C - 1).bit_length()                                             # C rounded up to a power of 2
    if P != C:  # pad with tokens that read and write nothing and do not decay
        q, k, v = (F.pad(x, (0, 0, 0, P - C)) for x in (q, k, v))
        G = torch.cat([G, G[..., -1:, :].expand(*lead, P - C, K)], -2)
    o = (q * k).sum(-1, keepdim=True) * v                                    # [..., P, V] the diagonal j = i
    s = P // 2
    while s >= 1:
        qs, ks, vs, Gs = (x.unflatten(-2, (P // (2 * s), 2, s)) for x in (q, k, v, G))  # [..., nb, 2, s, K|V]
        r = Gs[..., 1, :1, :]                                                 # [..., nb, 1, K]
        q_hat = qs[..., 1, :, :] * (Gs[..., 1, :, :] - r).exp()              # [..., nb, s, K] second halves
        k_hat = ks[..., 0, :, :] * (r - Gs[..., 0, :, :]).exp()              # [..., nb, s, K] first halves
        blk = (q_hat @ k_hat.transpose(-1, -2)) @ vs[..., 0, :, :]           # [..., nb, s, V]
        o.unflatten(-2, (P // (2 * s), 2, s))[..., 1, :, :] += blk            # into the second halves
        s //= 2
    return o[..., :C, :]


def diag_chunk(q: Tensor, k: Tensor, v: Tensor, h0: Tensor | None, scale: float, layout: ChunkLayout,
               g: Tensor | None) -> tuple[Tensor, Tensor]:
    """Chunked form. Returns (o `[B, T, H, V]` in the compute dtype, final states `[N, H, K, V]`).

    Per chunk of C tokens with in-chunk cumulative log-decay `G_i = sum_{j<=i} g_j` (so every
    exponent below is <= 0 and nothing overflows, however strong the decay):
      1. intra-chunk: o_i  = sum_{j<=i} (q_i . (k_j * exp(G_i - G_j))) v_j   (all chunks at once;
                      a per-key decay through sub-chunks, `_intra_vector`, never `[C, C, K]`)
      2. chunk state: U    = sum_j (k_j * exp(G_C - G_j)) v_j^T
      3. inter-chunk: S_c  = exp(G_C) * S_{c-1} + U   (the only loop, over chunk columns)
      4. readout:     o_i += (q_i * exp(G_i)) S_{c-1}
    """
    H, K = q.shape[2:]
    V = v.shape[-1]
    dt = at_least_float32(q.dtype)
    # chunks with heads first: [Nb, NC, H, C, K|V]
    qc, kc, vc = (layout.to_chunks(x.to(dt)).transpose(2, 3).contiguous() for x in (q, k, v))
    h0s = layout.initial_states(h0, (H, K, V), dt, q.device)                 # [N, H, K, V]
    C = layout.C
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()       # [Ci, Cj]
    # 1. intra-chunk output [Nb, NC, H, C, V]; decay-folded q (readout) and k (state write)
    if g is None:
        o = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0) @ vc
        q_in, k_out, last = qc, kc, None
    else:
        G = layout.to_chunks(g.to(dt)).transpose(2, 3).contiguous().cumsum(3)  # [Nb, NC, H, C(, K)]
        if g.dim() == 3:
            diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
            o = ((qc @ kc.transpose(-1, -2)) * diff.exp()) @ vc
            G = G[..., None]                                                  # [Nb, NC, H, C, 1]
        else:
            o = _intra_vector(qc, kc, vc, G)
        last = G[..., -1:, :]                                                 # [Nb, NC, H, 1, 1|K]
        q_in, k_out = qc * G.exp(), kc * (last - G).exp()
        last = last.transpose(-1, -2).exp()                                   # [Nb, NC, H, 1|K, 1]
    # 2. each chunk's own contribution to the state
    U = k_out.transpose(-1, -2) @ vc                                          # [Nb, NC, H, K, V]
    # 3. the state entering and leaving every chunk
    S = q.new_zeros(layout.Nb, H, K, V, dtype=dt)
    entering, states = [], []
    for c in range(layout.NC):
        S = layout.reset(S, h0s, c)
        entering.append(S)
        S = (S if last is None else last[:, c] * S) + U[:, c]
        states.append(S)
    # 4. readout of the entering state
    o = o + q_in @ torch.stack(entering, 1)                                  # [Nb, NC, H, C, V]
    o = layout.from_chunks((scale * o).transpose(2, 3))                       # [B, T, H, V]
    return o, layout.final_states(torch.stack(states, 1))


class DiagonalDecayRule(UpdateRule):
    """The family class: a rule of this family is a configuration of it, stating its gates and defaults.

    decay input (in `gates`):  none (linear_attention) | `g_gamma [H]`, a constant log-decay per head
    defaulted by `default_gamma` (retnet, lightning) | `g [B, T, H]` (mamba2) | `g [B, T, H, K]` (gla, hgrn2).
    `fla_op`: the fla kernel computing the same function (lsm.rules._fla).
    """

    has_fla = True
    has_triton_step = True
    has_triton_chunk = True
    fla_op = "simple_gla"

    def default_gamma(self, num_heads: int, device=None) -> Tensor:
        """`g_gamma [H]` when the caller gives none (rules with a constant decay)."""
        raise NotImplementedError(f"{self.name}: no default constant decay")

    @property
    def _constant(self) -> bool:
        return "g_gamma" in self.gates

    # ---------------------------------------------------------------- the constant decay `g_gamma [H]`
    def _validate(self, q, k, v, initial_state, cu_seqlens, gates, single_step=False):
        if not self._constant:
            return super()._validate(q, k, v, initial_state, cu_seqlens, gates, single_step)
        gg = gates.get("g_gamma")
        rest = {n: t for n, t in gates.items() if n != "g_gamma"}
        super()._validate(q, k, v, initial_state, cu_seqlens, rest, single_step)
        if gg is not None:
            H = q.shape[-2]
            _check(isinstance(gg, torch.Tensor) and gg.is_floating_point(), TypeError,
                   f"{self.name}: `g_gamma` must be a floating-point tensor [H]")
            _check(tuple(gg.shape) == (H,), ValueError, f"{self.name}: `g_gamma` must be [H] = ({H},), got {tuple(gg.shape)}")
            if gg.device.type == "cpu":
                _check(not bool((gg > 0).any()), ValueError, f"{self.name}: `g_gamma` holds log-decays and must be <= 0")

    def _fill(self, q, gates):
        if not self._constant:
            return super()._fill(q, gates)
        gg = gates.get("g_gamma")
        if gg is None:
            gg = self.default_gamma(q.shape[-2], q.device)
        return {"g_gamma": gg}

    def _recurrent_dense(self, q, k, v, initial_state, output_final_state, scale, gates):
        if self._constant:
            gates = {"g_gamma": gates["g_gamma"].view(1, 1, -1).expand(q.shape[0], q.shape[1], -1)}  # [B, T, H]
        return super()._recurrent_dense(q, k, v, initial_state, output_final_state, scale, gates)

    # ---------------------------------------------------------------- the four forms
    def _step(self, q, k, v, state, scale, g=None, g_gamma=None):
        if g_gamma is not None:
            g = g_gamma.to(state[0].dtype).expand(q.shape[0], -1)             # [B, H]
        o, S = diag_step(q, k, v, state[0], scale, g)
        return o, (S,)

    def _chunk_torch(self, q, k, v, initial_state, scale, layout, g=None, g_gamma=None):
        if g_gamma is not None:
            g = g_gamma.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1)     # [B, T, H]
        return diag_chunk(q, k, v, initial_state, scale, layout, g)

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, g=None, g_gamma=None):
        decay = {"g": g} if g is not None else {"g_gamma": g_gamma} if g_gamma is not None else {}
        return fla_chunk(self.fla_op, q, k, v, initial_state, output_final_state, scale, cu_seqlens, **decay)

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, g=None,
                      g_gamma=None):
        from lsm_kernels.diag import chunk_diag
        return chunk_diag(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
