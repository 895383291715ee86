"""mamba2: `S_t = a_t S_{t-1} + k_t v_t^T` with a data-dependent scalar decay per head (Mamba-2 / SSD, Dao & Gu, 2024)."""
from __future__ import annotations

from lsm.rules._diag import DiagonalDecayRule
from lsm.rules.base import GateSpec, register
from lsm.rules.gates import Mamba2Gate


@register
class Mamba2(DiagonalDecayRule):
    name = "mamba2"
    gates = {"g": GateSpec(per="head", kind="log_decay")}
    fla_op = "simple_gla"

    def gate_module(self, hidden_size, num_heads, head_dim):
        return Mamba2Gate(hidden_size, num_heads, head_dim)
