"""Plain dense reference of the Mixture-of-Memories, for tests: no packing, a loop over memories and tokens.

Every memory runs the rule's own recurrence (`rule.step`) over *all* tokens, and a token that is
not routed to memory m keeps the old state (`torch.where` on the routing mask), so S_m changes
only at its routed tokens. Outputs are mixed with the router weights (the shared memory with
weight 1), then go through the layer's readout; with `readout: per_memory` each memory's read goes
through the norm and gate alone, is weighted, and meets its own columns of the output projection.
It shares every parameter with the layer it is given and is slow by design: O(Ms * T) Python steps.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lsm.dtypes import at_least_float32
from lsm.mixture.mom import MixtureOfMemories
from lsm.rules.base import DecodeState


def mom_reference(layer: MixtureOfMemories, x: Tensor, state: DecodeState | None = None) -> tuple[Tensor, DecodeState]:
    """x `[B, T, D]`, optional decode state with leading dims `[B, Ms, H]` (as in `MoMCache.state`)
    -> (output `[B, T, D]`, final decode state `[B, Ms, H, ...]`)."""
    rule = layer.rule
    B, T, _ = x.shape
    Ms, H, K, V = layer.num_states, layer.num_heads, layer.head_dim, layer.value_dim
    ct = at_least_float32(x.dtype)
    sel, w = layer.slots(layer.router(layer.router_input(x, None, None)))           # [B, T, S]
    # dense routing: weight of every memory for every token (0 where not routed), and the mask
    routed = torch.zeros(B, T, Ms, dtype=torch.bool).scatter_(2, sel, True)         # [B, T, Ms]
    weight = torch.zeros(B, T, Ms, dtype=ct).scatter_(2, sel, w.to(ct))             # [B, T, Ms]
    q, k, v, gates = layer.project(x, None, None)
    out = torch.zeros(B, T, H, V, dtype=ct)
    reads = torch.zeros(B, T, Ms, H, V, dtype=ct)                                   # every memory's read
    finals = []
    for m in range(Ms):
        st = (tuple(s[:, m] for s in state) if state is not None
              else rule.init_state(B, H, K, V, dtype=ct))
        for t in range(T):
            o, new = rule.step(q[:, t], k[:, t, m], v[:, t, m], st,
                               **{n: g[:, t, m] for n, g in gates.items()}, **layer.rule_options)
            keep = routed[:, t, m]
            st = tuple(torch.where(keep.view(B, *([1] * (s.dim() - 1))), n.to(s.dtype), s) for s, n in zip(st, new))
            out[:, t] += weight[:, t, m, None, None] * o.to(ct)
            reads[:, t, m] = o.to(ct)
        finals.append(st)
    final = tuple(torch.stack([f[i] for f in finals], 1) for i in range(len(finals[0])))
    if layer.readout_mode == "sum":
        return layer.readout(out.to(v.dtype), x), final
    # per_memory: memory m's read, normed and gated, weighted (0 where not routed), into its slice of o_proj
    gate = layer.output_gate(x)
    y = torch.zeros(B, T, layer.hidden_size, dtype=ct)
    for m in range(Ms):
        n = layer.o_norm(reads[:, :, m].to(v.dtype), gate).to(ct) * weight[:, :, m, None, None]
        y += n.flatten(-2) @ layer.o_proj.weight[:, m * H * V:(m + 1) * H * V].T.to(ct)
    return y.to(v.dtype), final
