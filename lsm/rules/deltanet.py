"""deltanet: `S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T` (DeltaNet, Schlag et al., 2021; chunked by Yang et al., 2024)."""
from __future__ import annotations

from torch import Tensor, nn

from lsm.rules._delta import delta_chunk, delta_step
from lsm.rules._fla import fla_chunk
from lsm.rules.base import GateSpec, UpdateRule, register


class DeltaNetGate(nn.Module):
    """`beta = sigmoid(x W_b)`, `[B, T, H]` (the write strength of each head)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"beta": self.b_proj(x).sigmoid()}


@register
class DeltaNet(UpdateRule):
    name = "deltanet"
    gates = {"beta": GateSpec(per="head", kind="rate")}
    normalize_keys = True
    has_fla = True
    has_triton_step = True

    def _step(self, q, k, v, state, scale, beta):
        o, S = delta_step(q, k, v, state[0], scale, beta)
        return o, (S,)

    def _chunk_torch(self, q, k, v, initial_state, scale, layout, beta):
        return delta_chunk(q, k, v, initial_state, scale, layout, beta)

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, beta):
        # keys arrive L2-normalised from the layer: fla's in-kernel normalisation stays off
        return fla_chunk("delta_rule", q, k, v, initial_state, output_final_state, scale, cu_seqlens,
                         beta=beta, use_qk_l2norm_in_kernel=False)

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, beta):
        from lsm_kernels.delta import chunk_delta
        return chunk_delta(q, k, v, beta, None, scale, initial_state, output_final_state, cu_seqlens, chunk_size)

    def gate_module(self, hidden_size, num_heads, head_dim):
        return DeltaNetGate(hidden_size, num_heads, head_dim)
