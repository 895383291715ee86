"""hgrn2: gla's recurrence with the key tied to the forget gate, `k_t = 1 - alpha_t` (HGRN2, Qin et al., 2024).

The rule's math is gla's; what differs is the parameterisation: the layer derives k from g
(`key_from_gate`), and the forget gate has a learnable lower bound as in HGRN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsm.rules.base import register
from lsm.rules.gla import GLA


class HGRN2Gate(nn.Module):
    """`alpha = lower + (1 - lower) * sigmoid(x W)`, `g = log(alpha)`, `[B, T, H, K]`."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, lower_bound: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.lower_bound = num_heads, head_dim, lower_bound
        self.proj = nn.Linear(hidden_size, num_heads * head_dim, bias=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.proj(x)
        if self.lower_bound > 0:
            g = torch.log(self.lower_bound + (1 - self.lower_bound) * torch.sigmoid(z))
        else:
            g = F.logsigmoid(z)
        return {"g": g.unflatten(-1, (self.num_heads, self.head_dim))}


@register
class HGRN2(GLA):
    name = "hgrn2"
    #: the layer sets `k = 1 - exp(g)` instead of projecting a key
    key_from_gate = True

    def gate_module(self, hidden_size, num_heads, head_dim):
        return HGRN2Gate(hidden_size, num_heads, head_dim)
