"""The delta family (deltanet, gated_deltanet): what the generic chunk-vs-recurrent tests do not cover.

- agreement with flash-linear-attention's plain-PyTorch references (they compute in float32),
- the WY/UT solve: a chunk's transition equals the ordered product of its factors
  `a_i (I - beta_i k_i k_i^T)`, at chunk sizes 16/32/64,
- numerical safety: strong decays (down to exp(-1e3) per token) and beta in [0, 2],
- gradients through the triangular solve (torch.autograd.gradcheck), decode steps, gate modules.
Everything runs in float64 on CPU unless stated; tolerances are given in each test.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lsm.rules as R
from lsm.rules._chunking import ChunkLayout
from lsm.rules._delta import delta_chunk
from lsm.rules.gates import Mamba2Gate

DELTA = ["deltanet", "gated_deltanet"]
F64 = dict(dtype=torch.float64)


def inputs(name, B, T, H, K, V, seed, beta_max=1.0, g_scale=1.0, dtype=torch.float64):
    """q, k (unit), v, beta in [0, beta_max], g = -g_scale * U(0, 1) (gated only)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    gates = {"beta": torch.rand(B, T, H, generator=gen, dtype=dtype) * beta_max}
    if name == "gated_deltanet":
        gates["g"] = -torch.rand(B, T, H, generator=gen, dtype=dtype) * g_scale
    return q, k, v, gates


def close(a, b, atol, rtol=0.0, what=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ fla's references
fla_gdn_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
fla_dn_naive = pytest.importorskip("fla.ops.delta_rule.naive")


@given(T=st.integers(1, 80), with_h0=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_gated_deltanet_matches_fla_naive(T, with_h0, seed):
    """fla's naive recurrent and naive chunk gated delta rule (float32): atol 2e-5 on o and S."""
    B, H, K, V = 2, 2, 8, 4
    q, k, v, gates = inputs("gated_deltanet", B, T, H, K, V, seed, beta_max=1.0, g_scale=2.0)
    h0 = torch.randn(B, H, K, V, **F64) if with_h0 else None
    o, S = R.get("gated_deltanet").chunk(q, k, v, h0, True, chunk_size=16, backend="torch", **gates)
    f32 = lambda t: None if t is None else t.float()
    o_r, S_r = fla_gdn_naive.naive_recurrent_gated_delta_rule(
        f32(q), f32(k), f32(v), f32(gates["beta"]), f32(gates["g"]), initial_state=f32(h0), output_final_state=True)
    close(o.float(), o_r, 2e-5, 1e-5, "o vs fla naive recurrent")
    close(S.float(), S_r, 2e-5, 1e-5, "S vs fla naive recurrent")
    o_c, S_c = fla_gdn_naive.naive_chunk_gated_delta_rule(
        f32(q), f32(k), f32(v), f32(gates["g"]), f32(gates["beta"]), chunk_size=16, initial_state=f32(h0),
        output_final_state=True)
    close(o.float(), o_c, 2e-5, 1e-5, "o vs fla naive chunk")
    close(S.float(), S_c, 2e-5, 1e-5, "S vs fla naive chunk")


@given(n_chunks=st.integers(1, 4), seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_deltanet_matches_fla_naive(n_chunks, seed):
    """fla's delta_rule_recurrence and delta_rule_chunkwise ([B, H, T, K] layout, float32): atol 2e-5."""
    B, H, K, V, C = 2, 2, 8, 4, 16
    T = n_chunks * C
    q, k, v, gates = inputs("deltanet", B, T, H, K, V, seed)
    h0 = torch.randn(B, H, K, V, **F64)
    rule = R.get("deltanet")
    o, S = rule.chunk(q, k, v, h0, True, chunk_size=C, backend="torch", **gates)
    hm = lambda t: t.transpose(1, 2).float().contiguous()                   # [B, T, H, *] -> [B, H, T, *]
    o_r, S_r = fla_dn_naive.delta_rule_recurrence(hm(q), hm(k), hm(v), hm(gates["beta"]), h0.float())
    close(o.float(), o_r.transpose(1, 2), 2e-5, 1e-5, "o vs fla delta_rule_recurrence")
    close(S.float(), S_r, 2e-5, 1e-5, "S vs fla delta_rule_recurrence")
    o0, S0 = rule.chunk(q, k, v, None, True, chunk_size=C, backend="torch", **gates)
    o_c, S_c = fla_dn_naive.delta_rule_chunkwise(hm(q), hm(k), hm(v), hm(gates["beta"]), chunk_size=C)
    close(o0.float(), o_c.transpose(1, 2), 2e-5, 1e-5, "o vs fla delta_rule_chunkwise")
    close(S0.float(), S_c, 2e-5, 1e-5, "S vs fla delta_rule_chunkwise")


# ------------------------------------------------------------------ the WY/UT solve
@pytest.mark.parametrize("name", DELTA)
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("extra", [0, 5])
def test_wy_transition_is_product_of_factors(name, chunk_size, extra):
    """With v = 0 and S0 = I, the final state is the ordered product prod_t a_t (I - beta_t k_t k_t^T):
    the WY form `I - K^T W` of each chunk, chained over 1-4 chunks. float64, atol 1e-10."""
    B, H, K = 1, 2, 8
    T = chunk_size * (1 if extra == 0 else 3) + extra
    q, k, v, gates = inputs(name, B, T, H, K, K, seed=chunk_size + extra, beta_max=2.0, g_scale=0.1)
    v = torch.zeros_like(v)
    eye = torch.eye(K, **F64).expand(B, H, K, K)
    _, S = R.get(name).chunk(q, k, v, eye.clone(), True, chunk_size=chunk_size, backend="torch", **gates)
    P = eye.clone()
    for t in range(T):
        kt, bt = k[:, t], gates["beta"][:, t]                                     # [B, H, K], [B, H]
        factor = eye - bt[..., None, None] * kt[..., :, None] * kt[..., None, :]
        if "g" in gates:
            factor = gates["g"][:, t].exp()[..., None, None] * factor
        P = factor @ P
    close(S, P, 1e-10, 0, "transition")


@pytest.mark.parametrize("name", DELTA)
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_sizes_agree(name, chunk_size):
    """T = 150 (ragged for every size), beta in [0, 2], initial state: chunk == recurrent, atol 1e-9."""
    q, k, v, gates = inputs(name, 2, 150, 2, 16, 8, seed=chunk_size, beta_max=2.0, g_scale=1.0)
    h0 = torch.randn(2, 2, 16, 8, **F64)
    rule = R.get(name)
    o_r, S_r = rule.recurrent(q, k, v, h0, True, **gates)
    o_c, S_c = rule.chunk(q, k, v, h0, True, chunk_size=chunk_size, backend="torch", **gates)
    close(o_c, o_r, 1e-9, 1e-9, "o")
    close(S_c, S_r, 1e-9, 1e-9, "S")


# ------------------------------------------------------------------ numerical safety
@given(log10_rate=st.floats(0.0, 3.0), chunk_size=st.sampled_from([16, 64]), seed=st.integers(0, 2**16))
@settings(max_examples=12)
def test_strong_decays_finite_and_exact(log10_rate, chunk_size, seed):
    """Per-token log-decays down to -1e3 (a_t ~ exp(-1000)): no inf/NaN in o, S or gradients,
    chunk == recurrent within atol 1e-9 (float64)."""
    rule = R.get("gated_deltanet")
    q, k, v, gates = inputs("gated_deltanet", 1, 70, 2, 8, 4, seed, beta_max=2.0, g_scale=10.0 ** log10_rate)
    h0 = torch.randn(1, 2, 8, 4, **F64)
    for t in (q, k, v, h0, *gates.values()):
        t.requires_grad_(True)
    o_c, S_c = rule.chunk(q, k, v, h0, True, chunk_size=chunk_size, backend="torch", **gates)
    o_r, S_r = rule.recurrent(q, k, v, h0, True, **gates)
    assert torch.isfinite(o_c).all() and torch.isfinite(S_c).all()
    close(o_c, o_r, 1e-9, 1e-9, "o")
    close(S_c, S_r, 1e-9, 1e-9, "S")
    leaves = [q, k, v, h0, *gates.values()]
    g_c = torch.autograd.grad((o_c.sum() + S_c.sum()), leaves)
    g_r = torch.autograd.grad((o_r.sum() + S_r.sum()), leaves)
    for n, a, b in zip(["q", "k", "v", "h0", *gates], g_c, g_r):
        assert torch.isfinite(a).all(), n
        close(a, b, 1e-8, 1e-8, f"grad {n}")


@pytest.mark.parametrize("name", DELTA)
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_beta_range_is_non_expansive(name, beta):
    """Unit keys, beta in {0, 1, 2}, v = 0: every factor has spectral norm <= 1, so the state norm never
    grows over T = 256 (beta = 2 is a reflection and keeps it exactly for deltanet); chunk == recurrent."""
    rule = R.get(name)
    q, k, v, gates = inputs(name, 1, 256, 2, 8, 4, seed=7, g_scale=0.05)
    gates["beta"] = torch.full_like(gates["beta"], beta)
    v = torch.zeros_like(v)
    h0 = torch.randn(1, 2, 8, 4, **F64)
    _, S = rule.chunk(q, k, v, h0, True, chunk_size=64, backend="torch", **gates)
    _, S_r = rule.recurrent(q, k, v, h0, True, **gates)
    close(S, S_r, 1e-9, 1e-9, "S")
    n0, n1 = h0.norm(dim=(-2, -1)), S.norm(dim=(-2, -1))
    assert (n1 <= n0 * (1 + 1e-9)).all()
    if beta in (0.0, 2.0) and name == "deltanet":
        close(n1, n0, 1e-9, 1e-9, "orthogonal factors keep the norm")


@pytest.mark.parametrize("name", DELTA)
def test_beta_zero_and_g_zero(name):
    """beta = 0: no write, the state only decays; gated_deltanet with g = 0 equals deltanet. atol 1e-12."""
    rule = R.get(name)
    q, k, v, gates = inputs(name, 2, 40, 2, 8, 4, seed=3)
    h0 = torch.randn(2, 2, 8, 4, **F64)
    zero = {**gates, "beta": torch.zeros_like(gates["beta"])}
    _, S = rule.chunk(q, k, v, h0, True, chunk_size=16, backend="torch", **zero)
    decay = gates["g"].sum(1).exp()[..., None, None] if "g" in gates else 1.0
    close(S, decay * h0, 1e-12, 1e-12, "beta = 0")
    if name == "gated_deltanet":
        o1, S1 = rule.chunk(q, k, v, h0, True, chunk_size=16, backend="torch",
                            beta=gates["beta"], g=torch.zeros_like(gates["g"]))
        o2, S2 = R.get("deltanet").chunk(q, k, v, h0, True, chunk_size=16, backend="torch", beta=gates["beta"])
        close(o1, o2, 1e-12, 1e-12, "o")
        close(S1, S2, 1e-12, 1e-12, "S")


# ------------------------------------------------------------------ gradients, steps, gates
@pytest.mark.parametrize("name", DELTA)
def test_gradcheck_chunk(name):
    """torch.autograd.gradcheck of the chunked form (two chunks of 4, ragged, varlen, initial state)."""
    q, k, v, gates = inputs(name, 1, 11, 1, 3, 2, seed=11, beta_max=2.0)
    h0 = torch.randn(2, 1, 3, 2, **F64)
    cu = torch.tensor([0, 6, 11])
    names = ["beta", "g"][: len(gates)]
    layout = ChunkLayout(1, 11, 4, cu, q.device)

    def fn(q, k, v, h0, *gs):
        return delta_chunk(q, k, v, h0, 0.7, layout, *gs)

    args = [t.clone().requires_grad_() for t in (q, k, v, h0, *(gates[n] for n in names))]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", DELTA)
def test_decode_steps_continue_chunk(name):
    """chunk over 25 tokens, then 7 decode steps from its final state == chunk over all 32. atol 1e-10."""
    rule = R.get(name)
    q, k, v, gates = inputs(name, 2, 32, 2, 8, 4, seed=5, beta_max=2.0)
    o_all, S_all = rule.chunk(q, k, v, None, True, chunk_size=16, backend="torch", **gates)
    _, S = rule.chunk(q[:, :25], k[:, :25], v[:, :25], None, True, chunk_size=16, backend="torch",
                      **{n: t[:, :25] for n, t in gates.items()})
    state = rule.state_from_final(S)
    for t in range(25, 32):
        o, state = rule.step(q[:, t], k[:, t], v[:, t], state, **{n: x[:, t] for n, x in gates.items()})
        close(o, o_all[:, t], 1e-10, 1e-10, f"o[{t}]")
    close(rule.final_from_state(state), S_all, 1e-10, 1e-10, "S")


def test_gate_modules():
    """deltanet -> {beta in (0, 1)}; gated_deltanet -> {beta, g <= 0}, with g from Mamba2Gate; both [B, T, H]."""
    x = torch.randn(2, 5, 16)
    dn = R.get("deltanet").gate_module(16, 4, 8)
    out = dn(x)
    assert set(out) == {"beta"} and out["beta"].shape == (2, 5, 4)
    assert ((out["beta"] > 0) & (out["beta"] < 1)).all()
    gdn = R.get("gated_deltanet").gate_module(16, 4, 8)
    assert any(isinstance(m, Mamba2Gate) for m in gdn.modules())
    out = gdn(x)
    assert set(out) == {"beta", "g"}
    assert out["beta"].shape == out["g"].shape == (2, 5, 4)
    assert (out["g"] <= 0).all() and ((out["beta"] > 0) & (out["beta"] < 1)).all()
    for name in DELTA:
        rule = R.get(name)
        assert rule.normalize_keys and rule.has_fla
        assert all(s.per == "head" for s in rule.gates.values())


# ------------------------------------------------------------------ fla kernels (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("name", DELTA)
@pytest.mark.parametrize("varlen", [False, True])
def test_fla_backend_matches_torch(name, varlen):
    """backend='fla' vs the torch chunked form, float32 on GPU: atol 2e-3 (fla uses tf32 dots)."""
    rule = R.get(name)
    B, T = (1, 300) if varlen else (2, 150)
    q, k, v, gates = inputs(name, B, T, 4, 64, 64, seed=0, dtype=torch.float32)
    cuda = lambda t: t.cuda()
    q, k, v = map(cuda, (q, k, v))
    gates = {n: cuda(t) for n, t in gates.items()}
    cu = torch.tensor([0, 100, 117, 300], device="cuda") if varlen else None
    N = 3 if varlen else B
    h0 = torch.randn(N, 4, 64, 64, device="cuda")
    o_f, S_f = rule.chunk(q, k, v, h0, True, cu_seqlens=cu, backend="fla", **gates)
    o_t, S_t = rule.chunk(q, k, v, h0, True, cu_seqlens=cu, backend="torch", **gates)
    close(o_f.float(), o_t.float(), 2e-3, 2e-3, "o")
    close(S_f.float(), S_t.float(), 2e-3, 2e-3, "S")
