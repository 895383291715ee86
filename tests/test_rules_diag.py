"""The diagonal-decay family under strong decays: what the generic chunk-vs-recurrent tests do not cover.

The torch chunked form folds the decay into q and k relative to sub-chunk starts (`_intra_vector`
for a per-key decay); these tests drive it with per-token log-decays down to -20 (alpha ~ 2e-9), where
a folded factor that did not stay <= exp(0) would overflow: chunk == recurrent for outputs, final
state and every gradient, at ragged T, odd chunk sizes, with initial states and packed sequences.
Everything runs in float64 on CPU; tolerances are given in each test.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lsm.rules as R
from lsm.rules._diag import DiagonalDecayRule

GATED = [n for n in R.names() if isinstance(R.get(n), DiagonalDecayRule) and "g" in R.get(n).gates]
F64 = {"dtype": torch.float64}
ATOL, RTOL = 1e-9, 1e-7


def inputs(rule, B, T, H, K, V, seed, g_min):
    """q, k, v ~ N(0, 1); log-decay g = g_min * U(0, 1)^2 (a spread from ~0 down to g_min per token)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen, **F64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, **F64)
    shape = (B, T, H, K) if rule.gates["g"].per == "key" else (B, T, H)
    g = g_min * torch.rand(*shape, generator=gen, **F64) ** 2
    return [t.requires_grad_() for t in (q, k, v, g)]


def check(rule, q, k, v, g, h0, chunk_size, cu_seqlens=None, seed=0):
    o_c, S_c = rule.chunk(q, k, v, h0, True, chunk_size=chunk_size, backend="torch", g=g, cu_seqlens=cu_seqlens)
    o_r, S_r = rule.recurrent(q, k, v, h0, True, g=g, cu_seqlens=cu_seqlens)
    assert torch.isfinite(o_c).all() and torch.isfinite(S_c).all()
    torch.testing.assert_close(o_c, o_r, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(S_c, S_r, atol=ATOL, rtol=RTOL)
    gen = torch.Generator().manual_seed(seed)
    wo, wS = torch.randn(o_r.shape, generator=gen, **F64), torch.randn(S_r.shape, generator=gen, **F64)
    leaves = [t for t in (q, k, v, g, h0) if t is not None]
    g_c = torch.autograd.grad((o_c * wo).sum() + (S_c * wS).sum(), leaves)
    g_r = torch.autograd.grad((o_r * wo).sum() + (S_r * wS).sum(), leaves)
    for name, a, b in zip(["q", "k", "v", "g", "h0"], g_c, g_r):
        assert torch.isfinite(a).all(), f"grad of {name} not finite"
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("name", GATED)
@given(T=st.integers(1, 150), chunk_size=st.sampled_from([16, 24, 64]), g_min=st.sampled_from([-0.1, -3.0, -20.0]),
       with_h0=st.booleans(), seed=st.integers(0, 2**16))
def test_strong_decays_chunk_equals_recurrent(name, T, chunk_size, g_min, with_h0, seed):
    """float64, atol 1e-9 / rtol 1e-7; log-decays down to g_min per token, chunk 24 is not a power of 2."""
    rule = R.get(name)
    B, H, K, V = 2, 2, 8, 4
    q, k, v, g = inputs(rule, B, T, H, K, V, seed, g_min)
    h0 = torch.randn(B, H, K, V, **F64).requires_grad_() if with_h0 else None
    check(rule, q, k, v, g, h0, chunk_size, seed=seed)


@pytest.mark.parametrize("name", GATED)
@given(lens=st.lists(st.integers(0, 70), min_size=1, max_size=4).filter(sum), chunk_size=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**16))
def test_strong_decays_varlen(name, lens, chunk_size, seed):
    """Packed sequences with initial states, log-decays down to -20 per token; float64, atol 1e-9."""
    rule = R.get(name)
    H, K, V = 2, 8, 4
    q, k, v, g = inputs(rule, 1, sum(lens), H, K, V, seed, -20.0)
    cu = torch.tensor([0] + lens).cumsum(0)
    h0 = torch.randn(len(lens), H, K, V, **F64).requires_grad_()
    check(rule, q, k, v, g, h0, chunk_size, cu_seqlens=cu, seed=seed)


def test_per_key_decay_never_builds_the_pairwise_tensor():
    """At C = 64, K = 64 the old exact form held a [C, C, K] tensor per chunk; the sub-chunked form's
    largest intermediate is the size of q (checked through the peak of saved tensors: below 8x q)."""
    rule = R.get("gla")
    B, T, H, K = 1, 256, 1, 64
    q, k, v, g = inputs(rule, B, T, H, K, K, 0, -1.0)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rule.chunk(q, k, v, None, True, chunk_size=64, backend="torch", g=g)
    assert max(sizes) <= 8 * q.numel(), max(sizes)
