"""A cache split anywhere continues exactly: any sequence of call lengths (prefill, chunks, single steps)
through the cache equals one pass, for every rule, the single layer, the MoM layer and a 2-layer model.

ttt's decode state (S0, S, n) is mid-mini-batch after most splits: `chunk` takes that tuple as its initial
state and returns it as its final state (head / body / foot, lsm/rules/ttt.py). Its plain reference is
`recurrent` from the same tuple (the rule's `_step`, token by token).

Tolerances: float64 torch form atol 1e-9 / rtol 1e-7 (the same arithmetic, reassociated); float32 under the
Triton interpreter atol 2e-5 / rtol 1e-4 for outputs and states, 1e-4 / 1e-3 for gradients (float32
reductions in another order). A wrong mini-batch position shows up at 1e-3 and above.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lsm.rules as R
from lsm.config import MixerConfig, ModelConfig
from lsm.layers import RuleLayer
from lsm.mixture import MixtureOfMemories
from lsm.model import LanguageModel
from lsm.rules.base import UpdateRule

RULES = R.names()
TRITON_RULES = [n for n in RULES if type(R.get(n))._chunk_triton is not UpdateRule._chunk_triton]
TTT = R.get("ttt")
D, H, KD = 16, 2, 8
F64 = dict(atol=1e-9, rtol=1e-7)
F32 = dict(atol=2e-5, rtol=1e-4)
F32_GRAD = dict(atol=1e-4, rtol=1e-3)
# ttt's mini-batch of 3 puts mini-batch boundaries inside short calls and short MoM memory segments
OPTIONS = {"ttt": {"mini_batch_size": 3}}
calls = st.lists(st.integers(1, 6), min_size=2, max_size=4)


def layer_for(kind: str, name: str, backend: str, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    kw = dict(head_dim=KD, chunk_size=4, backend=backend, rule_options=OPTIONS.get(name))
    layer = (RuleLayer(name, D, H, **kw) if kind == "rule"
             else MixtureOfMemories(name, D, H, num_memories=3, topk=2, **kw))
    return layer.to(dtype)


def run_split(layer, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The layer over x in calls of `lengths` (a call of 1 token with a cache is a decoding step)."""
    cache, outs, a = None, [], 0
    for n in lengths:
        out = layer(x[:, a:a + n], cache=cache, use_cache=True)
        cache, a = out.cache, a + n
        outs.append(out.output)
    return torch.cat(outs, 1)


def close(a, b, tol, what):
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("kind", ["rule", "mom"])
@pytest.mark.parametrize("name", RULES)
@settings(max_examples=4)
@given(lengths=calls, B=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_layer_split_equals_one_pass(kind, name, lengths, B, seed):
    """float64, torch form: the calls through the cache equal one pass without a cache."""
    layer = layer_for(kind, name, "torch", torch.float64, seed)
    x = torch.randn(B, sum(lengths), D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    close(run_split(layer, x, lengths), layer(x).output, F64, f"{kind} {name} {lengths}")


# the interpreter is slow: every rule through the single layer, the MoM layer for ttt (whose state is more
# than S) and one delta rule
TRITON_CASES = [(k, n) for n in TRITON_RULES for k in ("rule", "mom") if k == "rule" or n in ("ttt", "gated_deltanet")]


@pytest.mark.parametrize("kind,name", TRITON_CASES)
@settings(max_examples=1)
@given(lengths=st.lists(st.integers(1, 5), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_triton_layer_split_equals_one_pass(kind, name, lengths, seed):
    """float32, this project's Triton kernels under the interpreter: the split equals one pass."""
    layer = layer_for(kind, name, "triton", torch.float32, seed)
    x = torch.randn(2, sum(lengths), D, generator=torch.Generator().manual_seed(seed))
    close(run_split(layer, x, lengths), layer(x).output, F32, f"{kind} {name} triton {lengths}")


@pytest.mark.parametrize("kind", ["rule", "mom"])
@settings(max_examples=3)
@given(lengths=calls, seed=st.integers(0, 2**16))
def test_language_model_split_equals_one_pass(kind, lengths, seed):
    """A 2-layer model over ttt (the rule whose state is more than S): logits of the split equal one pass."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=13, hidden_size=D, num_layers=2,
                      mixer=MixerConfig(type=kind, rule="ttt", num_heads=H, head_dim=KD, num_memories=3, topk=2,
                                        chunk_size=4, backend="torch", rule_options={"mini_batch_size": 3}))
    lm = LanguageModel(cfg).double()
    ids = torch.randint(0, 13, (2, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    caches, outs, a = None, [], 0
    for n in lengths:
        out = lm(ids[:, a:a + n], caches=caches, use_cache=True)
        caches, a = out.caches, a + n
        outs.append(out.logits)
    close(torch.cat(outs, 1), lm(ids).logits, F64, f"lm {kind} {lengths}")


# ----------------------------------------------------------------------------------------- the rule
def ttt_inputs(lens: list[int], b: int, seed: int, dtype=torch.float64, ln: bool = False):
    """Packed inputs of sequences `lens` and a reachable decode state (S0, S, n) per sequence: n random in [0, b),
    S = S0 where n = 0 (as every state of init_state / step / chunk)."""
    g = torch.Generator().manual_seed(seed)
    T, N = sum(lens), len(lens)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    q, v = r(1, T, H, KD), r(1, T, H, KD)
    k = torch.nn.functional.normalize(r(1, T, H, KD), dim=-1)
    eta = 0.2 * torch.rand(1, T, H, generator=g, dtype=dtype)
    n = torch.randint(0, b, (N, 1), generator=g).to(dtype).expand(N, H).contiguous()
    S0 = 0.5 * r(N, H, KD, KD)
    S = torch.where((n == 0)[..., None, None], S0, S0 + 0.1 * r(N, H, KD, KD))
    cu = torch.tensor([0] + lens).cumsum(0)
    gates = dict(eta=eta, mini_batch_size=b)
    if ln:
        gates.update(ln_weight=1 + 0.1 * r(H, KD), ln_bias=0.1 * r(H, KD))
    return (q, k, v), gates, (S0, S, n), cu


@settings(max_examples=8)
@given(lens=st.lists(st.integers(0, 9), min_size=1, max_size=3), b=st.integers(1, 4), ln=st.booleans(),
       seed=st.integers(0, 2**16))
def test_ttt_chunk_from_decode_state_equals_recurrence(lens, b, ln, seed):
    """chunk(initial_state=(S0, S, n)) equals the recurrence from the same state: outputs, the final tuple, and
    the gradients of q, k, v, eta, S0 and S (float64, packed, a different position n per sequence)."""
    (q, k, v), gates, state, cu = ttt_inputs(lens, b, seed, ln=ln)
    leaves = [q, k, v, gates["eta"], state[0], state[1]]
    for t in leaves:
        t.requires_grad_(True)
    o_r, f_r = TTT.recurrent(q, k, v, initial_state=state, output_final_state=True, cu_seqlens=cu, **gates)
    o_c, f_c = TTT.chunk(q, k, v, initial_state=state, output_final_state=True, cu_seqlens=cu, chunk_size=4,
                         backend="torch", **gates)
    close(o_c, o_r, F64, "output")
    for a, r_, what in zip(f_c, f_r, ("S0", "S", "n")):
        close(a, r_, F64, f"final {what}")
    w = torch.randn(o_r.shape, generator=torch.Generator().manual_seed(seed), dtype=o_r.dtype)
    loss = lambda o, f: (o * w).sum() + (f[0] ** 2).sum() + (f[1] ** 3).sum()
    g_r = torch.autograd.grad(loss(o_r, f_r), leaves, allow_unused=True)
    g_c = torch.autograd.grad(loss(o_c, f_c), leaves, allow_unused=True)
    for a, r_, what in zip(g_c, g_r, ("q", "k", "v", "eta", "S0", "S")):
        close(a, r_, F64, f"grad {what}")


@settings(max_examples=3)
@given(lens=st.lists(st.integers(0, 7), min_size=1, max_size=2), b=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_ttt_triton_chunk_from_decode_state_equals_torch(lens, b, seed):
    """backend="triton" (interpreter, float32) from a mid-mini-batch state equals the torch form, gradients too."""
    (q, k, v), gates, state, cu = ttt_inputs(lens, b, seed, dtype=torch.float32)
    leaves = [q, k, v, gates["eta"], state[0], state[1]]
    res = []
    for backend in ("torch", "triton"):
        xs = [t.detach().clone().requires_grad_(True) for t in leaves]
        o, f = TTT.chunk(*xs[:3], initial_state=(xs[4], xs[5], state[2]), output_final_state=True, cu_seqlens=cu,
                         backend=backend, eta=xs[3], mini_batch_size=b)
        loss = (o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() + (f[0] ** 2).sum() + (f[1] ** 2).sum()
        res.append((o, f, torch.autograd.grad(loss, xs, allow_unused=True)))
    (o_t, f_t, g_t), (o_k, f_k, g_k) = res
    close(o_k, o_t, F32, "output")
    for a, r_, what in zip(f_k, f_t, ("S0", "S", "n")):
        close(a, r_, F32, f"final {what}")
    for a, r_, what in zip(g_k, g_t, ("q", "k", "v", "eta", "S0", "S")):
        close(a, r_, F32_GRAD, f"grad {what}")


@pytest.mark.parametrize("name", [n for n in RULES if n != "ttt"])
def test_chunk_takes_the_decode_state_tuple(name):
    """Every other rule: a decode-state tuple as `initial_state` is its memory, and the final state comes back as
    the tuple `state_from_final` makes."""
    rule = R.get(name)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, H, KD, generator=g, dtype=torch.float64) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    gates = {n: (-0.1 * torch.rand(2, 5, H, *((KD,) if s.per == "key" else ()), generator=g, dtype=torch.float64)
                 if s.kind == "log_decay" else 0.3 * torch.rand(2, 5, H, generator=g, dtype=torch.float64))
             for n, s in rule.gates.items() if s.required}
    S = torch.randn(2, H, KD, KD, generator=g, dtype=torch.float64)
    o1, f1 = rule.chunk(q, k, v, initial_state=S, output_final_state=True, backend="torch", **gates)
    o2, f2 = rule.chunk(q, k, v, initial_state=rule.state_from_final(S), output_final_state=True, backend="torch",
                        **gates)
    close(o2, o1, F64, f"{name} output")
    assert isinstance(f2, tuple)
    close(rule.final_from_state(f2), f1, F64, f"{name} final")


def test_decode_state_errors():
    """A malformed decode-state tuple is refused with a message naming the fix."""
    (q, k, v), gates, (S0, S, n), cu = ttt_inputs([4], 3, 0)
    with pytest.raises(ValueError, match="leading dims"):
        TTT.chunk(q, k, v, initial_state=(S0, S, n[:, :1]), cu_seqlens=cu, backend="torch", **gates)
    with pytest.raises(ValueError, match="holds 3 tensors"):
        TTT.chunk(q, k, v, initial_state=(S0, S), cu_seqlens=cu, backend="torch", **gates)
    with pytest.raises(ValueError, match="integer in"):
        TTT.chunk(q, k, v, initial_state=(S0, S, n + 0.5), cu_seqlens=cu, backend="torch", **gates)
