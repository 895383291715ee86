"""deltanet: `S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`.

DeltaNet (Schlag et al., 2021), chunked by Yang et al. (2024).
"""
from __future__ import annotations

import torch

from lsm.rules._delta import DeltaRule
from lsm.rules.base import GateSpec, register
from lsm.rules.gates import DeltaNetGate


@register
class DeltaNet(DeltaRule):
    name = "deltanet"
    gates = {"beta": GateSpec(per="head", kind="rate")}
    fla_op = "delta_rule"

    def kernel_refusal(self, call, backend, q, k, v, gates, state=None, auto=False):
        if call == "chunk" and backend == "fla" and q.dtype == torch.float32:
            return (f"{self.name}: flash-linear-attention's delta-rule kernel takes bf16/fp16 inputs, got float32 q; "
                    f"cast q, k, v (e.g. train.precision=bf16) or use backend='triton' or 'torch'")
        return super().kernel_refusal(call, backend, q, k, v, gates, state=state, auto=auto)

    def gate_module(self, hidden_size, num_heads, head_dim):
        return DeltaNetGate(hidden_size, num_heads, head_dim)
