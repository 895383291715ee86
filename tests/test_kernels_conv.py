"""The layer's fused kernels against their torch forms (TRITON_INTERPRET=1 on CPU, float64, atol 1e-10):

- `lsm_kernels.conv.short_conv`: causal depthwise conv + bias + SiLU (+ per-head L2 norm), dense and packed
  batches (ragged lengths, empty sequences, sequences shorter than the conv), widths 2..4, gradients of x,
  weight and bias; its `gather` form (MoM's routed keys/values) equals the full conv followed by a gather;
  `ShortConv` from a cached tail (decoding steps and prefills after a cache, both backends) equals the full conv.
- `lsm_kernels.norm.gated_rms_norm`: the readout's RMSNorm * silu(gate), gradients of x, weight and gate.
- the layers: `RuleLayer` and `MixtureOfMemories` training with backend="triton" (fused conv, norm and the
  rule's kernel) equal backend="torch" in outputs and every parameter's gradient (float32, atol 1e-4).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsm.layers import RuleLayer
from lsm.mixture import MixtureOfMemories
from lsm.mixture.routing import dispatch
from lsm.modules import GatedRMSNorm, ShortConv, conv_tail, seq_positions
from lsm_kernels.conv import short_conv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F64 = dict(atol=1e-10, rtol=1e-8)


def cu_from(lens):
    return torch.tensor([0] + lens).cumsum(0).to(DEV)


def conv_module(C, W, seed):
    torch.manual_seed(seed)
    m = ShortConv(C, W).double().to(DEV)
    with torch.no_grad():
        m.bias.normal_()
    return m


def grads(y, leaves, seed):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype).to(y.device)
    return torch.autograd.grad(y, leaves, dy)


@given(lens=st.lists(st.integers(0, 9), min_size=1, max_size=3), B=st.integers(1, 2), W=st.integers(2, 4),
       heads=st.integers(1, 3), head=st.sampled_from([4, 6, 8, 12]), norm=st.booleans(), packed=st.booleans(),
       seed=st.integers(0, 99))
def test_short_conv_equals_torch(lens, B, W, heads, head, norm, packed, seed):
    C = heads * head
    m = conv_module(C, W, seed)
    T = sum(lens) if packed else max(lens)
    x = torch.randn(1 if packed else B, T, C, dtype=torch.float64, device=DEV, requires_grad=True)
    cu = cu_from(lens) if packed else None
    kw = dict(head=head if norm else None)
    y = m(x, None, cu, backend="triton", **kw)[0]
    y_ref = m(x, None, cu, backend="torch", **kw)[0]
    torch.testing.assert_close(y, y_ref, **F64)
    if T:
        for a, b in zip(grads(y, [x, m.weight, m.bias], seed), grads(y_ref, [x, m.weight, m.bias], seed)):
            torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("head", [6, 12])
def test_short_conv_norm_of_a_head_that_is_not_a_power_of_two(head):
    """The per-head L2 norm normalises each head on its own when the head is narrower than its power-of-two tile
    (a tile of 8 or 16 lanes must not reach into the next head): forward and gradients, two heads, packed."""
    m = conv_module(2 * head, 4, 0)
    cu = cu_from([3, 6])
    x = torch.randn(1, 9, 2 * head, dtype=torch.float64, device=DEV, requires_grad=True)
    y = m(x, None, cu, head=head, backend="triton")[0]
    y_ref = m(x, None, cu, head=head, backend="torch")[0]
    torch.testing.assert_close(y, y_ref, **F64)
    for a, b in zip(grads(y, [x, m.weight, m.bias], 0), grads(y_ref, [x, m.weight, m.bias], 0)):
        torch.testing.assert_close(a, b, **F64)


@given(lens=st.lists(st.integers(1, 8), min_size=1, max_size=3), G=st.integers(2, 4), topk=st.integers(1, 2),
       norm=st.booleans(), dims=st.sampled_from([(8, 4), (12, 6)]), seed=st.integers(0, 99))
def test_short_conv_gather_equals_full_then_gather(lens, G, topk, norm, dims, seed):
    """MoM's form: only the routed (token, memory) rows, in packed order, with the token-stream conv."""
    CX, head = dims
    m = conv_module(G * CX, 4, seed)
    T = sum(lens)
    cu = cu_from(lens)
    x = torch.randn(1, T, G * CX, dtype=torch.float64, device=DEV, requires_grad=True)
    gen = torch.Generator().manual_seed(seed)
    sel = torch.stack([torch.randperm(G, generator=gen)[:min(topk, G)] for _ in range(T)])[None].to(DEV)
    d = dispatch(sel, G, cu)
    pos = seq_positions(cu, T)
    y = short_conv(x, m.weight, m.bias, pos, True, head if norm else None, gather=(d.src, d.inv, G))
    full = m(x, None, cu, backend="torch", head=head if norm else None)[0]
    y_ref = full.reshape(T * G, CX).index_select(0, d.src)
    torch.testing.assert_close(y, y_ref, **F64)
    for a, b in zip(grads(y, [x, m.weight, m.bias], seed), grads(y_ref, [x, m.weight, m.bias], seed)):
        torch.testing.assert_close(a, b, **F64)


@given(shape=st.sampled_from([(3, 8), (2, 5, 16), (1, 4, 3, 12)]), gate=st.booleans(), seed=st.integers(0, 99))
def test_gated_rms_norm_equals_torch(shape, gate, seed):
    torch.manual_seed(seed)
    m = GatedRMSNorm(shape[-1]).double().to(DEV)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(*shape, dtype=torch.float64, device=DEV, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64, device=DEV, requires_grad=True) if gate else None
    leaves = [x, m.weight] + ([g] if gate else [])
    y, y_ref = m(x, g, backend="triton"), m(x, g, backend="torch")
    torch.testing.assert_close(y, y_ref, **F64)
    for a, b in zip(grads(y, leaves, seed), grads(y_ref, leaves, seed)):
        torch.testing.assert_close(a, b, **F64)


def test_bad_input():
    x = torch.randn(1, 5, 8, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        short_conv(x, torch.randn(6, 4, device=DEV))
    with pytest.raises(ValueError, match="head"):
        short_conv(x, torch.randn(8, 4, device=DEV), head=3)
    with pytest.raises(ValueError, match="pos"):
        short_conv(x, torch.randn(8, 4, device=DEV), pos=torch.arange(4, device=DEV))


@pytest.mark.parametrize("kind", ["single", "mom", "mom-packed"])
def test_layer_training_triton_equals_torch(kind):
    """Training (no cache): fused conv + norm kernels, routed-row conv (MoM) and the rule's Triton kernel
    against the all-torch layer; outputs and the gradient of every parameter (float32, atol 1e-4)."""
    torch.manual_seed(0)
    if kind == "single":
        layer = RuleLayer("gated_deltanet", 16, 2, chunk_size=16)
    else:
        layer = MixtureOfMemories("gated_deltanet", 16, 2, num_memories=3, topk=2, chunk_size=16)
    layer = layer.to(DEV)
    cu = cu_from([5, 1, 7]) if kind == "mom-packed" else None
    x = torch.randn(1 if cu is not None else 2, 13, 16, device=DEV, requires_grad=True)
    outs = []
    for backend in ("triton", "torch"):
        layer.backend = backend
        y = layer(x, cu_seqlens=cu).output
        leaves = [x] + list(layer.parameters())
        outs.append((y, grads(y, leaves, 1)))
    (y, g), (y_ref, g_ref) = outs
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for (name, _), a, b in zip([("x", x)] + list(layer.named_parameters()), g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{kind} grad of {name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(0, 6), n=st.integers(1, 3), heads=st.integers(1, 3),
       head=st.sampled_from([2, 4, 6]), W=st.integers(2, 4), activation=st.booleans(), norm=st.booleans(),
       seed=st.integers(0, 2**16))
def test_short_conv_from_a_cached_tail_equals_the_full_conv(backend, B, T, n, heads, head, W, activation, norm, seed):
    """`ShortConv` continuing from a cached tail, split at any T, for n tokens (n = 1: a decoding step, the torch taps
    or the fused kernel; n > 1: a prefill after a cache) equals those tokens of one pass over T + n tokens (float64,
    atol 1e-10); its new tail is the last W - 1 inputs; bf16 inputs land within 2e-2 of the float64 result."""
    torch.manual_seed(seed)
    conv = ShortConv(heads * head, W, activation=activation).double().to(DEV)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(B, T + n, heads * head, dtype=torch.float64, device=DEV)
    hn = head if norm else None
    full, _ = conv(x, head=hn)                                                   # the torch form, one pass
    _, tail = conv(x[:, :T], head=hn)
    y, new_tail = conv(x[:, T:], tail, head=hn, backend=backend)
    torch.testing.assert_close(y, full[:, T:], **F64)
    torch.testing.assert_close(new_tail, conv_tail(x, W), atol=0, rtol=0)
    if backend == "torch" or DEV == "cuda":
        yb, _ = conv.to(torch.bfloat16)(x[:, T:].bfloat16(), tail.bfloat16(), head=hn, backend=backend)
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.double(), full[:, T:], atol=2e-2, rtol=2e-2)
