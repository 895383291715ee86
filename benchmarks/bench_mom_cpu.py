"""CPU timing of the Mixture-of-Memories layer against the single-memory layer (torch backend).

    python benchmarks/bench_mom_cpu.py [--rules gated_deltanet gla] [--lengths 64 128 256] [--chunk-sizes 64 16]
                                       [--batch 64] [--reps 5] [--threads 1]

float32, d = 64, 2 heads (K = V = 32), backend "torch"; MoM with 4 memories, top-2 and a shared memory.
Per (rule, T, chunk size): forward + backward of `RuleLayer` and `MixtureOfMemories` on x `[B, T, d]`
(loss = mean of y^2), median of `--reps` calls after one warm-up. A token touches K + shared = 3 memories,
so 3x the single layer is the rule's share of the ideal. The last column: the chunk slots that the MoM's one
packed `rule.chunk` call lays out (its `ChunkLayout`) per routed (token, memory) row; 1 = no padding.
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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
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
