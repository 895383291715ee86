"""The diagonal-decay family: `S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`.

One implementation serves linear_attention (no decay), retnet / lightning (a constant per-head
decay), mamba2 (a data-dependent scalar per head) and gla / hgrn2 (a data-dependent vector over K):
`diag_step` (the definition), `diag_chunk` (the torch chunked form) and `DiagonalDecayRule`, the
class whose configurations those rules are (the backend plumbing written once).
Decays are log-space `g = log(alpha) <= 0`: `None`, `[B, T, H]` (scalar) or `[B, T, H, K]` (vector).
"""
from __future__ import annotations

import torch
from torch import Tensor

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


def diag_chunk(q: Tensor, k: Tensor, v: Tensor, h0: Tensor | None, scale: float, layout: ChunkLayout,
               g: Tensor | None) -> tuple[Tensor, Tensor]:
    """Chunked form. Returns (o `[B, T, H, V]` in the compute dtype, final states `[N, H, K, V]`).

    Per chunk of C tokens with in-chunk cumulative log-decay `G_i = sum_{j<=i} g_j` (so every
    exponent below is <= 0 and nothing overflows, however strong the decay):
      1. inter-chunk: o_i  = (q_i * exp(G_i)) S
      2. intra-chunk: o_i += sum_{j<=i} (q_i . (k_j * exp(G_i - G_j))) v_j
      3. state:       S    = exp(G_C) * S + sum_j (k_j * exp(G_C - G_j)) v_j^T
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = (layout.to_chunks(x.to(dt)) for x in (q, k, v))             # [Nb, NC, C, H, K|V]
    gc = None if g is None else layout.to_chunks(g.to(dt))                    # [Nb, NC, C, H(, K)]
    vector = g is not None and g.dim() == 4
    h0s = layout.initial_states(h0, (H, K, V), dt, q.device)                 # [N, H, K, V]
    C = layout.C
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()       # [Ci, Cj]
    S = q.new_zeros(layout.Nb, H, K, V, dtype=dt)
    outs, states = [], []
    for c in range(layout.NC):
        S = layout.reset(S, h0s, c)
        qi, ki, vi = qc[:, c], kc[:, c], vc[:, c]                             # [Nb, C, H, K|V]
        if gc is None:
            A = torch.einsum("bihk,bjhk->bhij", qi, ki).masked_fill(~causal, 0)
            o = torch.einsum("bihk,bhkv->bihv", qi, S) + torch.einsum("bhij,bjhv->bihv", A, vi)
            S = S + torch.einsum("bjhk,bjhv->bhkv", ki, vi)
        elif not vector:
            G = gc[:, c].cumsum(1)                                            # [Nb, C, H]
            diff = (G[:, :, None] - G[:, None, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
            A = torch.einsum("bihk,bjhk->bhij", qi, ki) * diff.exp().permute(0, 3, 1, 2)
            o = torch.einsum("bihk,bhkv->bihv", qi * G.exp()[..., None], S) + torch.einsum("bhij,bjhv->bihv", A, vi)
            Gl = G[:, -1]                                                     # [Nb, H]
            kd = ki * (Gl[:, None] - G).exp()[..., None]
            S = Gl.exp()[..., None, None] * S + torch.einsum("bjhk,bjhv->bhkv", kd, vi)
        else:
            G = gc[:, c].cumsum(1)                                            # [Nb, C, H, K]
            diff = (G[:, :, None] - G[:, None, :]).masked_fill(~causal[None, :, :, None, None], float("-inf"))
            A = torch.einsum("bihk,bjhk,bijhk->bhij", qi, ki, diff.exp())     # [Nb, H, Ci, Cj]
            o = torch.einsum("bihk,bhkv->bihv", qi * G.exp(), S) + torch.einsum("bhij,bjhv->bihv", A, vi)
            Gl = G[:, -1]                                                     # [Nb, H, K]
            kd = ki * (Gl[:, None] - G).exp()
            S = Gl.exp()[..., None] * S + torch.einsum("bjhk,bjhv->bhkv", kd, vi)
        outs.append(scale * o)
        states.append(S)
    o = layout.from_chunks(torch.stack(outs, 1))                              # [B, T, H, V]
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
