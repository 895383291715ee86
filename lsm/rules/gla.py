"""gla: `S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`, alpha_t in (0, 1)^K (Gated Linear Attention, Yang et al., 2024)."""
from __future__ import annotations

from lsm.rules._diag import DiagonalDecayRule
from lsm.rules.base import GateSpec, register
from lsm.rules.gates import GLAGate


@register
class GLA(DiagonalDecayRule):
    name = "gla"
    gates = {"g": GateSpec(per="key", kind="log_decay")}
    fla_op = "gla"

    def gate_module(self, hidden_size, num_heads, head_dim):
        return GLAGate(hidden_size, num_heads, head_dim)
