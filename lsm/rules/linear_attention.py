"""linear_attention: `S_t = S_{t-1} + k_t v_t^T` (Katharopoulos et al., 2020), no decay."""
from __future__ import annotations

from lsm.rules._diag import DiagonalDecayRule
from lsm.rules.base import register


@register
class LinearAttention(DiagonalDecayRule):
    name = "linear_attention"
    gates = {}
