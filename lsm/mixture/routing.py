"""Routing, dispatch and the load-balancing loss of the Mixture-of-Memories.

Router: `r_t = x_t W_r` (`[M]`), `p_t = softmax(r_t)`, keep the top-K, renormalise them to sum to 1.

Dispatch packs every (token, memory) pair into one variable-length batch for the rule's chunked
kernel. A token occupies S "slots": its K routed memories, plus the shared memory (index M) with
weight 1 when there is one. Segments are (sequence, memory) pairs, numbered `n * Ms + m`
(Ms = M + shared); inside a segment rows keep time order, so memory m of sequence n sees exactly
its own sub-sequence of tokens. All index arithmetic is cumulative sums and gathers on the
device with static sizes (R = L * S rows for L tokens): no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsm.dtypes import at_least_float32
from lsm.rules._chunking import token_sequences


@dataclass
class Routing:
    """The router's decision for every token (`[B, T, ...]`)."""

    probs: Tensor    # [B, T, M]  softmax of the router logits (float32, or float64 for float64 inputs)
    index: Tensor    # [B, T, K]  the top-K memories (long)
    weight: Tensor   # [B, T, K]  their probabilities renormalised to sum to 1


class Router(nn.Module):
    """Linear router: x `[B, T, D]` -> `Routing` over `num_memories` memories, top-`topk`.

    temperature: scores are softmax(x W_r / temperature) (below 1 sharper, above 1 flatter; the top-K
    weights are renormalised either way). init_std: std of the normal init of W_r; it also holds inside a
    `LanguageModel`, whose init of linear weights defers to a module's `_init_std`. None = the model's init.
    """

    def __init__(self, hidden_size: int, num_memories: int, topk: int, temperature: float = 1.0,
                 init_std: float | None = None):
        super().__init__()
        self.num_memories, self.topk, self.temperature = num_memories, topk, float(temperature)
        self.proj = nn.Linear(hidden_size, num_memories, bias=False)
        if init_std is not None:
            self.proj._init_std = float(init_std)
            nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, x: Tensor) -> Routing:
        # the routing decision in at least float32, under autocast too (like the rules' gates): a bf16 logit
        # would flip the top-k choice of near-ties between memories
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(at_least_float32(x.dtype)),
                              self.proj.weight.to(at_least_float32(self.proj.weight.dtype)))
            probs = torch.softmax(logits / self.temperature, dim=-1)                      # [B, T, M]
        top, index = probs.topk(self.topk, dim=-1)                              # [B, T, K]
        return Routing(probs, index, top / top.sum(-1, keepdim=True))


def load_balancing_loss(routing: Routing, num_memories: int) -> Tensor:
    """Switch-style `M * sum_m f_m P_m`: f = fraction of routed (token, memory) assignments to m,
    P = mean router probability of m, over every token of the batch. Equals 1 when balanced."""
    M = num_memories
    idx = routing.index.reshape(-1)
    counts = routing.probs.new_zeros(M).index_add_(0, idx, routing.probs.new_ones(idx.numel()))  # [M]
    f = counts / max(idx.numel(), 1)
    P = routing.probs.reshape(-1, M).mean(0)                                    # [M]
    return M * (f * P).sum()


@dataclass
class Dispatch:
    """Index maps between token order and the packed (segment-major) order.

    With L tokens, S slots per token and Ms memories per sequence, there are R = L * S rows.
        src:  `[R]` flat index into `[L * Ms]` (token, memory) of every packed row
        tok:  `[R]` flat token index of every packed row (for the shared query)
        dest: `[L, S]` packed row of each (token, slot)
        inv:  `[L * Ms]` packed row of each (token, memory), -1 where the token is not routed there
        cu_seqlens: `[N * Ms + 1]` segment boundaries of the packed batch
    """

    src: Tensor
    tok: Tensor
    dest: Tensor
    inv: Tensor
    cu_seqlens: Tensor


def dispatch(sel: Tensor, num_slots_memories: int, cu_seqlens: Tensor | None = None) -> Dispatch:
    """Pack the (token, memory) pairs by segment.

    Args:
        sel: `[B, T, S]` long, the memory of each of a token's S slots (distinct per token).
        num_slots_memories: Ms, the number of memories per sequence (shared one included).
        cu_seqlens: `[N+1]` when the batch is packed (then B == 1), else sequences are the B rows.
    """
    B, T, S = sel.shape
    Ms = num_slots_memories
    L = B * T
    dev = sel.device
    # a batch is a packed batch of B sequences of length T: one code path for both
    cu = (torch.arange(B + 1, device=dev) * T) if cu_seqlens is None else cu_seqlens.to(device=dev, dtype=torch.long)
    N = cu.numel() - 1
    sel = sel.reshape(L, S)
    t = torch.arange(L, device=dev)
    seq, _ = token_sequences(cu, L)                                             # [L] sequence of each token
    # 1. how many tokens each memory received before each token, inside the token stream
    #    (scanned along the last dim of an [Ms, L] tensor: a scan over dim 0 of [L, Ms] is ~20x slower on GPUs)
    mask = torch.zeros(Ms, L, dtype=torch.long, device=dev).scatter_(0, sel.t(), 1)  # [Ms, L] routed?
    csum = torch.cat([mask.new_zeros(Ms, 1), mask.cumsum(1)], 1).t()            # [L+1, Ms] exclusive counts
    # 2. per segment (n, m): its length and the rank of each routed token inside it
    base = csum.index_select(0, cu[:-1])                                        # [N, Ms] count before sequence start
    counts = csum.index_select(0, cu[1:]) - base                                # [N, Ms] segment lengths
    rank = csum[:-1] - base.index_select(0, seq)                                # [L, Ms]
    cu_seg = torch.cat([counts.new_zeros(1), counts.reshape(-1).cumsum(0)])     # [N*Ms+1]
    # 3. packed row of each (token, slot), and its inverse
    pos = cu_seg[:-1].view(N, Ms).index_select(0, seq) + rank                   # [L, Ms]
    dest = pos.gather(1, sel)                                                   # [L, S]
    pair = t[:, None] * Ms + sel                                                # [L, S] flat (token, memory)
    src = torch.empty(L * S, dtype=torch.long, device=dev).scatter_(0, dest.reshape(-1), pair.reshape(-1))
    inv = torch.full((L * Ms,), -1, dtype=torch.long, device=dev).scatter_(0, pair.reshape(-1), dest.reshape(-1))
    return Dispatch(src=src, tok=src // Ms, dest=dest, inv=inv, cu_seqlens=cu_seg)


class _TakeRows(torch.autograd.Function):
    """x[idx] along dim 0 for indices that are all distinct: the backward writes each row once
    (index_copy into zeros), with no atomic accumulation as index_select's backward does."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.n = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.n, *grad.shape[1:]).index_copy_(0, idx, grad), None


class _TakeTokens(torch.autograd.Function):
    """Per-token x `[L, ...]` to packed rows `[R, ...]` (row r holds token tok[r]); every token fills
    the S rows dest[t]. The backward gathers those S rows and sums them: no atomics."""

    @staticmethod
    def forward(ctx, x, tok, dest):
        ctx.save_for_backward(dest)
        return x.index_select(0, tok)

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        return grad.index_select(0, dest.reshape(-1)).unflatten(0, dest.shape).sum(1), None, None


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """`x.index_select(0, idx)` for distinct indices, with a scatter-free backward."""
    return _TakeRows.apply(x, idx)


def take_tokens(x: Tensor, d: Dispatch) -> Tensor:
    """Per-token x `[L, ...]` -> the packed rows `[R, ...]` of dispatch d, with a gather-sum backward."""
    return _TakeTokens.apply(x, d.tok, d.dest)
