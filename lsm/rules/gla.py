"""gla: `S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`, alpha_t in (0, 1)^K (Gated Linear Attention, Yang et al., 2024)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lsm.rules._diag import diag_chunk, diag_step
from lsm.rules._fla import fla_chunk
from lsm.rules.base import GateSpec, UpdateRule, register


class GLAGate(nn.Module):
    """`g = logsigmoid(x W_down W_up + b) / normalizer`, `[B, T, H, K]` (low-rank, as in GLA)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, rank: int = 16, normalizer: float = 16.0):
        super().__init__()
        self.num_heads, self.head_dim, self.normalizer = num_heads, head_dim, normalizer
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, num_heads * head_dim, bias=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        g = F.logsigmoid(self.up(self.down(x))) / self.normalizer              # [B, T, H*K]
        return {"g": g.unflatten(-1, (self.num_heads, self.head_dim))}


@register
class GLA(UpdateRule):
    name = "gla"
    gates = {"g": GateSpec(per="key", kind="log_decay")}
    has_fla = True

    def _step(self, q, k, v, state, scale, g):
        o, S = diag_step(q, k, v, state[0], scale, g)
        return o, (S,)

    def _chunk_torch(self, q, k, v, initial_state, scale, layout, g):
        return diag_chunk(q, k, v, initial_state, scale, layout, g)

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, g):
        return fla_chunk("gla", q, k, v, initial_state, output_final_state, scale, cu_seqlens, g=g)

    has_triton_step = True

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, g):
        from lsm_kernels.diag import chunk_diag
        return chunk_diag(q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens, chunk_size)

    def _step_triton(self, q, k, v, state, scale, g):
        from lsm_kernels.decode import recurrent_step
        o, S = recurrent_step(q, k, v, state[0], scale, g=g, inplace=False)
        return o, (S,)

    def gate_module(self, hidden_size, num_heads, head_dim):
        return GLAGate(hidden_size, num_heads, head_dim)
