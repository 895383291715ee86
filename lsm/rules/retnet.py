"""retnet: `S_t = gamma_h S_{t-1} + k_t v_t^T` with a fixed per-head decay `gamma_h = 1 - 2^(-5-h)` (Sun et al., 2023)."""
from __future__ import annotations

import torch

from lsm.rules._diag import diag_chunk, diag_step
from lsm.rules._fla import fla_chunk
from lsm.rules.base import GateSpec, UpdateRule, _check, register


def retnet_gamma(num_heads: int, device=None) -> torch.Tensor:
    """Log-decays `log(1 - 2^(-5-h))`, `[H]`, computed on `device` (no host-to-device copy per call)."""
    h = torch.arange(num_heads, device=device, dtype=torch.float64)
    return torch.log1p(-torch.exp2(-5 - h)).float()


class _ConstantDecay(UpdateRule):
    """Shared by retnet and lightning: a constant log-decay `g_gamma [H]` per head, defaulted from H."""

    gates = {"g_gamma": GateSpec(per="head", kind="log_decay", required=False)}
    has_fla = True

    def default_gamma(self, num_heads: int, device=None) -> torch.Tensor:
        raise NotImplementedError

    def _validate(self, q, k, v, initial_state, cu_seqlens, gates, single_step=False):
        gg = gates.get("g_gamma")
        rest = {n: t for n, t in gates.items() if n != "g_gamma"}
        super()._validate(q, k, v, initial_state, cu_seqlens, rest, single_step)
        if gg is not None:
            H = q.shape[-2]
            _check(isinstance(gg, torch.Tensor) and gg.is_floating_point(), TypeError,
                   f"{self.name}: `g_gamma` must be a floating-point tensor [H]")
            _check(tuple(gg.shape) == (H,), ValueError, f"{self.name}: `g_gamma` must be [H] = ({H},), got {tuple(gg.shape)}")
            if gg.device.type == "cpu":
                _check(not bool((gg > 0).any()), ValueError, f"{self.name}: `g_gamma` holds log-decays and must be <= 0")

    def _fill(self, q, gates):
        gg = gates.get("g_gamma")
        if gg is None:
            gg = self.default_gamma(q.shape[-2], q.device)
        return {"g_gamma": gg}

    def _step(self, q, k, v, state, scale, g_gamma):
        g = g_gamma.to(state[0].dtype).expand(q.shape[0], -1)               # [B, H]
        o, S = diag_step(q, k, v, state[0], scale, g)
        return o, (S,)

    def _recurrent_dense(self, q, k, v, initial_state, output_final_state, scale, gates):
        g = gates["g_gamma"].view(1, 1, -1).expand(q.shape[0], q.shape[1], -1)
        return super()._recurrent_dense(q, k, v, initial_state, output_final_state, scale, {"g_gamma": g})

    def _chunk_torch(self, q, k, v, initial_state, scale, layout, g_gamma):
        g = g_gamma.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1)       # [B, T, H]
        return diag_chunk(q, k, v, initial_state, scale, layout, g)

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, g_gamma):
        return fla_chunk("simple_gla", q, k, v, initial_state, output_final_state, scale, cu_seqlens, g_gamma=g_gamma)

    has_triton_step = True

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, g_gamma):
        from lsm_kernels.diag import chunk_diag
        return chunk_diag(q, k, v, None, g_gamma, scale, initial_state, output_final_state, cu_seqlens, chunk_size)


@register
class RetNet(_ConstantDecay):
    name = "retnet"

    def default_gamma(self, num_heads, device=None):
        return retnet_gamma(num_heads, device)
