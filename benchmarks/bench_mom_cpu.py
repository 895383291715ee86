"""CPU timing of the Mixture-of-Memories layer against the single-memory layer (torch backend).

    python benchmarks/bench_mom_cpu.py [--rules gated_deltanet gla] [--lengths 64 128 256] [--chunk-sizes 64 16]
                                       [--batch 64] [--reps 5] [--threads 1]
    python benchmarks/bench_mom_cpu.py --decode [--rules ...] [--batch 16]

float32, d = 64, 2 heads (K = V = 32), backend "torch"; MoM with 4 memories, top-2 and a shared memory.
Per (rule, T, chunk size): forward + backward of `RuleLayer` and `MixtureOfMemories` on x `[B, T, d]`
(loss = mean of y^2), median of `--reps` calls after one warm-up. A token touches K + shared = 3 memories,
so 3x the single layer is the rule's share of the ideal. The last column: the chunk slots that the MoM's one
packed `rule.chunk` call lays out (its `ChunkLayout`) per routed (token, memory) row; 1 = no padding.
`--decode`: one decoding step (T = 1, from a cache filled by an 8-token prefill, no grad) of each layer at
B = `--batch`: the best of `--reps` medians of 200 steps. At these sizes a step is bound by its op count and
Python, as an eager GPU step is by its launches, so this is where the step's host overhead shows on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lsm.layers import RuleLayer
from lsm.mixture import MixtureOfMemories
from lsm.mixture.routing import dispatch
from lsm.rules._chunking import ChunkLayout

D, H, M, TOPK = 64, 2, 4, 2


def fwd_bwd_ms(layer, x: torch.Tensor, reps: int) -> float:
    def once():
        layer(x).output.square().mean().backward()
    once()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def decode_ms(layer, B: int, reps: int, steps: int = 200) -> float:
    with torch.no_grad():
        cache = layer(torch.randn(B, 8, D), use_cache=True).cache
        x = torch.randn(B, 1, D)
        best = float("inf")
        for _ in range(reps):
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                cache = layer(x, cache=cache, use_cache=True).cache
                times.append(time.perf_counter() - t0)
            best = min(best, statistics.median(times))
    return best * 1e3


def chunk_slots(mom: MixtureOfMemories, x: torch.Tensor) -> float:
    """Chunk slots per sequence that the MoM's packed `rule.chunk` call lays out (as `_chunk` calls it on CPU)."""
    B, T, _ = x.shape
    with torch.no_grad():
        d = dispatch(mom.slots(mom.router(x))[0], mom.num_states)
    lay = ChunkLayout(1, d.src.numel(), mom.chunk_size, d.cu_seqlens, x.device, max_seqlen=T,
                      seqs_per_row=mom.num_states)
    return lay.Nb * lay.NC * lay.C / B


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", nargs="+", default=["gated_deltanet", "gla"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode", action="store_true", help="time one decoding step instead of forward + backward")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.decode:
        print(f"| rule | single step, B={a.batch} (ms) | MoM step (ms) | MoM / single |")
        print("|---|---:|---:|---:|")
        for name in a.rules:
            torch.manual_seed(0)
            single = RuleLayer(name, D, H, backend="torch").eval()
            mom = MixtureOfMemories(name, D, H, num_memories=M, topk=TOPK, shared_memory=True, backend="torch").eval()
            t1, tm = decode_ms(single, a.batch, a.reps), decode_ms(mom, a.batch, a.reps)
            print(f"| {name} | {t1:.3f} | {tm:.3f} | {tm / t1:.2f} |", flush=True)
        return
    print("| rule | T | chunk | single (ms) | MoM (ms) | MoM / single | chunk slots / routed row |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in a.rules:
        for C in a.chunk_sizes:
            for T in a.lengths:
                torch.manual_seed(0)
                x = torch.randn(a.batch, T, D, requires_grad=True)
                single = RuleLayer(name, D, H, chunk_size=C, backend="torch")
                mom = MixtureOfMemories(name, D, H, num_memories=M, topk=TOPK, shared_memory=True, chunk_size=C,
                                        backend="torch")
                t1, tm = fwd_bwd_ms(single, x, a.reps), fwd_bwd_ms(mom, x, a.reps)
                rows = chunk_slots(mom, x) / (T * (TOPK + 1))
                print(f"| {name} | {T} | {C} | {t1:.1f} | {tm:.1f} | {tm / t1:.2f} | {rows:.2f} |", flush=True)


if __name__ == "__main__":
    main()
