"""Causal softmax attention with rotary positions and a KV cache: the mixer of hybrid models' attention blocks.

Same interface as every other mixer: `forward(x [B, T, D], cache=None, cu_seqlens=None, use_cache=False)
-> MixerOutput`. Packed variable-length batches (`B = 1`, `cu_seqlens`) attend within their own
sequence only (a block-diagonal causal mask) and restart their positions at 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsm.layers import MixerOutput
from lsm.modules import seq_positions
from lsm.rules._chunking import token_sequences


@dataclass
class KVCache:
    """Keys and values seen so far, `[B, H, T_seen, Dh]` each (grows by one token per decoding step)."""

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def seen(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


def rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotate pairs of channels of x `[B, H, T, Dh]` by angle pos * theta^(-2i/Dh); pos `[T]` or `[B, T]`."""
    Dh = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, Dh, 2, device=x.device, dtype=torch.float32) / Dh)   # [Dh/2]
    angles = pos.to(torch.float32)[..., None] * inv_freq                                       # [(B,) T, Dh/2]
    if angles.dim() == 3:
        angles = angles[:, None]                                                               # [B, 1, T, Dh/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention (`F.scaled_dot_product_attention`) with RoPE."""

    def __init__(self, hidden_size: int, num_heads: int, rope_theta: float = 10000.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"Attention: `num_heads` ({num_heads}) must divide `hidden_size` ({hidden_size})")
        if (hidden_size // num_heads) % 2:
            raise ValueError(f"Attention: head size {hidden_size // num_heads} must be even for rotary positions")
        self.num_heads, self.head_dim, self.rope_theta = num_heads, hidden_size // num_heads, rope_theta
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor, cache: KVCache | None = None, cu_seqlens: Tensor | None = None,
                use_cache: bool = False) -> MixerOutput:
        B, T, D = x.shape
        if cache is not None and cu_seqlens is not None:
            raise ValueError("Attention: decoding with a cache takes a batch [B, T, D], not packed `cu_seqlens`")
        if use_cache and cache is None:
            cache = KVCache()
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        past = 0 if cache is None else cache.seen
        pos = seq_positions(cu_seqlens, T) if cu_seqlens is not None else torch.arange(past, past + T, device=x.device)
        q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
        if cache is not None and cache.k is not None:
            k, v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)                         # [B, H, past+T, Dh]
        if cache is not None:
            cache.k, cache.v = k, v
        if cu_seqlens is not None:
            seq = token_sequences(cu_seqlens, T)[0]
            mask = (seq[:, None] == seq[None, :]) & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new queries see every cached key and the causal part of their own block
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, D)                                                    # [B, T, D]
        return MixerOutput(self.o_proj(y), cache)
