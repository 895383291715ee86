"""gla: `S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`, alpha_t in (0, 1)^K (Gated Linear Attention, Yang et al., 2024)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lsm.rules._diag import GatedDiagRule
from lsm.rules.base import GateSpec, register


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
class GLA(GatedDiagRule):
    name = "gla"
    gates = {"g": GateSpec(per="key", kind="log_decay")}
    fla_op = "gla"

    def gate_module(self, hidden_size, num_heads, head_dim):
        return GLAGate(hidden_size, num_heads, head_dim)
