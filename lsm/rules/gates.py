"""The rules' gate modules: hidden states `x [B, T, D]` -> the per-token gate inputs of one rule.

`rule.gate_module(hidden_size, num_heads, head_dim)` returns one of these; the layer calls it on x
and passes its dict to the rule. Decays come out in log space (`g <= 0`), rates (`beta`, `eta`) >= 0;
the layer casts them to at least float32 (`lsm.modules.rule_inputs`; the Mamba-2 decay and TTT's rate
are computed in it already).

    NoGates            {}                                  linear_attention, retnet, lightning
    Mamba2Gate         {"g": [B, T, H]}                    mamba2
    GLAGate            {"g": [B, T, H, K]}                 gla
    HGRN2Gate          {"g": [B, T, H, K]}                 hgrn2
    DeltaNetGate       {"beta": [B, T, H]}                 deltanet
    GatedDeltaNetGate  {"beta", "g": [B, T, H]}            gated_deltanet
    TTTGate            {"eta": [B, T, H]} (+ LN affine)    ttt
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsm.dtypes import at_least_float32


class NoGates(nn.Module):
    """Gate module of rules without per-token gates."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {}


class Mamba2Gate(nn.Module):
    """`g = -exp(A_log) * softplus(x W + dt_bias)`, `[B, T, H]` (Mamba-2's discretised decay, log space)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1, 16)))
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.proj(x)
        z = z.to(at_least_float32(z.dtype))  # decays in at least float32
        return {"g": -self.A_log.to(z.dtype).exp() * F.softplus(z + self.dt_bias.to(z.dtype))}


class GLAGate(nn.Module):
    """`g = logsigmoid(x W_down W_up + b) / normalizer`, `[B, T, H, K]` (low-rank, as in GLA)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, rank: int = 16, normalizer: float = 16.0):
        super().__init__()
        self.num_heads, self.head_dim, self.normalizer = num_heads, head_dim, normalizer
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, num_heads * head_dim, bias=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        g = F.logsigmoid(self.up(self.down(x))) / self.normalizer              # [B, T, H*K]
        return {"g": g.unflatten(-1, (self.num_heads, self.head_dim))}


class HGRN2Gate(nn.Module):
    """`alpha = lower + (1 - lower) * sigmoid(x W)`, `g = log(alpha)`, `[B, T, H, K]`."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, lower_bound: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.lower_bound = num_heads, head_dim, lower_bound
        self.proj = nn.Linear(hidden_size, num_heads * head_dim, bias=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.proj(x)
        if self.lower_bound > 0:
            g = torch.log(self.lower_bound + (1 - self.lower_bound) * torch.sigmoid(z))
        else:
            g = F.logsigmoid(z)
        return {"g": g.unflatten(-1, (self.num_heads, self.head_dim))}


class DeltaNetGate(nn.Module):
    """`beta = sigmoid(x W_b)`, `[B, T, H]` (the write strength of each head)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"beta": self.b_proj(x).sigmoid()}


class GatedDeltaNetGate(nn.Module):
    """`beta = sigmoid(x W_b)` and `g = -exp(A_log) * softplus(x W_a + dt_bias)`, both `[B, T, H]`."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.beta = DeltaNetGate(hidden_size, num_heads, head_dim)
        self.decay = Mamba2Gate(hidden_size, num_heads, head_dim)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {**self.beta(x), **self.decay(x)}


class TTTGate(nn.Module):
    """`eta = base_lr * sigmoid(x W + b)`, `[B, T, H]`.

    `base_lr` defaults to `1 / head_dim` (TTT-Linear's `ttt_base_lr = 1` divided by the head
    dimension). W starts at N(0, 0.02^2), b at 0, so eta starts near `base_lr / 2`.
    With `layer_norm=True` the module also owns the LN form's `ln_weight` (ones) and `ln_bias`
    (zeros), `[H, head_dim]`, and returns them in the gate dict.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, base_lr: float | None = None,
                 layer_norm: bool = False):
        super().__init__()
        self.base_lr = 1.0 / head_dim if base_lr is None else float(base_lr)
        self.proj = nn.Linear(hidden_size, num_heads, bias=True)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        self.layer_norm = layer_norm
        if layer_norm:
            self.ln_weight = nn.Parameter(torch.ones(num_heads, head_dim))
            self.ln_bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.proj(x)
        z = z.to(at_least_float32(z.dtype))  # rates in at least float32
        out = {"eta": self.base_lr * torch.sigmoid(z)}
        if self.layer_norm:
            out.update(ln_weight=self.ln_weight, ln_bias=self.ln_bias)
        return out
