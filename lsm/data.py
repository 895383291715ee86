"""Data: MQAR (multi-query associative recall, as in Zoology) and byte-level text from local files.

Both sources are deterministic functions of (seed, split, step): batch `step` of the training
stream is the same whatever ran before it, so a resumed run sees exactly the batches an
uninterrupted one would. A batch is a `Batch(input_ids [B, T] int64, labels [B, T] int64)` with
`labels = -100` where no loss is taken.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lsm.config import Config, ConfigError, MQARConfig, TextConfig, default_text_path

IGNORE = -100
_SPLITS = {"train": 0, "test": 1, "val": 2}
EVAL_SPLITS = ("val", "test")  # the validation stream selects (early stopping, learning rate); the test set reports


@dataclass
class Batch:
    input_ids: Tensor  # [B, T] int64
    labels: Tensor     # [B, T] int64, IGNORE where there is no target

    def to(self, device) -> "Batch":
        """Copy to `device`; to CUDA from pinned memory, so the copy does not wait for the queued GPU work."""
        if torch.device(device).type != "cuda":
            return Batch(self.input_ids.to(device), self.labels.to(device))
        return Batch(*(x.pin_memory().to(device, non_blocking=True) for x in (self.input_ids, self.labels)))


def _generator(seed: int, split: str, *key: int) -> torch.Generator:
    """A CPU generator seeded from (seed, split, key...): independent, reproducible streams."""
    mix = zlib.crc32(repr((seed, _SPLITS[split]) + tuple(key)).encode())
    return torch.Generator().manual_seed(mix)


# --------------------------------------------------------------------------- MQAR
def _smallest(r: Tensor, n: int) -> Tensor:
    """Indices of the n smallest entries of each row of r, in order: `r.argsort(1)[:, :n]` (the stream's definition)
    in O(row) by topk; the rare rows with an exact tie among their n + 1 smallest take the argsort, whose order of
    equal entries topk does not promise to share (CPU data: reading `tied` waits for nothing)."""
    top = r.topk(min(n + 1, r.shape[1]), 1, largest=False)
    idx = top.indices[:, :n].clone()
    tied = (top.values[:, 1:] == top.values[:, :-1]).any(1)
    if tied.any():
        rows = tied.nonzero().flatten()
        idx[rows] = r[rows].argsort(1)[:, :n]
    return idx


def mqar_examples(num_examples: int, num_pairs: int, seq_len: int, vocab_size: int,
                  generator: torch.Generator, power_a: float = 0.01) -> Batch:
    """`num_examples` MQAR sequences with `num_pairs` key-value pairs each, T = `seq_len` input tokens.

    Layout of the full sequence (T + 1 tokens; input = [:-1], labels = [1:]):
      1. key-value section, 2n tokens: k_1 v_1 k_2 v_2 ... k_n v_n, keys distinct, drawn from
         [1, V/2), values from [V/2, V);
      2. query section, T + 1 - 2n tokens of filler 0 in which every key appears once more, at an
         even offset drawn with probability ∝ (offset gap)^(power_a - 1) (Zoology's power law,
         short gaps are likelier), followed by its value.
    The loss is taken only where the input is a query key: the label there is its value.
    """
    B, n, V, T = num_examples, num_pairs, vocab_size, seq_len
    if 4 * n > T:
        raise ValueError(f"mqar: {n} pairs need seq_len >= {4 * n}, got {T}")
    if n > V // 2 - 1:
        raise ValueError(f"mqar: {n} pairs need {n} distinct keys; vocab_size={V} has {V // 2 - 1}")
    keys = _smallest(torch.rand(B, V // 2 - 1, generator=generator), n) + 1                     # [B, n] distinct
    values = torch.randint(V // 2, V, (B, n), generator=generator)                              # [B, n]
    kv = torch.stack([keys, values], 2).reshape(B, 2 * n)                                        # [B, 2n]

    L = T + 1 - 2 * n                                                                            # query section length
    slots = L // 2                                                                               # even offsets 0, 2, ...
    gaps = torch.arange(1, slots + 1, dtype=torch.float64)
    weights = (power_a * gaps ** (power_a - 1)).expand(B, slots)                                 # [B, slots]
    slot = torch.multinomial(weights, n, replacement=False, generator=generator)                 # [B, n] distinct
    order = torch.rand(B, n, generator=generator).argsort(1)                                     # which key goes where
    q_keys, q_values = keys.gather(1, order), values.gather(1, order)                             # [B, n]
    queries = torch.zeros(B, L, dtype=torch.long)
    queries.scatter_(1, 2 * slot, q_keys)
    queries.scatter_(1, 2 * slot + 1, q_values)

    seq = torch.cat([kv, queries], 1)                                                            # [B, T + 1]
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    labels.scatter_(1, 2 * slot, q_values)                                                       # predict v after its k
    labels = torch.cat([torch.full((B, 2 * n), IGNORE, dtype=torch.long), labels], 1)           # [B, T + 1]
    return Batch(seq[:, :-1].contiguous(), labels[:, :-1].contiguous())


def labelled_positions(labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The first k labelled positions of each row, in order, and their labels, `[B, k]` each (static shapes, no host
    synchronisation: a stable sort of the IGNORE mask). A row with fewer labels is filled with unlabelled positions,
    whose label is IGNORE, so a loss over them equals the loss over all positions."""
    k = min(k, labels.shape[1])
    positions = (labels == IGNORE).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
    return positions, labels.gather(1, positions)


def mqar_write_positions(batch: Batch, num_pairs: int) -> Tensor:
    """For every query of an MQAR batch, the position of its pair's value token (where the pair is written).

    batch: `mqar_examples(..., num_pairs, ...)`. Returns `[B, T]` long: at a query position (labels != IGNORE,
    the input there is the query key) the position 2j + 1 of the value of the pair whose key it is; -1 elsewhere.
    """
    ids = batch.input_ids                                                        # [B, T]
    keys = ids[:, 0:2 * num_pairs:2]                                             # [B, n] distinct per row
    match = ids[:, :, None] == keys[:, None, :]                                  # [B, T, n]
    write = 2 * match.to(torch.long).argmax(-1) + 1                              # [B, T]
    return torch.where(batch.labels != IGNORE, write, torch.full_like(write, -1))


class MQARData:
    """Training batches mixing (seq_len, pairs) cells; test sets per (pairs, length) cell of the sweep.

    Cells come from `train_cells` / `test_cells` when given, else from `seq_len` x `train_pairs` and
    `test_seq_lens` x `test_pairs`. A training batch is as long as its longest cell; a shorter example is
    right-padded with filler 0 and label IGNORE, which a causal model never sees from the example's own tokens.
    """

    kind = "mqar"

    def __init__(self, cfg: MQARConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed

    def max_labels(self) -> int:
        """The most labelled positions a training row holds: its cell's pairs (one label per query)."""
        return max(n for _, n in self.train_cells())

    def train_cells(self) -> list[tuple[int, int]]:
        """The (seq_len, pairs) cells the training examples draw from, uniformly."""
        c = self.cfg
        return [(L, n) for L, n in c.train_cells] if c.train_cells else [(c.seq_len, n) for n in c.train_pairs]

    def train_batch(self, step: int, batch_size: int, micro: int = 0) -> Batch:
        """Batch `step` (micro-batch `micro`) of the training stream; each example draws its cell."""
        c = self.cfg
        cells = self.train_cells()
        g = _generator(self.seed, "train", step, micro)
        choice = torch.randint(len(cells), (batch_size,), generator=g)
        T = max(L for L, _ in cells)
        ids = torch.zeros(batch_size, T, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        for i, (L, n) in enumerate(cells):      # one vectorised call per cell
            rows = (choice == i).nonzero().flatten()
            if rows.numel():
                b = mqar_examples(rows.numel(), n, L, c.vocab_size, g, c.power_a)
                ids[rows, :L], labels[rows, :L] = b.input_ids, b.labels
        return Batch(ids, labels)

    def test_cells(self) -> list[tuple[int, int]]:
        """The evaluation sweep: (num_pairs, seq_len) cells that fit (seq_len >= 4 * pairs)."""
        c = self.cfg
        if c.test_cells:
            return [(n, L) for L, n in c.test_cells]
        return [(n, T) for T in (c.test_seq_lens or [c.seq_len]) for n in c.test_pairs if 4 * n <= T]

    def test_set(self, num_pairs: int, seq_len: int, split: str = "test") -> Batch:
        """The fixed evaluation set of a cell: `num_test` examples of the test stream, or `num_val` of the
        validation stream (split="val", its own generator: what model selection may look at)."""
        c = self.cfg
        n = c.num_val if split == "val" else c.num_test
        return mqar_examples(n, num_pairs, seq_len, c.vocab_size, _generator(self.seed, split, num_pairs, seq_len), c.power_a)


# --------------------------------------------------------------------------- text
def read_text_bytes(cfg: TextConfig) -> bytes:
    """The bytes of `cfg.path` (a file, or the files matching `cfg.glob` in a folder, sorted), at most `max_bytes`."""
    root = Path(cfg.path).expanduser() if cfg.path is not None else Path(default_text_path())
    if not root.exists():
        raise ConfigError(f"data.text.path: {root} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.glob(cfg.glob) if p.is_file())
    chunks, total = [], 0
    for p in files:
        if total >= cfg.max_bytes:
            break
        try:
            b = p.read_bytes()
        except OSError:
            continue
        chunks.append(b[: cfg.max_bytes - total])
        total += len(chunks[-1])
    smallest = min(cfg.test_fraction, 1 - cfg.test_fraction - cfg.val_fraction)
    if total < 2 * (cfg.seq_len + 1) / smallest or total * cfg.val_fraction < cfg.seq_len + 2:
        raise ConfigError(f"data.text.path: {root} holds {total} bytes under glob {cfg.glob!r}, too few for "
                          f"seq_len={cfg.seq_len} with test_fraction={cfg.test_fraction}, val_fraction={cfg.val_fraction}")
    return b"".join(chunks)


class TextData:
    """Byte-level language modelling: random windows of the train split, fixed windows of the validation and
    test splits (the bytes run train | val | test)."""

    kind = "text"

    def max_labels(self) -> int:
        """Every position of a window is labelled."""
        return self.cfg.seq_len

    def __init__(self, cfg: TextConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        data = torch.frombuffer(bytearray(read_text_bytes(cfg)), dtype=torch.uint8)
        cut = int(len(data) * (1 - cfg.test_fraction))
        val_cut = int(len(data) * (1 - cfg.test_fraction - cfg.val_fraction))
        self.train, self.val, self.test = data[:val_cut], data[val_cut:cut], data[cut:]

    def _windows(self, data: Tensor, starts: Tensor, T: int) -> Batch:
        idx = starts[:, None] + torch.arange(T + 1)                                                 # [B, T + 1]
        seq = data[idx].long()
        return Batch(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())

    def train_batch(self, step: int, batch_size: int, micro: int = 0) -> Batch:
        T = self.cfg.seq_len
        starts = torch.randint(len(self.train) - T - 1, (batch_size,), generator=_generator(self.seed, "train", step, micro))
        return self._windows(self.train, starts, T)

    def test_batches(self, batch_size: int, num_batches: int, split: str = "test"):
        """Evenly spaced, non-random windows of the test (or validation) split, the same for every model."""
        T = self.cfg.seq_len
        data = self.val if split == "val" else self.test
        total = min(batch_size * num_batches, (len(data) - 1) // T)
        starts = torch.arange(total) * ((len(data) - T - 1) // max(total, 1))
        for i in range(0, total, batch_size):
            yield self._windows(data, starts[i:i + batch_size], T)


def build_data(cfg: Config) -> MQARData | TextData:
    """The data source the config names."""
    if cfg.data.kind == "mqar":
        return MQARData(cfg.data.mqar, cfg.data.seed)
    return TextData(cfg.data.text, cfg.data.seed)
