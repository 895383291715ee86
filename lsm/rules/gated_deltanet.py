"""gated_deltanet: `S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T` (Gated DeltaNet, Yang et al., 2025)."""
from __future__ import annotations

from torch import Tensor, nn

from lsm.rules._delta import delta_chunk, delta_step
from lsm.rules._fla import fla_chunk
from lsm.rules.base import GateSpec, UpdateRule, register
from lsm.rules.deltanet import DeltaNetGate
from lsm.rules.mamba2 import Mamba2Gate


class GatedDeltaNetGate(nn.Module):
    """`beta = sigmoid(x W_b)` and `g = -exp(A_log) * softplus(x W_a + dt_bias)`, both `[B, T, H]`."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.beta = DeltaNetGate(hidden_size, num_heads, head_dim)
        self.decay = Mamba2Gate(hidden_size, num_heads, head_dim)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {**self.beta(x), **self.decay(x)}


@register
class GatedDeltaNet(UpdateRule):
    name = "gated_deltanet"
    gates = {"beta": GateSpec(per="head", kind="rate"), "g": GateSpec(per="head", kind="log_decay")}
    normalize_keys = True
    has_fla = True
    has_triton_step = True

    def _step(self, q, k, v, state, scale, beta, g):
        o, S = delta_step(q, k, v, state[0], scale, beta, g)
        return o, (S,)

    def _chunk_torch(self, q, k, v, initial_state, scale, layout, beta, g):
        return delta_chunk(q, k, v, initial_state, scale, layout, beta, g)

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, beta, g):
        # keys arrive L2-normalised from the layer: fla's in-kernel normalisation stays off
        return fla_chunk("gated_delta_rule", q, k, v, initial_state, output_final_state, scale, cu_seqlens,
                         beta=beta, g=g, use_qk_l2norm_in_kernel=False)

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, beta, g):
        from lsm_kernels.delta import chunk_delta
        return chunk_delta(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)

    def gate_module(self, hidden_size, num_heads, head_dim):
        return GatedDeltaNetGate(hidden_size, num_heads, head_dim)
