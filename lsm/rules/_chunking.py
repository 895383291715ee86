"""Chunk-aligned layout shared by every torch chunked form.

A batch `[B, T, ...]`, or a packed variable-length batch `[1, T, ...]` with `cu_seqlens [N+1]`, is
scattered into chunks `[Nb, NC, C, ...]` such that no chunk holds tokens of two sequences. Padding
slots are zero, which every rule treats as "no update": zero key and value, log-decay 0, beta 0,
eta 0. The inter-chunk scan then loops over the `NC` chunk columns (never over tokens, heads or
sequences) and resets the state to the sequence's initial state where a sequence starts.

All index arithmetic stays on the device. On an accelerator `NC` comes from static shapes (an upper
bound in the variable-length case), so building the layout never synchronises with the host; on CPU it
is read from the lengths, so a packed batch's layout is as short as its longest row.
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

    Sequences sit in the rows of the layout one after another, each from a chunk boundary; the scan runs
    the rows side by side, so it takes NC steps (the longest row, in chunks) however many rows there are.
    Which sequences share a row:
        a batch (no `cu_seqlens`):             one row per batch row;
        packed, `max_seqlen` given:            one row per sequence;
        packed, no `max_seqlen`:               one row for all;
        packed, `seqs_per_row = g`, exact NC:  every g consecutive sequences (MoM: the memories of one sequence).
    NC is exact on CPU: the longest row, read from the lengths (a host read waits for nothing there); and
    where shared rows would lay out no fewer chunks than a row per sequence, each sequence gets its own (the
    same slots or fewer, a shorter scan). On other devices NC is a static bound from the shapes and
    `max_seqlen`, so building the layout never synchronises with the host; there `seqs_per_row` is not used
    (a row of g sequences has no static bound tighter than g rows of one). Both build the same attributes
    below: one code path for the rules' math.

    Attributes:
        N: number of sequences (B, or len(cu_seqlens) - 1).
        Nb, NC, C: the chunked layout is `[Nb, NC, C, ...]`.
        seq_start: `[Nb, NC]` bool, chunk `c` begins a sequence (state is reset there).
        seq_index: `[Nb, NC]` long, the sequence a chunk belongs to (for initial states).
        last_chunk: `[N]` long, flat index (into `Nb * NC`) of each sequence's last chunk.
        dest: `[B * T]` long, flat slot (into `Nb * NC * C`) of every token.
    """

    def __init__(self, B: int, T: int, chunk_size: int, cu_seqlens: Tensor | None, device: torch.device,
                 max_seqlen: int | None = None, seqs_per_row: int | None = None, exact: bool | None = None):
        C = chunk_size
        self.C, self.B, self.T = C, B, T
        if exact is None:  # a traced graph keeps static shapes: no host read there either
            exact = torch.device(device).type == "cpu" and not torch.compiler.is_compiling()
        if cu_seqlens is None:  # a batch is a packed batch of B sequences of length T: one code path for both
            cu, max_seqlen, seqs_per_row = torch.arange(B + 1, device=device) * T, T, 1
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.long)
        N = cu.numel() - 1
        nchunks = ((cu[1:] - cu[:-1] + C - 1) // C).clamp(min=1)                 # [N] an empty sequence owns one chunk
        before = nchunks.cumsum(0) - nchunks                                     # [N] chunks before a sequence, all rows

        def rows(g: int) -> tuple[int, Tensor, Tensor]:
            """g consecutive sequences per row: (Nb, the row of each sequence `[N]`, its first chunk in the row `[N]`)."""
            Nb = -(-N // g)
            row = torch.arange(N, device=device) // g                            # [N]
            return Nb, row, before - before[row * g]

        # 1. the rows: on CPU `seqs_per_row` sequences each, if given; else a row per sequence under a length bound,
        #    or one row for all
        Nb, row, in_row = rows(seqs_per_row if exact and seqs_per_row is not None
                               else 1 if max_seqlen is not None else max(N, 1))
        # 2. the row length NC: exact (CPU), or a static bound (N ceil's sum to at most ceil(T / C) + N - 1)
        if exact:
            NC = int((in_row + nchunks).max()) if N else 1
            if Nb < N and Nb * NC >= N * int(nchunks.max()):  # shared rows save no chunks: a row each scans fewer steps
                Nb, row, in_row = rows(1)
                NC = int(nchunks.max())
        else:
            NC = max(-(-max_seqlen // C), 1) if max_seqlen is not None else max(-(-B * T // C), 1) + N - 1
        self.N, self.Nb, self.NC = N, Nb, NC
        # 3. flat chunk index of every sequence's first chunk, and what the scan needs per chunk
        chunk_off = row * NC + in_row                                            # [N] increasing
        c = torch.arange(Nb * NC, device=device)
        self.seq_index = (torch.searchsorted(chunk_off, c, right=True) - 1).clamp(0, max(N - 1, 0)).view(Nb, NC)
        self.seq_start = torch.zeros(Nb * NC, dtype=torch.bool, device=device).index_fill_(0, chunk_off, True).view(Nb, NC)
        self.last_chunk = chunk_off + nchunks - 1                                # padding chunks after it are identity
        seq, pos = token_sequences(cu, B * T)                                    # [B*T] sequence of every token, position
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
