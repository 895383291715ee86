"""TTT-Linear's Triton backend (lsm_kernels.ttt through `TTT.chunk(..., backend="triton")` and
`TTT.step(..., backend="triton")`), plain and LayerNorm form, against the torch mini-batch dual form
(`backend="torch"`), the token-by-token definition (`recurrent`) and the autograd step (`TTT._step`).

Without a GPU these run under TRITON_INTERPRET=1 (set by conftest.py) on tiny float32 shapes. Tolerances
(float32; the forms differ by reassociation and by the kernel's float32 accumulation order):
outputs and gradients atol 1e-4 / rtol 1e-4, final states atol 2e-5 / rtol 1e-5 (`STATE_TOL`).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lsm import rules

RULE = rules.get("ttt")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-4, rtol=1e-4)
STATE_TOL = dict(atol=2e-5, rtol=1e-5)
H = 2


def make(B, T, K=8, V=8, N=None, seed=0, eta_max=0.5, ln=False):
    """Leaves q, unit k, v, eta in (0, eta_max), h0 `[N, H, K, V]` (and LN parameters when `ln`), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    x = {"q": rnd(B, T, H, K), "k": F.normalize(rnd(B, T, H, K), dim=-1), "v": rnd(B, T, H, V),
         "eta": eta_max * torch.rand(B, T, H, generator=gen), "h0": 0.5 * rnd(B if N is None else N, H, K, V)}
    if ln:
        x["ln_weight"] = 1 + 0.3 * rnd(H, V)
        x["ln_bias"] = 0.3 * rnd(H, V)
    return {n: t.to(DEV).requires_grad_() for n, t in x.items()}


def run(fn, x, with_h0=True, **kw):
    gates = {n: t for n, t in x.items() if n not in ("q", "k", "v", "h0")}
    return fn(x["q"], x["k"], x["v"], initial_state=x["h0"] if with_h0 else None, output_final_state=True,
              **gates, **kw)


def grads(o, S, x, seed=0):
    """Gradients of a random linear function of (o, S) in every leaf."""
    gen = torch.Generator().manual_seed(seed + 1)
    loss = (o * torch.randn(o.shape, generator=gen).to(DEV)).sum()
    if S is not None:
        loss = loss + (S * torch.randn(S.shape, generator=gen).to(DEV)).sum()
    names = list(x)
    return dict(zip(names, torch.autograd.grad(loss, [x[n] for n in names], allow_unused=True)))


def close(got, want, what, tol=TOL):
    assert got is not None, f"{what}: no value"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{what}: {m}")


def check_grads(g, g_ref, names):
    for n in names:
        if g_ref[n] is None:
            assert g[n] is None or not g[n].any(), f"grad of {n}: expected none"
            continue
        close(g[n], g_ref[n], f"grad of {n}")


# ------------------------------------------------------------------ chunk: triton == torch == recurrent

GRADS = ["q", "k", "v", "eta", "h0", "ln_weight", "ln_bias"]


@settings(max_examples=10)
@given(T=st.integers(1, 19), b=st.sampled_from([1, 3, 4, 8]), with_h0=st.booleans(), B=st.integers(1, 2),
       ln=st.booleans(), seed=st.integers(0, 2**16))
def test_chunk_matches_torch_and_recurrent(T, b, with_h0, B, ln, seed):
    """Ragged T (any T, not only multiples of the mini-batch), b = 1 and > 1, with and without an initial
    state, plain and LayerNorm form: outputs, final states, and gradients of q, k, v, eta, h0 (ln_weight, ln_bias)."""
    x = make(B, T, seed=seed, ln=ln)
    o, S = run(RULE.chunk, x, with_h0, mini_batch_size=b, backend="triton")
    o_t, S_t = run(RULE.chunk, x, with_h0, mini_batch_size=b, backend="torch")
    o_r, S_r = run(RULE.recurrent, x, with_h0, mini_batch_size=b)
    assert o.dtype == torch.float32 and S.dtype == torch.float32 and S.shape == (B, H, 8, 8)
    close(o, o_t, "output vs torch")
    close(o, o_r, "output vs recurrent")
    close(S, S_t, "final state vs torch", STATE_TOL)
    close(S, S_r, "final state vs recurrent", STATE_TOL)
    g, g_t = grads(o, S, x, seed), grads(o_t, S_t, x, seed)
    check_grads(g, g_t, GRADS[:7 if ln else 5])
    if not with_h0:
        assert g["h0"] is None


@settings(max_examples=6)
@given(lens=st.lists(st.integers(0, 11), min_size=1, max_size=4), b=st.sampled_from([1, 4, 5]),
       with_h0=st.booleans(), ln=st.booleans(), seed=st.integers(0, 2**16))
def test_varlen_equals_separate_runs(lens, b, with_h0, ln, seed):
    """Packed sequences (empty ones included) with `cu_seqlens` on the device equal one run per sequence,
    and the torch packed run; gradients too; plain and LayerNorm form."""
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    x = make(1, T, N=len(lens), seed=seed, ln=ln)
    o, S = run(RULE.chunk, x, with_h0, cu_seqlens=cu, mini_batch_size=b, backend="triton")
    o_t, S_t = run(RULE.chunk, x, with_h0, cu_seqlens=cu, mini_batch_size=b, backend="torch")
    close(o, o_t, "packed output vs torch")
    close(S, S_t, "packed final state vs torch", STATE_TOL)
    g, g_t = grads(o, S, x, seed), grads(o_t, S_t, x, seed)
    check_grads(g, g_t, GRADS[:7 if ln else 5])
    for n, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e == a:  # an empty sequence: its final state is its initial state (or zeros)
            close(S[n], x["h0"][n] if with_h0 else torch.zeros_like(S[n]), f"empty sequence {n}", STATE_TOL)
            continue
        xs = {m: (t[n:n + 1] if m == "h0" else t if m.startswith("ln_") else t[:, a:e]) for m, t in x.items()}
        o_n, S_n = run(RULE.chunk, xs, with_h0, mini_batch_size=b, backend="triton")
        close(o[:, a:e], o_n, f"sequence {n} output")
        close(S[n:n + 1], S_n, f"sequence {n} final state", STATE_TOL)


@pytest.mark.parametrize("ln", [False, True])
def test_tiled_key_and_value_dims(ln):
    """K and V span several tiles of the backward's dq/dk kernel (K = 80 > 64) and of the value dim (V = 80 > 64):
    partial per-tile sums of deta and of the state gradient (the LN form: one 128-wide V tile in the state pass,
    two in the dq/dk pass)."""
    x = make(1, 7, K=80, V=80, seed=3, eta_max=0.1, ln=ln)
    o, S = run(RULE.chunk, x, mini_batch_size=4, backend="triton")
    o_t, S_t = run(RULE.chunk, x, mini_batch_size=4, backend="torch")
    close(o, o_t, "output")
    close(S, S_t, "final state", STATE_TOL)
    check_grads(grads(o, S, x), grads(o_t, S_t, x), GRADS[:7 if ln else 5])


def test_grad_of_output_only_without_initial_state():
    """No initial state, no final state requested: the backward starts from a zero state gradient."""
    x = make(2, 13, seed=4)
    del x["h0"]
    o = RULE.chunk(x["q"], x["k"], x["v"], eta=x["eta"], mini_batch_size=4, backend="triton")[0]
    o_t = RULE.chunk(x["q"], x["k"], x["v"], eta=x["eta"], mini_batch_size=4, backend="torch")[0]
    close(o, o_t, "output")
    check_grads(grads(o, None, x), grads(o_t, None, x), ["q", "k", "v", "eta"])


def test_inference_without_final_state():
    """Under no_grad, no final state requested: S is None, o as torch's."""
    x = make(1, 10, seed=5)
    with torch.no_grad():
        o, S = RULE.chunk(x["q"], x["k"], x["v"], initial_state=x["h0"], eta=x["eta"], backend="triton",
                          mini_batch_size=3)
        o_t, _ = RULE.chunk(x["q"], x["k"], x["v"], initial_state=x["h0"], eta=x["eta"], backend="torch",
                            mini_batch_size=3)
    assert S is None
    close(o, o_t, "output")


def test_chunk_size_does_not_change_the_result():
    """The kernel's chunk is the mini-batch: any chunk_size gives the same output."""
    x = make(1, 12, seed=6)
    outs = [run(RULE.chunk, x, mini_batch_size=4, chunk_size=c, backend="triton")[0] for c in (4, 64)]
    close(outs[0], outs[1], "chunk_size 4 vs 64", dict(atol=0, rtol=0))


# ------------------------------------------------------------------ backend choice and unsupported inputs

def test_auto_on_cpu_is_torch(monkeypatch):
    """CPU tensors: backend='auto' runs the torch form, never the Triton kernel."""
    def boom(*a, **kw):
        raise AssertionError("auto picked triton on CPU")
    monkeypatch.setattr(type(RULE), "_chunk_triton", boom)
    x = make(1, 5, seed=7)
    if DEV == "cpu":
        run(RULE.chunk, x, backend="auto")


def test_triton_support_decision():
    """What `auto` checks on CUDA tensors (shapes, dtypes and options only, no values read)."""
    q, v = torch.zeros(1, 4, H, 8), torch.zeros(1, 4, H, 8)

    def refusal(q, v, gates, auto=False):
        return RULE.kernel_refusal("chunk", "triton", q, q, v, gates, auto=auto)

    def preferred(q, v, gates):
        return refusal(q, v, gates, auto=True) is None

    assert refusal(q, v, {}) is None
    assert refusal(q, v, {"mini_batch_size": 64}) is None
    assert refusal(q, v, {"ln_weight": torch.ones(H, 8), "ln_bias": None}) is None
    assert "mini_batch_size" in refusal(q, v, {"mini_batch_size": 65})
    assert "K <= 256" in refusal(torch.zeros(1, 4, H, 257), v, {})
    assert "float32" in refusal(q.double(), v.double(), {})
    assert preferred(q, v, {"ln_weight": torch.ones(H, 8)})
    big = torch.zeros(1, 4, H, 256)
    assert preferred(big, big, {}) and refusal(big, big, {"ln_bias": torch.zeros(H, 256)}) is None
    assert not preferred(big, big, {"ln_bias": torch.zeros(H, 256)})   # LN at V = 256: torch under auto
    assert not preferred(q, v, {"mini_batch_size": 65})
    # the decode step: `auto` takes the fused kernel only without gradients and with a float32 state
    state = RULE.init_state(1, H, 8, 8)
    assert RULE.kernel_refusal("step", "triton", q[:, 0], q[:, 0], v[:, 0], {}, state=state, auto=True) is None
    assert "float32" in RULE.kernel_refusal("step", "triton", q[:, 0], q[:, 0], v[:, 0], {},
                                            state=tuple(s.double() for s in state), auto=True)
    assert "forward only" in RULE.kernel_refusal("step", "triton", q[:, 0].requires_grad_(), q[:, 0], v[:, 0], {},
                                                 state=state, auto=True)


@pytest.mark.parametrize("case", ["K", "mini_batch_size", "float64"])
def test_unsupported_inputs_raise(case):
    """backend='triton' on inputs the kernel cannot take: a ValueError naming the option and the fix."""
    K = 257 if case == "K" else 8
    q = torch.randn(1, 3, H, K, device=DEV)
    k, v, eta = F.normalize(torch.randn(1, 3, H, K, device=DEV), dim=-1), torch.randn(1, 3, H, K, device=DEV), \
        torch.rand(1, 3, H, device=DEV)
    kw = {"eta": eta}
    if case == "mini_batch_size":
        kw[case] = 128
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    with pytest.raises(ValueError, match=r"backend='triton'.*" + {"float64": "float32"}.get(case, case)) as e:
        RULE.chunk(q, k, v, backend="triton", **kw)
    assert "backend='torch'" in str(e.value)


# ------------------------------------------------------------------ decode step: triton == torch

def _decode(backend, x, state, b, T):
    """Feed x's tokens one by one through `step`; returns (o `[B, T, H, V]`, the final decode state)."""
    ln = {n: x[n] for n in ("ln_weight", "ln_bias") if n in x}
    outs = []
    for t in range(T):
        o, state = RULE.step(x["q"][:, t], x["k"][:, t], x["v"][:, t], state, backend=backend, eta=x["eta"][:, t],
                             mini_batch_size=b, **ln)
        outs.append(o)
    return torch.stack(outs, 1), state


@settings(max_examples=8)
@given(T=st.integers(1, 9), b=st.sampled_from([1, 3, 4]), ln=st.booleans(), from_state=st.booleans(),
       dims=st.sampled_from([(8, 8), (80, 80), (8, 24)]), seed=st.integers(0, 2**16))
def test_step_matches_torch_step(T, b, ln, from_state, dims, seed):
    """`step(backend='triton')` (lsm_kernels.ttt.ttt_step) against the autograd definition `TTT._step`, token by
    token through mini-batch boundaries: outputs, S0, S and n; plain and LayerNorm forms, from an empty state
    or a final state, K and V in several tiles (80)."""
    K, V = dims
    ln = ln and K == V
    with torch.no_grad():
        x = {n: t.detach() for n, t in make(2, T, K=K, V=V, seed=seed, ln=ln).items()}
        state = RULE.state_from_final(x["h0"]) if from_state else RULE.init_state(2, H, K, V, device=DEV)
        o, st_ = _decode("triton", x, state, b, T)
        o_t, st_t = _decode("torch", x, state, b, T)
    # empty start, LN form: LN(0) divides by sqrt(ln_eps), so the first updates are ~1e3 and carry its rounding
    tol = dict(atol=1e-4, rtol=2e-4) if ln else STATE_TOL
    close(o, o_t, "decoded outputs", TOL)
    for name, a, e in zip(("S0", "S", "n"), st_, st_t):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        close(a, e, f"decode state {name}", tol)
    assert (st_[2] == T % b).all()


def test_step_continues_the_chunked_run():
    """Prefill with the Triton chunk kernel, decode with the Triton step: equals one chunked run over all tokens."""
    x = make(1, 11, seed=8)
    with torch.no_grad():
        o_all, S_all = run(RULE.chunk, x, mini_batch_size=4, backend="triton")
        pre = {n: (t[:, :8] if n != "h0" else t) for n, t in x.items()}
        _, S8 = run(RULE.chunk, pre, mini_batch_size=4, backend="triton")         # 8 tokens: two whole mini-batches
        rest = {n: (t[:, 8:] if n != "h0" else t) for n, t in x.items()}
        o, state = _decode("triton", rest, RULE.state_from_final(S8), 4, 3)
    close(o, o_all[:, 8:], "decoded outputs")
    close(RULE.final_from_state(state), S_all, "final state", STATE_TOL)


def test_step_auto_on_cpu_is_torch(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("auto picked the triton step on CPU")
    monkeypatch.setattr(type(RULE), "_step_triton", boom)
    x = make(1, 2, seed=9)
    if DEV == "cpu":
        _decode("auto", x, RULE.init_state(1, H, 8, 8), 4, 2)


def test_step_kernel_rejects_bad_inputs():
    from lsm_kernels.ttt import ttt_step
    q = torch.randn(1, H, 8, device=DEV)
    state = RULE.init_state(1, H, 8, 4, device=DEV)
    with pytest.raises(ValueError, match="K == V"):
        ttt_step(q, q, torch.randn(1, H, 4, device=DEV), torch.rand(1, H, device=DEV), state,
                 ln_weight=torch.ones(H, 4, device=DEV))
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_step(q, q, torch.randn(1, H, 4, device=DEV), torch.rand(1, H, device=DEV), state, mini_batch_size=0)


def test_chunk_kernel_rejects_bad_inputs_and_defaults_ln_parameters():
    """lsm_kernels.ttt.chunk_ttt_linear directly: the LN form needs K == V, the mini-batch fits one tile, and a
    missing ln_bias / ln_weight defaults to zeros / ones."""
    from lsm_kernels.ttt import chunk_ttt_linear
    q = F.normalize(torch.randn(1, 5, H, 8, device=DEV), dim=-1)
    eta = torch.rand(1, 5, H, device=DEV)
    with pytest.raises(ValueError, match="K == V"):
        chunk_ttt_linear(q, q, torch.randn(1, 5, H, 4, device=DEV), eta, ln_weight=torch.ones(H, 4, device=DEV))
    with pytest.raises(ValueError, match="mini_batch_size"):
        chunk_ttt_linear(q, q, q, eta, mini_batch_size=65)
    w = 1 + 0.3 * torch.randn(H, 8, device=DEV)
    with torch.no_grad():
        o_w = chunk_ttt_linear(q, q, q, eta, mini_batch_size=4, ln_weight=w)[0]
        o_wb = chunk_ttt_linear(q, q, q, eta, mini_batch_size=4, ln_weight=w, ln_bias=torch.zeros(H, 8, device=DEV))[0]
        o_b = chunk_ttt_linear(q, q, q, eta, mini_batch_size=4, ln_bias=torch.zeros(H, 8, device=DEV))[0]
        o_1 = chunk_ttt_linear(q, q, q, eta, mini_batch_size=4, ln_weight=torch.ones(H, 8, device=DEV))[0]
    close(o_w, o_wb, "ln_weight alone", dict(atol=0, rtol=0))
    close(o_b, o_1, "ln_bias alone", dict(atol=0, rtol=0))
