"""Mixture-of-Memories (MoM, arXiv 2502.13685) around any update rule.

    x [B, T, D] -> router: softmax(x W_r) -> top-K memories, weights renormalised to sum to 1
               -> shared q `[B, T, H, K]`; per-memory k, v, gates `[B, T, Ms, H, *]` from ONE matmul each
                  (Ms = M memories + the shared one), short conv over the token stream
               -> dispatch: the (token, memory) pairs packed by (sequence, memory) segment, in time
                  order, into one variable-length batch of R = B*T*(K + shared) rows
               -> ONE rule.chunk(..., cu_seqlens=segments, initial_state=[N*Ms, H, K, V])
               -> combine: o_t = sum_{m in topK(t)} w_{t,m} read(S_m, q_t) + read(S_shared, q_t)
               -> the single-memory layer's readout (per-head norm, output gate, projection)

Memory m sees exactly the sub-sequence of tokens routed to it, so a token not routed to m leaves
S_m unchanged (no decay either): that is the packing, not extra code. The shared memory is
memory index M, chosen by every token with weight 1, so it rides in the same packed batch.

Host synchronisation: none in this module (cumulative sums, gathers and static shapes only).
The rule's backend may add one: fla's variable-length kernels build their chunk indices from
`cu_seqlens` on the host (one sync per call); the torch backend builds its layout on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lsm.dtypes import at_least_float32
from lsm.layers import MixerOutput, RuleLayer
from lsm.mixture.routing import Dispatch, Router, Routing, dispatch, load_balancing_loss, take_rows, take_tokens
from lsm.mixture.slots import mix_slots, routed_step, with_shared_slot
from lsm.modules import ShortConv, seq_positions
from lsm.rules.backends import use_conv_kernel
from lsm.rules.base import DecodeState


@dataclass
class MoMCache:
    """Decoding cache of a `MixtureOfMemories`.

    state: the rule's decode-state tuple, every tensor with leading dims `[B, Ms, H]`
           (memory index M is the shared memory).
    conv:  short-conv tails, name -> `[B, C, W-1]` (k and v tails hold every memory's channels).
    seen:  tokens processed so far (host int, no sync).
    config: the configuration the cache was built for, checked on every call.
    """

    state: DecodeState
    conv: dict[str, Tensor] = field(default_factory=dict)
    seen: int = 0
    config: dict = field(default_factory=dict)


class MixtureOfMemories(RuleLayer):
    """Mixture-of-Memories token mixer for any registered update rule.

    Args (beyond `RuleLayer`'s):
        num_memories: M, routed memories per layer. topk: K memories per token (1 <= K <= M).
        shared_memory: add an always-on memory that every token updates and reads with weight 1.
        aux_loss_weight: weight of the load-balancing loss returned in `MixerOutput.aux_loss`.
        router_conv: W > 1: the router reads a causal depthwise convolution of x over the last W tokens
            (no activation; its tail rides in the cache) instead of x_t alone, so a token's memories can
            depend on its neighbours: on MQAR a pair's write (at its value, the key one token back) and its
            read (at the query key) can then pick the same memory. 0 (default) or 1: x_t.
        router_temperature: router scores are softmax(logits / temperature) (default 1).
        router_init_std: std of the router weight's normal init (default None: the model's `init_std`).
        readout: "sum" (default, the MoM paper's): the token's K routed memories' reads, weighted, and the shared
            memory's are summed into one `[H, V]` output before the single layer's norm, gate and projection.
            "per_memory": each memory's read is normed and gated on its own, weighted, and reaches a slice of
            the output projection of its own (Ms x wider: like an MoE expert's output matrix), so memories do
            not meet in one head-width sum. Decoding then steps the routed memories without the fused kernel.
        Routing diagnostics (load, entropy, dead memories, write/read sharing) are in `lsm.mixture.diagnostics`.

    Dtypes as in `RuleLayer` (the same `lsm.modules.rule_inputs`): q, k, v in the activation dtype, gates
    in at least float32, states (every memory's) in float32.

    It is a `RuleLayer` built for `Ms = M + shared` memories (`num_states`): one shared query, and
    keys, values and gates with Ms times the heads from one projection each (`RuleLayer.project`);
    the output gate, norm and projection (`readout`) are the single layer's. The rule's gate module
    is built once for `Ms * H` heads, so every rule's parameterisation works per memory without the
    wrapper knowing it. What this class adds: the router, dispatch/combine, and the routed decode step.

    forward(x `[B, T, D]`, cache=None, cu_seqlens=None, use_cache=False) -> MixerOutput(output, cache, aux_loss).
    With `cu_seqlens` (B = 1, N packed sequences) segments are (sequence, memory) pairs.
    A call with a cache and T = 1 is a decoding step: it gathers the K selected and the shared
    memory's states, runs `rule.step` once on `[B * (K + shared)]` states and scatters them back.
    Longer calls with a cache (prefill) run the chunked path from the cached per-memory states.
    """

    def __init__(self, rule, hidden_size: int, num_heads: int, head_dim: int | None = None,
                 value_dim: int | None = None, num_memories: int = 4, topk: int = 2, shared_memory: bool = True,
                 aux_loss_weight: float = 0.01, router_conv: int = 0, router_temperature: float = 1.0,
                 router_init_std: float | None = None, readout: str = "sum", conv_size: int = 4,
                 use_short_conv: bool = True,
                 use_output_gate: bool = True, norm_eps: float = 1e-5, chunk_size: int = 64,
                 backend: str = "auto", rule_options: dict | None = None):
        _check_mixture_args(num_memories, topk, shared_memory, aux_loss_weight, router_conv, router_temperature,
                            router_init_std, readout)
        super().__init__(rule, hidden_size, num_heads, head_dim, value_dim, conv_size=conv_size,
                         use_short_conv=use_short_conv, use_output_gate=use_output_gate, norm_eps=norm_eps,
                         chunk_size=chunk_size, backend=backend, rule_options=rule_options,
                         num_states=num_memories + int(shared_memory))
        self.num_memories, self.topk, self.shared_memory = num_memories, topk, bool(shared_memory)
        self.aux_loss_weight = float(aux_loss_weight)
        self.conv_size = conv_size
        self.router = Router(hidden_size, num_memories, topk, router_temperature, router_init_std)
        # the router's view of the token window: linear, so at init it is a random mix of the last W tokens
        self.router_conv = ShortConv(hidden_size, router_conv, activation=False) if router_conv > 1 else None
        self.readout_mode = readout
        if readout == "per_memory":   # a slice of the output projection per memory (memory-major input channels)
            self.o_proj = nn.Linear(self.num_states * self.num_heads * self.value_dim, hidden_size, bias=False)

    @property
    def config(self) -> dict:
        """What a cache must agree with."""
        return dict(rule=self.rule.name, num_memories=self.num_memories, shared_memory=self.shared_memory,
                    num_heads=self.num_heads, head_dim=self.head_dim, value_dim=self.value_dim,
                    conv_size=self.conv_size if self.convs else 0,
                    router_conv=self.router_conv.kernel_size if self.router_conv is not None else 0)

    # ---------------------------------------------------------------- pieces
    def _routed(self, name: str, lin: Tensor, d: Dispatch, cache, cu_seqlens, head: int | None) -> Tensor:
        """Packed rows `[R, C]` of the per-memory projection `name` (lin `[B, T, Ms * C]`) after its short
        conv: the conv runs over the token stream, but the fused kernel computes only the routed
        (token, memory) pairs and writes them in packed order (no gather, 3/5 of the work at M=4, top-2)."""
        B, T, MC = lin.shape
        Ms = self.num_states
        conv = self.convs[name] if name in self.convs else None
        if conv is not None and cache is None and use_conv_kernel(self.backend, lin, conv.kernel_size):
            from lsm_kernels.conv import short_conv
            pos = None if cu_seqlens is None else seq_positions(cu_seqlens, T)
            return short_conv(lin, conv.weight, conv.bias, pos, conv.activation, head, gather=(d.src, d.inv, Ms))
        full = self._conv(name, lin, cache, cu_seqlens, head=head)
        return take_rows(full.reshape(B * T * Ms, MC // Ms), d.src)

    def router_input(self, x: Tensor, cache: MoMCache | None, cu_seqlens) -> Tensor:
        """What the router reads: x `[B, T, D]`, or its causal conv over the last `router_conv` tokens."""
        if self.router_conv is None:
            return x
        y, tail = self.router_conv(x, None if cache is None else cache.conv.get("router"), cu_seqlens,
                                   backend=self.backend)
        if cache is not None:
            cache.conv["router"] = tail
        return y

    def slots(self, routing: Routing) -> tuple[Tensor, Tensor]:
        """The memories a token reads and writes, and their weights: `[B, T, S]` each, S = K + shared.
        The shared memory is index M with weight 1."""
        if self.shared_memory:
            return with_shared_slot(routing.index, routing.weight, self.num_memories)
        return routing.index, routing.weight

    def init_cache(self, batch_size: int, device=None, dtype=torch.float32) -> MoMCache:
        """An empty cache: every memory's decode state from `rule.init_state`, `[B, Ms, ...]`."""
        Ms = self.num_states
        state = self.rule.init_state(batch_size * Ms, self.num_heads, self.head_dim, self.value_dim,
                                     device=device, dtype=dtype)
        return MoMCache(state=tuple(s.unflatten(0, (batch_size, Ms)) for s in state), config=self.config)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, cache: MoMCache | None = None, cu_seqlens: Tensor | None = None,
                use_cache: bool = False) -> MixerOutput:
        self._check_inputs(x, cache, cu_seqlens)
        B, T, _ = x.shape
        if use_cache and cache is None:
            cache = self.init_cache(B, x.device, at_least_float32(x.dtype))
        routing = self.router(self.router_input(x, cache, cu_seqlens))
        mix = self.readout_mode == "sum"
        # the slot tensors (routed + shared) are built where they are read: a mixed decoding step takes the routing
        # as it is (its kernel adds the shared memory), which saves the step four launches
        sel = w = None
        if cache is not None and T == 1:
            # a decoding step: the balancing loss is a training signal, not computed here
            o, aux_loss = self._step(*self.project(x, cache, cu_seqlens), routing, cache, mix), x.new_zeros(())
        else:
            aux_loss = self.aux_loss_weight * load_balancing_loss(routing, self.num_memories)
            sel, w = self.slots(routing)
            o = self._chunk(x, sel, w, cache, cu_seqlens, mix)
        if cache is not None:
            cache.seen += T
        if not mix and sel is None:
            sel, w = self.slots(routing)
        y = self.readout(o, x) if mix else self.readout_per_memory(o, sel, w, x)
        return MixerOutput(y, cache, aux_loss)

    def readout_per_memory(self, o: Tensor, sel: Tensor, w: Tensor, x: Tensor) -> Tensor:
        """`readout: per_memory`: o `[B, T, S, H, V]` (each slot's read), sel / w `[B, T, S]` -> `[B, T, D]`: each
        read normed and gated on its own, weighted, placed at its memory's channels (zeros for the memories a
        token does not read) and projected (a gather-backward scatter: no sync, no atomics)."""
        B, T, S, H, V = o.shape
        gate = self.output_gate(x)
        n = self.o_norm(o, None if gate is None else gate[:, :, None].expand_as(o), backend=self.backend)
        n = n * w.to(n.dtype)[..., None, None]
        full = n.new_zeros(B, T, self.num_states, H, V).scatter(2, sel[..., None, None].expand_as(n), n)
        return self.o_proj(full.flatten(-3))

    def _chunk(self, x, sel, w, cache, cu_seqlens, mix: bool = True) -> Tensor:
        """Training / prefill: one packed call of `rule.chunk`. Returns o `[B, T, H, V]` mixed over the slots, or
        `[B, T, S, H, V]` per slot (`mix=False`)."""
        B, T, _ = x.shape
        Ms, H = self.num_states, self.num_heads
        d = dispatch(sel, Ms, cu_seqlens)
        q, k, v, gates = self.project(x, cache, cu_seqlens, routed=_RoutedRows(self, d, cache, cu_seqlens))
        h0 = None if cache is None else tuple(s.flatten(0, 1) for s in cache.state)  # decode state, [B*Ms, H, ...]
        o, S = self.rule.chunk(take_tokens(q.flatten(0, 1), d)[None], k, v, initial_state=h0,
                               output_final_state=cache is not None, cu_seqlens=d.cu_seqlens,
                               chunk_size=self.chunk_size, backend=self.backend,
                               # a batch row gives each memory at most T tokens: segments side by side (a
                               # static bound, sync-free); on CPU the torch form scans a sequence's Ms segments
                               # one after another in one row instead, which pads them to (K + shared) * T, not Ms * T
                               max_seqlen=T if cu_seqlens is None else None, seqs_per_row=Ms,
                               **gates, **self.rule_options)
        if cache is not None:
            cache.state = tuple(s.unflatten(0, (B, Ms)) for s in S)
        o = take_rows(o[0], d.dest.flatten()).unflatten(0, d.dest.shape)           # [B*T, S, H, V]
        if not mix:
            return o.unflatten(0, (B, T))
        return mix_slots(o, w.flatten(0, 1)).view(B, T, H, -1)

    def _step(self, q, k, v, gates, routing: Routing, cache: MoMCache, mix: bool = True) -> Tensor:
        """Decoding (T = 1): update only the K selected memories and the shared one. Returns `[B, 1, H, V]`
        (`[B, 1, S, H, V]` per slot with `mix=False`).

        `routed_step` reads the selected memories' rows of k, v and gates; with the Triton
        backend (and mixed reads) it is one fused kernel updating the cache in place."""
        o, cache.state = routed_step(self.rule, q[:, 0], k[:, 0], v[:, 0], cache.state, routing.index[:, 0],
                                     routing.weight[:, 0], self.shared_memory, backend=self.backend, mix=mix,
                                     **{n: g[:, 0] for n, g in gates.items()}, **self.rule_options)
        return o[:, None]

    def _check_inputs(self, x, cache, cu_seqlens) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: `x` must be [B, T, {self.hidden_size}], got {tuple(getattr(x, 'shape', ()))}")
        if cu_seqlens is not None:
            if not (isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and not cu_seqlens.is_floating_point()):
                raise TypeError(f"{name}: `cu_seqlens` must be a 1-D int32/int64 tensor [N+1]")
            if x.shape[0] != 1:
                raise ValueError(f"{name}: with `cu_seqlens` the sequences are packed along T, so the batch size "
                                 f"must be 1, got B={x.shape[0]}")
            if cache is not None:
                raise ValueError(f"{name}: decoding with a cache takes a batch [B, T, D], not packed `cu_seqlens`")
        if cache is None:
            return
        if not isinstance(cache, MoMCache):
            raise TypeError(f"{name}: `cache` must be a MoMCache from this layer, got {type(cache).__name__}")
        for key, want in self.config.items():
            got = cache.config.get(key)
            if got != want:
                raise ValueError(f"{name}: the cache was built for {key}={got!r}, this layer has {key}={want!r}")
        lead = tuple(cache.state[0].shape[:3])
        if lead != (x.shape[0], self.num_states, self.num_heads):
            raise ValueError(f"{name}: the cache holds states for batch size {lead[0]}, got a batch of {x.shape[0]}")


class _RoutedRows:
    """What `RuleLayer.project` reads on the chunked path: the routed (token, memory) rows only, in dispatch order."""

    def __init__(self, layer: MixtureOfMemories, d: Dispatch, cache, cu_seqlens):
        self.layer, self.d, self.cache, self.cu_seqlens = layer, d, cache, cu_seqlens

    def rows(self, name: str, lin: Tensor, head: int | None) -> Tensor:
        """Projection `name`'s rows `[R, C]` after its short conv (lin `[B, T, Ms * C]`)."""
        return self.layer._routed(name, lin, self.d, self.cache, self.cu_seqlens, head)

    def gather(self, t: Tensor) -> Tensor:
        """`[B, T, Ms, ...]` -> `[1, R, ...]`: an index gather whose backward is a gather (no host sync, no atomics)."""
        return take_rows(t.flatten(0, 2), self.d.src)[None]


def _check_mixture_args(num_memories, topk, shared_memory, aux_loss_weight, router_conv, router_temperature,
                        router_init_std, readout="sum") -> None:
    for n, val in (("num_memories", num_memories), ("topk", topk)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"`{n}` must be a positive int, got {val!r}")
    if topk > num_memories:
        raise ValueError(f"`topk` ({topk}) must be <= `num_memories` ({num_memories})")
    if not isinstance(shared_memory, bool):
        raise TypeError(f"`shared_memory` must be a bool, got {type(shared_memory).__name__}")
    if not isinstance(aux_loss_weight, (int, float)) or isinstance(aux_loss_weight, bool) or aux_loss_weight < 0:
        raise ValueError(f"`aux_loss_weight` must be a non-negative float, got {aux_loss_weight!r}")
    if not isinstance(router_conv, int) or isinstance(router_conv, bool) or router_conv < 0:
        raise ValueError(f"`router_conv` must be an int >= 0 (0 or 1: the router reads x_t alone), got {router_conv!r}")
    if not isinstance(router_temperature, (int, float)) or isinstance(router_temperature, bool) or not router_temperature > 0:
        raise ValueError(f"`router_temperature` must be a float > 0, got {router_temperature!r}")
    if router_init_std is not None and (not isinstance(router_init_std, (int, float)) or router_init_std < 0):
        raise ValueError(f"`router_init_std` must be None or a float >= 0, got {router_init_std!r}")
    if readout not in ("sum", "per_memory"):
        raise ValueError(f"`readout` must be 'sum' or 'per_memory', got {readout!r}")
