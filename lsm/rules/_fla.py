"""Calls into flash-linear-attention's Triton kernels (backend="fla", GPU only).

fla 0.6 takes the same `[B, T, H, K]` layout, log-space decays, `scale`, `initial_state`,
`output_final_state` and `cu_seqlens` as we do. Its variable-length path builds chunk indices
from `cu_seqlens` on the host (a synchronisation): that is fla's, not ours.
"""
from __future__ import annotations

import importlib

from torch import Tensor

_OPS = {
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "gla": ("fla.ops.gla", "chunk_gla"),
    "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
}


def fla_op(name: str):
    """The fla function `name` (imported lazily: fla imports triton)."""
    module, fn = _OPS[name]
    return getattr(importlib.import_module(module), fn)


def fla_chunk(name: str, q: Tensor, k: Tensor, v: Tensor, initial_state, output_final_state: bool, scale: float,
              cu_seqlens, **gates) -> tuple[Tensor, Tensor | None]:
    """Run fla's chunked kernel `name`; the state is passed and returned in float32."""
    if initial_state is not None:
        initial_state = initial_state.float()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.long()
    o, S = fla_op(name)(q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, **gates)
    return o, S
