"""Triton kernels of the diagonal-decay family (lsm_kernels.diag / .decode) against the torch references.

Without a GPU these run under TRITON_INTERPRET=1 (set by conftest.py) on tiny float32 shapes; the
`gpu` tests race bf16 kernels at real sizes against the float32 reference and against fla.
"""
import pytest
import torch
import torch.nn.functional as F

from lsm import rules

DIAG = ["linear_attention", "retnet", "lightning", "gla", "hgrn2", "mamba2"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gates(rule, B, T, H, K, device, strength=1.0, gamma_grad=False):
    """Random per-token gates of `rule` (log-decays <= 0), `[B, T, H]` or `[B, T, H, K]`."""
    out = {}
    for name, spec in rule.gates.items():
        if name == "g_gamma":
            if gamma_grad:
                out[name] = (-torch.rand(H, device=device) * strength).requires_grad_()
            continue
        shape = (B, T, H, K) if spec.per == "key" else (B, T, H)
        out[name] = (F.logsigmoid(torch.randn(shape, device=device) + 2) * strength).requires_grad_()
    return out


def _inputs(B, T, H, K, V, N, device, dtype=torch.float32):
    q, k = (torch.randn(B, T, H, K, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, V, device=device, dtype=dtype).requires_grad_()
    h0 = torch.randn(N, H, K, V, device=device).requires_grad_()
    return q, k, v, h0


def _run(rule, backend, q, k, v, h0, gates, cu, chunk_size, do, dht):
    o, S = rule.chunk(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=chunk_size,
                      backend=backend, **gates)
    leaves = [q, k, v, h0, *gates.values()]
    grads = torch.autograd.grad((o.float() * do).sum() + (S * dht).sum(), leaves)
    return o, S, grads


def _assert_close(got, want, name, atol=2e-4, rtol=2e-4):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# (B, T, cu_seqlens, chunk size): ragged T (not a multiple of the chunk), packed sequences (one empty)
CASES = {"ragged": (2, 29, None, 16), "varlen": (1, 40, [0, 5, 5, 23, 40], 32)}
# hgrn2 runs gla's kernels with other gate inputs: one case is enough
CHUNK_PARAMS = [(n, c) for n in DIAG for c in CASES if not (n == "hgrn2" and c == "varlen")]


@pytest.mark.parametrize("name,case", CHUNK_PARAMS)
def test_chunk_matches_torch(name, case):
    torch.manual_seed(0)
    rule = rules.get(name)
    B, T, cu, C = CASES[case]
    H, K, V = 2, 12, 16
    cu = None if cu is None else torch.tensor(cu, device=DEV, dtype=torch.int32)
    N = B if cu is None else cu.numel() - 1
    q, k, v, h0 = _inputs(B, T, H, K, V, N, DEV)
    gates = _gates(rule, B, T, H, K, DEV, gamma_grad=case == "varlen")
    do = torch.randn(B, T, H, V, device=DEV)
    dht = torch.randn(N, H, K, V, device=DEV)
    o, S, grads = _run(rule, "triton", q, k, v, h0, gates, cu, C, do, dht)
    o_ref, S_ref, grads_ref = _run(rule, "torch", q, k, v, h0, gates, cu, C, do, dht)
    _assert_close(o, o_ref, "o")
    _assert_close(S, S_ref, "final state")
    for n, a, b in zip(["dq", "dk", "dv", "dh0", *gates], grads, grads_ref):
        _assert_close(a, b, n)


@pytest.mark.parametrize("name", ["gla", "hgrn2"])
def test_chunk_per_key_decay_sub_chunks(name):
    """Chunk 64 (four 16-token sub-chunks, so every off-diagonal sub-chunk pair of the intra-chunk kernels),
    per-key log-decays down to -20 per token, packed sequences with initial states: outputs, final states
    and all gradients against the torch form (float32, atol 2e-4)."""
    torch.manual_seed(3)
    rule = rules.get(name)
    H, K, V = 1, 16, 16
    cu = torch.tensor([0, 3, 70, 100], device=DEV, dtype=torch.int32)
    T, N = 100, 3
    q, k, v, h0 = _inputs(1, T, H, K, V, N, DEV)
    gates = {"g": (-20 * torch.rand(1, T, H, K, device=DEV) ** 2).requires_grad_()}
    do = torch.randn(1, T, H, V, device=DEV)
    dht = torch.randn(N, H, K, V, device=DEV)
    o, S, grads = _run(rule, "triton", q, k, v, h0, gates, cu, 64, do, dht)
    o_ref, S_ref, grads_ref = _run(rule, "torch", q, k, v, h0, gates, cu, 64, do, dht)
    _assert_close(o, o_ref, "o")
    _assert_close(S, S_ref, "final state")
    for n, a, b in zip(["dq", "dk", "dv", "dh0", "dg"], grads, grads_ref):
        _assert_close(a, b, n)


@pytest.mark.parametrize("name", ["mamba2", "gla"])
def test_chunk_strong_decay_tiled(name, monkeypatch):
    """Decays down to exp(-40) per token stay finite; K and V span several 16-wide tiles; no initial state."""
    import lsm_kernels.diag as kd
    monkeypatch.setattr(kd, "_blocks", lambda K, V: (16, 16))
    torch.manual_seed(1)
    rule = rules.get(name)
    B, T, H, K, V = 1, 24, 1, 32, 40
    q, k, v, _ = _inputs(B, T, H, K, V, B, DEV)
    gates = _gates(rule, B, T, H, K, DEV, strength=20.0)
    outs = [rule.chunk(q, k, v, output_final_state=True, chunk_size=16, backend=b, **gates) for b in ("triton", "torch")]
    do = torch.randn(B, T, H, V, device=DEV)
    grads = [torch.autograd.grad((o * do).sum(), [q, k, v, *gates.values()]) for o, _ in outs]
    _assert_close(outs[0][0], outs[1][0], "o")
    _assert_close(outs[0][1], outs[1][1], "final state")
    for n, a, b in zip(["dq", "dk", "dv", "dg"], *grads):
        _assert_close(a, b, n, atol=1e-3)


@pytest.mark.parametrize("name", DIAG)
def test_step_matches_torch(name):
    torch.manual_seed(2)
    rule = rules.get(name)
    B, H, K, V = 3, 2, 12, 20
    q, k = torch.randn(B, H, K, device=DEV), torch.randn(B, H, K, device=DEV)
    v = torch.randn(B, H, V, device=DEV)
    gates = {n: t[:, 0].detach() for n, t in _gates(rule, B, 1, H, K, DEV).items()}
    state = (torch.randn(B, H, K, V, device=DEV),)
    before = state[0].clone()
    o, (S,) = rule.step(q, k, v, state, backend="triton", **gates)
    o_ref, (S_ref,) = rule.step(q, k, v, state, backend="torch", **gates)
    torch.testing.assert_close(state[0], before, msg="rule.step must not modify the state it is given")
    _assert_close(o, o_ref, "o", atol=1e-5, rtol=1e-5)
    _assert_close(S, S_ref, "state", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["none", "gamma", "scalar", "vector", "delta", "gated_delta"])
def test_mom_step_matches_loop(kind):
    """The MoM decode kernel updates exactly the selected memories + the shared one, and mixes their readouts."""
    from lsm.rules._delta import delta_step
    from lsm.rules._diag import diag_step
    from lsm_kernels.decode import mom_step

    torch.manual_seed(3)
    B, M, topk, H, K, V = 3, 4, 2, 2, 12, 20
    S_ = topk + 1
    states = torch.randn(B, M + 1, H, K, V, device=DEV)
    q = torch.randn(B, H, K, device=DEV)
    k = F.normalize(torch.randn(B, M + 1, H, K, device=DEV), dim=-1)    # every memory's row; the kernel picks
    v = torch.randn(B, M + 1, H, V, device=DEV)
    idx = torch.stack([torch.randperm(M)[:topk] for _ in range(B)]).to(DEV)
    w = torch.rand(B, topk, device=DEV).softmax(-1)
    g = {"scalar": -torch.rand(B, M + 1, H, device=DEV), "vector": -torch.rand(B, M + 1, H, K, device=DEV),
         "gated_delta": -torch.rand(B, M + 1, H, device=DEV)}.get(kind)
    g_gamma = -torch.rand(H, device=DEV) if kind == "gamma" else None
    beta = torch.rand(B, M + 1, H, device=DEV) if kind in ("delta", "gated_delta") else None

    ref, o_ref = states.clone(), torch.zeros(B, H, V, device=DEV)
    for b in range(B):
        for s in range(S_):
            m, ws = (int(idx[b, s]), w[b, s]) if s < topk else (M, 1.0)
            gs = g[b:b + 1, m] if g is not None else (g_gamma[None] if g_gamma is not None else None)
            if beta is None:
                o, new = diag_step(q[b:b + 1], k[b:b + 1, m], v[b:b + 1, m], ref[b:b + 1, m], 0.5, gs)
            else:
                o, new = delta_step(q[b:b + 1], k[b:b + 1, m], v[b:b + 1, m], ref[b:b + 1, m], 0.5, beta[b:b + 1, m], gs)
            ref[b, m] = new[0]
            o_ref[b] += ws * o[0]
    o = mom_step(q, k, v, states, idx, w, 0.5, g=g, g_gamma=g_gamma, beta=beta)
    _assert_close(o, o_ref, "o", atol=1e-5, rtol=1e-5)
    _assert_close(states, ref, "states", atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- GPU
def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("KV", [64, 128, 256])
@pytest.mark.parametrize("name", DIAG)
def test_gpu_bf16_vs_fp32_reference(name, KV):
    """bf16 kernels at real sizes (ragged packed batch, initial state) against the float32 torch reference."""
    torch.manual_seed(4)
    rule = rules.get(name)
    T, H, K, V = 3000, 4, KV, KV
    cu = torch.tensor([0, 1000, 1001, 2500, 3000], device="cuda", dtype=torch.int32)
    N = cu.numel() - 1
    q, k, v, h0 = _inputs(1, T, H, K, V, N, "cuda", torch.bfloat16)
    with torch.no_grad():
        k.copy_(F.normalize(k.float(), dim=-1))   # keep states O(1) over long sequences
        q.copy_(F.normalize(q.float(), dim=-1))
    gates = _gates(rule, 1, T, H, K, "cuda")
    do = torch.randn(1, T, H, V, device="cuda")
    dht = torch.randn(N, H, K, V, device="cuda")
    o, S, grads = _run(rule, "triton", q, k, v, h0, gates, cu, 64, do, dht)
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v, h0)]
    g32 = {n: t.detach().float().requires_grad_() for n, t in gates.items()}
    o_ref, S_ref, grads_ref = _run(rule, "torch", *f32, g32, cu, 64, do, dht)
    assert _rel(o, o_ref) < 2e-2, _rel(o, o_ref)
    assert _rel(S, S_ref) < 2e-2, _rel(S, S_ref)
    for n, a, b in zip(["dq", "dk", "dv", "dh0", *gates], grads, grads_ref):
        # gate gradients are reverse cumulative sums of differences (q dq - k dk): bf16 rounding shows more there
        assert _rel(a, b) < (5e-2 if n in gates else 3e-2), (n, _rel(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", DIAG)
def test_gpu_matches_fla(name):
    torch.manual_seed(5)
    rule = rules.get(name)
    B, T, H, K, V = 2, 2048, 8, 128, 128
    q, k, v, h0 = _inputs(B, T, H, K, V, B, "cuda", torch.bfloat16)
    gates = {n: t.detach() for n, t in _gates(rule, B, T, H, K, "cuda").items()}
    with torch.no_grad():
        o, S = rule.chunk(q, k, v, initial_state=h0, output_final_state=True, backend="triton", **gates)
        o_f, S_f = rule.chunk(q, k, v, initial_state=h0, output_final_state=True, backend="fla", **gates)
    assert _rel(o, o_f) < 2e-2 and _rel(S, S_f) < 2e-2, (_rel(o, o_f), _rel(S, S_f))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", DIAG)
def test_gpu_step_bf16(name):
    torch.manual_seed(6)
    rule = rules.get(name)
    B, H, K, V = 8, 16, 128, 128
    q, k, v = (torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16) for D in (K, K, V))
    gates = {n: t[:, 0].detach() for n, t in _gates(rule, B, 1, H, K, "cuda").items()}
    state = (torch.randn(B, H, K, V, device="cuda"),)
    o, (S,) = rule.step(q, k, v, state, backend="triton", **gates)
    o_ref, (S_ref,) = rule.step(q, k, v, state, backend="torch", **gates)
    assert _rel(o, o_ref) < 1e-2 and _rel(S, S_ref) < 1e-4
