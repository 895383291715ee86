"""retnet: `S_t = gamma_h S_{t-1} + k_t v_t^T` with a fixed per-head decay `gamma_h = 1 - 2^(-5-h)` (Sun et al., 2023)."""
from __future__ import annotations

import torch

from lsm.rules._diag import DiagonalDecayRule
from lsm.rules.base import GateSpec, register


def retnet_gamma(num_heads: int, device=None) -> torch.Tensor:
    """Log-decays `log(1 - 2^(-5-h))`, `[H]`, computed on `device` (no host-to-device copy per call)."""
    h = torch.arange(num_heads, device=device, dtype=torch.float64)
    return torch.log1p(-torch.exp2(-5 - h)).float()


@register
class RetNet(DiagonalDecayRule):
    name = "retnet"
    gates = {"g_gamma": GateSpec(per="head", kind="log_decay", required=False)}

    def default_gamma(self, num_heads, device=None):
        return retnet_gamma(num_heads, device)
