"""The diagonal-decay family: `S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`.

One implementation serves linear_attention (no decay), retnet / lightning (a constant per-head
decay), mamba2 (a data-dependent scalar per head) and gla / hgrn2 (a data-dependent vector over K).
Decays are log-space `g = log(alpha) <= 0`: `None`, `[B, T, H]` (scalar) or `[B, T, H, K]` (vector).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lsm.rules._chunking import ChunkLayout
from lsm.rules._fla import fla_chunk
from lsm.rules.base import UpdateRule


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


class GatedDiagRule(UpdateRule):
    """A diagonal-decay rule with one per-token log-decay gate `g` (gla, hgrn2: per key; mamba2: per head).

    Subclasses set `name`, `gates` and `fla_op` (the fla kernel computing the same function)."""

    has_fla = True
    has_triton_step = True
    fla_op = ""

    def _step(self, q, k, v, state, scale, g):
        o, S = diag_step(q, k, v, state[0], scale, g)
        return o, (S,)

    def _chunk_torch(self, q, k, v, initial_state, scale, layout, g):
        return diag_chunk(q, k, v, initial_state, scale, layout, g)

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, g):
        return fla_chunk(self.fla_op, q, k, v, initial_state, output_final_state, scale, cu_seqlens, g=g)

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, g):
        from lsm_kernels.diag import chunk_diag
        return chunk_diag(q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
