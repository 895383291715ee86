"""linear_attention: `S_t = S_{t-1} + k_t v_t^T` (Katharopoulos et al., 2020), no decay."""
from __future__ import annotations

from lsm.rules._diag import diag_chunk, diag_step
from lsm.rules._fla import fla_chunk
from lsm.rules.base import UpdateRule, register


@register
class LinearAttention(UpdateRule):
    name = "linear_attention"
    gates = {}
    has_fla = True

    def _step(self, q, k, v, state, scale):
        o, S = diag_step(q, k, v, state[0], scale, None)
        return o, (S,)

    def _chunk_torch(self, q, k, v, initial_state, scale, layout):
        return diag_chunk(q, k, v, initial_state, scale, layout, None)

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens):
        return fla_chunk("simple_gla", q, k, v, initial_state, output_final_state, scale, cu_seqlens)

    has_triton_step = True

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size):
        from lsm_kernels.diag import chunk_diag
        return chunk_diag(q, k, v, None, None, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
