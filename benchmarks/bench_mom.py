"""GPU benchmark of the Mixture-of-Memories layer: ours against our single-memory layer and fla's layers.

    python benchmarks/bench_mom.py [--reps 10] [--shapes 8x4096 2x16384] [--decode-batch 16] [--out FILE]

bf16, d = 1024, 4 heads x 256 (K = V = 256), rule gated_deltanet; MoM with 4 memories, top-2 and a
shared memory. Rows, all in one run:
    lsm MoM            lsm.mixture.MixtureOfMemories (backend "auto": fla's kernel for the rule on GPU)
    lsm GDN            lsm.layers.RuleLayer("gated_deltanet"), the single-memory layer
    fla MomAttention   fla.layers.MomAttention (expand_v=1, shared_mem=True)
    fla GatedDeltaNet  fla.layers.GatedDeltaNet (expand_v=1)
For each shape (B x T): forward time (no_grad), forward+backward time (dy random, x requires grad),
and peak memory of forward+backward above what was allocated before the call (weights, inputs).
Times are medians over `--reps` calls after warm-up, measured with CUDA events.
Decode: one token at B = `--decode-batch` from a cache filled by a 32-token prefill, median per step;
our layers also with the step captured once and replayed as a CUDA graph (lsm.decoding.GraphedStep).
Sync check: how many host synchronisations one forward of our MoM makes, per rule backend
(torch.cuda.set_sync_debug_mode), to show where a sync remains.

Every row runs under try/except: a failure (out of memory, an fla version without the layer)
prints as an error cell and the rest still runs. The table is printed and, when $OUT is set
(or --out is given), written to a markdown file there.
"""
from __future__ import annotations

import argparse
import os
import statistics
import traceback
import warnings

import torch

from lsm.layers import RuleLayer
from lsm.mixture import MixtureOfMemories

D, H, HEAD, M, TOPK = 1024, 4, 256, 4, 2
DTYPE = torch.bfloat16
BACKEND = "auto"  # rule backend of our layers (--backend)


# ---------------------------------------------------------------- the four layers, one calling convention
def build(name: str):
    """-> (module, forward(x, cache) -> (y, cache), new_cache() for decoding)."""
    if name == "lsm MoM":
        m = MixtureOfMemories("gated_deltanet", D, H, head_dim=HEAD, num_memories=M, topk=TOPK, shared_memory=True,
                              backend=BACKEND)

        def fwd(x, cache=None, use_cache=False):
            out = m(x, cache=cache, use_cache=use_cache)
            return out.output, out.cache
        return m, fwd, lambda: None
    if name == "lsm GDN":
        m = RuleLayer("gated_deltanet", D, H, head_dim=HEAD, backend=BACKEND)

        def fwd(x, cache=None, use_cache=False):
            out = m(x, cache=cache, use_cache=use_cache)
            return out.output, out.cache
        return m, fwd, lambda: None
    from fla.models.cache_utils import Cache
    if name == "fla MomAttention":
        from fla.layers import MomAttention
        m = MomAttention(hidden_size=D, head_dim=HEAD, num_heads=H, expand_v=1, num_memories=M, topk=TOPK,
                         shared_mem=True, layer_idx=0)
    elif name == "fla GatedDeltaNet":
        from fla.layers import GatedDeltaNet
        m = GatedDeltaNet(hidden_size=D, head_dim=HEAD, num_heads=H, expand_v=1, layer_idx=0)
    else:
        raise ValueError(name)

    def fwd(x, cache=None, use_cache=False):
        out = m(x, past_key_values=cache, use_cache=use_cache)
        return out[0], out[2]
    return m, fwd, Cache


LAYERS = ("lsm MoM", "lsm GDN", "fla MomAttention", "fla GatedDeltaNet")


# ---------------------------------------------------------------- measurement
def cuda_time(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over reps calls (CUDA events), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def peak_gib(fn) -> float:
    """Peak memory of fn() above what is allocated before it, GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_train(name: str, B: int, T: int, reps: int) -> dict:
    m, fwd, _ = build(name)
    m = m.to("cuda", DTYPE).train()
    x = torch.randn(B, T, D, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn(B, T, D, device="cuda", dtype=DTYPE)

    def f():
        with torch.no_grad():
            fwd(x)

    def fb():
        y, _ = fwd(x)
        y.backward(dy)
        x.grad = None
        m.zero_grad(set_to_none=True)

    return {"fwd_ms": cuda_time(f, reps), "fwdbwd_ms": cuda_time(fb, reps), "peak_gib": peak_gib(fb)}


def decode_step(name: str, B: int, prefill: int = 32):
    """One decoding step of layer `name` at batch B as a closure (no grad), from a cache filled by a `prefill`-token
    prefill; "(CUDA graph)" names replay the step captured by lsm.decoding.GraphedStep."""
    graph = name.endswith(" (CUDA graph)")
    m, fwd, new_cache = build(name.removesuffix(" (CUDA graph)"))
    m = m.to("cuda", DTYPE).eval()
    with torch.no_grad():
        _, cache = fwd(torch.randn(B, prefill, D, device="cuda", dtype=DTYPE), new_cache(), use_cache=True)
        x = torch.randn(B, 1, D, device="cuda", dtype=DTYPE)
        state = {"cache": cache}
        if graph:
            from lsm.decoding import GraphedStep
            graphed = GraphedStep(lambda xt, c: fwd(xt, c, use_cache=True), x, cache)

    @torch.no_grad()
    def step():
        if graph:
            graphed(x)
        else:
            _, state["cache"] = fwd(x, state["cache"], use_cache=True)
    return step


def bench_decode(name: str, B: int, reps: int) -> dict:
    """Median ms of one decoding step (see decode_step)."""
    return {"decode_ms": cuda_time(decode_step(name, B), reps * 5)}


def count_syncs(backend: str, B: int = 2, T: int = 512) -> int | str:
    """Host synchronisations in one forward of our MoM with the given rule backend."""
    m = MixtureOfMemories("gated_deltanet", D, H, head_dim=HEAD, num_memories=M, topk=TOPK, backend=backend)
    m = m.to("cuda", DTYPE)
    x = torch.randn(B, T, D, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        m(x)  # warm-up (kernel compilation and autotuning may synchronise)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                m(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def guarded(fn, *args) -> dict | str:
    try:
        return fn(*args)
    except Exception as e:  # one failing row must not stop the run
        traceback.print_exc()
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    finally:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- report
def fmt(v, spec=".2f"):
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", nargs="+", default=["8x4096", "2x16384"], help="BxT")
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    ap.add_argument("--out", default=None, help="markdown file (default $OUT/bench_mom.md when $OUT is set)")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "fla", "torch"],
                    help="rule backend of our layers")
    ap.add_argument("--decode-only", action="store_true")
    a = ap.parse_args()
    global BACKEND
    BACKEND = a.backend
    if not torch.cuda.is_available():
        raise SystemExit("bench_mom.py needs a CUDA GPU")
    from _gpu import configure_autotuning
    configure_autotuning()
    torch.manual_seed(0)
    lines = [f"# MoM benchmark: {torch.cuda.get_device_name()}, bf16, d={D}, {H} heads x {HEAD}, "
             f"{M} memories, top-{TOPK}, shared memory, rule gated_deltanet", ""]
    results = {}
    lines += [f"| layer | decode step, B={a.decode_batch} (ms) |", "|---|---:|"]
    for name in a.layers + [f"{n} (CUDA graph)" for n in a.layers if n.startswith("lsm")]:
        r = guarded(bench_decode, name, a.decode_batch, a.reps)
        results[(name, "decode")] = r
        lines.append(f"| {name} | {fmt(r['decode_ms'], '.3f') if isinstance(r, dict) else r} |")
        print(lines[-1], flush=True)
    lines += ["", "| layer | B x T | fwd (ms) | fwd+bwd (ms) | peak fwd+bwd (GiB) |", "|---|---|---:|---:|---:|"]
    for shape in ([] if a.decode_only else a.shapes):
        B, T = (int(s) for s in shape.split("x"))
        for name in a.layers:
            r = guarded(bench_train, name, B, T, a.reps)
            results[(name, shape)] = r
            cells = ([fmt(r["fwd_ms"]), fmt(r["fwdbwd_ms"]), fmt(r["peak_gib"])] if isinstance(r, dict)
                     else [r, "", ""])
            lines.append(f"| {name} | {B} x {T} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)

    def ratio(num, den, key):
        rn, rd = results.get(num), results.get(den)
        if isinstance(rn, dict) and isinstance(rd, dict):
            return f"{rn[key] / rd[key]:.2f}x"
        return "n/a"

    lines.append("")
    for shape in a.shapes:
        lines.append(f"- {shape}: our MoM / our GDN: fwd {ratio(('lsm MoM', shape), ('lsm GDN', shape), 'fwd_ms')}, "
                     f"fwd+bwd {ratio(('lsm MoM', shape), ('lsm GDN', shape), 'fwdbwd_ms')} (target <= 2.5x); "
                     f"fla MoM / fla GDN: fwd {ratio(('fla MomAttention', shape), ('fla GatedDeltaNet', shape), 'fwd_ms')}, "
                     f"fwd+bwd {ratio(('fla MomAttention', shape), ('fla GatedDeltaNet', shape), 'fwdbwd_ms')}; "
                     f"our MoM vs fla MoM fwd+bwd: {ratio(('fla MomAttention', shape), ('lsm MoM', shape), 'fwdbwd_ms')} faster")
    lines.append(f"- decode: fla MoM step / our MoM step = "
                 f"{ratio(('fla MomAttention', 'decode'), ('lsm MoM', 'decode'), 'decode_ms')} eager, "
                 f"{ratio(('fla MomAttention', 'decode'), ('lsm MoM (CUDA graph)', 'decode'), 'decode_ms')} "
                 f"with the step replayed as a CUDA graph (target >= 20x; fla's MoM step synchronises, "
                 f"so it cannot be captured)")
    for backend in ("torch", "triton", "fla"):
        n = guarded(count_syncs, backend)
        lines.append(f"- host synchronisations in one forward of our MoM, rule backend {backend!r}: {n}")
    print("\n".join(lines[-(len(a.shapes) + 5):]))
    out = a.out or (os.path.join(os.environ["OUT"], "bench_mom.md") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {out}")
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
