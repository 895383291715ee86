"""Every Triton kernel stays inside its tensors when a head is narrower than its tile (heads of 8 on 16-wide tiles,
heads of 6 and 12 that are not powers of two), in training (forward + backward) and in decoding.

Under TRITON_INTERPRET=1 a masked-off lane touches nothing, and a masked-on lane past its tensor reads whatever host
memory lies there: the result can still be right (a later `where` drops the value) where a GPU faults. The fixture
`bounds` instruments the interpreter's loads and stores: each address a masked-on lane touches must lie inside one
of the launch's tensor arguments (the view itself, not the rest of its storage), else the access is refused and the
test fails naming the kernel, the program and the nearest argument. Memory the kernels' launchers leave
uninitialised is filled with NaN (`torch.utils.deterministic.fill_uninitialized_memory`), so a kernel reading what
nothing wrote gives a non-finite result. On a GPU (no interpreter) the same cases run the compiled kernels at these
shapes, without the address check.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lsm import rules
from lsm.layers import RuleLayer, _at
from lsm.mixture import MixtureOfMemories

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class Bounds:
    """The interpreter's masked loads and stores checked against the launch's tensor arguments."""

    def __init__(self, monkeypatch):
        import triton.runtime.interpreter as interp
        for owner, name in ((interp.GridExecutor, "_init_args_hst"), (interp.InterpreterBuilder, "set_grid_idx"),
                            (interp.InterpreterBuilder, "create_masked_load"),
                            (interp.InterpreterBuilder, "create_masked_store")):
            if not hasattr(owner, name):
                raise RuntimeError(f"Triton's interpreter has no {owner.__name__}.{name} any more: adapt the `bounds` "
                                   f"fixture of {__file__} to this Triton version")
        self.errors: list[str] = []
        self.launches = 0
        self.kernel, self.args, self.program = None, [], None
        init, grid = interp.GridExecutor._init_args_hst, interp.InterpreterBuilder.set_grid_idx
        load, store = interp.InterpreterBuilder.create_masked_load, interp.InterpreterBuilder.create_masked_store
        bounds = self

        def init_args(executor, args_dev, kwargs):
            args_hst, kwargs_hst = init(executor, args_dev, kwargs)
            bounds.launches += 1
            bounds.kernel = getattr(executor.fn, "__name__", str(executor.fn))
            bounds.args = [(name, a.data_ptr(), a.data_ptr() + _extent(a))
                           for name, a in zip(executor.arg_names, args_hst) if isinstance(a, torch.Tensor)]
            return args_hst, kwargs_hst

        def set_grid_idx(builder, x, y, z):
            bounds.program = (x, y, z)
            return grid(builder, x, y, z)

        def masked_load(builder, ptrs, mask, other, *a, **kw):
            bounds.check("load", ptrs, mask)
            return load(builder, ptrs, mask, other, *a, **kw)

        def masked_store(builder, ptrs, value, mask, *a, **kw):
            bounds.check("store", ptrs, mask)
            return store(builder, ptrs, value, mask, *a, **kw)

        monkeypatch.setattr(interp.GridExecutor, "_init_args_hst", init_args)
        monkeypatch.setattr(interp.InterpreterBuilder, "set_grid_idx", set_grid_idx)
        monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_load", masked_load)
        monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_store", masked_store)

    def check(self, what, ptrs, mask) -> None:
        p = np.asarray(ptrs.data)
        addr = p[np.broadcast_to(np.asarray(mask.data).astype(bool), p.shape)].astype(np.int64)
        if addr.size == 0:
            return
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        inside = np.zeros(addr.shape, dtype=bool)
        for _, lo, hi in self.args:
            inside |= (addr >= lo) & (addr + size <= hi)
        if inside.all():
            return
        bad = int(addr[~inside][0])
        name, lo, hi = min(self.args, key=lambda r: min(abs(bad - r[1]), abs(bad - r[2])))
        self.errors.append(f"{self.kernel} program {self.program}: {what} of {int((~inside).sum())} lanes outside "
                           f"every argument, e.g. {bad - lo:+d} bytes from the start of `{name}` ({hi - lo} bytes)")
        raise IndexError(self.errors[-1])  # before the access: a stray store would corrupt the host's heap


def _extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to the end of its last one (non-negative strides)."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


@pytest.fixture
def bounds(monkeypatch):
    """A `Bounds` under the interpreter (None on a GPU); NaN in every uninitialised allocation meanwhile."""
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        b = Bounds(monkeypatch) if INTERPRETED else None
        yield b
        if b is not None:
            assert b.launches > 0, "no Triton kernel ran: the case does not test the kernels"
            assert not b.errors, "out-of-bounds accesses:\n" + "\n".join(dict.fromkeys(b.errors))
    finally:
        torch.use_deterministic_algorithms(det)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _train(layer, x, cu):
    """Output and the gradients of x and every parameter, on the triton and torch backends."""
    out = []
    for backend in ("triton", "torch"):
        for m in layer.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        y = layer(x, cu_seqlens=cu).output
        leaves = [x, *layer.parameters()]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1], device=DEV)).sum(), leaves,
                                    allow_unused=True)
        out.append((y, [g for g in grads if g is not None]))
    return out


def _assert_same(got, want, what):
    (y, g), (y_ref, g_ref) = got, want
    assert torch.isfinite(y).all() and all(torch.isfinite(a).all() for a in g), f"{what}: non-finite values"
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what} output: {m}")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what} gradient {i}: {m}")


TRITON_RULES = [n for n in rules.names() if rules.get(n).has_triton_chunk]


@pytest.mark.parametrize("name", TRITON_RULES)
def test_training_heads_of_8_stay_in_bounds(bounds, name):
    """A layer of width 16 with 2 heads of 8 (the kernels' tiles are 16 wide): short conv + L2 norm, the rule's
    chunked kernels and the gated norm, forward and backward, on a packed batch with a chunk spanning two sequences."""
    torch.manual_seed(0)
    layer = RuleLayer(name, 16, 2, chunk_size=16).to(DEV)
    cu = torch.tensor([0, 5, 23], device=DEV, dtype=torch.int32)
    x = torch.randn(1, 23, 16, device=DEV, requires_grad=True)
    got, want = _train(layer, x, cu)
    _assert_same(got, want, name)


@pytest.mark.parametrize("head", [6, 12])
def test_mom_training_heads_not_a_power_of_two_stay_in_bounds(bounds, head):
    """MoM's routed rows (gathered conv, packed memory segments) with heads of 6 and 12 (tiles of 8 and 16)."""
    torch.manual_seed(0)
    layer = MixtureOfMemories("gated_deltanet", 2 * head, 2, num_memories=3, topk=2, chunk_size=16).to(DEV)
    x = torch.randn(2, 11, 2 * head, device=DEV, requires_grad=True)
    got, want = _train(layer, x, None)
    _assert_same(got, want, f"mom head {head}")


STEP_RULES = [n for n in rules.names() if rules.get(n).has_triton_step]


@pytest.mark.parametrize("name", STEP_RULES)
def test_decode_step_heads_of_8_stays_in_bounds(bounds, name):
    """The fused decode step (lsm_kernels.decode) at heads of 8, from a prefilled cache, against the torch step."""
    torch.manual_seed(0)
    layer = RuleLayer(name, 16, 2, chunk_size=16, backend="triton").to(DEV)
    x = torch.randn(2, 6, 16, device=DEV)
    with torch.no_grad():
        cache = layer(x[:, :5], use_cache=True).cache
        q, k, v, gates = layer.project(x[:, 5:], cache, None)
        gates = {n: _at(t, 0, 1) for n, t in {**gates, **layer.rule_options}.items()}
        (o, state), (o_ref, state_ref) = (layer.rule.step(q[:, 0], k[:, 0], v[:, 0], cache.state, backend=b, **gates)
                                          for b in ("triton", "torch"))
    assert torch.isfinite(o).all() and all(torch.isfinite(s).all() for s in state), f"{name}: non-finite values"
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(state, state_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
