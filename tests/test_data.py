"""MQAR invariants (Zoology layout) and the byte-level text source."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lsm.config import ConfigError, MQARConfig, TextConfig, from_dict
from lsm.data import IGNORE, MQARData, TextData, mqar_examples, mqar_write_positions


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mqar_layout_and_answers():
    V, n, T = 64, 6, 40
    b = mqar_examples(32, n, T, V, _gen())
    assert b.input_ids.shape == b.labels.shape == (32, T)
    for ids, labels in zip(b.input_ids.tolist(), b.labels.tolist()):
        keys, values = ids[0:2 * n:2], ids[1:2 * n:2]
        assert len(set(keys)) == n and all(1 <= k < V // 2 for k in keys)          # distinct keys in [1, V/2)
        assert all(V // 2 <= v < V for v in values)                                # values in [V/2, V)
        answer = dict(zip(keys, values))
        targets = [(t, y) for t, y in enumerate(labels) if y != IGNORE]
        assert len(targets) == n                                                   # one target per query
        assert all(t >= 2 * n for t, _ in targets)                                 # no loss on the key-value section
        assert sorted(ids[t] for t, _ in targets) == sorted(keys)                  # every key is queried once
        for t, y in targets:
            assert answer[ids[t]] == y                                             # the label is the key's value
            if t + 1 < T:
                assert ids[t + 1] == y                                             # ...and comes next in the input
        queried = {t for t, _ in targets} | {t + 1 for t, _ in targets}
        assert all(ids[t] == 0 for t in range(2 * n, T) if t not in queried)       # filler elsewhere


def test_mqar_is_seeded_and_splits_differ():
    cfg = MQARConfig(vocab_size=64, seq_len=32, train_pairs=[2, 4, 8], test_pairs=[4, 8], num_test=16)
    a, b = MQARData(cfg, seed=1), MQARData(cfg, seed=1)
    assert torch.equal(a.train_batch(5, 8).input_ids, b.train_batch(5, 8).input_ids)
    assert not torch.equal(a.train_batch(5, 8).input_ids, a.train_batch(6, 8).input_ids)
    assert not torch.equal(a.train_batch(5, 8).input_ids, MQARData(cfg, seed=2).train_batch(5, 8).input_ids)
    assert torch.equal(a.test_set(4, 32).input_ids, b.test_set(4, 32).input_ids)
    train = {tuple(r) for s in range(4) for r in a.train_batch(s, 16).input_ids.tolist()}
    assert not train & {tuple(r) for r in a.test_set(8, 32).input_ids.tolist()}
    counts = (a.train_batch(0, 64).labels != IGNORE).sum(1)
    assert set(counts.tolist()) <= {2, 4, 8} and len(set(counts.tolist())) > 1     # the batch mixes pair counts


def test_mqar_sweep_cells():
    cfg = MQARConfig(vocab_size=64, seq_len=32, train_pairs=[4], test_pairs=[4, 8, 16], test_seq_lens=[32, 64])
    assert MQARData(cfg).test_cells() == [(4, 32), (8, 32), (4, 64), (8, 64), (16, 64)]


def test_mqar_train_and_test_cells():
    """Explicit (seq_len, pairs) cells: a mixed batch right-padded to the longest cell, whose examples are exactly
    the unpadded examples of their cell; the old keys give the same batches as the equivalent cells."""
    cfg = MQARConfig(vocab_size=64, train_cells=[[16, 2], [32, 8]], test_cells=[[32, 4], [64, 16]])
    d = MQARData(cfg, seed=3)
    assert d.test_cells() == [(4, 32), (16, 64)] and d.train_cells() == [(16, 2), (32, 8)]
    b = d.train_batch(0, 64)
    assert b.input_ids.shape == (64, 32)
    counts = (b.labels != IGNORE).sum(1)
    assert set(counts.tolist()) == {2, 8}
    short = counts == 2
    assert (b.input_ids[short, 16:] == 0).all() and (b.labels[short, 16:] == IGNORE).all()
    old = MQARData(MQARConfig(vocab_size=64, seq_len=32, train_pairs=[2, 8]), seed=3).train_batch(1, 16)
    new = MQARData(MQARConfig(vocab_size=64, train_cells=[[32, 2], [32, 8]]), seed=3).train_batch(1, 16)
    assert torch.equal(old.input_ids, new.input_ids) and torch.equal(old.labels, new.labels)


def test_mqar_cells_are_validated():
    with pytest.raises(ConfigError, match=r"data.mqar.train_cells: cell \[16, 8\]"):
        from_dict({"data": {"mqar": {"train_cells": [[16, 8]]}}})
    with pytest.raises(ConfigError, match="data.mqar.test_cells: each cell is"):
        from_dict({"data": {"mqar": {"test_cells": [[64]]}}})
    cfg = from_dict({"data": {"mqar": {"train_cells": [[64, 4], [256, 16]]}}})
    from lsm.accounting import config_seq_len
    assert config_seq_len(cfg) == 256


def test_mqar_write_positions():
    """Each query's write position holds its pair's value, which is the query's label."""
    b = mqar_examples(8, 5, 40, 64, _gen())
    w = mqar_write_positions(b, 5)
    q = b.labels != IGNORE
    assert ((w >= 0) == q).all()
    assert torch.equal(b.input_ids.gather(1, w.clamp(min=0))[q], b.labels[q])
    assert torch.equal(b.input_ids.gather(1, (w - 1).clamp(min=0))[q], b.input_ids[q])   # the key before it


def test_text_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello world " * 200)
    (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 4)
    d = TextData(TextConfig(path=str(tmp_path), glob="*.txt", seq_len=16, test_fraction=0.25), seed=0)
    b = d.train_batch(0, 4)
    assert b.input_ids.shape == (4, 16) and torch.equal(b.input_ids[:, 1:], b.labels[:, :-1])
    assert len(d.test) > 0 and len(d.val) > 16 and len(d.train) + len(d.val) + len(d.test) == 2400 + 1024
    tb = list(d.test_batches(4, 2))
    assert tb and all(x.input_ids.shape[1] == 16 for x in tb)
    vb = list(d.test_batches(4, 2, "val"))
    assert vb and not torch.equal(vb[0].input_ids, tb[0].input_ids)


@given(rows=st.integers(1, 8), cols=st.integers(1, 60), data=st.data(), levels=st.sampled_from([3, 50, 0]))
def test_smallest_is_the_argsort_prefix(rows, cols, data, levels):
    """`_smallest` (topk, argsort only for rows with an exact tie) gives `argsort(1)[:, :n]` exactly: the MQAR
    streams stay what they were (uniform keys; with `levels` > 0 the entries tie often)."""
    from lsm.data import _smallest

    n = data.draw(st.integers(1, cols))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    r = torch.randint(0, levels, (rows, cols), generator=g).float() if levels else torch.rand(rows, cols, generator=g)
    assert torch.equal(_smallest(r, n), r.argsort(1)[:, :n])


@given(rows=st.integers(1, 6), T=st.integers(1, 40), k=st.integers(1, 45), data=st.data())
def test_labelled_positions(rows, T, k, data):
    """The first k labelled positions per row in order, then unlabelled ones labelled IGNORE; static shape."""
    from lsm.data import labelled_positions

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    labels = torch.where(torch.rand(rows, T, generator=g) < data.draw(st.floats(0, 1)),
                         torch.randint(0, 50, (rows, T), generator=g), torch.full((rows, T), IGNORE))
    pos, lab = labelled_positions(labels, k)
    assert pos.shape == lab.shape == (rows, min(k, T))
    for b in range(rows):
        want = (labels[b] != IGNORE).nonzero().flatten()[:k].tolist()
        assert pos[b, :len(want)].tolist() == want and torch.equal(lab[b], labels[b, pos[b]])
        assert (lab[b, len(want):] == IGNORE).all() and len(set(pos[b].tolist())) == pos.shape[1]
