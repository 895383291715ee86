"""Chunk-aligned layout shared by every torch chunked form.

A batch `[B, T, ...]`, or a packed variable-length batch `[1, T, ...]` with `cu_seqlens [N+1]`, is
scattered into chunks `[Nb, NC, C, ...]` such that no chunk holds tokens of two sequences. Padding
slots are zero, which every rule treats as "no update": zero key and value, log-decay 0, beta 0,
eta 0. The inter-chunk scan then loops over the `NC` chunk columns (never over tokens, heads or
sequences) and resets the state to the sequence's initial state where a sequence starts.

All index arithmetic stays on the device: `NC` comes from static shapes (an upper bound in the
variable-length case), so building the layout never synchronises with the host.
"""
from __future__ import annotations

import torch
from torch import Tensor


def token_sequences(cu_seqlens: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """(seq `[T]`, pos `[T]`): the sequence of every token of a packed batch and its position inside it.

    cu_seqlens `[N+1]` (any integer dtype); both results are long tensors on its device (no host sync).
    """
    cu = cu_seqlens.long()
    t = torch.arange(T, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True).clamp(max=cu.numel() - 2)   # [T]
    return seq, t - cu[seq]


class ChunkLayout:
    """Index maps between token order and the chunk-aligned layout.

    Attributes:
        N: number of sequences (B, or len(cu_seqlens) - 1).
        Nb, NC, C: the chunked layout is `[Nb, NC, C, ...]`.
        seq_start: `[Nb, NC]` bool, chunk `c` begins a sequence (state is reset there).
        seq_index: `[Nb, NC]` long, the sequence a chunk belongs to (for initial states).
        last_chunk: `[N]` long, flat index (into `Nb * NC`) of each sequence's last chunk.
        dest: `[B * T]` long, flat slot (into `Nb * NC * C`) of every token.
    """

    def __init__(self, B: int, T: int, chunk_size: int, cu_seqlens: Tensor | None, device: torch.device,
                 max_seqlen: int | None = None):
        C = chunk_size
        self.C = C
        self.B, self.T = B, T
        if cu_seqlens is not None and max_seqlen is not None:
            # every sequence fits in ceil(max_seqlen / C) chunks: lay the N sequences out as a batch
            # [N, NC, C] so that the scan runs NC steps for all of them at once (not sum(NC_n) steps)
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            N = cu.numel() - 1
            NC = max(-(-max_seqlen // C), 1)
            self.N, self.Nb, self.NC = N, N, NC
            self.seq_start = torch.zeros(N, NC, dtype=torch.bool, device=device)
            self.seq_start[:, 0] = True
            self.seq_index = torch.arange(N, device=device)[:, None].expand(N, NC)
            self.last_chunk = torch.arange(N, device=device) * NC + (NC - 1)   # padding is identity: the last column
            seq, pos = token_sequences(cu, T)
            self.dest = seq * (NC * C) + pos
            return
        if cu_seqlens is None:
            NC = max(-(-T // C), 1)
            self.N, self.Nb, self.NC = B, B, NC
            self.seq_start = torch.zeros(B, NC, dtype=torch.bool, device=device)
            self.seq_start[:, 0] = True
            self.seq_index = torch.arange(B, device=device)[:, None].expand(B, NC)
            self.last_chunk = torch.arange(B, device=device) * NC + (NC - 1)
            t = torch.arange(T, device=device)
            self.dest = (torch.arange(B, device=device)[:, None] * (NC * C) + t[None, :]).reshape(-1)
            return
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        N = cu.numel() - 1
        lens = cu[1:] - cu[:-1]                                   # [N]
        nchunks = ((lens + C - 1) // C).clamp(min=1)              # an empty sequence still owns one chunk
        chunk_off = torch.cumsum(nchunks, 0) - nchunks            # [N] first chunk of each sequence
        NC = -(-T // C) + N                                       # static upper bound on sum(nchunks)
        self.N, self.Nb, self.NC = N, 1, NC
        c = torch.arange(NC, device=device)
        owner = torch.searchsorted(chunk_off, c, right=True) - 1  # [NC] sequence owning chunk c
        self.seq_index = owner.clamp(0, N - 1)[None, :]
        self.seq_start = torch.zeros(1, NC, dtype=torch.bool, device=device)
        self.seq_start.index_fill_(1, chunk_off, True)              # index_fill_: no host-to-device copy
        self.last_chunk = chunk_off + nchunks - 1
        seq, pos = token_sequences(cu, T)                        # [T] sequence of token t, position in it
        self.dest = (chunk_off[seq] + pos // C) * C + pos % C

    def to_chunks(self, x: Tensor) -> Tensor:
        """`[B, T, *rest]` -> `[Nb, NC, C, *rest]`, zero in padding slots (differentiable)."""
        rest = x.shape[2:]
        flat = x.reshape(self.B * self.T, *rest)
        out = flat.new_zeros(self.Nb * self.NC * self.C, *rest).index_copy(0, self.dest, flat)
        return out.view(self.Nb, self.NC, self.C, *rest)

    def from_chunks(self, y: Tensor) -> Tensor:
        """`[Nb, NC, C, *rest]` -> `[B, T, *rest]`."""
        rest = y.shape[3:]
        return y.reshape(self.Nb * self.NC * self.C, *rest)[self.dest].view(self.B, self.T, *rest)

    def initial_states(self, h0: Tensor | None, shape: tuple[int, ...], dtype, device) -> Tensor:
        """Initial state of every sequence, `[N, *shape]` (zeros when `h0` is None)."""
        if h0 is None:
            return torch.zeros(self.N, *shape, dtype=dtype, device=device)
        return h0.to(dtype)

    def reset(self, S: Tensor, h0: Tensor, c: int) -> Tensor:
        """State entering chunk column `c`: the sequence's initial state where one starts, else `S`."""
        start = self.seq_start[:, c].view(-1, *([1] * (S.dim() - 1)))
        return torch.where(start, h0[self.seq_index[:, c]], S)

    def final_states(self, states: Tensor) -> Tensor:
        """`states [Nb, NC, *shape]` (state after each chunk) -> final state of each sequence `[N, *shape]`."""
        return states.flatten(0, 1)[self.last_chunk]
