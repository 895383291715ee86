"""CPU timing of every rule's torch chunked form (and its recurrence, for scale).

    python benchmarks/bench_rules_cpu.py [--lengths 1024 4096 16384] [--rules gla mamba2] [--plot out.png]

B=1, H=4, K=V=64, float32, forward only, chunk size 64. The last column, t(16K)/t(4K), is ~4 for an
algorithm linear in T (a quadratic one would give ~16); the recurrent form is timed at the shortest
length only (it is a Python loop over tokens) and extrapolated linearly for the 16K column.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import lsm.rules as R


def inputs(rule, T, B=1, H=4, K=64, V=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    k = F.normalize(k, dim=-1)
    gates = {}
    for n, spec in rule.gates.items():
        if spec.required:
            shape = (B, T, H, K) if spec.per == "key" else (B, T, H)
            x = torch.randn(*shape, generator=gen)
            gates[n] = F.logsigmoid(x + 3) if spec.kind == "log_decay" else torch.sigmoid(x) * 0.1
    return q, k, v, gates


def timeit(fn, reps=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--rules", nargs="+", default=R.names())
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plot", default=None, help="write a PNG of time vs T")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    Ts = sorted(a.lengths)
    rows = []
    with torch.no_grad():
        for name in a.rules:
            rule = R.get(name)
            times = []
            for T in Ts:
                q, k, v, g = inputs(rule, T)
                times.append(timeit(lambda: rule.chunk(q, k, v, output_final_state=True, backend="torch", **g),
                                    reps=2 if T > 4096 else 3))
            q, k, v, g = inputs(rule, Ts[0])
            with torch.enable_grad() if name == "ttt" else torch.no_grad():  # ttt's definition differentiates
                rec = timeit(lambda: rule.recurrent(q, k, v, output_final_state=True, **g), reps=1)
            rows.append((name, times, rec * Ts[-1] / Ts[0]))
            print(f"  {name}: " + ", ".join(f"T={T}: {t * 1e3:.1f} ms" for T, t in zip(Ts, times)), flush=True)

    head = "| rule | " + " | ".join(f"chunk T={T}" for T in Ts) + f" | recurrent T={Ts[-1]} (extrap.) | t({Ts[-1]})/t({Ts[-2]}) |"
    print()
    print(head)
    print("|" + "---|" * (len(Ts) + 3))
    for name, times, rec in rows:
        ratio = times[-1] / times[-2]
        print(f"| {name} | " + " | ".join(f"{t * 1e3:.1f} ms" for t in times)
              + f" | {rec * 1e3:.0f} ms | {ratio:.2f} |")
    worst = max(r[1][-1] / r[1][-2] for r in rows)
    print(f"\nworst t({Ts[-1]})/t({Ts[-2]}) = {worst:.2f} (linear scaling gives {Ts[-1] / Ts[-2]:.0f}; "
          f"quadratic {(Ts[-1] / Ts[-2]) ** 2:.0f})")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, times, _ in rows:
            ax.loglog(Ts, [t * 1e3 for t in times], marker="o", label=name)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("forward time (ms), CPU float32")
        ax.set_title("torch chunked form, B=1 H=4 K=V=64")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
