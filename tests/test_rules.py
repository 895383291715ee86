"""Every registered rule: its chunked form equals its recurrence.

Equal means: the same outputs and final state, for random T in 1..200 (not only multiples of the
chunk size), chunk sizes 16/32/64, with and without an initial state, packed variable-length
batches equal separate runs, and the same gradients for every input (gates, initial state).
All comparisons run in float64 on CPU; tolerances are stated per test.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import lsm.rules as R
from lsm.rules._chunking import ChunkLayout

RULES = R.names()
F64 = dict(dtype=torch.float64)
# float64 arithmetic: the chunked and token-by-token forms differ only by reassociation
ATOL, RTOL = 1e-9, 1e-7


def make_inputs(rule, B, T, H, K, V, seed, dtype=torch.float64, requires_grad=False):
    """Random q, k, v and the rule's gates (log-decays include strong decays down to ~exp(-8))."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    if rule.normalize_keys:
        k = F.normalize(k, dim=-1)
    gates = {}
    for name, spec in rule.gates.items():
        if not spec.required:
            continue
        shape = (B, T, H, K) if spec.per == "key" else (B, T, H)
        if spec.kind == "log_decay":
            gates[name] = F.logsigmoid(rnd(*shape) * 2 + 2)
        elif spec.kind == "rate":
            gates[name] = torch.sigmoid(rnd(*shape))
        else:
            gates[name] = rnd(*shape)
    tensors = {"q": q, "k": k, "v": v, **gates}
    if requires_grad:
        for t in tensors.values():
            t.requires_grad_(True)
    return tensors


def grads(out, inputs: dict, seed: int):
    """Gradients of a random linear functional of the outputs w.r.t. every input tensor (zeros where unused)."""
    gen = torch.Generator().manual_seed(seed + 1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum() for o in out if o is not None)
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:  # e.g. T = 0 and no initial state
        return {n: torch.zeros_like(inputs[n]) for n in names}
    gs = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(inputs[n]) if g is None else g for n, g in zip(names, gs)}


def assert_close(a, b, what, atol=ATOL, rtol=RTOL):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def split_call(fn, rule, inputs, h0, **kw):
    qkv = {n: inputs[n] for n in ("q", "k", "v")}
    gates = {n: t for n, t in inputs.items() if n not in qkv}
    return fn(qkv["q"], qkv["k"], qkv["v"], initial_state=h0, output_final_state=True, **gates, **kw)


@pytest.mark.parametrize("name", RULES)
@given(T=st.integers(1, 200), chunk_size=st.sampled_from([16, 32, 64]), with_h0=st.booleans(),
       B=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_chunk_equals_recurrent(name, T, chunk_size, with_h0, B, seed):
    """float64, atol 1e-9 / rtol 1e-7: outputs, final state and gradients of every input."""
    rule = R.get(name)
    H, K, V = 2, 8, 4
    inputs = make_inputs(rule, B, T, H, K, V, seed, requires_grad=True)
    h0 = torch.randn(B, H, K, V, **F64).requires_grad_() if with_h0 else None
    all_inputs = {**inputs, "h0": h0}
    o_r, S_r = split_call(rule.recurrent, rule, inputs, h0)
    o_c, S_c = split_call(rule.chunk, rule, inputs, h0, chunk_size=chunk_size, backend="torch")
    assert_close(o_c, o_r, f"{name} output")
    assert_close(S_c, S_r, f"{name} final state")
    g_r = grads((o_r, S_r), all_inputs, seed)
    g_c = grads((o_c, S_c), all_inputs, seed)
    for n in g_r:
        if n != "g" or with_h0 or T > 1:  # a decay of an empty state (T = 1, no h0) has no effect
            assert g_r[n].abs().sum() > 0, f"{name}: no gradient reaches `{n}` in the reference"
        assert_close(g_c[n], g_r[n], f"{name} grad of {n}")


@pytest.mark.parametrize("name", RULES)
@given(lens=st.lists(st.integers(0, 70), min_size=1, max_size=4), chunk_size=st.sampled_from([16, 32, 64]),
       with_h0=st.booleans(), seed=st.integers(0, 2**16))
def test_varlen_equals_separate_runs(name, lens, chunk_size, with_h0, seed):
    """A packed batch (B=1, cu_seqlens) equals running each sequence alone; float64, atol 1e-9."""
    rule = R.get(name)
    H, K, V = 2, 8, 4
    T = sum(lens)
    inputs = make_inputs(rule, 1, T, H, K, V, seed, requires_grad=True)
    cu = torch.tensor([0] + lens).cumsum(0)
    N = len(lens)
    h0 = torch.randn(N, H, K, V, **F64).requires_grad_() if with_h0 else None
    o_p, S_p = split_call(rule.chunk, rule, inputs, h0, cu_seqlens=cu, chunk_size=chunk_size, backend="torch")
    outs, finals = [], []
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        part = {k: t[:, a:b] for k, t in inputs.items()}
        o, S = split_call(rule.chunk, rule, part, None if h0 is None else h0[n:n + 1],
                          chunk_size=chunk_size, backend="torch")
        outs.append(o)
        finals.append(S)
    assert_close(o_p, torch.cat(outs, 1), f"{name} packed output")
    assert_close(S_p, torch.cat(finals, 0), f"{name} packed final states")
    # with a length bound the sequences are scanned side by side: same results
    o_m, S_m = split_call(rule.chunk, rule, inputs, h0, cu_seqlens=cu, chunk_size=chunk_size, backend="torch",
                          max_seqlen=max(lens) + seed % 40)
    assert_close(o_m, o_p, f"{name} packed output with max_seqlen")
    assert_close(S_m, S_p, f"{name} packed final states with max_seqlen")
    # the packed recurrence is the reference for gradients
    o_r, S_r = split_call(rule.recurrent, rule, inputs, h0, cu_seqlens=cu)
    all_inputs = {**inputs, "h0": h0}
    g_p = grads((o_p, S_p), all_inputs, seed)
    g_r = grads((o_r, S_r), all_inputs, seed)
    for n in g_r:
        assert_close(g_p[n], g_r[n], f"{name} packed grad of {n}")


@pytest.mark.parametrize("name", RULES)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=6), per_row=st.integers(1, 6),
       chunk_size=st.sampled_from([16, 32]), with_h0=st.booleans(), seed=st.integers(0, 2**16))
def test_every_chunk_layout_equals_recurrent(name, lens, per_row, chunk_size, with_h0, seed):
    """The torch form on every `ChunkLayout` of a packed batch: the static ones an accelerator builds (one row;
    one row per sequence under `max_seqlen`) and the exact ones built on CPU (those two, and `per_row`
    sequences one after another in each row, as MoM groups a sequence's memory segments) give the packed
    recurrence's outputs, final states and gradients. float64, atol 1e-9."""
    rule = R.get(name)
    H, K, V = 2, 8, 4
    T = sum(lens)
    inputs = make_inputs(rule, 1, T, H, K, V, seed, requires_grad=True)
    cu = torch.tensor([0] + lens).cumsum(0)
    h0 = torch.randn(len(lens), H, K, V, **F64).requires_grad_() if with_h0 else None
    all_inputs = {**inputs, "h0": h0}
    o_r, S_r = split_call(rule.recurrent, rule, inputs, h0, cu_seqlens=cu)
    g_r = grads((o_r, S_r), all_inputs, seed)
    q, k, v = (inputs[n] for n in "qkv")
    gates = rule._fill(q, {n: t for n, t in inputs.items() if n not in "qkv"})
    for max_seqlen, seqs_per_row, exact in [(None, None, False), (max(lens), None, False), (None, None, True),
                                            (max(lens), None, True), (max(lens), per_row, True)]:
        layout = ChunkLayout(1, T, chunk_size, cu, q.device, max_seqlen, seqs_per_row, exact)
        what = f"{name} layout max_seqlen={max_seqlen} seqs_per_row={seqs_per_row} exact={exact}"
        o, S = rule._chunk_torch(q, k, v, h0, rule._scale(None, q), layout, **gates)
        assert_close(o, o_r, f"{what}: output")
        assert_close(S, S_r, f"{what}: final states")
        g = grads((o, S), all_inputs, seed)
        for n in g_r:
            assert_close(g[n], g_r[n], f"{what}: grad of {n}")


@given(lens=st.lists(st.integers(0, 50), min_size=1, max_size=12), per_row=st.integers(1, 6),
       chunk_size=st.sampled_from([1, 4, 16]))
def test_chunk_layout_rows(lens, per_row, chunk_size):
    """Every token gets its own slot, a sequence's tokens sit in time order in one row from a chunk start,
    and the exact row length stays within the static bounds: ceil(max_seqlen / C) for one sequence per row,
    ceil(T / C) + N - 1 for one row, ceil(row length / C) + g - 1 for g sequences per row."""
    C, N, T = chunk_size, len(lens), sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0)
    ceil = lambda n: max(-(-n // C), 1)
    for max_seqlen, g, bound in [(max(lens), None, ceil(max(lens))), (None, None, ceil(T) + N - 1),
                                 (max(lens), per_row, max(ceil(sum(lens[i:i + per_row])) for i in range(0, N, per_row))
                                  + per_row - 1)]:
        exact = ChunkLayout(1, T, C, cu, torch.device("cpu"), max_seqlen, g, exact=True)
        static = ChunkLayout(1, T, C, cu, torch.device("cpu"), max_seqlen, g, exact=False)
        assert exact.NC <= bound and (g is not None or exact.NC <= static.NC == bound)
        assert exact.dest.unique().numel() == T
        row, col = exact.dest // (exact.NC * C), exact.dest % (exact.NC * C)
        for n in range(N):
            a, b = int(cu[n]), int(cu[n + 1])
            if b > a:
                assert (row[a:b] == row[a]).all() and (col[a:b] == col[a] + torch.arange(b - a)).all()
                assert col[a] % C == 0


@pytest.mark.parametrize("name", RULES)
@given(T=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_step_decoding_equals_recurrent(name, T, seed):
    """Decoding token by token with `step` from an empty state equals `recurrent`; float64, atol 1e-9."""
    rule = R.get(name)
    B, H, K, V = 2, 2, 8, 4
    inputs = make_inputs(rule, B, T, H, K, V, seed)
    o_r, S_r = split_call(rule.recurrent, rule, inputs, None)
    state = rule.init_state(B, H, K, V, dtype=torch.float64)
    outs = []
    for t in range(T):
        o, state = rule.step(**{n: x[:, t] for n, x in inputs.items()}, state=state)
        outs.append(o)
    assert_close(torch.stack(outs, 1), o_r, f"{name} decoded outputs")
    assert_close(rule.final_from_state(state), S_r, f"{name} decoded final state")


@pytest.mark.parametrize("name", RULES)
def test_continuation_from_final_state(name):
    """Prefix then continuation from the returned final state equals one run (prefix a multiple of 16)."""
    rule = R.get(name)
    B, T, H, K, V = 2, 57, 2, 8, 4
    inputs = make_inputs(rule, B, T, H, K, V, 3)
    o, S = split_call(rule.chunk, rule, inputs, None, backend="torch")
    cut = 32
    o1, S1 = split_call(rule.chunk, rule, {n: t[:, :cut] for n, t in inputs.items()}, None, backend="torch")
    o2, S2 = split_call(rule.chunk, rule, {n: t[:, cut:] for n, t in inputs.items()}, S1, backend="torch")
    assert_close(torch.cat([o1, o2], 1), o, f"{name} continued output")
    assert_close(S2, S, f"{name} continued state")


@pytest.mark.parametrize("name", RULES)
def test_float32_state_and_output_dtype(name):
    """bf16 inputs: outputs come back in bf16, states in float32."""
    rule = R.get(name)
    inputs = make_inputs(rule, 1, 20, 2, 8, 4, 0, dtype=torch.bfloat16)
    o, S = split_call(rule.chunk, rule, inputs, None, backend="torch")
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32


# ------------------------------------------------------------------ bad input

def _good(name):
    rule = R.get(name)
    return rule, make_inputs(rule, 1, 10, 2, 8, 4, 0)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("fn", ["recurrent", "chunk"])
def test_bad_shapes_and_dtypes(name, fn):
    rule, x = _good(name)
    call = getattr(rule, fn)
    q, k, v = x["q"], x["k"], x["v"]
    gates = {n: t for n, t in x.items() if n not in "qkv"}
    with pytest.raises(ValueError, match="`k`"):
        call(q, k[..., :4], v, **gates)
    with pytest.raises(ValueError, match="`v`"):
        call(q, k, v[:, :5], **gates)
    with pytest.raises(TypeError, match="one dtype"):
        call(q, k, v.float(), **gates)
    with pytest.raises(ValueError, match="`initial_state`"):
        call(q, k, v, initial_state=torch.zeros(1, 2, 8, 5, **F64), **gates)
    with pytest.raises(TypeError, match="unexpected argument `bogus`"):
        call(q, k, v, bogus=torch.zeros(1), **gates)
    for g, t in gates.items():
        with pytest.raises(TypeError, match=f"gate `{g}`"):
            call(q, k, v, **{**gates, g: t.long()})
        with pytest.raises(ValueError, match=f"gate `{g}`"):
            call(q, k, v, **{**gates, g: t[:, :3]})
        if rule.gates[g].kind == "log_decay":
            with pytest.raises(ValueError, match="<= 0"):
                call(q, k, v, **{**gates, g: t.abs() + 0.1})
    for g, spec in rule.gates.items():
        if spec.required:
            with pytest.raises(ValueError, match=f"gate `{g}` is required"):
                call(q, k, v, **{n: t for n, t in gates.items() if n != g})


@pytest.mark.parametrize("name", RULES)
def test_bad_cu_seqlens(name):
    rule, x = _good(name)
    q, k, v = x["q"], x["k"], x["v"]
    gates = {n: t for n, t in x.items() if n not in "qkv"}
    two = {n: torch.cat([t, t]) for n, t in x.items()}
    with pytest.raises(ValueError, match="batch size must be 1"):
        rule.chunk(two["q"], two["k"], two["v"], cu_seqlens=torch.tensor([0, 10]),
                   **{n: t for n, t in two.items() if n not in "qkv"})
    with pytest.raises(ValueError, match="non-decreasing"):
        rule.chunk(q, k, v, cu_seqlens=torch.tensor([0, 7, 3, 10]), **gates)
    with pytest.raises(ValueError, match="start at 0"):
        rule.chunk(q, k, v, cu_seqlens=torch.tensor([-2, 10]), **gates)
    with pytest.raises(ValueError, match="end at T"):
        rule.chunk(q, k, v, cu_seqlens=torch.tensor([0, 4]), **gates)
    with pytest.raises(TypeError, match="int32/int64"):
        rule.chunk(q, k, v, cu_seqlens=torch.tensor([0.0, 10.0]), **gates)
    with pytest.raises(ValueError, match="backend"):
        rule.chunk(q, k, v, backend="cuda", **gates)


def test_max_seqlen_shorter_than_a_sequence_is_an_error():
    rule, x = _good("mamba2")
    with pytest.raises(ValueError, match="max_seqlen"):
        rule.chunk(x["q"], x["k"], x["v"], g=x["g"], cu_seqlens=torch.tensor([0, 7, 10]), max_seqlen=5)
    with pytest.raises(ValueError, match="seqs_per_row"):
        rule.chunk(x["q"], x["k"], x["v"], g=x["g"], cu_seqlens=torch.tensor([0, 7, 10]), seqs_per_row=0)


def test_unknown_rule_lists_valid_ones():
    with pytest.raises(ValueError, match="Valid rules: .*gated_deltanet") as e:
        R.get("gated_delta_net")
    assert "Did you mean 'gated_deltanet'" in str(e.value)
    assert isinstance(e.value, KeyError)


def test_registry_has_the_required_rules():
    required = {"linear_attention", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "ttt", "lightning", "hgrn2"}
    assert required <= set(R.names())


# ------------------------------------------------------------------ against fla's plain-PyTorch references

def _fla_naive():
    try:
        from fla.ops.gla.naive import naive_recurrent_gla
        from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    except Exception as e:  # pragma: no cover - fla missing entirely
        pytest.fail(f"fla's naive references must import on CPU: {e}")
    return naive_recurrent_linear_attn, naive_recurrent_simple_gla, naive_recurrent_gla


@pytest.mark.parametrize("name", ["linear_attention", "retnet", "lightning", "mamba2", "gla", "hgrn2"])
def test_diag_family_matches_fla_naive(name):
    """Our chunked form against fla's float32 recurrences: float32, atol 1e-4 / rtol 1e-4."""
    lin, simple, gla = _fla_naive()
    rule = R.get(name)
    B, T, H, K, V = 2, 45, 3, 16, 8
    x = make_inputs(rule, B, T, H, K, V, 7, dtype=torch.float32)
    h0 = torch.randn(B, H, K, V)
    o, S = split_call(rule.chunk, rule, x, h0, chunk_size=16, backend="torch")
    if name == "linear_attention":
        o_f, S_f = lin(x["q"], x["k"], x["v"], initial_state=h0, output_final_state=True)
    elif name in ("retnet", "lightning"):
        g = rule._fill(x["q"], {})["g_gamma"].view(1, 1, H).expand(B, T, H)
        o_f, S_f = simple(x["q"], x["k"], x["v"], g, initial_state=h0, output_final_state=True)
    elif name == "mamba2":
        o_f, S_f = simple(x["q"], x["k"], x["v"], x["g"], initial_state=h0, output_final_state=True)
    else:
        o_f, S_f = gla(x["q"], x["k"], x["v"], x["g"], initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S, S_f, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ GPU: fla's Triton kernels

@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in RULES if R.get(n).has_fla])
@pytest.mark.parametrize("varlen", [False, True])
def test_fla_backend_matches_torch_on_gpu(name, varlen):
    """bf16 fla kernels against our float32 torch chunked form on the GPU: relative error < 2e-2."""
    rule = R.get(name)
    B, T, H, K, V = (1, 1000, 4, 64, 64) if varlen else (2, 777, 4, 64, 64)
    x = {n: t.cuda() for n, t in make_inputs(rule, B, T, H, K, V, 11, dtype=torch.float32).items()}
    cu = torch.tensor([0, 100, 101, 613, 1000], device="cuda") if varlen else None
    N = 4 if varlen else B
    h0 = torch.randn(N, H, K, V, device="cuda")
    for t in x.values():
        t.requires_grad_(True)
    h0.requires_grad_(True)
    ref = split_call(rule.chunk, rule, x, h0, cu_seqlens=cu, backend="torch")
    xb = {n: t.detach().bfloat16().requires_grad_() for n, t in x.items()}
    h0b = h0.detach().clone().requires_grad_()
    out = split_call(rule.chunk, rule, xb, h0b, cu_seqlens=cu, backend="fla")

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

    assert rel(out[0], ref[0]) < 2e-2 and rel(out[1], ref[1]) < 2e-2
    g_ref = grads(ref, {**x, "h0": h0}, 5)
    g_out = grads(tuple(o.float() for o in out), {**xb, "h0": h0b}, 5)
    for n in g_ref:
        assert rel(g_out[n], g_ref[n]) < 5e-2, f"{name} grad {n}: {rel(g_out[n], g_ref[n])}"


def test_auto_backend_policy(monkeypatch):
    """On CUDA, "auto" picks ours for the rules listed for the device's compute capability, fla's kernel
    where fla has the rule, else ours; on CPU always the torch form. (A stub stands in for a CUDA tensor.)"""
    import types

    import lsm.rules.backends as backends
    cuda_q = types.SimpleNamespace(is_cuda=True, device="cuda:0", requires_grad=True)
    monkeypatch.setattr(backends, "capability", lambda device: (9, 0))
    monkeypatch.setattr(backends, "has_fla", lambda: True)
    monkeypatch.setattr(backends, "TRITON_FIRST", {(9, 0): backends.TritonFirst(
        "a benchmark file", train=frozenset({"retnet", "mamba2"}), infer=frozenset({"retnet"}))})
    assert R.get("retnet").resolve_backend("auto", cuda_q) == "triton"
    assert R.get("mamba2").resolve_backend("auto", cuda_q) == "triton"          # training: ours
    with torch.no_grad():
        assert R.get("mamba2").resolve_backend("auto", cuda_q) == "fla"         # inference: fla's
        assert R.get("retnet").resolve_backend("auto", cuda_q) == "triton"
    assert R.get("gla").resolve_backend("auto", cuda_q) == "fla"
    monkeypatch.setattr(backends, "capability", lambda device: (8, 0))
    assert R.get("retnet").resolve_backend("auto", cuda_q) == "fla"
    monkeypatch.setattr(backends, "has_fla", lambda: False)
    assert R.get("gla").resolve_backend("auto", cuda_q) == "triton"
    for name in R.names():
        assert R.get(name).resolve_backend("auto", torch.zeros(1)) == "torch"


@pytest.mark.parametrize("name", R.names())
def test_backend_resolves_from_q_alone(name, monkeypatch):
    """`resolve_backend(backend, q)` with k, v and gates unknown (what a run's provenance asks before any batch):
    every rule answers for every backend with a name or a ValueError that says why, on CPU and on a (stub) GPU."""
    import types

    import lsm.rules.backends as backends
    rule = R.get(name)
    q = torch.zeros(1, requires_grad=True)
    for backend in ("torch", "triton", "auto"):
        assert rule.resolve_backend(backend, q) in ("torch", "triton")
    cuda_q = types.SimpleNamespace(is_cuda=True, device="cuda:0", requires_grad=True, dtype=torch.bfloat16,
                                   shape=(1, 1, 1, 64))
    monkeypatch.setattr(backends, "capability", lambda device: (9, 0))
    monkeypatch.setattr(backends, "has_fla", lambda: False)
    for backend in ("triton", "auto"):
        assert rule.resolve_backend(backend, cuda_q) in ("triton", "torch")


def test_triton_first_table_agrees_with_its_benchmark_file():
    """Every entry of the "auto" table is what its benchmark result says: a rule is listed for training
    (inference) exactly when our fwd+bwd (forward) time is at most fla's at every measured size."""
    import json
    from pathlib import Path

    from lsm.rules.backends import TRITON_FIRST

    root = Path(__file__).resolve().parent.parent
    assert TRITON_FIRST
    for cap, entry in TRITON_FIRST.items():
        rows = json.loads((root / entry.source).read_text())
        rules = {r["rule"] for r in rows}
        for mode, key in (("train", "fwdbwd"), ("infer", "fwd")):
            won = {n for n in rules if all(r.get(f"fla_{key}") is not None and r[f"triton_{key}"] <= r[f"fla_{key}"]
                                           for r in rows if r["rule"] == n)}
            assert getattr(entry, mode) == won, (cap, mode, entry.source)


def test_fla_deltanet_refuses_float32_with_a_clear_message():
    """fla's delta-rule kernel asserts on float32 inputs: our hook says so first (explicit backend='fla' raises
    it; 'auto' skips fla for such calls), and lets bf16 through."""
    rule = R.get("deltanet")
    q32 = torch.randn(1, 8, 2, 16)
    msg = rule.kernel_refusal("chunk", "fla", q32, q32, q32, {})
    assert msg is not None and "bf16" in msg and "backend='triton'" in msg
    assert rule.kernel_refusal("chunk", "fla", q32.bfloat16(), q32.bfloat16(), q32.bfloat16(), {}) is None
    assert R.get("gated_deltanet").kernel_refusal("chunk", "fla", q32, q32, q32, {}) is None


def test_auto_passes_over_fla_where_fla_refuses_the_gated_backward(monkeypatch):
    """fla 0.6 refuses the backward of its gated kernels (per-token decay g) on Hopper under Triton >= 3.4, < 3.7.1
    (found by the GPU matrix on the image's Triton 3.6.0): "auto" then trains on ours, backend="fla" raises one line
    before the forward (unless tilelang, which fla may hand that backward to, is installed); inference, unaffected
    Triton versions, other GPUs and rules without g keep fla."""
    import types

    import lsm.rules.backends as backends

    def cuda():
        return types.SimpleNamespace(is_cuda=True, device="cuda:0", requires_grad=True, dtype=torch.bfloat16)

    g = types.SimpleNamespace(requires_grad=True)
    monkeypatch.setattr(backends, "capability", lambda device: (9, 0))
    monkeypatch.setattr(backends, "has_fla", lambda: True)
    monkeypatch.setattr(backends, "fla_gated_backward_broken", lambda: True)
    monkeypatch.setattr(backends, "has_tilelang", lambda: False)
    monkeypatch.setattr(backends, "TRITON_FIRST", {})
    gdn = R.get("gated_deltanet")
    resolve = lambda rule, backend, **gates: backends.resolve_chunk(rule, backend, cuda(), cuda(), cuda(), gates)
    assert resolve(gdn, "auto", g=g, beta=g) == "triton"
    with pytest.raises(ValueError, match=r"gated_deltanet: flash-linear-attention refuses .*needs >= 3\.7\.1"):
        resolve(gdn, "fla", g=g, beta=g)
    with torch.no_grad():   # the forward alone is fine
        assert resolve(gdn, "auto", g=g, beta=g) == "fla"
    assert resolve(R.get("deltanet"), "auto", beta=g) == "fla"        # no g: fla's backward is not affected
    assert resolve(R.get("gla"), "auto", g=g) == "fla"                # fla's gla backward is its own kernel
    assert resolve(R.get("mamba2"), "auto", g=g) == "triton"
    monkeypatch.setattr(backends, "has_tilelang", lambda: True)
    assert resolve(gdn, "fla", g=g, beta=g) == "fla"                 # fla may run that backward through tilelang
    assert resolve(gdn, "auto", g=g, beta=g) == "triton"             # auto does not count on it
    monkeypatch.setattr(backends, "has_tilelang", lambda: False)
    monkeypatch.setattr(backends, "fla_gated_backward_broken", lambda: False)
    assert resolve(gdn, "auto", g=g, beta=g) == "fla"
    monkeypatch.setattr(backends, "fla_gated_backward_broken", lambda: True)
    monkeypatch.setattr(backends, "capability", lambda device: (8, 0))
    assert resolve(gdn, "auto", g=g, beta=g) == "fla"
