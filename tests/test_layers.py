"""The single-memory layer, for every rule: decoding equals the full forward, packing equals separate runs,
causality, and clear errors. float64 on CPU, atol 1e-10."""
from __future__ import annotations

import pytest
import torch

import lsm.rules as R
from lsm.layers import RuleCache, RuleLayer

RULES = R.names()
ATOL = 1e-10


def layer(name, **kw):
    torch.manual_seed(0)
    opts = {"mini_batch_size": 1} if name == "ttt" else None  # ttt: decode from a prefix mid-mini-batch needs b=1
    return RuleLayer(name, 24, 2, chunk_size=16, rule_options=opts, **kw).double()


@pytest.mark.parametrize("name", RULES)
def test_decoding_and_prefill_continuation_equal_full_forward(name):
    L = layer(name)
    x = torch.randn(2, 21, 24, dtype=torch.float64)
    full = L(x).output
    out = L(x[:, :13], use_cache=True)
    outs, cache = [out.output], out.cache
    for t in range(13, 21):
        r = L(x[:, t:t + 1], cache=cache)
        outs.append(r.output)
        cache = r.cache
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)
    assert cache.seen == 21
    # a prefix then a multi-token continuation
    a = L(x[:, :7], use_cache=True)
    b = L(x[:, 7:], cache=a.cache)
    torch.testing.assert_close(torch.cat([a.output, b.output], 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", RULES)
def test_packed_batch_equals_separate_runs(name):
    L = layer(name)
    x = torch.randn(1, 30, 24, dtype=torch.float64)
    cu = torch.tensor([0, 4, 4, 19, 30])
    packed = L(x, cu_seqlens=cu).output
    sep = torch.cat([L(x[:, a:b]).output for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    torch.testing.assert_close(packed, sep, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", RULES)
def test_causal(name):
    L = layer(name)
    x = torch.randn(1, 20, 24, dtype=torch.float64)
    y = x.clone()
    y[:, 12:] = torch.randn_like(y[:, 12:])
    torch.testing.assert_close(L(x).output[:, :12], L(y).output[:, :12], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gated_deltanet", "gla", "hgrn2"])
def test_gradients_reach_every_parameter(name):
    L = layer(name)
    L(torch.randn(2, 9, 24, dtype=torch.float64)).output.square().sum().backward()
    missing = [n for n, p in L.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_bad_input():
    with pytest.raises(ValueError, match="hidden_size.*divisible.*num_heads"):
        RuleLayer("mamba2", 30, 4)
    with pytest.raises(ValueError, match="unknown update rule 'mamba3'"):
        RuleLayer("mamba3", 32, 4)
    L = layer("mamba2")
    with pytest.raises(ValueError, match=r"\[B, T, 24\]"):
        L(torch.randn(2, 5, 23, dtype=torch.float64))
    with pytest.raises(TypeError, match="RuleCache"):
        L(torch.randn(2, 5, 24, dtype=torch.float64), cache={"state": None})
    c = L(torch.randn(2, 5, 24, dtype=torch.float64), use_cache=True).cache
    with pytest.raises(ValueError, match="another batch size"):
        L(torch.randn(3, 1, 24, dtype=torch.float64), cache=c)
    assert isinstance(c, RuleCache)

