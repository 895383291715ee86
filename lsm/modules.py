"""Building blocks shared by the single-memory layer and the MoM wrapper."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsm.dtypes import at_least_float32
from lsm.rules._chunking import token_sequences
from lsm.rules.backends import use_conv_kernel, use_kernels


def seq_positions(cu_seqlens: Tensor, T: int) -> Tensor:
    """Position of every packed token inside its own sequence, `[T]` (on the device, no sync)."""
    return token_sequences(cu_seqlens, T)[1]


def rule_inputs(x: Tensor, q: Tensor, k: Tensor, v: Tensor, gates: dict) -> tuple[Tensor, Tensor, Tensor, dict]:
    """The one dtype rule of every layer (single and MoM) for what reaches the update rule.

    q, k, v: the activation dtype, i.e. autocast's dtype where autocast is on for x's device (bf16 under
    GPU training: CUDA autocast runs the L2 norms of q and k in float32, CPU autocast does not, so
    they are cast back here), else x's dtype. Gates and the rule's other floating-point tensors
    (ln_weight, ...): at least float32 (float64 stays float64). States: float32, as the caches
    and the rules keep them. Casts are no-ops where the dtypes already agree."""
    dev = x.device.type
    act = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    q, k, v = (t if t.dtype == act else t.to(act) for t in (q, k, v))
    gates = {n: g.to(at_least_float32(g.dtype)) if isinstance(g, Tensor) and g.is_floating_point() else g
             for n, g in gates.items()}
    return q, k, v, gates


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (width W), SiLU after, as in Mamba / fla's ShortConvolution.

    forward(x `[B, T, C]`, state `[B, C, W-1]` or None, cu_seqlens, head=None, backend="torch")
        -> (y `[B, T, C]`, new state `[B, C, W-1]`).
    With `cu_seqlens` taps never reach across a sequence boundary. `head`: L2-normalise every group
    of `head` channels after the activation (queries and keys). Without a state and with
    `use_conv_kernel(backend, x, W)` it runs the fused kernel `lsm_kernels.conv.short_conv` (one pass
    forward, two backward, no host sync); otherwise the plain torch form below. From a cached tail (decoding,
    prefill after a cache) the kernel runs over tail + tokens; a torch decoding step sums the W taps.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True):
        super().__init__()
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.uniform_(self.weight, -1 / math.sqrt(kernel_size), 1 / math.sqrt(kernel_size))

    def forward(self, x: Tensor, state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                head: int | None = None, backend: str = "torch") -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        W = self.kernel_size
        kernel = T > 0 and use_conv_kernel(backend, x, W)
        if state is None and kernel:
            from lsm_kernels.conv import short_conv
            pos = None if cu_seqlens is None else seq_positions(cu_seqlens, T)
            y = short_conv(x, self.weight, self.bias, pos, self.activation, head)
            return y, conv_tail(x, W)
        past = x.new_zeros(B, W - 1, C) if state is None else state.transpose(1, 2).to(x.dtype)
        xp = torch.cat([past, x], 1)                                   # [B, W-1+T, C]
        if T == 0:
            return x, xp.transpose(1, 2).contiguous()
        if kernel and cu_seqlens is None:  # from a cached tail: the kernel over tail + tokens, their last T rows
            from lsm_kernels.conv import short_conv
            y = short_conv(xp, self.weight, self.bias, None, self.activation, head)[:, W - 1:]
            return y, xp[:, T:].transpose(1, 2)
        if cu_seqlens is None and T == 1:  # a decoding step: the W taps as one product and sum (no conv1d call)
            acc = at_least_float32(x.dtype)
            y = ((xp.to(acc) * self.weight.t().to(acc)).sum(1, keepdim=True) + self.bias.to(acc)).to(x.dtype)
        elif cu_seqlens is None:  # one depthwise conv1d
            y = F.conv1d(xp.transpose(1, 2), self.weight.to(x.dtype)[:, None], self.bias.to(x.dtype), groups=C)
            y = y.transpose(1, 2)                                      # [B, T, C]
        else:  # packed: sum the W taps, masking taps that would reach into the previous sequence
            pos = seq_positions(cu_seqlens, T)
            y = self.bias.to(x.dtype).expand(B, T, C)
            for j in range(W):  # tap j looks back W-1-j tokens
                tap = xp[:, j:j + T] * self.weight[:, j].to(x.dtype)
                if j < W - 1:
                    tap = tap * (pos >= W - 1 - j).to(x.dtype)[None, :, None]
                y = y + tap
        if self.activation:
            y = F.silu(y)
        if head is not None:
            y = F.normalize(y.unflatten(-1, (C // head, head)), dim=-1).flatten(-2)
        return y, xp[:, T:].transpose(1, 2).contiguous() if W > 1 else x.new_zeros(B, C, 0)


def conv_tail(x: Tensor, width: int) -> Tensor:
    """The last `width - 1` inputs of x `[B, T, C]` as a conv state `[B, C, width-1]` (zeros before the start)."""
    B, T, C = x.shape
    n = width - 1
    tail = x[:, max(T - n, 0):]
    if tail.shape[1] < n:
        tail = torch.cat([x.new_zeros(B, n - tail.shape[1], C), tail], 1)
    return tail.transpose(1, 2).contiguous()


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the readout, times `silu(gate)` when a gate is given. x `[..., V]`.

    forward(x, gate=None, backend="torch"): with `use_kernels(backend, x)` one fused kernel
    (`lsm_kernels.norm.gated_rms_norm`), else the plain torch form."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, gate: Tensor | None = None, backend: str = "torch") -> Tensor:
        if use_kernels(backend, x):
            from lsm_kernels.norm import gated_rms_norm
            return gated_rms_norm(x, self.weight, gate, self.eps)
        dtype = x.dtype
        x = x.to(at_least_float32(dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)
        if gate is not None:
            x = x * F.silu(gate.to(x.dtype))
        return x.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(at_least_float32(dtype))
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)).to(dtype)
