"""gated_deltanet: `S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T` (Gated DeltaNet, Yang et al., 2025)."""
from __future__ import annotations

from lsm.rules._delta import DeltaRule
from lsm.rules.base import GateSpec, register
from lsm.rules.gates import GatedDeltaNetGate


@register
class GatedDeltaNet(DeltaRule):
    name = "gated_deltanet"
    gates = {"beta": GateSpec(per="head", kind="rate"), "g": GateSpec(per="head", kind="log_decay")}
    fla_op = "gated_delta_rule"

    def gate_module(self, hidden_size, num_heads, head_dim):
        return GatedDeltaNetGate(hidden_size, num_heads, head_dim)
