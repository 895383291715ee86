"""Compile every Triton kernel of `lsm_kernels` for a GPU target without a GPU (default sm_90, H100).

The public entry points (chunk_diag for the four decay kinds, chunk_delta gated and ungated, chunk_ttt_linear
plain and LayerNorm form, recurrent_step, mom_step and ttt_step; forward without gradients, forward and backward
with them) are called on CPU tensors with every kernel launch intercepted: each launch is turned into a
(signature, constexprs) pair exactly as the launcher passes it (None arguments become constexpr None), the
distinct pairs are compiled with
`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 64))` down to a cubin
(ptxas ships in the triton wheel), and nothing is ever run. Variants: bf16 and fp32 inputs, K = V = 64 and
K = V = 256, dense and packed (varlen) batches. To check another triton release, install its wheel into a
separate folder and put it first on the path, e.g.
`pip download --no-deps triton==3.6.0 --python-version 3.11 --platform manylinux_2_27_x86_64 --only-binary=:all:`,
`pip install --no-deps --target /tmp/t36 triton-3.6.0-*.whl`, then
`PYTHONPATH=/tmp/t36 python benchmarks/compile_check.py` (301 variants, about 20 minutes on two cores, of
which the LayerNorm TTT kernels at K = V = 256 take about 10 (`--only ttt`: 39 variants, 11 minutes);
`--quick` about one minute). Exits non-zero if any variant fails.

    python benchmarks/compile_check.py [--arch 90] [--warps 4] [--stages 3] [--jobs 2] [--quick] [--only NAME]
    python benchmarks/compile_check.py --only _bwd_intra --warps 2,4,8 --resources   # registers, spills, shared
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
import torch.nn.functional as F
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, KernelInterface

# checked before the kernels are imported (hence E402 below)
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: run without TRITON_INTERPRET=1 (it turns the kernels into Python functions; nothing to compile)")
from lsm_kernels.conv import short_conv  # noqa: E402
from lsm_kernels.decode import mom_step, recurrent_step  # noqa: E402
from lsm_kernels.delta import chunk_delta  # noqa: E402
from lsm_kernels.diag import chunk_diag  # noqa: E402
from lsm_kernels.norm import gated_rms_norm  # noqa: E402
from lsm_kernels.ttt import chunk_ttt_linear, ttt_step  # noqa: E402

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.bool: "i1"}
VARIANTS: dict = {}          # key -> (JITFunction, signature, constexprs)


def _jit_fn(kernel):
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _record(kernel, args, kwargs):
    fn = _jit_fn(kernel)
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    sig, cx, attrs = {}, {}, {}
    for i, (p, name) in enumerate(zip(fn.params, fn.arg_names)):
        x = bound[name]
        if p.is_constexpr or x is None:
            sig[name], cx[name] = "constexpr", x
        elif isinstance(x, torch.Tensor):
            sig[name] = "*" + DTYPES[x.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]              # torch allocations are 16-byte aligned
        elif isinstance(x, bool):
            sig[name] = "i1"
        elif isinstance(x, int):
            sig[name] = "i32" if -2**31 <= x < 2**31 else "i64"
        elif isinstance(x, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: unsupported argument {name}={x!r}")
    key = (f"{fn.__module__.split('.')[-1]}.{fn.__name__}", tuple(sig.items()), tuple((k, repr(v)) for k, v in cx.items()))
    VARIANTS.setdefault(key, (fn, sig, cx, attrs))


def _intercept():
    KernelInterface.__getitem__ = lambda self, grid: (lambda *a, **kw: _record(self, a, kw))


def _detach(*xs):
    return [None if x is None else x.detach() for x in xs]


def _calls(quick: bool):
    """Drive every public entry point on CPU tensors (values are irrelevant: nothing runs)."""
    shapes = [(64, 64)] if quick else [(64, 64), (256, 256)]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    H, T = 2, 80
    for dt in dtypes:
        for K, V in shapes:
            for varlen in (False, True):
                B, cu = (1, torch.tensor([0, 30, 31, T], dtype=torch.int32)) if varlen else (2, None)
                N = 3 if varlen else B

                def leaves(*shape_dtypes):
                    return [torch.randn(*s[:-1], dtype=s[-1]).requires_grad_() for s in shape_dtypes]

                def grad(outs, xs):
                    o, S = outs
                    loss = o.float().sum() + (S.sum() if S is not None else 0)
                    torch.autograd.grad(loss, [x for x in xs if x is not None])

                # diagonal decay, NONE / GAMMA / SCALAR / VECTOR
                for kind in range(4):
                    q, k, v = leaves((B, T, H, K, dt), (B, T, H, K, dt), (B, T, H, V, dt))
                    h0 = torch.randn(N, H, K, V).requires_grad_()
                    g = g_gamma = None
                    if kind == 1:
                        g_gamma = -torch.rand(H).requires_grad_()
                    elif kind >= 2:
                        g = F.logsigmoid(torch.randn((B, T, H) if kind == 2 else (B, T, H, K))).to(dt).requires_grad_()
                    chunk_diag(*_detach(q, k, v, g, g_gamma), cu_seqlens=cu)           # inference
                    grad(chunk_diag(q, k, v, g, g_gamma, initial_state=h0, output_final_state=True, cu_seqlens=cu),
                         [q, k, v, g, g_gamma, h0])
                # delta rule, ungated / gated
                for gated in (False, True):
                    q, v = leaves((B, T, H, K, dt), (B, T, H, V, dt))
                    k = F.normalize(torch.randn(B, T, H, K), dim=-1).to(dt).requires_grad_()
                    beta = torch.rand(B, T, H).to(dt).requires_grad_()
                    g = F.logsigmoid(torch.randn(B, T, H)).requires_grad_() if gated else None
                    h0 = torch.randn(N, H, K, V).requires_grad_()
                    chunk_delta(*_detach(q, k, v, beta, g), cu_seqlens=cu)
                    grad(chunk_delta(q, k, v, beta, g, initial_state=h0, output_final_state=True, cu_seqlens=cu),
                         [q, k, v, beta, g, h0])
                # TTT-Linear
                q, k, v = leaves((B, T, H, K, dt), (B, T, H, K, dt), (B, T, H, V, dt))
                eta = torch.rand(B, T, H).to(dt).requires_grad_()
                h0 = torch.randn(N, H, K, V).requires_grad_()
                chunk_ttt_linear(*_detach(q, k, v, eta), cu_seqlens=cu)
                grad(chunk_ttt_linear(q, k, v, eta, None, h0, True, cu, 16), [q, k, v, eta, h0])
                if K == V:   # the LayerNorm form
                    w, b = torch.ones(H, V).requires_grad_(), torch.zeros(H, V).requires_grad_()
                    chunk_ttt_linear(*_detach(q, k, v, eta), cu_seqlens=cu, ln_weight=w.detach(), ln_bias=b.detach())
                    grad(chunk_ttt_linear(q, k, v, eta, None, h0, True, cu, 16, w, b), [q, k, v, eta, h0, w, b])
            # decode steps (no varlen)
            Bd, M, topk = 2, 4, 2
            for kind in range(4):
                for delta in (False, True):
                    q, k, v = torch.randn(Bd, H, K, dtype=dt), torch.randn(Bd, H, K, dtype=dt), torch.randn(Bd, H, V, dtype=dt)
                    g = torch.randn(Bd, H, dtype=dt) if kind == 2 else torch.randn(Bd, H, K, dtype=dt) if kind == 3 else None
                    g_gamma = -torch.rand(H) if kind == 1 else None
                    beta = torch.rand(Bd, H, dtype=dt) if delta else None
                    recurrent_step(q, k, v, torch.zeros(Bd, H, K, V), g=g, g_gamma=g_gamma, beta=beta)
                    NS = M + 1  # every memory's row
                    km, vm = torch.randn(Bd, NS, H, K, dtype=dt), torch.randn(Bd, NS, H, V, dtype=dt)
                    gm = None if g is None else torch.randn(Bd, NS, *g.shape[1:], dtype=dt)
                    bm = torch.rand(Bd, NS, H, dtype=dt) if delta else None
                    mom_step(q, km, vm, torch.zeros(Bd, M + 1, H, K, V), torch.tensor([[0, 2], [1, 3]]),
                             torch.rand(Bd, topk, dtype=dt), g=gm, g_gamma=g_gamma, beta=bm)
            # TTT-Linear decode step, plain and LayerNorm form (K == V)
            for ln in (False, True):
                q, k, v = torch.randn(Bd, H, K, dtype=dt), torch.randn(Bd, H, K, dtype=dt), torch.randn(Bd, H, V, dtype=dt)
                state = (torch.zeros(Bd, H, K, V), torch.zeros(Bd, H, K, V), torch.zeros(Bd, H))
                ttt_step(q, k, v, torch.rand(Bd, H), state, None, 16,
                         torch.ones(H, V) if ln else None, torch.zeros(H, V) if ln else None)
            # the layer's fused short conv (+ L2 norm of q, k) and gated RMSNorm, dense and packed
            C = H * K
            for head in (None, K):
                for packed in (False, True):
                    x = torch.randn(1 if packed else 2, T, C, dtype=dt).requires_grad_()
                    w, b = torch.randn(C, 4).requires_grad_(), torch.zeros(C).requires_grad_()
                    pos = torch.arange(T) % 30 if packed else None
                    torch.autograd.grad(short_conv(x, w, b, pos, True, head).float().sum(), [x, w, b])
            x, gate = torch.randn(2, T, H, V, dtype=dt).requires_grad_(), torch.randn(2, T, H, V, dtype=dt).requires_grad_()
            w = torch.ones(V).requires_grad_()
            torch.autograd.grad(gated_rms_norm(x, w, gate).float().sum(), [x, w, gate])


def _resources(ptx: str, arch: int) -> str:
    """Registers per thread, spilled bytes and the stack of one compiled kernel: ptxas -v on its PTX (the ptxas
    that triton ships). Spills mean values the kernel keeps in local memory, i.e. in cache or HBM."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    return (f"{regs.group(1) if regs else '?'} registers, spills {st.group(1) if st else '?'} B stored / "
            f"{st.group(2) if st else '?'} B loaded, stack {stack.group(1) if stack else '?'} B")


def _compile(job):
    i, arch, num_warps, num_stages = job[:4]
    fn, sig, cx, attrs = list(VARIANTS.values())[i]
    t = time.time()
    try:
        kw = dict(target=GPUTarget("cuda", arch, 64 if arch >= 90 else 32),
                  options={"num_warps": num_warps, "num_stages": num_stages})
        try:
            cb = triton.compile(ASTSource(fn, sig, cx, attrs), **kw)
        except TypeError:                                        # a release without `attrs`
            cb = triton.compile(ASTSource(fn, sig, cx), **kw)
        assert cb.asm.get("cubin"), "no cubin"
        if len(job) > 4 and job[4]:
            return i, num_warps, None, f"{_resources(cb.asm['ptx'], arch)}, shared {cb.metadata.shared} B"
        return i, num_warps, None, time.time() - t
    except Exception as e:                                       # noqa: BLE001 (report and go on)
        chain, x = [], e                                         # innermost cause first (the actual error)
        while x is not None:
            chain.insert(0, f"{type(x).__name__}: {str(x)[-1500:]}")
            x = x.__cause__ or x.__context__
        return i, num_warps, "\n".join(chain[:3]), time.time() - t


def _describe(cx):
    keep = ("K", "V", "BT", "BK", "BV", "DECAY", "GATED", "T_MODE", "DELTA", "ROUTED", "USE_H0", "STORE_H", "PREC", "LN")
    return " ".join(f"{k}={v}" for k, v in cx.items() if k in keep)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--warps", default="4", help="comma-separated num_warps to compile each variant with")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="bf16, K = V = 64 only")
    ap.add_argument("--only", default=None, help="compile only kernels whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per compiled variant")
    ap.add_argument("--resources", action="store_true",
                    help="one line per variant with its registers, spilled bytes, stack and shared memory (ptxas -v)")
    a = ap.parse_args()

    _intercept()
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"     # only lets the launchers accept CPU tensors; the kernels are
    try:                                     # already decorated as compiled JIT functions and never run
        _calls(a.quick)
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = prev
    idx = [i for i, key in enumerate(VARIANTS) if a.only is None or a.only in key[0]]
    jobs = [(i, a.arch, int(w), a.stages, a.resources) for i in idx for w in a.warps.split(",")]
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), sm_{a.arch}: "
          f"{len(idx)} kernel variants x num_warps {a.warps}, num_stages {a.stages}", flush=True)
    keys = list(VARIANTS)
    per, failed, t0 = {}, [], time.time()
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("fork")) as ex:
        for i, w, err, dt in ex.map(_compile, jobs):
            name, sig, cx, _ = keys[i][0], *VARIANTS[keys[i]][1:]
            ok, n = per.get(name, (0, 0))
            per[name] = (ok + (err is None), n + 1)
            if err is not None:
                failed.append((name, sig, cx, w, err))
                print(f"FAIL {name} num_warps={w} {_describe(cx)}", flush=True)
            elif a.resources:
                print(f"ok   {name} num_warps={w} {_describe(cx)}: {dt}", flush=True)
            elif a.verbose:
                print(f"ok   {name} num_warps={w} {_describe(cx)} ({dt:.1f}s)", flush=True)
    for name, (ok, n) in sorted(per.items()):
        print(f"  {name:<34} {ok:>3}/{n} compiled")
    for name, sig, cx, w, err in failed:
        print(f"\n--- {name} num_warps={w}\n    signature {sig}\n    constexprs {cx}\n{err}")
    n = len(jobs)
    print(f"\ntriton {triton.__version__} sm_{a.arch}: {n - len(failed)}/{n} compiled, {len(failed)} failed "
          f"({time.time() - t0:.0f}s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
