"""Race this project's Triton kernels (backend="triton") against fla's (backend="fla") and SDPA attention.

For every rule with a Triton kernel (diagonal-decay, delta, ttt) and T in {2048, 8192} at B*T = 32K tokens, H = 16, D = 128, bf16:
checks ours against fla on the same inputs (outputs, final state, gradients), then times forward and
forward+backward with triton.testing.do_bench (median) and prints the ratio fla / ours (> 1: ours is
faster). Every row is guarded: a failing provider prints its error and the table goes on.

    python benchmarks/bench_kernels.py                       # the full table
    python benchmarks/bench_kernels.py --rules gla mamba2 --T 2048 --out bench.json --plot bench.png
    python benchmarks/bench_kernels.py --rules gla deltanet --T 2048 --profile prof.txt   # + kernel by kernel

--profile FILE: after a rule's timings, one forward+backward of ours and of fla's under torch.profiler, the
kernels by GPU time (ms per call, share, launches), appended to FILE: where each provider spends its time.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch
import torch.nn.functional as F

DIAG = ["linear_attention", "retnet", "lightning", "gla", "hgrn2", "mamba2"]


def make_inputs(name: str, B: int, T: int, H: int, D: int, dtype=torch.bfloat16, device="cuda"):
    """q, k (L2-normalised, as the layers feed them), v, gates; all leaves require grad."""
    from lsm import rules
    rule = rules.get(name)
    g = torch.Generator(device=device).manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, D, device=device, generator=g), dim=-1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, D, device=device, generator=g), dim=-1).to(dtype).requires_grad_()
    v = torch.randn(B, T, H, D, device=device, generator=g).to(dtype).requires_grad_()
    gates = {}
    for n, spec in rule.gates.items():
        if n == "g_gamma":
            continue  # the rule's default per-head schedule
        shape = (B, T, H, D) if spec.per == "key" else (B, T, H)
        # GLA-style gates: logsigmoid / 16 (decays close to 1); mamba2-style: a few tenths per token
        x = torch.randn(shape, device=device, generator=g)
        if n == "eta":  # ttt's learning rate: base_lr / 2 on average, as TTTGate starts
            gates[n] = (x.sigmoid() / D).requires_grad_()
            continue
        gates[n] = (x.sigmoid() if spec.kind == "rate" else F.logsigmoid(x) / 16 if spec.per == "key"
                    else -F.softplus(x) * 0.2).requires_grad_()  # rate: beta in (0, 1)
    return rule, q, k, v, gates


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check(name: str, B: int, T: int, H: int, D: int) -> str:
    """Max relative error of ours vs fla over o, final state and the input gradients."""
    rule, q, k, v, gates = make_inputs(name, B, T, H, D)
    leaves = [q, k, v, *gates.values()]
    do = torch.randn_like(v)
    res = {}
    for backend in ("triton", "fla"):
        o, S = rule.chunk(q, k, v, output_final_state=True, backend=backend, **gates)
        grads = torch.autograd.grad((o * do).sum(), leaves)
        res[backend] = (o, S, *grads)
    names = ["o", "S", "dq", "dk", "dv", *("d" + n for n in gates)]
    errs = {n: rel(a, b) for n, a, b in zip(names, res["triton"], res["fla"])}
    # gate gradients are reverse cumulative sums of differences: bf16 rounding shows more there
    bad = [n for n, e in errs.items() if e > (5e-2 if n.startswith("dg") else 2e-2)]
    worst = max(errs, key=errs.get)
    return f"{'MISMATCH ' + ','.join(bad) if bad else 'ok'} (max rel {errs[worst]:.1e} in {worst})"


def calls(name: str, backend: str, B: int, T: int, H: int, D: int):
    """(forward, forward+backward, the leaves whose .grad the latter fills) of one rule and backend."""
    rule, q, k, v, gates = make_inputs(name, B, T, H, D)
    leaves = [q, k, v, *gates.values()]
    do = torch.randn_like(v)

    def fwd():
        with torch.no_grad():
            return rule.chunk(q, k, v, backend=backend, **gates)

    def fwdbwd():
        o, _ = rule.chunk(q, k, v, backend=backend, **gates)
        o.backward(do)

    return fwd, fwdbwd, leaves


def fwdbwd_profile(name: str, backend: str, B: int, T: int, H: int, D: int) -> list[dict]:
    """The kernels of one forward+backward (the gradients dropped between calls, as do_bench does)."""
    from _gpu import kernel_profile
    _, fwdbwd, leaves = calls(name, backend, B, T, H, D)

    def once():
        fwdbwd()
        for t in leaves:
            t.grad = None
    return kernel_profile(once)


def time_rule(name: str, backend: str, B: int, T: int, H: int, D: int) -> tuple[float, float]:
    from triton.testing import do_bench
    fwd, fwdbwd, leaves = calls(name, backend, B, T, H, D)
    return (do_bench(fwd, warmup=25, rep=100, return_mode="median"),
            do_bench(fwdbwd, warmup=25, rep=100, grad_to_none=leaves, return_mode="median"))


def time_sdpa(B: int, T: int, H: int, D: int) -> tuple[float, float]:
    from triton.testing import do_bench
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwdbwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    return (do_bench(fwd, warmup=25, rep=100, return_mode="median"),
            do_bench(fwdbwd, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median"))


def _fmt(x) -> str:
    return f"{x:8.3f}" if isinstance(x, float) else f"{'-':>8}"


def _ratio(a, b) -> str:
    return f"{a / b:6.2f}" if isinstance(a, float) and isinstance(b, float) else f"{'-':>6}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", nargs="+", default=DIAG + ["deltanet", "gated_deltanet", "ttt"])
    p.add_argument("--T", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--tokens", type=int, default=32768, help="B * T")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against fla")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--plot", help="write a bar chart of forward+backward times here (PNG)")
    p.add_argument("--profile", help="append each rule's kernel-by-kernel fwd+bwd profile (ours and fla's) here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 1
    from _gpu import configure_autotuning, format_profile
    configure_autotuning()
    import triton

    from lsm import rules
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"B*T={a.tokens} H={a.heads} D={a.dim} bf16, times in ms (do_bench median)")
    head = (f"{'rule':<17}{'T':>6} | {'ours fwd':>8} {'fla fwd':>8} {'fla/ours':>8} | {'ours f+b':>8} {'fla f+b':>8} "
            f"{'fla/ours':>8} | {'sdpa fwd':>8} {'sdpa f+b':>8} | check")
    print(head)
    print("-" * len(head))
    rows = []
    for T in a.T:
        B = max(a.tokens // T, 1)
        try:
            sdpa = time_sdpa(B, T, a.heads, a.dim)
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
            sdpa = (None, None)
            print(f"# sdpa T={T}: {type(e).__name__}: {e}", file=sys.stderr)
        for name in a.rules:
            row = {"rule": name, "T": T, "B": B, "sdpa_fwd": sdpa[0], "sdpa_fwdbwd": sdpa[1]}
            for backend in ("triton", "fla"):
                if backend == "fla" and not rules.get(name).has_fla:
                    row["fla_fwd"] = row["fla_fwdbwd"] = None
                    row["fla_error"] = "fla has no kernel for this function (see the rule's docstring)"
                    continue
                try:
                    row[f"{backend}_fwd"], row[f"{backend}_fwdbwd"] = time_rule(name, backend, B, T, a.heads, a.dim)
                except Exception as e:  # noqa: BLE001
                    row[f"{backend}_fwd"] = row[f"{backend}_fwdbwd"] = None
                    row[f"{backend}_error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc(limit=3)
                finally:
                    torch.cuda.empty_cache()
            if a.no_check or not rules.get(name).has_fla:
                row["check"] = "skipped" if a.no_check else "no fla peer (tests compare with the torch form)"
            else:
                try:
                    row["check"] = check(name, B, T, a.heads, a.dim)
                except Exception as e:  # noqa: BLE001
                    row["check"] = f"error: {type(e).__name__}: {str(e)[:80]}"
            rows.append(row)
            print(f"{name:<17}{T:>6} | {_fmt(row['triton_fwd'])} {_fmt(row['fla_fwd'])} "
                  f"{_ratio(row['fla_fwd'], row['triton_fwd']):>8} | {_fmt(row['triton_fwdbwd'])} "
                  f"{_fmt(row['fla_fwdbwd'])} {_ratio(row['fla_fwdbwd'], row['triton_fwdbwd']):>8} | "
                  f"{_fmt(row['sdpa_fwd'])} {_fmt(row['sdpa_fwdbwd'])} | {row['check']}", flush=True)
            if a.profile:
                for backend in ("triton", "fla"):
                    if row.get(f"{backend}_fwdbwd") is None:
                        continue
                    try:
                        text = format_profile(f"{name} T={T} {'ours' if backend == 'triton' else 'fla'} fwd+bwd",
                                              fwdbwd_profile(name, backend, B, T, a.heads, a.dim))
                    except Exception as e:  # noqa: BLE001
                        text = f"## {name} T={T} {backend}: profile failed: {type(e).__name__}: {e}"
                    with open(a.profile, "a") as f:
                        f.write(text + "\n")
            if a.out:  # after every row: a run cut short keeps what it measured
                with open(a.out, "w") as f:
                    json.dump(rows, f, indent=1)
    if a.plot:
        try:
            _plot(rows, a.plot)
        except Exception as e:  # noqa: BLE001
            print(f"# plot failed: {e}", file=sys.stderr)
    return 0


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['rule']}\nT={r['T']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    for i, (key, lab) in enumerate([("triton_fwdbwd", "ours"), ("fla_fwdbwd", "fla"), ("sdpa_fwdbwd", "SDPA")]):
        ax.bar([j + (i - 1) * 0.27 for j in x], [r.get(key) or 0 for r in rows], width=0.27, label=lab)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("forward + backward, ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
