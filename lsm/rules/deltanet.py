"""deltanet: `S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`.

DeltaNet (Schlag et al., 2021), chunked by Yang et al. (2024).
"""
from __future__ import annotations

from lsm.rules._delta import DeltaRule
from lsm.rules.base import GateSpec, register
from lsm.rules.gates import DeltaNetGate


@register
class DeltaNet(DeltaRule):
    name = "deltanet"
    gates = {"beta": GateSpec(per="head", kind="rate")}
    fla_op = "delta_rule"

    def gate_module(self, hidden_size, num_heads, head_dim):
        return DeltaNetGate(hidden_size, num_heads, head_dim)
