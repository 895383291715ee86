"""The project's one dtype promotion: gates, states and accumulations run in at least float32.

    at_least_float32(torch.bfloat16) -> torch.float32;  at_least_float32(torch.float64) -> torch.float64

(float64 stays float64, so the float64 property tests stay exact.) Which tensors take it is the layers' dtype
rule, `lsm.modules.rule_inputs`.
"""
from __future__ import annotations

import torch


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)
