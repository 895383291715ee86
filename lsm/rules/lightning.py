"""lightning: retnet's recurrence with ALiBi-style per-head slopes (Lightning Attention, Qin et al., 2024).

`g_gamma_h = -s_h` with `s_h = 2^(-8 (h + 1) / H)`: the first heads forget fastest.
"""
from __future__ import annotations

import torch

from lsm.rules._diag import DiagonalDecayRule
from lsm.rules.base import GateSpec, register


def lightning_gamma(num_heads: int, device=None) -> torch.Tensor:
    """Log-decays `-2^(-8 (h + 1) / H)`, `[H]`, computed on `device`."""
    h = torch.arange(num_heads, device=device, dtype=torch.float64)
    return (-(2.0 ** (-8.0 * (h + 1) / num_heads))).float()


@register
class Lightning(DiagonalDecayRule):
    name = "lightning"
    gates = {"g_gamma": GateSpec(per="head", kind="log_decay", required=False)}

    def default_gamma(self, num_heads, device=None):
        return lightning_gamma(num_heads, device)
