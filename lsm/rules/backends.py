"""Which backend runs a rule's `chunk` and `step`: the one place of the backend policy.

    backend = resolve_chunk(rule, "auto", q, k, v, gates)         # -> "torch" | "triton" | "fla"
    backend = resolve_step(rule, "auto", q, k, v, state, gates)   # -> "torch" | "triton"

"auto" on CPU tensors is the torch form. On a GPU, `chunk` takes this project's Triton kernel
for the rules listed in `TRITON_FIRST` for the device's compute capability (the rules whose
kernels measured at least as fast as fla's in the named benchmark result, for training =
forward + backward, used when an input requires grad, and for inference = forward), else fla's
kernel where fla has the rule, else ours, else the torch form; `step` takes the fused Triton
decode step where the rule has one. A rule vetoes a kernel for one call through its hook
`UpdateRule.kernel_refusal` (a shape, dtype or option the kernel cannot take): "auto" then falls
back to the torch form, an explicit backend raises the hook's message as a `ValueError`. fla's own
refusal of an environment (`fla_refusal`: the backward of its gated kernels on Hopper under Triton
< 3.7.1) is treated the same way: "auto" passes over fla, backend="fla" raises before the forward.
The decision reads shapes, dtypes and flags only: no host synchronisation.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "torch", "triton", "fla"]
BACKENDS = ("auto", "torch", "triton", "fla")


@dataclass(frozen=True)
class TritonFirst:
    """The rules whose Triton kernels (ours) beat fla's on one GPU generation, and where that was measured."""

    source: str                 # the benchmark result file (written by benchmarks/bench_kernels.py) the sets come from
    train: frozenset[str]       # fwd+bwd at least as fast as fla's at every size of `source`
    infer: frozenset[str]       # forward at least as fast as fla's at every size of `source`


#: The "auto" policy on CUDA per compute capability; an unlisted device gets fla wherever fla has the rule.
#: tests/test_rules.py checks every entry against its `source`.
TRITON_FIRST: dict[tuple[int, int], TritonFirst] = {
    (9, 0): TritonFirst(source="benchmarks/results/bench_kernels_h200.json",
                        train=frozenset({"linear_attention", "retnet", "lightning", "mamba2"}),
                        infer=frozenset({"retnet", "deltanet"})),
}


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def has_fla() -> bool:
    try:
        import fla  # noqa: F401
    except Exception:  # fla imports triton, which can fail on exotic platforms
        return False
    return True


#: fla ops whose backward runs fla's common `chunk_bwd_dqkwg`: fla 0.6 refuses it for a per-token decay `g` on
#: Hopper with Triton >= 3.4.0 and < 3.7.1 (wrong results there, fla issue 640) unless its tilelang backend takes over
FLA_COMMON_BACKWARD = frozenset({"simple_gla", "delta_rule", "gated_delta_rule"})


@functools.lru_cache(maxsize=None)
def fla_gated_backward_broken() -> bool:
    """fla's own Triton-version test of that refusal (fla.utils), read once."""
    from fla.utils import TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    return TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1


@functools.lru_cache(maxsize=None)
def has_tilelang() -> bool:
    return importlib.util.find_spec("tilelang") is not None


def fla_refusal(rule, q: Tensor, k: Tensor | None, v: Tensor | None, gates: dict, auto: bool = False) -> str | None:
    """Why fla would refuse this call here (fla raises it in the backward, after the forward ran), or None.

    `auto` is conservative: it passes over fla wherever the Triton version is affected, tilelang or not (ours
    computes the same function). An explicit backend="fla" is refused only without tilelang, which fla may
    dispatch that backward to. Reads flags, the device's capability and fla's version test only."""
    if not (getattr(rule, "fla_op", None) in FLA_COMMON_BACKWARD and gates.get("g") is not None
            and requires_grad(q, k, v, *gates.values())):
        return None
    if capability(q.device)[0] != 9 or not fla_gated_backward_broken() or (not auto and has_tilelang()):
        return None
    import triton
    return (f"{rule.name}: flash-linear-attention refuses the backward of its gated kernel on Hopper GPUs under "
            f"Triton {triton.__version__} (it needs >= 3.7.1 there, or tilelang); pip install 'triton>=3.7.1,<3.9', "
            f"or use backend='triton' (ours) or 'auto'")


def _check_name(rule, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{rule.name}: unknown backend {backend!r}; choose one of {BACKENDS}")


def requires_grad(*tensors) -> bool:
    """Whether autograd records a graph through any of `tensors` (non-tensors are skipped)."""
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


def resolve_chunk(rule, backend: str, q: Tensor, k: Tensor | None = None, v: Tensor | None = None,
                  gates: dict | None = None) -> str:
    """The concrete backend `rule.chunk` (an `lsm.rules.UpdateRule`) runs for `backend` on q's device."""
    _check_name(rule, backend)
    gates = gates or {}
    if backend == "auto":
        if not q.is_cuda:
            return "torch"
        ours = rule.has_triton_chunk and rule.kernel_refusal("chunk", "triton", q, k, v, gates, auto=True) is None
        if ours:
            mode = "train" if requires_grad(q) else "infer"
            table = TRITON_FIRST.get(capability(q.device))
            if table is not None and rule.name in getattr(table, mode):
                return "triton"
        if (rule.has_fla and has_fla() and rule.kernel_refusal("chunk", "fla", q, k, v, gates, auto=True) is None
                and fla_refusal(rule, q, k, v, gates, auto=True) is None):
            return "fla"
        return "triton" if ours else "torch"
    if backend == "fla":
        if not rule.has_fla:
            raise ValueError(f"{rule.name}: flash-linear-attention has no kernel for this rule; use backend='torch'")
        if not q.is_cuda:
            raise ValueError(f"{rule.name}: backend='fla' runs Triton kernels on a GPU; q is on {q.device}. "
                             f"Use backend='torch' on CPU")
    if backend in ("fla", "triton"):
        why = rule.kernel_refusal("chunk", backend, q, k, v, gates) or (
            fla_refusal(rule, q, k, v, gates) if backend == "fla" else None)
        if why is not None:
            raise ValueError(why)
    return backend


def resolve_step(rule, backend: str, q: Tensor, k: Tensor | None = None, v: Tensor | None = None,
                 state: tuple | None = None, gates: dict | None = None) -> str:
    """The concrete backend `rule.step` runs: "triton" (the fused decode step) or "torch"."""
    _check_name(rule, backend)
    if backend == "auto":
        ok = (q.is_cuda and rule.has_triton_step
              and rule.kernel_refusal("step", "triton", q, k, v, gates or {}, state=state, auto=True) is None)
        return "triton" if ok else "torch"
    if backend == "fla":  # a decode step is one small update; fla's fused_recurrent adds launch overhead only
        return "torch"
    return backend


def use_kernels(backend: str, x: Tensor) -> bool:
    """Whether a layer with rule backend `backend` runs this project's fused layer kernels (short conv, gated
    norm) on x: always on a GPU unless backend="torch" (the plain reference), and on CPU tensors only for
    backend="triton" (Triton's interpreter)."""
    return backend == "triton" or (backend != "torch" and x.is_cuda)


#: the widest short convolution the fused conv kernel takes (lsm_kernels.conv)
CONV_KERNEL_MAX_WIDTH = 4


def use_conv_kernel(backend: str, x: Tensor, width: int) -> bool:
    """Whether a short convolution of `width` taps over x runs the fused kernel (`use_kernels` and a width it holds)."""
    return width <= CONV_KERNEL_MAX_WIDTH and use_kernels(backend, x)
