"""Routing diagnostics (lsm.mixture.diagnostics): the vectorised counts against plain loops on random routings,
a hand-made case, and their path through evaluation (lsm.evaluate), training metrics and a sweep's runs.csv."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsm.config import load_config
from lsm.data import mqar_examples, mqar_write_positions
from lsm.evaluate import evaluate, format_result, summary
from lsm.mixture.diagnostics import RoutingTally, dead_memories, memory_counts, router_entropy, write_counts, write_read_shared
from lsm.mixture.routing import Routing
from lsm.model import build_model


def _routing(B, T, M, K, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(B, T, M, generator=g, dtype=torch.float64) * 3, -1)
    top, index = probs.topk(K, -1)
    return Routing(probs, index, top / top.sum(-1, keepdim=True))


@settings(max_examples=20)
@given(B=st.integers(1, 3), pairs=st.integers(1, 5), M=st.integers(2, 5), K=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_counts_and_sharing_equal_plain_loops(B, pairs, M, K, seed):
    T = 4 * pairs + 3
    r = _routing(B, T, M, min(K, M), seed)
    batch = mqar_examples(B, pairs, T, 64, torch.Generator().manual_seed(seed))
    write = mqar_write_positions(batch, pairs)
    counts, writes = [0.0] * M, [0.0] * M
    hits = queries = 0
    for b in range(B):
        for t in range(T):
            for m in r.index[b, t].tolist():
                counts[m] += 1
            if write[b, t] >= 0:
                queries += 1
                hits += bool(set(r.index[b, t].tolist()) & set(r.index[b, int(write[b, t])].tolist()))
                for m in r.index[b, int(write[b, t])].tolist():
                    writes[m] += 1
    assert memory_counts(r.index, M).tolist() == counts
    assert write_counts(r.index, write, M).tolist() == writes and sum(writes) == B * pairs * r.index.shape[-1]
    got_hits, got_queries = write_read_shared(r.index, write)
    assert (int(got_hits), int(got_queries)) == (hits, queries) and queries == B * pairs
    ent = [-sum(p * math.log(p) for p in r.probs[b, t].tolist()) for b in range(B) for t in range(T)]
    torch.testing.assert_close(router_entropy(r.probs).flatten(), torch.tensor(ent, dtype=torch.float64))


def test_hand_made_tally():
    """Two tokens to memory 0, one to memory 1, none to 2 and 3 (dead: load < 1/40); the query at t=2 reads
    memory 0 and its write at t=1 went to memory 1: no sharing; uniform probabilities: entropy log 4."""
    probs = torch.full((1, 3, 4), 0.25)
    r = Routing(probs, torch.tensor([[[0], [1], [0]]]), torch.ones(1, 3, 1))
    tally = RoutingTally()
    tally.add(r, torch.tensor([[-1, -1, 1]]))
    out = tally.summary()
    assert [out[f"load{m}"] for m in range(4)] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0], abs=1e-7)
    assert out["dead"] == 2 and out["share"] == 0.0 and math.isclose(out["entropy"], math.log(4), rel_tol=1e-6)
    assert [out[f"write{m}"] for m in range(4)] == [0.0, 1.0, 0.0, 0.0]   # the one pair was written to memory 1
    assert int(dead_memories(torch.tensor([0.5, 0.5]))) == 0


TINY = ["model.hidden_size=16", "model.num_layers=2", "model.mixer.num_heads=2", "model.mixer.backend=torch",
        "model.mixer.num_memories=3", "model.mixer.topk=1", "data.mqar.vocab_size=32", "data.mqar.seq_len=16",
        "data.mqar.train_pairs=[2]", "data.mqar.test_pairs=[2,4]", "data.mqar.num_test=8", "data.mqar.num_val=8",
        "train.batch_size=4", "train.warmup_steps=0", "train.steps=2", "train.eval_every=2", "train.log_every=1",
        "train.tensorboard=false", "train.progress=false", "eval.batch_size=4"]


def test_evaluation_reports_routing_per_mom_layer(tmp_path):
    cfg = load_config(None, [*TINY, "model.mixer.type=mom"])
    result = evaluate(build_model(cfg), cfg)
    assert set(result["routing"]) == {"L0", "L1"}
    for d in result["routing"].values():
        assert math.isclose(sum(d[f"load{m}"] for m in range(3)), 1.0, rel_tol=1e-6)
        assert 0 <= d["share"] <= 1 and 0 <= d["entropy"] <= math.log(3) + 1e-6 and 0 <= d["dead"] <= 3
        assert math.isclose(sum(d[f"write{m}"] for m in range(3)), 1.0, rel_tol=1e-6)
    flat = summary(result)
    assert flat["route/L1/share"] == result["routing"]["L1"]["share"]
    assert "write/read share a memory" in format_result(result) and "pair writes per memory" in format_result(result)
    single = load_config(None, TINY)
    assert "routing" not in evaluate(build_model(single), single)


def test_training_logs_routing_at_evaluation_steps(tmp_path):
    from lsm.train import train

    cfg = load_config(None, [*TINY, "model.mixer.type=mom", f"train.out_dir={tmp_path / 'run'}"])
    train(cfg, quiet=True)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/accuracy" in r]
    assert val and all("val/route/L0/entropy" in r and "val/route/L1/share" in r for r in val)
    assert not any(k.startswith(("route/", "val/route")) for r in records if "loss" in r for k in r)
