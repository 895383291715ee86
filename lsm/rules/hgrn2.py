"""hgrn2: gla's recurrence with the key tied to the forget gate, `k_t = 1 - alpha_t` (HGRN2, Qin et al., 2024).

The rule's math is gla's; what differs is the parameterisation: the layer derives k from g
(`key_from_gate`), and the forget gate has a learnable lower bound as in HGRN.
"""
from __future__ import annotations

from lsm.rules._diag import DiagonalDecayRule
from lsm.rules.base import GateSpec, register
from lsm.rules.gates import HGRN2Gate


@register
class HGRN2(DiagonalDecayRule):
    name = "hgrn2"
    gates = {"g": GateSpec(per="key", kind="log_decay")}
    fla_op = "gla"
    #: the layer sets `k = 1 - exp(g)` instead of projecting a key
    key_from_gate = True

    def gate_module(self, hidden_size, num_heads, head_dim):
        return HGRN2Gate(hidden_size, num_heads, head_dim)
