"""The single-memory layer, for every rule: decoding equals the full forward, packing equals separate runs,
causality, and clear errors. float64 on CPU, atol 1e-10."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lsm.rules as R
from lsm.layers import RuleCache, RuleLayer
from lsm.modules import ShortConv, conv_tail

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


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(0, 6), heads=st.integers(1, 3), head=st.sampled_from([2, 4]),
       W=st.integers(2, 4), activation=st.booleans(), norm=st.booleans(), seed=st.integers(0, 2**16))
def test_short_conv_decode_step_equals_the_full_conv(B, T, heads, head, W, activation, norm, seed):
    """ShortConv's one-token step (taps summed from the cached tail, no conv1d) equals token T of one pass over
    T + 1 tokens, and its new tail is the last W - 1 inputs; float64 exact to 1e-12, bf16 inputs within 2e-2 of
    the float64 result (the step accumulates in float32)."""
    torch.manual_seed(seed)
    C = heads * head
    conv = ShortConv(C, W, activation=activation).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(B, T + 1, C, dtype=torch.float64)
    hn = head if norm else None
    full, _ = conv(x, head=hn)
    _, tail = conv(x[:, :T], head=hn)
    y, new_tail = conv(x[:, T:], tail, head=hn)
    torch.testing.assert_close(y, full[:, T:], atol=1e-12, rtol=0)
    torch.testing.assert_close(new_tail, conv_tail(x, W), atol=0, rtol=0)
    yb, _ = conv.to(torch.bfloat16)(x[:, T:].bfloat16(), tail.bfloat16(), head=hn)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), full[:, T:], atol=2e-2, rtol=2e-2)
