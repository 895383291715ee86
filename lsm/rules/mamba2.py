"""mamba2: `S_t = a_t S_{t-1} + k_t v_t^T` with a data-dependent scalar decay per head (Mamba-2 / SSD, Dao & Gu, 2024)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsm.rules._diag import GatedDiagRule
from lsm.rules.base import GateSpec, register


class Mamba2Gate(nn.Module):
    """`g = -exp(A_log) * softplus(x W + dt_bias)`, `[B, T, H]` (Mamba-2's discretised decay, log space)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1, 16)))
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.proj(x)
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # decays in at least float32
        return {"g": -self.A_log.to(z.dtype).exp() * F.softplus(z + self.dt_bias.to(z.dtype))}


@register
class Mamba2(GatedDiagRule):
    name = "mamba2"
    gates = {"g": GateSpec(per="head", kind="log_decay")}
    fla_op = "simple_gla"

    def gate_module(self, hidden_size, num_heads, head_dim):
        return Mamba2Gate(hidden_size, num_heads, head_dim)
