"""The single-memory token mixer: one update rule behind projections, a short convolution and an output gate.

    x [B, T, D] -> q, k, v projections -> short causal conv + SiLU -> L2-normalised q, k
               -> rule.chunk (training / prefill) or rule.step (decoding, T = 1) -> o [B, T, H, V]
               -> per-head RMSNorm * silu(gate) -> output projection -> [B, T, D]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsm import rules
from lsm.dtypes import at_least_float32
from lsm.modules import GatedRMSNorm, ShortConv, rule_inputs
from lsm.rules.base import DecodeState, UpdateRule


@dataclass
class MixerOutput:
    """What every token mixer returns."""

    output: Tensor                   # [B, T, D]
    cache: Any = None                # pass back in for the next call (None unless asked for)
    aux_loss: Tensor | None = None   # MoM load-balancing loss, already weighted


@dataclass
class RuleCache:
    """Decoding cache of a `RuleLayer`: the rule's decode state and the short-conv tails."""

    state: DecodeState | None = None          # tuple of tensors, leading dims [B, H]
    conv: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, C, W-1]
    seen: int = 0                              # tokens processed so far (host int, no sync)


def check_dims(hidden_size: int, num_heads: int, head_dim: int | None, value_dim: int | None) -> tuple[int, int]:
    """Validate head sizes; returns (head_dim, value_dim)."""
    for n, val in (("hidden_size", hidden_size), ("num_heads", num_heads)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"`{n}` must be a positive int, got {val!r}")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}) "
                             f"when `head_dim` is not given")
        head_dim = hidden_size // num_heads
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"`head_dim` must be a positive int, got {head_dim!r}")
    value_dim = head_dim if value_dim is None else value_dim
    if not isinstance(value_dim, int) or value_dim < 1:
        raise ValueError(f"`value_dim` must be a positive int, got {value_dim!r}")
    return head_dim, value_dim


class RuleLayer(nn.Module):
    """Single-memory linear-attention layer for any registered update rule.

    Dtypes (one rule for every layer, `lsm.modules.rule_inputs`): q, k, v reach the rule in the activation
    dtype (autocast's dtype where autocast is on, bf16 on GPU, else the input's dtype), gates in at least
    float32, and states (the cache, the rule's initial/final states) in float32.

    Args:
        rule: registry name (or rule object).
        hidden_size: D. num_heads: H. head_dim: K per head (default D // H). value_dim: V per head (default K).
        conv_size: width of the short causal convolution on q, k, v (0 or 1 disables it).
        use_output_gate: multiply the normalised readout by silu(x W_g).
        chunk_size, backend: passed to `rule.chunk`.
        rule_options: fixed keyword options of the rule (e.g. {"mini_batch_size": 16} for ttt).
        num_states: Ms, the memories whose keys, values and gates the layer projects (one matmul each,
            memory-major channels) under one shared query: 1 here; `MixtureOfMemories` builds M (+ shared).
    """

    def __init__(self, rule: str | UpdateRule, hidden_size: int, num_heads: int, head_dim: int | None = None,
                 value_dim: int | None = None, conv_size: int = 4, use_short_conv: bool = True,
                 use_output_gate: bool = True, norm_eps: float = 1e-5, chunk_size: int = 64,
                 backend: str = "auto", rule_options: dict | None = None, num_states: int = 1):
        super().__init__()
        self.rule = rules.get(rule)
        self.head_dim, self.value_dim = check_dims(hidden_size, num_heads, head_dim, value_dim)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.chunk_size, self.backend = chunk_size, backend
        self.rule_options = dict(rule_options or {})
        self.num_states = Ms = num_states
        H, K, V = num_heads, self.head_dim, self.value_dim
        self.key_from_gate = getattr(self.rule, "key_from_gate", False)
        self.q_proj = nn.Linear(hidden_size, H * K, bias=False)
        self.k_proj = None if self.key_from_gate else nn.Linear(hidden_size, Ms * H * K, bias=False)
        self.v_proj = nn.Linear(hidden_size, Ms * H * V, bias=False)
        self.gates = self.rule.gate_module(hidden_size, Ms * H, K)
        self.convs = nn.ModuleDict()
        if use_short_conv and conv_size > 1:
            for n, c in (("q", H * K), ("k", Ms * H * K), ("v", Ms * H * V)):
                if not (n == "k" and self.key_from_gate):
                    self.convs[n] = ShortConv(c, conv_size)
        self.g_proj = nn.Linear(hidden_size, H * V, bias=False) if use_output_gate else None
        self.o_norm = GatedRMSNorm(V, eps=norm_eps)
        self.o_proj = nn.Linear(H * V, hidden_size, bias=False)

    def _conv(self, name: str, x: Tensor, cache: RuleCache | None, cu_seqlens, head: int | None = None) -> Tensor:
        """Short conv + SiLU of projection `name` (+ L2 norm over every `head` channels), updating the cache's tail."""
        if name not in self.convs:
            x = F.silu(x)
            return x if head is None else F.normalize(x.unflatten(-1, (-1, head)), dim=-1).flatten(-2)
        y, tail = self.convs[name](x, None if cache is None else cache.conv.get(name), cu_seqlens, head=head,
                                   backend=self.backend)
        if cache is not None:
            cache.conv[name] = tail
        return y

    def project(self, x: Tensor, cache, cu_seqlens, routed=None) -> tuple[Tensor, Tensor, Tensor, dict]:
        """x `[B, T, D]` -> q `[B, T, H, K]` (shared by the memories), k `[B, T, (Ms,) H, K]`, v `[B, T, (Ms,) H, V]`
        and the rule's per-token gates `[B, T, (Ms,) H(, K)]` (the memory axis only when Ms > 1).

        `routed` (MixtureOfMemories' chunked path): an object whose `rows(name, lin, head)` gives the
        projection `name`'s rows `[R, C]` after its short conv, and `gather(t)` a `[B, T, Ms, ...]` tensor's
        rows `[1, R, ...]`, for the routed (token, memory) pairs only; k, v, gates are then `[1, R, H, *]`.
        """
        H, K = self.num_heads, self.head_dim
        gates = self._gates(x)
        q = self._conv("q", self.q_proj(x), cache, cu_seqlens, head=K).unflatten(-1, (H, K))
        if routed is not None:
            gates = {n: routed.gather(g) for n, g in gates.items()}
        v = self._memory_input("v", self.v_proj(x), cache, cu_seqlens, None, routed)
        if self.key_from_gate:
            k = -torch.expm1(gates["g"]).to(q.dtype)                    # k = 1 - alpha
        else:
            k = self._memory_input("k", self.k_proj(x), cache, cu_seqlens, K, routed)
        return rule_inputs(x, q, k, v, gates)

    def _memory_input(self, name: str, lin: Tensor, cache, cu_seqlens, head: int | None, routed) -> Tensor:
        """Projection `name` (lin `[B, T, Ms * H * C]`) after its short conv -> `[B, T, (Ms,) H, C]`, or routed rows."""
        C = head or self.value_dim
        if routed is not None:
            return routed.rows(name, lin, head).unflatten(-1, (self.num_heads, C))[None]
        heads = (self.num_heads,) if self.num_states == 1 else (self.num_states, self.num_heads)
        return self._conv(name, lin, cache, cu_seqlens, head=head).unflatten(-1, (*heads, C))

    def _gates(self, x: Tensor) -> dict[str, Tensor]:
        """The rule's gates of every memory: as the gate module returns them for one memory, else `[B, T, Ms, H(, K)]`."""
        if self.num_states == 1:
            return self.gates(x)
        B, T, _ = x.shape
        Ms, H = self.num_states, self.num_heads
        gates = {}
        for name, g in self.gates(x).items():
            if not (isinstance(g, Tensor) and g.dim() >= 3 and tuple(g.shape[:3]) == (B, T, Ms * H)):
                raise ValueError(f"{type(self).__name__}: the gate module of rule {self.rule.name!r} returned `{name}` "
                                 f"with shape {tuple(getattr(g, 'shape', ()))}; only per-token gates [B, T, H(, K)] "
                                 f"can be routed to memories (pass fixed options through `rule_options`)")
            gates[name] = g.unflatten(2, (Ms, H))                                   # [B, T, Ms, H(, K)]
        return gates

    def output_gate(self, x: Tensor) -> Tensor | None:
        """The readout's gate `[B, T, H, V]` from x (None without `use_output_gate`)."""
        return None if self.g_proj is None else self.g_proj(x).unflatten(-1, (self.num_heads, self.value_dim))

    def readout(self, o: Tensor, x: Tensor) -> Tensor:
        """o `[B, T, H, V]` -> `[B, T, D]`: per-head norm, output gate, projection."""
        return self.o_proj(self.o_norm(o, self.output_gate(x), backend=self.backend).flatten(-2))

    def forward(self, x: Tensor, cache: RuleCache | None = None, cu_seqlens: Tensor | None = None,
                use_cache: bool = False) -> MixerOutput:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"RuleLayer: `x` must be [B, T, {self.hidden_size}], got {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, RuleCache):
            raise TypeError(f"RuleLayer: `cache` must be a RuleCache from this layer, got {type(cache).__name__}")
        if cache is not None and cu_seqlens is not None:
            raise ValueError("RuleLayer: decoding with a cache takes a batch [B, T, D], not packed `cu_seqlens`")
        if use_cache and cache is None:
            cache = RuleCache()
        B, T, _ = x.shape
        state = None if cache is None else cache.state
        if state is not None:
            S = self.rule.final_from_state(state)
            if S.shape != (B, self.num_heads, self.head_dim, self.value_dim):
                raise ValueError(f"RuleLayer: cache state has shape {tuple(S.shape)}, expected "
                                 f"{(B, self.num_heads, self.head_dim, self.value_dim)}: a cache from another "
                                 f"batch size or layer configuration")
        q, k, v, gates = self.project(x, cache, cu_seqlens)
        gates = {**gates, **self.rule_options}
        if state is not None and T == 1:
            o, state = self.rule.step(q[:, 0], k[:, 0], v[:, 0], state, **{n: _at(t, 0, T) for n, t in gates.items()})
            o = o[:, None]
        else:
            if cache is not None and state is None:
                state = self.rule.init_state(B, self.num_heads, self.head_dim, self.value_dim, device=x.device,
                                             dtype=at_least_float32(x.dtype))
            # from the cache's decode-state tuple: the chunked path continues it exactly (ttt mid-mini-batch too)
            o, state = self.rule.chunk(q, k, v, initial_state=state, output_final_state=cache is not None,
                                       cu_seqlens=cu_seqlens, chunk_size=self.chunk_size, backend=self.backend, **gates)
        if cache is not None:
            cache.state = state
            cache.seen += T
        return MixerOutput(self.readout(o, x), cache)


def _at(t, i: int, T: int):
    """Token i of a per-token gate `[B, T, ...]`; other options pass through."""
    if isinstance(t, Tensor) and t.dim() >= 3 and t.shape[1] == T:
        return t[:, i]
    return t
