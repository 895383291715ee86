"""CUDA-graph decoding (lsm/decoding.py): the replayed step equals eager decoding.

On CPU the same static-buffer step runs eagerly (`graph=False`): the cache object the caller holds
is rebound to its own buffers after every step, and the outputs equal plain decoding with a twin
cache (float64, exact up to 1e-12). The captured graph itself runs in the GPU-marked tests.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lsm.config import MixerConfig, ModelConfig
from lsm.decoding import GraphedStep, _rebind, cache_tensors
from lsm.layers import RuleCache, RuleLayer
from lsm.mixture import MixtureOfMemories, MoMCache
from lsm.model import LanguageModel

D, H = 16, 2
TOL = dict(atol=1e-12, rtol=1e-12)


def layers(device="cpu", dtype=torch.float64, backend="torch"):
    torch.manual_seed(0)
    return {
        "gdn": RuleLayer("gated_deltanet", D, H, backend=backend).to(device, dtype),
        "mom": MixtureOfMemories("gated_deltanet", D, H, num_memories=3, topk=2, backend=backend).to(device, dtype),
        "mom-gla": MixtureOfMemories("gla", D, H, num_memories=4, topk=1, backend=backend).to(device, dtype),
        "mom-pm": MixtureOfMemories("gated_deltanet", D, H, num_memories=3, topk=2, readout="per_memory",
                                    backend=backend).to(device, dtype),
        # ttt's decode state (S0, S, n) holds one tensor twice after a prefill: the static buffers must not alias
        "ttt": RuleLayer("ttt", D, H, backend=backend, rule_options={"mini_batch_size": 3}).to(device, dtype),
    }


def run_pair(layer, graph, device="cpu", dtype=torch.float64, steps=5):
    x = torch.randn(3, 6 + steps, D, device=device, dtype=dtype)
    with torch.no_grad():
        cache = layer(x[:, :6], use_cache=True).cache
        twin = copy.deepcopy(cache)
        step = GraphedStep(lambda xt, c: (layer(xt, cache=c).output, c), x[:, 6:7], cache, graph=graph)
        ys, refs = [], []
        for t in range(6, 6 + steps):
            ys.append(step(x[:, t:t + 1]).clone())
            refs.append(layer(x[:, t:t + 1], cache=twin).output)
    return cache, twin, torch.cat(ys, 1), torch.cat(refs, 1)


@pytest.mark.parametrize("name", ["gdn", "mom", "mom-gla", "mom-pm", "ttt"])
def test_static_step_equals_eager_decoding(name):
    layer = layers()[name]
    cache, twin, y, ref = run_pair(layer, graph=False)
    torch.testing.assert_close(y, ref, **TOL)
    for a, b in zip(cache_tensors(cache), cache_tensors(twin)):
        torch.testing.assert_close(a, b, **TOL)
    assert cache.seen == twin.seen == 11


def test_cache_tree_round_trip():
    """`_rebind` puts tensors back in `cache_tensors` order: dataclasses/lists/dicts in place, tuples rebuilt."""
    a, b, c, d = (torch.full((2,), float(i)) for i in range(4))
    tree = [RuleCache(state=(a, b), conv={"v": c, "k": d}, seen=3), MoMCache(state=(b,), seen=1)]
    leaves = cache_tensors(tree)
    assert [float(t[0]) for t in leaves] == [0, 1, 3, 2, 1]          # conv keys sorted: k before v
    fresh = [t + 10 for t in leaves]
    out = _rebind(tree, fresh)
    assert out is tree and all(x is y for x, y in zip(cache_tensors(tree), fresh))
    assert tree[0].seen == 3


def test_errors_name_the_problem():
    layer = layers()["gdn"]
    x = torch.randn(1, 4, D, dtype=torch.float64)
    with torch.no_grad():
        cache = layer(x, use_cache=True).cache
    with pytest.raises(ValueError, match="CUDA graphs need"):
        GraphedStep(lambda xt, c: (layer(xt, cache=c).output, c), x[:, :1], cache, graph=True)
    with pytest.raises(ValueError, match="prefill"):
        GraphedStep(lambda xt, c: (xt, c), x[:, :1], RuleCache(), graph=False)
    step = GraphedStep(lambda xt, c: (layer(xt, cache=c).output, c), x[:, :1], cache, graph=False)
    with pytest.raises(ValueError, match="captured for inputs"):
        step(x[:, :2])
    # an attention KV cache grows every token: refused with the reason
    cfg = ModelConfig(vocab_size=11, hidden_size=D, num_layers=2, attention_layers=[1],
                      mixer=MixerConfig(rule="gated_deltanet", num_heads=H, backend="torch"))
    lm = LanguageModel(cfg).double()
    ids = torch.randint(0, 11, (1, 4))
    with torch.no_grad():
        caches = lm(ids, use_cache=True).caches
    step = GraphedStep(lambda i, c: (lm(i, caches=c, use_cache=True).logits, c), ids[:, :1], caches, graph=False)
    with pytest.raises(ValueError, match="fixed-size caches"):
        step(ids[:, :1])


# ----------------------------------------------------------------------------------------- GPU
def test_generate_graphs_by_default_where_it_applies(monkeypatch):
    """generate(cuda_graph=None) replays the step on CUDA for models without attention blocks (whose caches keep their
    shapes), decodes eagerly elsewhere and where the capture fails (here: CPU tensors posing as a GPU's), while an
    explicit cuda_graph=True raises; `lsm generate` keeps --cuda-graph and adds --no-cuda-graph."""
    from lsm.cli import build_parser

    rule = LanguageModel(ModelConfig(vocab_size=16, hidden_size=16, num_layers=2, mixer=MixerConfig(num_heads=2)))
    hybrid = LanguageModel(ModelConfig(vocab_size=16, hidden_size=16, num_layers=2, attention_every=2,
                                       mixer=MixerConfig(num_heads=2)))
    assert rule.decodes_in_a_graph(torch.device("cuda")) and not rule.decodes_in_a_graph(torch.device("cpu"))
    assert not hybrid.decodes_in_a_graph(torch.device("cuda"))
    ids = torch.randint(0, 16, (1, 5))
    assert torch.equal(rule.generate(ids, 4, temperature=0), rule.generate(ids, 4, temperature=0, cuda_graph=False))
    monkeypatch.setattr(LanguageModel, "decodes_in_a_graph", lambda self, device: True)   # as on a GPU
    assert torch.equal(rule.generate(ids, 4, temperature=0), rule.generate(ids, 4, temperature=0, cuda_graph=False))
    with pytest.raises(ValueError, match="CUDA graphs need"):   # asked for explicitly, a step that cannot be captured
        rule.generate(ids, 4, temperature=0, cuda_graph=True)
    parse = lambda *a: build_parser().parse_args(["generate", "runs/x", *a]).cuda_graph
    assert (parse(), parse("--cuda-graph"), parse("--no-cuda-graph")) == (None, True, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["gdn", "mom", "mom-gla", "mom-pm"])
def test_cuda_graph_equals_eager_on_gpu(name, backend):
    """The captured and replayed step equals eager decoding (float32, atol 1e-5)."""
    layer = layers("cuda", torch.float32, backend)[name]
    cache, twin, y, ref = run_pair(layer, graph=True, device="cuda", dtype=torch.float32)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(cache_tensors(cache), cache_tensors(twin)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert cache.seen == twin.seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_with_cuda_graph_on_gpu():
    cfg = ModelConfig(vocab_size=32, hidden_size=64, num_layers=2,
                      mixer=MixerConfig(type="mom", rule="gated_deltanet", num_heads=2, num_memories=4, topk=2))
    lm = LanguageModel(cfg).cuda()
    ids = torch.randint(0, 32, (2, 7), device="cuda")
    a = lm.generate(ids, 12, temperature=0)
    b = lm.generate(ids, 12, temperature=0, cuda_graph=True)
    assert torch.equal(a, b)
