"""ttt (TTT-Linear): the mini-batch dual form equals the gradient-descent definition.

The definition (`recurrent`, `step`) takes every gradient with torch.autograd; the chunked form
uses analytic gradients (plain and through the LayerNorm). Checked, in float64 on CPU with tiny
shapes: outputs, final states and gradients of q, k, v, eta, initial_state, ln_weight, ln_bias
(atol 1e-9 / rtol 1e-7: the two forms differ only by reassociation), mini-batch sizes 1, 4, 16
with T not a multiple of them, packed variable-length batches, token-by-token decoding, the
semantics of a mini-batch against an explicit loop, ttt(b=1, plain) == deltanet(beta=eta), and
the LN form's gradient against fla's plain-PyTorch reference (float32, atol 1e-5).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lsm.rules as R

RULE = R.get("ttt")
F64 = dict(dtype=torch.float64)
TOL = dict(atol=1e-9, rtol=1e-7)
H, K = 2, 8


def make(B, T, V=K, ln=False, seed=0, requires_grad=True, eta_max=1.0):
    """q, k (unit norm), v, eta in (0, eta_max), and LN parameters when `ln`."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, **F64)
    x = {"q": rnd(B, T, H, K), "k": F.normalize(rnd(B, T, H, K), dim=-1), "v": rnd(B, T, H, V),
         "eta": eta_max * torch.sigmoid(rnd(B, T, H))}
    if ln:
        x["ln_weight"] = 1 + 0.3 * rnd(H, V)
        x["ln_bias"] = 0.3 * rnd(H, V)
    if requires_grad:
        for t in x.values():
            t.requires_grad_(True)
    return x


def run(fn, x, h0=None, **kw):
    return fn(x["q"], x["k"], x["v"], initial_state=h0, output_final_state=True,
              **{n: t for n, t in x.items() if n not in ("q", "k", "v")}, **kw)


def grads(out, inputs: dict, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in out)
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    return dict(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)))


def close(a, b, what, tol=TOL):
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ chunk == recurrent

@settings(max_examples=15)
@given(T=st.integers(1, 45), b=st.sampled_from([1, 4, 16]), chunk_size=st.sampled_from([8, 16, 32]),
       ln=st.booleans(), with_h0=st.booleans(), B=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_chunk_equals_recurrent(T, b, chunk_size, ln, with_h0, B, seed):
    """Outputs, final state and every gradient; float64, atol 1e-9 / rtol 1e-7."""
    x = make(B, T, ln=ln, seed=seed)
    h0 = torch.randn(B, H, K, K, **F64).requires_grad_() if with_h0 else None
    o_r, S_r = run(RULE.recurrent, x, h0, mini_batch_size=b)
    o_c, S_c = run(RULE.chunk, x, h0, mini_batch_size=b, chunk_size=chunk_size, backend="torch")
    close(o_c, o_r, "output")
    close(S_c, S_r, "final state")
    inputs = {**x, "h0": h0}
    g_r, g_c = grads((o_r, S_r), inputs, seed), grads((o_c, S_c), inputs, seed)
    for n, g in g_r.items():
        assert g is not None, f"no gradient reaches `{n}` in the reference"
        close(g_c[n], g, f"grad of {n}")


@pytest.mark.parametrize("b", [1, 4, 16])
@pytest.mark.parametrize("ln", [False, True])
def test_T_not_a_multiple_of_the_mini_batch(b, ln):
    """T = 2b + 3 (a short last mini-batch, padded in the chunk form); float64, atol 1e-9."""
    T = 2 * b + 3
    x = make(2, T, ln=ln, seed=b)
    h0 = torch.randn(2, H, K, K, **F64).requires_grad_()
    o_r, S_r = run(RULE.recurrent, x, h0, mini_batch_size=b)
    o_c, S_c = run(RULE.chunk, x, h0, mini_batch_size=b, chunk_size=16, backend="torch")
    close(o_c, o_r, "output")
    close(S_c, S_r, "final state")
    g_r, g_c = grads((o_r, S_r), {**x, "h0": h0}), grads((o_c, S_c), {**x, "h0": h0})
    for n in g_r:
        close(g_c[n], g_r[n], f"grad of {n}")


def test_default_mini_batch_is_16_and_chunk_size_rounds_to_whole_mini_batches():
    x = make(1, 37, requires_grad=False, seed=5)
    o16, S16 = run(RULE.recurrent, x, mini_batch_size=16)
    o, S = run(RULE.recurrent, x)
    close(o, o16, "default output")
    for cs in (1, 7, 20, 64):  # rounded to 16, 16, 16, 64
        o_c, S_c = run(RULE.chunk, x, chunk_size=cs, backend="torch")
        close(o_c, o16, f"chunk_size={cs} output")
        close(S_c, S16, f"chunk_size={cs} state")


# ------------------------------------------------------------------ the definition

@pytest.mark.parametrize("b", [1, 3, 4])
def test_mini_batch_semantics_against_an_explicit_loop(b):
    """Gradients inside a mini-batch are taken at its starting state; float64, atol 1e-10."""
    T, scale = 11, 0.7
    x = make(1, T, requires_grad=False, seed=b)
    q, k, v, eta = x["q"][0], x["k"][0], x["v"][0], x["eta"][0]     # [T, H, K], [T, H]
    h0 = torch.randn(H, K, K, **F64, generator=torch.Generator().manual_seed(99))
    S, o_ref = h0, []
    for t in range(T):
        if t % b == 0:
            S0 = S
        e = torch.einsum("hk,hkv->hv", k[t], S0) - v[t]
        S = S - eta[t][:, None, None] * k[t][:, :, None] * e[:, None, :]
        o_ref.append(scale * torch.einsum("hk,hkv->hv", q[t], S))
    for fn, kw in ((RULE.recurrent, {}), (RULE.chunk, {"backend": "torch"})):
        o, S_T = run(fn, x, h0[None], mini_batch_size=b, scale=scale, **kw)
        close(o[0], torch.stack(o_ref), f"{fn.__name__} output", dict(atol=1e-10, rtol=1e-8))
        close(S_T[0], S, f"{fn.__name__} state", dict(atol=1e-10, rtol=1e-8))


def test_b1_plain_equals_deltanet_with_beta_eta():
    """ttt with mini-batches of one token and no LN is deltanet with beta = eta; float64, atol 1e-9."""
    x = make(2, 29, V=5, requires_grad=False, seed=3)
    h0 = torch.randn(2, H, K, 5, **F64)
    if "deltanet" in R.names():
        dn = R.get("deltanet")
        o_d, S_d = dn.recurrent(x["q"], x["k"], x["v"], beta=x["eta"], initial_state=h0, output_final_state=True)
    else:  # the delta rule, written out
        S, outs = h0.clone(), []
        for t in range(x["q"].shape[1]):
            k_, v_, b_ = x["k"][:, t], x["v"][:, t], x["eta"][:, t, :, None]
            S = S + k_[..., :, None] * (b_ * (v_ - torch.einsum("bhk,bhkv->bhv", k_, S)))[..., None, :]
            outs.append(K ** -0.5 * torch.einsum("bhk,bhkv->bhv", x["q"][:, t], S))
        o_d, S_d = torch.stack(outs, 1), S
    for fn, kw in ((RULE.recurrent, {}), (RULE.chunk, {"backend": "torch", "chunk_size": 8})):
        o, S = run(fn, x, h0, mini_batch_size=1, **kw)
        close(o, o_d, f"{fn.__name__} output")
        close(S, S_d, f"{fn.__name__} state")


def test_ln_form_definition():
    """o_t = q_t + LN(scale S_t^T q_t), loss 1/2||k + LN(S^T k) - v||^2 on one token from h0; float64, atol 1e-10."""
    x = make(1, 1, ln=True, requires_grad=False, seed=8)
    q, k, v, eta = x["q"][0, 0], x["k"][0, 0], x["v"][0, 0], x["eta"][0, 0]
    w, bias = x["ln_weight"], x["ln_bias"]
    h0 = torch.randn(1, H, K, K, **F64)
    ln = lambda z: F.layer_norm(z, (K,), eps=1e-6) * w + bias       # per head: normalise over V
    W = h0[0].clone().requires_grad_()
    loss = 0.5 * (k + ln(torch.einsum("hk,hkv->hv", k, W)) - v).pow(2).sum()
    S1 = h0[0] - eta[:, None, None] * torch.autograd.grad(loss, W)[0]
    o_ref = q + ln(0.5 * torch.einsum("hk,hkv->hv", q, S1))
    for fn, kw in ((RULE.recurrent, {}), (RULE.chunk, {"backend": "torch"})):
        o, S = run(fn, x, h0, scale=0.5, **kw)
        close(o[0, 0], o_ref, f"{fn.__name__} output", dict(atol=1e-10, rtol=1e-8))
        close(S[0], S1, f"{fn.__name__} state", dict(atol=1e-10, rtol=1e-8))


def test_ln_weight_alone_defaults_bias_to_zero():
    x = make(1, 9, ln=True, requires_grad=False, seed=2)
    x_w = {n: t for n, t in x.items() if n != "ln_bias"}
    x0 = {**x, "ln_bias": torch.zeros(H, K, **F64)}
    close(run(RULE.chunk, x_w, backend="torch")[0], run(RULE.recurrent, x0)[0], "ln_weight only")


# ------------------------------------------------------------------ varlen, decoding, continuation

@settings(max_examples=12)
@given(lens=st.lists(st.integers(1, 30), min_size=1, max_size=4), b=st.sampled_from([1, 4, 16]),
       ln=st.booleans(), with_h0=st.booleans(), seed=st.integers(0, 2**16))
def test_varlen_equals_separate_runs(lens, b, ln, with_h0, seed):
    """A packed batch (mini-batches restart at every sequence start) equals separate runs; float64, atol 1e-9."""
    T, N = sum(lens), len(lens)
    x = make(1, T, ln=ln, seed=seed)
    cu = torch.tensor([0] + lens).cumsum(0)
    h0 = torch.randn(N, H, K, K, **F64).requires_grad_() if with_h0 else None
    o_p, S_p = run(RULE.chunk, x, h0, cu_seqlens=cu, mini_batch_size=b, chunk_size=16, backend="torch")
    outs, finals = [], []
    for n in range(N):
        a, e = int(cu[n]), int(cu[n + 1])
        part = {m: (t[:, a:e] if t.dim() >= 3 else t) for m, t in x.items()}
        o, S = run(RULE.recurrent, part, None if h0 is None else h0[n:n + 1], mini_batch_size=b)
        outs.append(o)
        finals.append(S)
    close(o_p, torch.cat(outs, 1), "packed output")
    close(S_p, torch.cat(finals, 0), "packed final states")
    o_r, S_r = run(RULE.recurrent, x, h0, cu_seqlens=cu, mini_batch_size=b)
    inputs = {**x, "h0": h0}
    g_p, g_r = grads((o_p, S_p), inputs, seed), grads((o_r, S_r), inputs, seed)
    for n in g_r:
        close(g_p[n], g_r[n], f"packed grad of {n}")


def test_varlen_with_an_empty_sequence():
    x = make(1, 12, requires_grad=False, seed=4)
    cu = torch.tensor([0, 5, 5, 12])
    h0 = torch.randn(3, H, K, K, **F64)
    o_p, S_p = run(RULE.chunk, x, h0, cu_seqlens=cu, mini_batch_size=4, backend="torch")
    o_r, S_r = run(RULE.recurrent, x, h0, cu_seqlens=cu, mini_batch_size=4)
    close(o_p, o_r, "output")
    close(S_p, S_r, "final states")
    close(S_p[1], h0[1], "an empty sequence keeps its initial state")


@pytest.mark.parametrize("b", [1, 4, 16])
@pytest.mark.parametrize("ln", [False, True])
def test_step_decoding_from_empty_equals_recurrent(b, ln):
    """step() token by token from init_state equals recurrent (and chunk); float64, atol 1e-9."""
    B, T = 2, 21
    x = make(B, T, ln=ln, requires_grad=False, seed=b)
    o_r, S_r = run(RULE.recurrent, x, mini_batch_size=b)
    o_c, _ = run(RULE.chunk, x, mini_batch_size=b, backend="torch")
    state = RULE.init_state(B, H, K, K, dtype=torch.float64)
    fixed = {n: t for n, t in x.items() if n.startswith("ln_")}
    outs = []
    for t in range(T):
        o, state = RULE.step(x["q"][:, t], x["k"][:, t], x["v"][:, t], state, eta=x["eta"][:, t],
                             mini_batch_size=b, **fixed)
        outs.append(o)
        assert torch.all(state[2] == (t + 1) % b), "n counts the tokens of the current mini-batch"
    close(torch.stack(outs, 1), o_r, "decoded outputs")
    close(torch.stack(outs, 1), o_c, "decoded outputs vs chunk")
    close(RULE.final_from_state(state), S_r, "decoded final state")


def test_step_under_inference_mode_and_no_grad():
    x = make(1, 6, ln=True, requires_grad=False, seed=1)
    ref, _ = run(RULE.recurrent, x, mini_batch_size=4)
    fixed = {n: t for n, t in x.items() if n.startswith("ln_")}
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            state, outs = RULE.init_state(1, H, K, K, dtype=torch.float64), []
            for t in range(6):
                o, state = RULE.step(x["q"][:, t], x["k"][:, t], x["v"][:, t], state, eta=x["eta"][:, t],
                                     mini_batch_size=4, **fixed)
                outs.append(o)
        close(torch.stack(outs, 1), ref, f"decoding under {ctx.__name__}")


@pytest.mark.parametrize("ln", [False, True])
def test_continuation_from_final_state_at_a_mini_batch_boundary(ln):
    """An initial state starts a fresh mini-batch: a prefix of whole mini-batches, then the rest, equals one run."""
    x = make(2, 30, ln=ln, requires_grad=False, seed=6)
    o, S = run(RULE.chunk, x, mini_batch_size=4, backend="torch")
    cut = lambda a, e: {n: (t[:, a:e] if t.dim() >= 3 else t) for n, t in x.items()}
    o1, S1 = run(RULE.chunk, cut(0, 12), mini_batch_size=4, backend="torch")
    o2, S2 = run(RULE.chunk, cut(12, 30), S1, mini_batch_size=4, backend="torch")
    close(torch.cat([o1, o2], 1), o, "continued output")
    close(S2, S, "continued state")
    # a step continuing from state_from_final(S1) equals the chunked continuation's first token
    s = RULE.state_from_final(S1)
    o_s, _ = RULE.step(x["q"][:, 12], x["k"][:, 12], x["v"][:, 12], s, eta=x["eta"][:, 12], mini_batch_size=4,
                       **{n: t for n, t in x.items() if n.startswith("ln_")})
    close(o_s, o2[:, 0], "step from state_from_final")


# ------------------------------------------------------------------ fla, gates, bad input

def test_ln_gradient_matches_fla_naive_reference():
    """fla's TTT reference (inner bias, per-query eta, Z + LN(Z) output) differs from ours, but on one
    mini-batch with a zero initial bias and eta constant inside it, its updated weight equals our state.
    float32, atol 1e-5 / rtol 1e-5."""
    from fla.ops.ttt.naive import chunk_ttt_linear_ref  # fla is a dependency: its CPU reference must import
    B, T, b = 2, 8, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    k = F.normalize(k, dim=-1)
    eta = torch.rand(B, 1, H, generator=gen).expand(B, T, H).contiguous() * 0.5
    w, bias = 1 + 0.3 * torch.randn(H, K, generator=gen), 0.3 * torch.randn(H, K, generator=gen)
    h0 = torch.randn(B, H, K, K, generator=gen)
    _, S_fla, _ = chunk_ttt_linear_ref(q.clone(), k, v, w, bias, eta[..., None], eps=1e-6, mini_batch_size=b,
                                       initial_state=h0.clone(), output_final_state=True)
    _, S = RULE.chunk(q, k, v, eta=eta, ln_weight=w, ln_bias=bias, mini_batch_size=b, initial_state=h0,
                      output_final_state=True, backend="torch")
    close(S, S_fla, "state after one mini-batch", dict(atol=1e-5, rtol=1e-5))
    assert not RULE.has_fla
    with pytest.raises(ValueError, match="fla"):
        RULE.chunk(q, k, v, eta=eta, backend="fla")


def test_gate_module():
    gm = RULE.gate_module(hidden_size=12, num_heads=H, head_dim=K)
    x = torch.randn(2, 5, 12)
    g = gm(x)
    assert set(g) == {"eta"} and g["eta"].shape == (2, 5, H) and g["eta"].dtype == torch.float32
    assert gm.base_lr == 1 / K and bool((g["eta"] > 0).all()) and bool((g["eta"] < 1 / K).all())
    assert gm.double()(x.double())["eta"].dtype == torch.float64
    from lsm.rules.gates import TTTGate
    gl = TTTGate(12, H, K, base_lr=0.5, layer_norm=True)
    g = gl(x)
    assert g["ln_weight"].shape == (H, K) and g["ln_bias"].shape == (H, K)
    q, k, v = torch.randn(2, 5, H, K), F.normalize(torch.randn(2, 5, H, K), dim=-1), torch.randn(2, 5, H, K)
    o, _ = RULE.chunk(q, k, v, backend="torch", **g)
    o.sum().backward()
    assert gl.ln_weight.grad is not None and gl.proj.weight.grad is not None


def test_bad_options():
    x = make(1, 6, requires_grad=False)
    q, k, v, eta = x["q"], x["k"], x["v"], x["eta"]
    for fn in (RULE.recurrent, RULE.chunk):
        for bad in (0, -2, 2.0, True):
            with pytest.raises(ValueError, match="mini_batch_size"):
                fn(q, k, v, eta=eta, mini_batch_size=bad)
        with pytest.raises(ValueError, match="ln_weight"):
            fn(q, k, v, eta=eta, ln_weight=torch.ones(H, K + 1, **F64))
        with pytest.raises(ValueError, match="K == V"):
            fn(q, k, v[..., :5], eta=eta, ln_bias=torch.zeros(H, 5, **F64))
        with pytest.raises(ValueError, match="ln_eps"):
            fn(q, k, v, eta=eta, ln_eps=0.0)
        with pytest.raises(ValueError, match=">= 0"):
            fn(q, k, v, eta=-eta)
        with pytest.raises(ValueError, match="gate `eta` is required"):
            fn(q, k, v)
