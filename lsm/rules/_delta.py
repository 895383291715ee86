"""The delta family: `S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = scale * S_t^T q_t`.

One implementation (`delta_step` the definition, `delta_chunk` the torch chunked form, `DeltaRule`
the class whose configurations the rules are) serves deltanet (no decay, `a_t = 1`) and gated_deltanet (a data-dependent
scalar decay per head, `a_t = exp(g_t)`, `g [B, T, H] <= 0`). `beta [B, T, H] >= 0` is the
write strength (beta in [0, 2] keeps `I - beta k k^T` non-expansive for unit keys). Keys are
expected L2-normalised; the layer normalises them, this module does not.

Equivalently (the form the chunked algorithm is built on) every token writes a correction
`delta_t = beta_t (v_t - a_t S_{t-1}^T k_t)` and `S_t = a_t S_{t-1} + k_t delta_t^T`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lsm.dtypes import at_least_float32
from lsm.rules._chunking import ChunkLayout
from lsm.rules._fla import fla_chunk
from lsm.rules.base import UpdateRule


def delta_step(q: Tensor, k: Tensor, v: Tensor, S: Tensor, scale: float, beta: Tensor,
               g: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token (the definition). q, k `[B, H, K]`, v `[B, H, V]`, S `[B, H, K, V]`, beta / g `[B, H]`."""
    dt = S.dtype
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    if g is not None:
        S = g.to(dt).exp()[..., None, None] * S                                   # a_t S_{t-1}
    delta = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, S))           # [B, H, V]
    S = S + k[..., :, None] * delta[..., None, :]                                 # [B, H, K, V]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, S)
    return o, S


def delta_chunk(q: Tensor, k: Tensor, v: Tensor, h0: Tensor | None, scale: float, layout: ChunkLayout,
                beta: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked form through the WY/UT representation. Returns (o `[B, T, H, V]` in the compute dtype,
    final states `[N, H, K, V]`).

    Within a chunk of C tokens entered with state S0, let `G_i = sum_{j<=i} g_j` (in-chunk
    cumulative log-decay, G = 0 without decay) and `D_ij = exp(G_i - G_j)` for j <= i (every
    exponent <= 0: nothing overflows however strong the decay). Unrolling the recurrence,
        S_i     = exp(G_i) S0 + sum_{j<=i} D_ij k_j delta_j^T
        delta_i = beta_i v_i - beta_i exp(G_i) S0^T k_i - sum_{j<i} beta_i D_ij (k_i . k_j) delta_j
    i.e. the unit lower-triangular system
        A Delta = diag(beta) V - diag(beta exp(G)) K S0,   A = I + strictly_lower(diag(beta) K K^T * D),
    so with T = A^{-1} (a triangular solve, never an explicit inverse):
        Delta = U - W S0,   U = T diag(beta) V,   W = T diag(beta exp(G)) K.
    U and W do not depend on S0, so they are computed for all chunks at once; only the state
    passing below loops, over the chunk columns:
        o     = scale * ((Q * exp(G)) S0 + (Q K^T * D) Delta)
        S_end = exp(G_C) S0 + (K * exp(G_C - G))^T Delta
    Padding slots (beta 0, g 0, k = v = 0) give delta = 0 and decay 1: they leave S unchanged.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = at_least_float32(q.dtype)
    C = layout.C

    # 1. chunk-aligned, head-major layout
    def chunks(x: Tensor) -> Tensor:                                              # [B, T, H, *] -> [Nb, NC, H, C, *]
        return layout.to_chunks(x.to(dt)).transpose(2, 3)
    qc, kc, vc = chunks(q), chunks(k), chunks(v)                                  # [Nb, NC, H, C, K|V]
    bc = chunks(beta)                                                             # [Nb, NC, H, C]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()            # [Ci, Cj], j <= i
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)          # j < i

    # 2. decay ratios D_ij = exp(G_i - G_j), j <= i (zero above the diagonal)
    if g is None:
        D = lower.to(dt)                                                          # [C, C]
        decay_q = decay_k = decay_last = None
    else:
        G = chunks(g).cumsum(-1)                                                  # [Nb, NC, H, C]
        diff = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf"))
        D = diff.exp()                                                            # [Nb, NC, H, C, C]
        decay_q = G.exp()[..., None]                                              # [Nb, NC, H, C, 1]   exp(G_i)
        decay_k = (G[..., -1:] - G).exp()[..., None]                              # [Nb, NC, H, C, 1]   exp(G_C - G_j)
        decay_last = G[..., -1].exp()[..., None, None]                            # [Nb, NC, H, 1, 1]   exp(G_C)

    # 3. A = I + strictly_lower(diag(beta) K K^T * D)                               [Nb, NC, H, C, C]
    KKt = kc @ kc.transpose(-1, -2)
    A = (bc[..., :, None] * KKt * D).masked_fill(~strict, 0) + torch.eye(C, dtype=dt, device=q.device)

    # 4. U = T diag(beta) V, W = T diag(beta exp(G)) K with T = A^{-1}: one unit-triangular solve
    kb = bc[..., None] * (kc if decay_q is None else kc * decay_q)               # [Nb, NC, H, C, K]
    rhs = torch.cat([bc[..., None] * vc, kb], -1)                                 # [Nb, NC, H, C, V+K]
    UW = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    U, W = UW[..., :V], UW[..., V:]                                               # [.., C, V], [.., C, K]

    # 5. intra-chunk readout weights P = (Q K^T * D) on j <= i, and the decayed q / k
    P = (qc @ kc.transpose(-1, -2)) * D                                           # [.., C, C], D is 0 above the diagonal
    qg = qc if decay_q is None else qc * decay_q                                  # [Nb, NC, H, C, K]
    kd = kc if decay_k is None else kc * decay_k                                  # [Nb, NC, H, C, K]

    # 6. inter-chunk state passing: the only loop, over the NC chunk columns
    h0s = layout.initial_states(h0, (H, K, V), dt, q.device)                     # [N, H, K, V]
    S = q.new_zeros(layout.Nb, H, K, V, dtype=dt)
    outs, states = [], []
    for c in range(layout.NC):
        S = layout.reset(S, h0s, c)                                               # [Nb, H, K, V]
        delta = U[:, c] - W[:, c] @ S                                             # [Nb, H, C, V]
        o = qg[:, c] @ S + P[:, c] @ delta                                        # [Nb, H, C, V]
        S = S if decay_last is None else decay_last[:, c] * S
        S = S + kd[:, c].transpose(-1, -2) @ delta                                # [Nb, H, K, V]
        outs.append(scale * o)
        states.append(S)

    # 7. back to token order
    o = torch.stack(outs, 1).transpose(2, 3)                                      # [Nb, NC, C, H, V]
    return layout.from_chunks(o), layout.final_states(torch.stack(states, 1))


class DeltaRule(UpdateRule):
    """The family class: deltanet (gates `beta`) and gated_deltanet (`beta`, `g`) are configurations of it.

    `fla_op`: the fla kernel computing the same function (lsm.rules._fla)."""

    normalize_keys = True
    has_fla = True
    has_triton_step = True
    has_triton_chunk = True
    fla_op = "delta_rule"

    def _step(self, q, k, v, state, scale, beta, g=None):
        o, S = delta_step(q, k, v, state[0], scale, beta, g)
        return o, (S,)

    def _chunk_torch(self, q, k, v, initial_state, scale, layout, beta, g=None):
        return delta_chunk(q, k, v, initial_state, scale, layout, beta, g)

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, beta, g=None):
        # keys arrive L2-normalised from the layer: fla's in-kernel normalisation stays off
        decay = {} if g is None else {"g": g}
        return fla_chunk(self.fla_op, q, k, v, initial_state, output_final_state, scale, cu_seqlens,
                         beta=beta, **decay, use_qk_l2norm_in_kernel=False)

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, beta, g=None):
        from lsm_kernels.delta import chunk_delta
        return chunk_delta(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
