"""Dtypes under autocast, one rule for every layer (`lsm.modules.rule_inputs`): q, k, v reach the rule in the
autocast dtype, gates and states in float32.

CUDA autocast runs the L2 norms of q and k in float32 while v stays bf16 (the GPU failure this guards
against: "q, k, v must share one dtype"); CPU autocast does not. The fixture reproduces the GPU case on CPU
by making `F.normalize` return float32, then runs every rule, single and MoM layer, under CPU bf16
autocast: a training forward + backward, and a prefill with a cache followed by a decoding step. A spy on
the rule records what reaches it.

Tolerances (bf16, 8 bits of mantissa, through projections, conv, rule and readout): the relative error
(Frobenius norm) of outputs to the float32 run <= 5e-2, of the parameters' gradients <= 1.5e-1 overall.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import lsm.mixture.mom as mom
import lsm.rules as R
from lsm.layers import RuleLayer
from lsm.mixture import MixtureOfMemories

RULES = R.names()
D, H, KD, T = 32, 2, 16, 12
OUT_TOL, GRAD_TOL = 5e-2, 1.5e-1


@pytest.fixture
def float32_norms(monkeypatch):
    """F.normalize in float32, as CUDA autocast runs it."""
    orig = F.normalize
    monkeypatch.setattr(torch.nn.functional, "normalize", lambda x, *a, **kw: orig(x.float(), *a, **kw))


def spy(monkeypatch, rule) -> list[dict]:
    """Record the dtypes of q, k, v, the gates and the state of every call of rule.chunk / step / routed_step."""
    calls = []

    def recording(orig, method):
        def wrapped(q, k, v, *args, **kw):
            state = kw.get("initial_state", args[0] if args else None)
            states = state if isinstance(state, tuple) else (state,) if isinstance(state, Tensor) else ()
            calls.append(dict(method=method, qkv={q.dtype, k.dtype, v.dtype},
                              gates={n: g.dtype for n, g in kw.items() if n in rule.gates and isinstance(g, Tensor)},
                              states={s.dtype for s in states}))
            return orig(q, k, v, *args, **kw)
        return wrapped

    for method in ("chunk", "step"):
        monkeypatch.setattr(rule, method, recording(getattr(rule, method), method))
    orig_routed = mom.routed_step          # a function of lsm.mixture (rule first), called by the MoM layer
    routed = recording(lambda *a, **kw: orig_routed(rule, *a, **kw), "routed_step")
    monkeypatch.setattr(mom, "routed_step", lambda _rule, *a, **kw: routed(*a, **kw))
    return calls


def make(kind: str, name: str):
    torch.manual_seed(0)
    kw = dict(head_dim=KD, chunk_size=8, backend="torch", rule_options={"mini_batch_size": 4} if name == "ttt" else None)
    return (RuleLayer(name, D, H, **kw) if kind == "rule"
            else MixtureOfMemories(name, D, H, num_memories=3, topk=2, **kw))


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_calls(calls: list[dict], what: str):
    assert calls, f"{what}: the rule was never called"
    for c in calls:
        assert c["qkv"] == {torch.bfloat16}, f"{what}: {c['method']} got q, k, v in {c['qkv']}"
        assert set(c["gates"].values()) <= {torch.float32}, f"{what}: {c['method']} got gates {c['gates']}"
        assert c["states"] <= {torch.float32}, f"{what}: {c['method']} got states in {c['states']}"


@pytest.mark.parametrize("kind", ["rule", "mom"])
@pytest.mark.parametrize("name", RULES)
def test_training_step_under_autocast(kind, name, float32_norms, monkeypatch):
    """Forward + backward under bf16 autocast with float32 norms: the rule sees bf16 q, k, v and float32
    gates; outputs and gradients are finite and close to the float32 run."""
    layer = make(kind, name)
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(1))
    y32 = layer(x).output
    g32 = torch.autograd.grad(y32.square().sum(), list(layer.parameters()), allow_unused=True)
    calls = spy(monkeypatch, layer.rule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x).output
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all(), f"{kind} {name}: output {y.dtype}"
    g = torch.autograd.grad(y.float().square().sum(), list(layer.parameters()), allow_unused=True)
    check_calls(calls, f"{kind} {name}")
    assert rel(y, y32) <= OUT_TOL, f"{kind} {name}: output relative error {rel(y, y32):.3g}"
    pairs = [(a, b) for a, b in zip(g, g32) if a is not None and b is not None]
    assert pairs and all(torch.isfinite(a).all() for a, _ in pairs), f"{kind} {name}: non-finite gradients"
    flat = lambda gs: torch.cat([t.float().flatten() for t in gs])
    err = rel(flat([a for a, _ in pairs]), flat([b for _, b in pairs]))
    assert err <= GRAD_TOL, f"{kind} {name}: gradient relative error {err:.3g}"


@pytest.mark.parametrize("kind", ["rule", "mom"])
@pytest.mark.parametrize("name", RULES)
def test_prefill_and_step_under_autocast(kind, name, float32_norms, monkeypatch):
    """A prefill with a cache and a decoding step under bf16 autocast: the caches stay float32, the rule sees
    bf16 q, k, v, float32 gates and states, and the outputs are close to the float32 run."""
    layer = make(kind, name)
    x = torch.randn(2, T + 1, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        c32 = layer(x[:, :T], use_cache=True).cache
        y32 = layer(x[:, T:], cache=c32).output
        calls = spy(monkeypatch, layer.rule)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache = layer(x[:, :T], use_cache=True).cache
            y = layer(x[:, T:], cache=cache).output
    check_calls(calls, f"{kind} {name}")
    assert {c["method"] for c in calls} >= {"chunk", "step"}, f"{kind} {name}: {[c['method'] for c in calls]}"
    assert all(s.dtype == torch.float32 for s in cache.state), f"{kind} {name}: cache {[s.dtype for s in cache.state]}"
    assert torch.isfinite(y).all() and rel(y, y32) <= OUT_TOL, f"{kind} {name}: step relative error {rel(y, y32):.3g}"
