"""Routing diagnostics of a Mixture-of-Memories: how the router spreads tokens over the memories.

    with record_routing(model) as layers:          # forward hooks on every `Router`: no change to the forward
        model(ids)
    tally = {name: RoutingTally() for name in layers}
    for name, routings in layers.items():
        for r in routings:
            tally[name].add(r, write_pos)            # device tensors only: no host sync
    tally["L0"].summary()                           # the one host read

Per layer:
  load[m]   fraction of the routed (token, memory) assignments that go to memory m (sums to 1)
  entropy   mean over tokens of the router's entropy -sum_m p_m log p_m, in nats (max log M)
  dead      memories whose load is below 1 / (10 M) (a tenth of a fair share)
  share     MQAR: fraction of queries whose read (at the query's key token) shares at least one routed
            memory with their pair's write (at its value token); without a shared routed memory a
            query can only be answered from the shared memory
  write[m]  MQAR: fraction of the pairs' routed writes (at their value tokens) that go to memory m: how the
            pairs, which are what a memory has to hold, spread over the memories (`load` counts every token,
            and most of an MQAR sequence is filler that routes alike)
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lsm.mixture.routing import Router, Routing


def memory_counts(index: Tensor, num_memories: int) -> Tensor:
    """Routed assignments per memory: index `[..., K]` long -> `[M]` float32 counts."""
    idx = index.reshape(-1)
    return torch.zeros(num_memories, device=index.device).index_add_(0, idx, torch.ones(idx.numel(), device=index.device))


def router_entropy(probs: Tensor) -> Tensor:
    """Entropy of every token's router distribution: probs `[..., M]` -> `[...]` nats."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def dead_memories(load: Tensor) -> Tensor:
    """Memories with load below a tenth of a fair share: load `[M]` (fractions) -> `[]` count."""
    return (load < 1 / (10 * load.shape[-1])).sum()


def _at_write(index: Tensor, write_pos: Tensor) -> tuple[Tensor, Tensor]:
    """(queries `[B, T]` bool, the routed memories `[B, T, K]` at each position's pair's write; meaningful at queries).

    index: `[B, T, K]` the routed memories of every token. write_pos: `[B, T]` long, at a query (read)
    position the position of its pair's write, -1 elsewhere (`lsm.data.mqar_write_positions`)."""
    return write_pos >= 0, index.gather(1, write_pos.clamp(min=0)[..., None].expand(-1, -1, index.shape[-1]))


def write_read_shared(index: Tensor, write_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Queries whose read and their pair's write share a routed memory (index, write_pos: `_at_write`'s).
    Returns (queries sharing at least one memory, queries): two `[]` tensors."""
    query, at_write = _at_write(index, write_pos)
    share = (index[..., :, None] == at_write[..., None, :]).flatten(-2).any(-1)      # [B, T]
    return (share & query).sum(), query.sum()


def write_counts(index: Tensor, write_pos: Tensor, num_memories: int) -> Tensor:
    """Routed memories of every queried pair's write (index, write_pos: `_at_write`'s) -> `[M]` float32 counts
    (each pair is queried once in MQAR, so each write counts once)."""
    query, at_write = _at_write(index, write_pos)
    weights = query[..., None].expand_as(at_write).reshape(-1).float()
    return torch.zeros(num_memories, device=index.device).index_add_(0, at_write.reshape(-1), weights)


class RoutingTally:
    """Running sums of one layer's routing over batches, kept on the device until `summary`."""

    def __init__(self):
        self.counts: Tensor | int = 0     # [M]
        self.entropy: Tensor | int = 0    # [] summed over tokens
        self.tokens = 0                   # host int (shapes are known on the host)
        self.shared: Tensor | int = 0     # []
        self.queries: Tensor | int = 0    # []
        self.writes: Tensor | int = 0     # [M] routed pair writes per memory

    def add(self, routing: Routing, write_pos: Tensor | None = None) -> None:
        """Count one forward's routing (`[B, T, ...]`); `write_pos` `[B, T]` adds the write/read sharing (MQAR)."""
        self.counts = self.counts + memory_counts(routing.index, routing.probs.shape[-1])
        self.entropy = self.entropy + router_entropy(routing.probs.float()).sum()
        self.tokens += routing.probs[..., 0].numel()
        if write_pos is not None:
            write_pos = write_pos.to(routing.index.device)
            hits, n = write_read_shared(routing.index, write_pos)
            self.shared, self.queries = self.shared + hits, self.queries + n
            self.writes = self.writes + write_counts(routing.index, write_pos, routing.probs.shape[-1])

    def summary(self) -> dict[str, float]:
        """load{m}, entropy, dead (and share, write{m} when queries were counted) as host numbers."""
        if not self.tokens:
            return {}
        load = self.counts / self.counts.sum()
        out = {f"load{m}": float(x) for m, x in enumerate(load.tolist())}
        out["entropy"] = float(self.entropy) / self.tokens
        out["dead"] = int(dead_memories(load))
        if isinstance(self.queries, Tensor) and int(self.queries):
            out["share"] = float(self.shared) / int(self.queries)
            out |= {f"write{m}": float(x) for m, x in enumerate((self.writes / self.writes.sum()).tolist())}
        return out


def _layer_name(module_name: str, i: int) -> str:
    """"blocks.3.mixer.router" (also under a DDP/FSDP wrapper) -> "L3"; else the router's rank."""
    m = re.search(r"blocks\.(\d+)\.", module_name)
    return f"L{m.group(1) if m else i}"


@contextmanager
def record_routing(model: nn.Module):
    """Collect the `Routing` of every `Router` in `model` while the context is open.

    Yields {layer name: [Routing, ...]} (one entry per forward call, in call order); the caller clears
    the lists between batches. Forward hooks only: the model's forward is unchanged.
    """
    routers = [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]
    records: dict[str, list[Routing]] = {_layer_name(n, i): [] for i, (n, _) in enumerate(routers)}
    handles = [m.register_forward_hook(lambda _m, _args, out, key=_layer_name(n, i): records[key].append(out))
               for i, (n, m) in enumerate(routers)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
