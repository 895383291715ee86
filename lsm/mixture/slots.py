"""Slots of the Mixture-of-Memories: the memories a token reads and writes, mixing their readouts, and decoding.

A token occupies S slots: its K routed memories `index [.., K]` with weights `weight [.., K]`, plus the
shared memory (index M, weight 1) when the layer has one. `routed_step` is one decoding step that updates
only those memories; the chunked path (lsm.mixture.mom) packs the slots with `routing.dispatch`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lsm.dtypes import at_least_float32
from lsm.rules import backends
from lsm.rules.base import DecodeState, UpdateRule


def with_shared_slot(index: Tensor, weight: Tensor, shared: int) -> tuple[Tensor, Tensor]:
    """Append the always-on shared memory (slot `shared`, weight 1) to routed slots `[..., K]` -> `[..., K + 1]`."""
    return (torch.cat([index, torch.full_like(index[..., :1], shared)], -1),
            torch.cat([weight, torch.ones_like(weight[..., :1])], -1))


def mix_slots(o: Tensor, w: Tensor) -> Tensor:
    """Weighted sum over slots: o `[L, S, H, V]`, w `[L, S]` -> `[L, H, V]` in o's dtype (summed in >= float32)."""
    ct = at_least_float32(o.dtype)
    return (o.to(ct) * w.to(ct)[..., None, None]).sum(1).to(o.dtype)


def routed_step(rule: UpdateRule, q: Tensor, k: Tensor, v: Tensor, state: DecodeState, index: Tensor, weight: Tensor,
                shared: bool, scale=None, backend: backends.Backend = "auto", mix: bool = True,
                **gates) -> tuple[Tensor, DecodeState]:
    """One decoding step of a Mixture-of-Memories layer: update only the routed memories (and the shared one).

    q `[B, H, K]` (the shared query); every memory's inputs k `[B, Ms, H, K]`, v `[B, Ms, H, V]`,
    gates `[B, Ms, H(, K)]`; state: the rule's decode-state tuple, every tensor `[B, Ms, H, ...]`
    (Ms = M routed memories + the shared one, last, when `shared`); index `[B, topk]` distinct
    memories < M and weight `[B, topk]`. Returns (o `[B, H, V]` = sum_s w_s o_s with the shared
    memory's weight 1, the new state). The memories not selected keep their state exactly. `mix=False`: o
    `[B, S, H, V]`, each slot's read unweighted (slots: the routed memories in `index` order, then the shared one).

    With the Triton backend, a float32 state and no autograd graph to record, one fused kernel
    updates the selected memories in place (`lsm_kernels.decode.mom_step`); otherwise the
    selected states are gathered, stepped with `rule.step` as one batch, and scattered back.
    """
    B, Ms = state[0].shape[:2]
    backend = backends.resolve_step(rule, backend, q, k, v, state, gates)
    fused = (mix and backend == "triton" and rule.has_triton_step and len(state) == 1 and state[0].dtype == torch.float32
             and state[0].is_contiguous() and not backends.requires_grad(q, k, v, state[0], weight, *gates.values()))
    if fused:
        from lsm_kernels.decode import mom_step
        scale, kernel_gates = rule.kernel_step_args(q, scale, gates)
        o = mom_step(q, k, v, state[0], index, weight, scale, shared=shared, **kernel_gates)
        return o, state
    sel, w = with_shared_slot(index, weight, Ms - 1) if shared else (index, weight)
    S = sel.shape[1]
    H, K = q.shape[1:]

    def at(t: Tensor) -> Tensor:                                            # gather index for [B, Ms, ...]
        return sel.view(B, S, *([1] * (t.dim() - 2))).expand(B, S, *t.shape[2:])

    pick = lambda t: t.gather(1, at(t)).flatten(0, 1)                       # [B, Ms, ...] -> [B*S, ...]
    per_memory = {n: pick(t) for n, t in gates.items() if isinstance(t, Tensor) and t.shape[:2] == (B, Ms)}
    fixed = {n: t for n, t in gates.items() if n not in per_memory}
    o, new = rule.step(q[:, None].expand(B, S, H, K).flatten(0, 1), pick(k), pick(v), tuple(pick(s) for s in state),
                       scale=scale, backend=backend, **per_memory, **fixed)
    state = tuple(s.scatter(1, at(s), n.unflatten(0, (B, S)).to(s.dtype)) for s, n in zip(state, new))
    o = o.unflatten(0, (B, S))
    return (mix_slots(o, w) if mix else o), state
