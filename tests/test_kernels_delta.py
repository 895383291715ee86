"""Triton kernels of the delta family (lsm_kernels.delta) against the torch reference (`backend="torch"`).

Without a GPU these run under TRITON_INTERPRET=1 (set by conftest.py) on tiny float32 shapes; the
`gpu` tests race bf16 kernels at real sizes against the float32 reference and against fla.
"""
import pytest
import torch
import torch.nn.functional as F

from lsm import rules

DELTA = ["deltanet", "gated_deltanet"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(name, B, T, H, K, V, N, device, dtype=torch.float32, beta_max=1.0, strength=1.0):
    """q, unit k, v, h0 and the gates (beta in [0, beta_max], log-decays <= 0); all leaves require grad."""
    q = torch.randn(B, T, H, K, device=device, dtype=dtype).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1).to(dtype).requires_grad_()
    v = torch.randn(B, T, H, V, device=device, dtype=dtype).requires_grad_()
    h0 = torch.randn(N, H, K, V, device=device).requires_grad_()
    gates = {"beta": (torch.rand(B, T, H, device=device) * beta_max).to(dtype).requires_grad_()}
    if name == "gated_deltanet":
        gates["g"] = (F.logsigmoid(torch.randn(B, T, H, device=device) + 2) * strength).requires_grad_()
    return q, k, v, h0, gates


def _run(rule, backend, q, k, v, h0, gates, cu, chunk_size, do, dht):
    o, S = rule.chunk(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=chunk_size,
                      backend=backend, **gates)
    leaves = [q, k, v, *([h0] if h0 is not None else []), *gates.values()]
    grads = torch.autograd.grad((o.float() * do).sum() + (S * dht).sum(), leaves)
    return o, S, grads


def _assert_close(got, want, name, atol=2e-4, rtol=2e-4):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# (B, T, cu_seqlens, chunk size): ragged T (not a multiple of the chunk), packed sequences (one empty)
CASES = {"ragged": (2, 29, None, 16), "varlen": (1, 40, [0, 5, 5, 23, 40], 32)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", DELTA)
def test_chunk_matches_torch(name, case):
    """Outputs, final states and gradients in q, k, v, h0, beta, g, with an initial state."""
    torch.manual_seed(0)
    rule = rules.get(name)
    B, T, cu, C = CASES[case]
    H, K, V = 2, 12, 16
    cu = None if cu is None else torch.tensor(cu, device=DEV, dtype=torch.int32)
    N = B if cu is None else cu.numel() - 1
    q, k, v, h0, gates = _inputs(name, B, T, H, K, V, N, DEV)
    do = torch.randn(B, T, H, V, device=DEV)
    dht = torch.randn(N, H, K, V, device=DEV)
    o, S, grads = _run(rule, "triton", q, k, v, h0, gates, cu, C, do, dht)
    o_ref, S_ref, grads_ref = _run(rule, "torch", q, k, v, h0, gates, cu, C, do, dht)
    _assert_close(o, o_ref, "o")
    _assert_close(S, S_ref, "final state", atol=1e-4, rtol=1e-4)
    for n, a, b in zip(["dq", "dk", "dv", "dh0", *gates], grads, grads_ref):
        _assert_close(a, b, n)


def test_chunk_tiled_strong_decay(monkeypatch):
    """K and V span several tiles (partial V-tile sums in the backward), decays down to exp(-40) per token,
    beta up to 2, no initial state, the gradient of the final state only."""
    import lsm_kernels.delta as kd
    monkeypatch.setattr(kd, "_blocks", lambda K, V: (16, 16))
    monkeypatch.setattr(kd, "_state_blocks", lambda K, V: (32, 16))
    torch.manual_seed(1)
    rule = rules.get("gated_deltanet")
    B, T, H, K, V = 1, 24, 1, 32, 40
    q, k, v, _, gates = _inputs("gated_deltanet", B, T, H, K, V, B, DEV, beta_max=2.0, strength=20.0)
    dht = torch.randn(B, H, K, V, device=DEV)
    outs = [rule.chunk(q, k, v, output_final_state=True, chunk_size=16, backend=b, **gates)
            for b in ("triton", "torch")]
    _assert_close(outs[0][0], outs[1][0], "o")
    _assert_close(outs[0][1], outs[1][1], "final state")
    grads = [torch.autograd.grad((S * dht).sum(), [q, k, v, *gates.values()], allow_unused=True) for _, S in outs]
    for n, a, b in zip(["dq", "dk", "dv", "dbeta", "dg"], *grads):
        if b is None or not b.any():
            assert a is None or not a.any(), n
            continue
        _assert_close(a, b, n, atol=1e-3)


@pytest.mark.parametrize("BT", [16, 32, 64])
def test_blocked_inverse(BT):
    """The WY inverse T = (I + strictly_lower(diag(beta) K K^T * D))^{-1} that the forward keeps, built on
    16 x 16 tiles (1, 2 or 4 diagonal blocks), equals torch.linalg.inv per chunk: unit keys, beta up to 2,
    decays down to exp(-20) per token, a ragged last chunk; atol 1e-4 (float32)."""
    from lsm_kernels._common import chunk_layout
    from lsm_kernels.delta import delta_fwd
    from lsm_kernels.diag import _local_cumsum
    torch.manual_seed(BT)
    B, T, H, K, V = 1, BT + 5, 2, 16, 8
    q, k, v, _, gates = _inputs("gated_deltanet", B, T, H, K, V, B, DEV, beta_max=2.0, strength=20.0)
    q, k, v, beta, g = (x.detach() for x in (q, k, v, gates["beta"], gates["g"]))
    meta = chunk_layout(B, T, None, BT, q.device)
    G = _local_cumsum(g.contiguous(), meta, BT)
    *_, Tm = delta_fwd(q, k, v, beta, G, None, K ** -0.5, meta, BT, False, keep_T=True)
    for t0 in range(0, T, BT):
        n = min(BT, T - t0)
        kc, bc, Gc = k[0, t0:t0 + n].transpose(0, 1), beta[0, t0:t0 + n].T, G[0, t0:t0 + n].T   # [H, n, K], [H, n]
        D = (Gc[:, :, None] - Gc[:, None, :]).tril(-1).exp().tril(-1)                  # [H, n, n]
        A = bc[:, :, None] * (kc @ kc.transpose(1, 2)) * D
        want = torch.linalg.inv(torch.eye(n, device=DEV) + A)
        _assert_close(Tm[0, t0:t0 + n, :, :n].transpose(0, 1), want, f"T of the chunk at {t0}", atol=1e-4)


def test_grad_of_output_only():
    """No initial state, no final state: the backward starts from a zero state gradient."""
    torch.manual_seed(2)
    rule = rules.get("deltanet")
    q, k, v, _, gates = _inputs("deltanet", 1, 21, 2, 16, 8, 1, DEV)
    do = torch.randn(1, 21, 2, 8, device=DEV)
    grads = [torch.autograd.grad((rule.chunk(q, k, v, chunk_size=16, backend=b, **gates)[0] * do).sum(),
                                 [q, k, v, gates["beta"]]) for b in ("triton", "torch")]
    for n, a, b in zip(["dq", "dk", "dv", "dbeta"], *grads):
        _assert_close(a, b, n)


def test_no_grad_without_final_state():
    """Inference path: only o, no final state requested; deltanet without gate."""
    torch.manual_seed(2)
    rule = rules.get("deltanet")
    q, k, v, h0, gates = _inputs("deltanet", 1, 21, 2, 16, 8, 1, DEV)
    with torch.no_grad():
        o, S = rule.chunk(q, k, v, initial_state=h0, chunk_size=16, backend="triton", **gates)
        o_ref, _ = rule.chunk(q, k, v, initial_state=h0, chunk_size=16, backend="torch", **gates)
    assert S is None
    _assert_close(o, o_ref, "o")


@pytest.mark.parametrize("name", DELTA)
def test_chunk_fp16(name):
    """Half-precision inputs (fp16: the interpreter emulates bf16 badly, the gpu tests cover it) against the
    float32 reference: relative errors of outputs, final states and gradients."""
    torch.manual_seed(3)
    rule = rules.get(name)
    cu = torch.tensor([0, 5, 5, 23, 40], device=DEV, dtype=torch.int32)
    q, k, v, h0, gates = _inputs(name, 1, 40, 2, 16, 16, 4, DEV, dtype=torch.float16)
    do = torch.randn(1, 40, 2, 16, device=DEV)
    dht = torch.randn(4, 2, 16, 16, device=DEV)
    o, S, grads = _run(rule, "triton", q, k, v, h0, gates, cu, 16, do, dht)
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v, h0)]
    g32 = {n: t.detach().float().requires_grad_() for n, t in gates.items()}
    o_ref, S_ref, grads_ref = _run(rule, "torch", *f32, g32, cu, 16, do, dht)
    assert o.dtype == torch.float16 and S.dtype == torch.float32
    for n, a, b in zip(["o", "S", "dq", "dk", "dv", "dh0", *gates], [o, S, *grads], [o_ref, S_ref, *grads_ref]):
        assert a.dtype == (torch.float32 if n in ("S", "dh0") or n == "g" else torch.float16), (n, a.dtype)
        assert _rel(a, b) < 5e-3, (n, _rel(a, b))


def test_key_dim_limit():
    from lsm_kernels.delta import chunk_delta
    q = torch.zeros(1, 4, 1, 300, device=DEV)
    with pytest.raises(ValueError, match="K"):
        chunk_delta(q, q, torch.zeros(1, 4, 1, 8, device=DEV), torch.zeros(1, 4, 1, device=DEV))


@pytest.mark.parametrize("mini_batch_size,cu", [(16, None), (5, [0, 7, 7, 30, 40])])
def test_ttt_matches_torch(mini_batch_size, cu):
    """TTT-Linear plain form (lsm_kernels.ttt): outputs, final states and gradients in q, k, v, eta, h0, with
    a mini-batch size that is not a power of two and packed sequences with an empty one."""
    from lsm_kernels.ttt import chunk_ttt_linear
    torch.manual_seed(3)
    rule = rules.get("ttt")
    B, T, H, K, V = (2, 37, 2, 16, 12) if cu is None else (1, 40, 2, 16, 12)
    cu = None if cu is None else torch.tensor(cu, device=DEV, dtype=torch.int32)
    N = B if cu is None else cu.numel() - 1
    q = torch.randn(B, T, H, K, device=DEV).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, K, device=DEV), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, V, device=DEV).requires_grad_()
    eta = (torch.rand(B, T, H, device=DEV) * 0.1).requires_grad_()
    h0 = torch.randn(N, H, K, V, device=DEV).requires_grad_()
    do, dht = torch.randn(B, T, H, V, device=DEV), torch.randn(N, H, K, V, device=DEV)
    res = []
    for triton_kernel in (True, False):
        if triton_kernel:
            o, S = chunk_ttt_linear(q, k, v, eta, None, h0, True, cu, mini_batch_size)
        else:
            o, S = rule.chunk(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="torch",
                              eta=eta, mini_batch_size=mini_batch_size)
        res.append((o, S, *torch.autograd.grad((o * do).sum() + (S * dht).sum(), [q, k, v, eta, h0])))
    for n, a, b in zip(["o", "final state", "dq", "dk", "dv", "deta", "dh0"], *res):
        _assert_close(a, b, n, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------- GPU
def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("KV", [64, 128, 256])
@pytest.mark.parametrize("name", DELTA)
def test_gpu_bf16_vs_fp32_reference(name, KV):
    """bf16 kernels at real sizes (ragged packed batch, initial state) against the float32 torch reference."""
    torch.manual_seed(4)
    rule = rules.get(name)
    T, H, K, V = 3000, 4, KV, KV
    cu = torch.tensor([0, 1000, 1001, 2500, 3000], device="cuda", dtype=torch.int32)
    N = cu.numel() - 1
    q, k, v, h0, gates = _inputs(name, 1, T, H, K, V, N, "cuda", torch.bfloat16)
    with torch.no_grad():
        q.copy_(F.normalize(q.float(), dim=-1))
    do = torch.randn(1, T, H, V, device="cuda")
    dht = torch.randn(N, H, K, V, device="cuda")
    o, S, grads = _run(rule, "triton", q, k, v, h0, gates, cu, 64, do, dht)
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v, h0)]
    g32 = {n: t.detach().float().requires_grad_() for n, t in gates.items()}
    o_ref, S_ref, grads_ref = _run(rule, "torch", *f32, g32, cu, 64, do, dht)
    assert _rel(o, o_ref) < 2e-2, _rel(o, o_ref)
    assert _rel(S, S_ref) < 2e-2, _rel(S, S_ref)
    for n, a, b in zip(["dq", "dk", "dv", "dh0", *gates], grads, grads_ref):
        # gate gradients sum many products of differences: bf16 rounding shows more there
        assert _rel(a, b) < (5e-2 if n in gates else 3e-2), (n, _rel(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", DELTA)
def test_gpu_matches_fla(name):
    """Outputs, final state and gradients against fla's chunked kernels (bf16)."""
    torch.manual_seed(5)
    rule = rules.get(name)
    B, T, H, K, V = 2, 2048, 8, 128, 128
    q, k, v, h0, gates = _inputs(name, B, T, H, K, V, B, "cuda", torch.bfloat16)
    do = torch.randn(B, T, H, V, device="cuda")
    dht = torch.randn(B, H, K, V, device="cuda")
    o, S, grads = _run(rule, "triton", q, k, v, h0, gates, None, 64, do, dht)
    o_f, S_f, grads_f = _run(rule, "fla", q, k, v, h0, gates, None, 64, do, dht)
    assert _rel(o, o_f) < 2e-2 and _rel(S, S_f) < 2e-2, (_rel(o, o_f), _rel(S, S_f))
    for n, a, b in zip(["dq", "dk", "dv", "dh0", *gates], grads, grads_f):
        assert _rel(a, b) < (5e-2 if n in gates else 3e-2), (n, _rel(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("KV", [64, 128, 256])
def test_gpu_ttt_bf16(KV):
    """bf16 TTT-Linear at real sizes (packed batch, initial state) against the float32 reference, with gradients."""
    from lsm_kernels.ttt import chunk_ttt_linear
    torch.manual_seed(6)
    T, H = 3000, 4
    cu = torch.tensor([0, 1000, 1001, 2500, 3000], device="cuda", dtype=torch.int32)
    N = cu.numel() - 1
    q, k = (F.normalize(torch.randn(1, T, H, KV, device="cuda"), dim=-1) for _ in range(2))
    v = torch.randn(1, T, H, KV, device="cuda")
    eta = torch.rand(1, T, H, device="cuda") / KV
    h0 = torch.randn(N, H, KV, KV, device="cuda")
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    res = []
    for dtype in (torch.bfloat16, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [eta.clone().requires_grad_(),
                                                                      h0.clone().requires_grad_()]
        if dtype == torch.bfloat16:
            o, S = chunk_ttt_linear(*leaves[:4], None, leaves[4], True, cu, 16)
        else:
            o, S = rules.get("ttt").chunk(*leaves[:3], initial_state=leaves[4], output_final_state=True,
                                          cu_seqlens=cu, backend="torch", eta=leaves[3], mini_batch_size=16)
        res.append((o, S, *torch.autograd.grad((o.float() * do).sum() + (S * dht).sum(), leaves)))
    for n, a, b in zip(["o", "S", "dq", "dk", "dv", "deta", "dh0"], *res):
        assert _rel(a, b) < 3e-2, (n, _rel(a, b))
