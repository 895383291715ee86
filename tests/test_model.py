"""The language model: shapes, decoding with caches == re-running the prefix, packed batches, hybrids."""
import pytest
import torch

from lsm.accounting import account_config
from lsm.config import load_config
from lsm.model import build_model

BASE = ["model.hidden_size=16", "model.num_layers=2", "model.mixer.num_heads=2", "data.mqar.vocab_size=32",
        "data.mqar.seq_len=16", "data.mqar.train_pairs=[2]", "data.mqar.test_pairs=[2]", "model.mixer.backend=torch",
        "model.mixer.chunk_size=4"]
VARIANTS = {
    "rule": ["model.mixer.rule=gated_deltanet"],
    "mom": ["model.mixer.rule=gated_deltanet", "model.mixer.type=mom", "model.mixer.num_memories=3"],
    "mom_per_memory": ["model.mixer.rule=gla", "model.mixer.type=mom", "model.mixer.num_memories=3",
                       "model.mixer.readout=per_memory"],
    "hybrid": ["model.mixer.rule=mamba2", "model.attention_every=2"],
    "attention": ["model.mixer.type=attention"],
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(None, BASE + VARIANTS[name])).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoding_with_cache_equals_full_prefix(name):
    model = _model(name)
    ids = torch.randint(0, 32, (2, 11))
    with torch.no_grad():
        full = model(ids).logits                                       # [B, T, V]
        out = model(ids[:, :5], use_cache=True)                        # prefill 5 tokens, then step one at a time
        steps = [out.logits]
        for t in range(5, 11):
            out = model(ids[:, t:t + 1], caches=out.caches, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["rule", "hybrid", "mom_per_memory"])
def test_greedy_generate_equals_rerunning(name):
    model = _model(name)
    prompt = torch.randint(0, 32, (2, 4))
    out = model.generate(prompt, 6, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_linear_cache_is_constant_size():
    model = _model("mom")
    out = model(torch.randint(0, 32, (1, 3)), use_cache=True)
    size = lambda caches: sum(t.numel() for c in caches for t in c.state)
    first = size(out.caches)
    for _ in range(5):
        out = model(torch.randint(0, 32, (1, 1)), caches=out.caches, use_cache=True)
    assert size(out.caches) == first


@pytest.mark.parametrize("name", ["rule", "attention", "hybrid"])
def test_packed_sequences_equal_separate(name):
    model = _model(name)
    a, b = torch.randint(0, 32, (1, 7)), torch.randint(0, 32, (1, 5))
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 7, 12])).logits
        torch.testing.assert_close(packed, torch.cat([model(a).logits, model(b).logits], 1), atol=1e-4, rtol=1e-4)


def test_hybrid_layout_aux_loss_and_tied_head():
    model = _model("hybrid")
    assert [type(b.mixer).__name__ for b in model.blocks] == ["RuleLayer", "Attention"]
    assert model.head.weight is model.embed.weight
    mom = _model("mom").train()
    out = mom(torch.randint(0, 32, (2, 8)))
    assert out.logits.shape == (2, 8, 32) and out.aux_loss.ndim == 0 and out.aux_loss > 0
    out.aux_loss.backward()
    router_grads = [p.grad for n, p in mom.named_parameters() if "router" in n]
    assert router_grads and all(g is not None for g in router_grads)


def test_memory_floats():
    cfg = load_config(None, BASE + VARIANTS["mom"])
    assert account_config(cfg).memory_floats == 2 * (3 + 1) * 2 * 8 * 8   # layers x memories x heads x K x V


def test_mixer_only_blocks():
    model = build_model(load_config(None, BASE + VARIANTS["rule"] + ["model.mlp_ratio=0"]))
    assert all(b.mlp is None for b in model.blocks)
    assert model(torch.randint(0, 32, (1, 5))).logits.shape == (1, 5, 32)
