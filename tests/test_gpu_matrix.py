"""The GPU test matrix: every rule x backend {torch, triton (ours), fla (where fla has the rule), auto} x
precision {fp32, bf16 autocast} x mode {training step, prefill + decode with a cache split mid-sequence,
packed varlen}, for the single layer, the MoM layer and a 2-layer model (MoM mixer); and greedy `generate()`
(eager and `cuda_graph=True`) on a briefly trained tiny model, per rule, backend and precision.

Every case is compared with the float32 torch form of the same module (same parameters). Tolerances are
relative errors in the Frobenius norm (`rel`):
    fp32: outputs 5e-3, gradients 2e-2 (the Triton kernels may run their dots in tf32)
    bf16: outputs 5e-2, gradients 1.5e-1 (8 bits of mantissa through projections, conv, rule and readout)
Greedy tokens must equal the float32 torch form's, except after a position where the reference's top-2
logit margin is below 1e-2 (fp32) / 2.5e-1 (bf16).

One shape per mode, identical across tests (fla autotunes per new shape): B = 2, T = 64, width 64, 2 heads
of 32; varlen lengths 17 + 40 + 7; decode: prefill 21, continuation 30, 13 steps. fla's quick autotune as
the benchmarks set it (benchmarks/_gpu.py, LSM_TUNE_MS=5,25).

Run on a GPU:   python -m pytest -m gpu tests/test_gpu_matrix.py -p no:xdist -o addopts= -q -x --durations=10
Debug on CPU:   LSM_MATRIX_DEVICE=cpu python -m pytest tests/test_gpu_matrix.py -o addopts= -q
    (the same cases with backend torch, and backend triton under the interpreter for one small case, fp32 only)
"""
from __future__ import annotations

import functools
import importlib.util
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lsm.rules as R
from lsm.config import MixerConfig, ModelConfig
from lsm.layers import RuleLayer
from lsm.mixture import MixtureOfMemories
from lsm.model import LanguageModel
from lsm.rules.base import UpdateRule

DEVICE = os.environ.get("LSM_MATRIX_DEVICE", "cuda")
ON_CPU = DEVICE == "cpu"
pytestmark = [] if ON_CPU else [pytest.mark.gpu]


@pytest.fixture(scope="module", autouse=True)
def quick_autotune():
    """fla's and our autotuners keep their first config (benchmarks/_gpu.py, LSM_TUNE_FIRST: correctness does
    not depend on the config, and timing every config of every kernel per shape took minutes); only when a case
    of this file runs on a GPU."""
    if not ON_CPU and torch.cuda.is_available():
        os.environ.setdefault("LSM_TUNE_FIRST", "1")
        spec = importlib.util.spec_from_file_location("_lsm_gpu", Path(__file__).parents[1] / "benchmarks" / "_gpu.py")
        gpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu)
        gpu.configure_autotuning()


RULES = R.names()
B, T, D, H, KD, VOCAB = 2, 64, 64, 2, 32, 32
LENS = (17, 40, 7)
SPLIT = (21, 30, 13)                       # prefill, chunked continuation, single steps
OUT_TOL = {"fp32": 5e-3, "bf16": 5e-2}
GRAD_TOL = {"fp32": 2e-2, "bf16": 1.5e-1}
MARGIN_TOL = {"fp32": 1e-2, "bf16": 2.5e-1}
PRECISIONS = ("fp32", "bf16")
KINDS = ("rule", "mom", "model")
#: the one small case the CPU debug mode also runs with backend="triton" (the interpreter is slow)
CPU_TRITON = ("rule", "gated_deltanet")


def backends(name: str) -> list[str]:
    rule = R.get(name)
    out = ["torch"]
    if type(rule)._chunk_triton is not UpdateRule._chunk_triton:
        out.append("triton")
    if rule.has_fla:
        out.append("fla")
    return out + ["auto"]


def cases() -> list:
    out = []
    for kind in KINDS:
        for name in RULES:
            for backend in backends(name):
                if ON_CPU and not (backend == "torch" or (backend == "triton" and (kind, name) == CPU_TRITON)):
                    continue
                out.append(pytest.param(kind, name, backend, id=f"{kind}-{name}-{backend}"))
    return out


def precisions(name: str, backend: str) -> tuple[str, ...]:
    """Both, except for Triton's CPU interpreter, which does not emulate bf16 dots faithfully (fp32 only), and
    fla's delta-rule kernel, which refuses float32 inputs (bf16 only; the refusal is tested in test_rules.py)."""
    if ON_CPU and backend == "triton":
        return ("fp32",)
    if backend == "fla" and name == "deltanet":
        return ("bf16",)
    return PRECISIONS


def autocast(precision: str):
    return torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def set_backend(module: torch.nn.Module, backend: str) -> None:
    for m in module.modules():
        if isinstance(m, RuleLayer):
            m.backend = backend


def build(kind: str, name: str, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    """The module under test, float32, on DEVICE (the MoM layer and the model's mixer: 4 memories, top-2)."""
    torch.manual_seed(seed)
    if kind == "model":
        cfg = ModelConfig(vocab_size=vocab, hidden_size=D, num_layers=2,
                          mixer=MixerConfig(type="mom", rule=name, num_heads=H, head_dim=KD, num_memories=4, topk=2))
        return LanguageModel(cfg).to(DEVICE)
    if kind == "mom":
        return MixtureOfMemories(name, D, H, head_dim=KD, num_memories=4, topk=2).to(DEVICE)
    return RuleLayer(name, D, H, head_dim=KD).to(DEVICE)


def inputs(kind: str, total: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "model":
        return torch.randint(0, VOCAB, (B, total), generator=g).to(DEVICE)
    return torch.randn(B, total, D, generator=g).to(DEVICE)


def forward(module, kind, x, **kw):
    """(output: layer output or logits, the cache(s))."""
    if kind == "model":
        out = module(x, caches=kw.get("cache"), cu_seqlens=kw.get("cu_seqlens"), use_cache=kw.get("use_cache", False))
        return out.logits, out.caches
    out = module(x, cache=kw.get("cache"), cu_seqlens=kw.get("cu_seqlens"), use_cache=kw.get("use_cache", False))
    return out.output, out.cache


def loss_of(kind: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if kind == "model":  # next-token loss
        return F.cross_entropy(y[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
    return y.float().square().mean()


def run_train(module, kind, backend, precision, x):
    set_backend(module, backend)
    module.zero_grad(set_to_none=True)
    with autocast(precision):
        y, _ = forward(module, kind, x)
        loss = loss_of(kind, y, x)
    loss.backward()
    return y.detach(), [p.grad.detach().clone() if p.grad is not None else None for p in module.parameters()]


# ----------------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("kind,name,backend", cases())
def test_training_step(kind, name, backend):
    """Loss + backward: outputs and parameter gradients finite and close to the fp32 torch form."""
    module, x = build(kind, name), inputs(kind, T)
    y_ref, g_ref = run_train(module, kind, "torch", "fp32", x)
    for precision in precisions(name, backend):
        y, g = run_train(module, kind, backend, precision, x)
        what = f"{kind} {name} {backend} {precision}"
        assert torch.isfinite(y).all(), f"{what}: non-finite output"
        assert rel(y, y_ref) <= OUT_TOL[precision], f"{what}: output relative error {rel(y, y_ref):.3g}"
        pairs = [(a, b) for a, b in zip(g, g_ref) if b is not None]
        assert all(a is not None and torch.isfinite(a).all() for a, _ in pairs), f"{what}: missing/non-finite grads"
        err = rel(torch.cat([a.flatten() for a, _ in pairs]), torch.cat([b.flatten() for _, b in pairs]))
        assert err <= GRAD_TOL[precision], f"{what}: gradient relative error {err:.3g}"


@pytest.mark.parametrize("kind,name,backend", cases())
@torch.no_grad()
def test_prefill_and_decode(kind, name, backend):
    """Prefill, a chunked continuation and single decoding steps through the cache equal one pass of the fp32
    torch form; the caches stay float32."""
    module, x = build(kind, name), inputs(kind, sum(SPLIT))
    set_backend(module, "torch")
    y_ref, _ = forward(module, kind, x)
    set_backend(module, backend)
    for precision in precisions(name, backend):
        cache, outs, a = None, [], 0
        with autocast(precision):
            for n in (SPLIT[0], SPLIT[1], *([1] * SPLIT[2])):
                y, cache = forward(module, kind, x[:, a:a + n], cache=cache, use_cache=True)
                outs.append(y)
                a += n
        y = torch.cat(outs, 1)
        what = f"{kind} {name} {backend} {precision}"
        assert torch.isfinite(y).all(), f"{what}: non-finite output"
        assert rel(y, y_ref) <= OUT_TOL[precision], f"{what}: relative error {rel(y, y_ref):.3g}"
        for c in (cache if kind == "model" else [cache]):
            assert all(s.dtype == torch.float32 for s in c.state), f"{what}: cache {[s.dtype for s in c.state]}"


@pytest.mark.parametrize("kind,name,backend", cases())
@torch.no_grad()
def test_packed_varlen(kind, name, backend):
    """A packed variable-length batch (B = 1, cu_seqlens) equals the fp32 torch form's."""
    module = build(kind, name)
    x = inputs(kind, sum(LENS))[:1]
    cu = torch.tensor([0, *LENS], device=DEVICE).cumsum(0).to(torch.int32)
    set_backend(module, "torch")
    y_ref, _ = forward(module, kind, x, cu_seqlens=cu)
    set_backend(module, backend)
    for precision in precisions(name, backend):
        with autocast(precision):
            y, _ = forward(module, kind, x, cu_seqlens=cu)
        what = f"{kind} {name} {backend} {precision}"
        assert torch.isfinite(y).all() and rel(y, y_ref) <= OUT_TOL[precision], f"{what}: relative error {rel(y, y_ref):.3g}"


# ----------------------------------------------------------------------------------------- generate
GEN_VOCAB, PROMPT, NEW = 16, 8, 16


@functools.cache
def trained(name: str) -> LanguageModel:
    """A 2-layer MoM model briefly trained (fp32, torch form) on x_{i+1} = (5 x_i + 3) mod 16: confident margins."""
    with torch.enable_grad():
        return _train(name)


def _train(name: str) -> LanguageModel:
    lm = build("model", name, vocab=GEN_VOCAB)
    set_backend(lm, "torch")
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40 if ON_CPU else 80):
        x = [torch.randint(0, GEN_VOCAB, (16,), generator=g)]
        for _ in range(31):
            x.append((5 * x[-1] + 3) % GEN_VOCAB)
        ids = torch.stack(x, 1).to(DEVICE)
        loss = loss_of("model", lm(ids).logits, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval()


@pytest.mark.parametrize("name,backend", [pytest.param(n, b, id=f"{n}-{b}") for n in RULES for b in backends(n)
                                          if not ON_CPU or b == "torch"])
@torch.no_grad()
def test_greedy_generate(name, backend):
    """Greedy tokens (eager and cuda_graph=True) equal the fp32 torch form's, except after a position where the
    reference's top-2 logit margin is below the precision's tolerance."""
    lm = trained(name)
    prompt = torch.randint(0, GEN_VOCAB, (B, PROMPT), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    set_backend(lm, "torch")
    ref = lm.generate(prompt, NEW, temperature=0)
    top2 = lm(ref).logits.float().topk(2, -1).values
    margin = top2[..., 0] - top2[..., 1]                         # [B, PROMPT + NEW]: at position t, for token t+1
    set_backend(lm, backend)
    for precision in precisions(name, backend):
        for graph in (False,) if ON_CPU else (False, True):
            with autocast(precision):
                got = lm.generate(prompt, NEW, temperature=0, cuda_graph=graph)
            what = f"{name} {backend} {precision} cuda_graph={graph}"
            for b in range(B):
                diff = (got[b] != ref[b]).nonzero()
                if diff.numel():
                    p = int(diff[0])
                    assert float(margin[b, p - 1]) < MARGIN_TOL[precision], (
                        f"{what}: row {b} differs at token {p} where the reference's top-2 margin is "
                        f"{float(margin[b, p - 1]):.3g} >= {MARGIN_TOL[precision]}")
