"""lsm.accounting against hand counts, and its state count against what a real decode cache holds."""
import pytest
import torch

from lsm import rules
from lsm.accounting import account, account_config, rule_core_flops
from lsm.config import from_dict
from lsm.model import build_model


def tiny(mixer_type: str, rule: str = "linear_attention", **model) -> object:
    return from_dict({"data": {"mqar": {"vocab_size": 16, "seq_len": 64, "train_pairs": [4], "test_pairs": [4]}},
                      "model": {"hidden_size": 8, "num_layers": 1, "mlp_ratio": 0, **model,
                                "mixer": {"type": mixer_type, "rule": rule, "num_heads": 2, "num_memories": 2,
                                          "topk": 1}}})


def test_single_memory_by_hand():
    # D = 8, H = 2, K = V = 4, conv 4, output gate, tied head, vocab 16, one block, no MLP
    # params: embed 16*8 + 2 RMSNorms 8 + q, k, v, g, o projections 5*64 + 3 convs 8*(4+1) + o_norm 4 = 588
    # state: S 2*4*4 = 32, conv tails 3 * 8 * 3 = 72
    # flops: projections 2*5*64 = 640, head 2*128 = 256, core H * (2*64*(4+4) + 4*16) = 2176
    a = account_config(tiny("rule"))
    assert (a.params_total, a.params_active) == (588, 588)
    assert (a.memory_floats, a.state_floats, a.state_rw_floats, a.kv_floats_per_token) == (32, 104, 104, 0)
    assert a.flops_per_token == 640 + 256 + 2176
    assert a.state_bytes == 4 * 104 and a.train_flops_per_token == 3 * a.flops_per_token


def test_mom_by_hand():
    # M = 2, top-1, shared: Ms = 3 memories, 2 touched per token.
    # k, v projections 8 -> 3*8 (192 each) and their convs 24*5 (120 each) are per-memory: 624, active 2/3 of it;
    # router 8*2. total = 588 - (64 + 64 + 40 + 40) + 624 + 16 = 1020; active = 1020 - 624 + 416 = 812
    # state: 3 memories * 32 = 96, conv tails q 8*3 + k 24*3 + v 24*3 = 168; rw = 96 * 2/3 + 168 = 232
    # flops: 2 * (q 64 + k 128 + v 128 + g 64 + o 64 + router 16) + head 256 + 2 memories * 2176
    a = account_config(tiny("mom"))
    assert (a.params_total, a.params_active) == (1020, 812)
    assert (a.memory_floats, a.state_floats, a.state_rw_floats) == (96, 264, 232)
    assert a.flops_per_token == 2 * 464 + 256 + 2 * 2176


def test_attention_block_counts_kv_per_token():
    a = account_config(tiny("rule", num_layers=2, attention_every=2))
    single = account_config(tiny("rule"))
    assert a.kv_floats_per_token == 2 * 8 and a.state_floats == single.state_floats
    assert a.flops_per_token > single.flops_per_token


def _cache_floats(caches) -> int:
    """Every tensor element a model's decode caches hold (rule states, rule extras, conv tails)."""
    n = 0
    for c in caches:
        tensors = list(c.state) + list(c.conv.values())
        n += sum(t.numel() for t in tensors)
    return n


@pytest.mark.parametrize("mixer_type", ["rule", "mom"])
@pytest.mark.parametrize("rule", rules.names())
def test_state_equals_real_decode_cache(rule, mixer_type):
    """state_floats is what a decode cache of one sequence really holds, for every rule, single and MoM."""
    cfg = tiny(mixer_type, rule=rule, num_layers=2)
    cfg.model.mixer.backend = "torch"
    model = build_model(cfg)
    out = model(torch.randint(0, 16, (1, 5)), use_cache=True)
    acc = account(model, 64)
    assert acc.state_floats == _cache_floats(out.caches)
    assert acc.params_total == model.num_params() == account_config(cfg).params_total


def test_router_conv_tail_is_state():
    """MoM routing from a conv window caches the window's tail: state_floats counts it."""
    cfg = tiny("mom", rule="gated_deltanet", num_layers=2)
    cfg.model.mixer.backend = "torch"
    cfg.model.mixer.router_conv = 3
    model = build_model(cfg)
    out = model(torch.randint(0, 16, (1, 5)), use_cache=True)
    acc = account(model, 64)
    assert acc.state_floats == _cache_floats(out.caches) == account_config(cfg).state_floats
    assert all("router" in c.conv for c in out.caches)


def test_rule_core_flops_families():
    base = rule_core_flops("gla", 16, 16, 64)
    assert rule_core_flops("deltanet", 16, 16, 64) > base
    assert rule_core_flops("ttt", 16, 16, 16) == 2 * 16 * 32 + 6 * 256


def test_bad_seq_len():
    model = build_model(tiny("rule"))
    with pytest.raises(ValueError, match="seq_len"):
        account(model, 0)
