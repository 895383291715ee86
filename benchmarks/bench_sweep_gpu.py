"""Sweep throughput on one GPU: training steps/s of the recall study's model for P processes sharing the GPU.

    python benchmarks/bench_sweep_gpu.py                                  # P = 1, 4, 8; single and MoM gated_deltanet
    python benchmarks/bench_sweep_gpu.py --procs 1 6 --variants mom --rule gla --width 64
    python benchmarks/bench_sweep_gpu.py --procs 4 --streams 1 4 --graph on --variants single --width 64   # 4 vs 16 runs
    python benchmarks/bench_sweep_gpu.py --device cpu --tiny --procs 1 2 --windows 2 --window 2   # smoke test on CPU

The models of `configs/zoology_mqar.yaml` are tiny (2 layers, d = 128, batch 64 x 256 tokens), so one
process leaves the GPU launch-bound; `lsm ablate` runs `ablate.jobs` cells side by side to fill it. Each
row starts P real `python -m lsm train` runs of the preset at once (as `lsm ablate` starts its workers:
one CPU thread each, their own seeds), `--windows` log windows of `--window` steps each, no evaluation.
The first window holds the warm-up (Triton compilation and autotuning, allocator growth); a process's
rate is the trainer's `tok_per_s` over the later windows / tokens per step. Printed: steps/s per process
(mean, min), in all, and runs per GPU-hour at the preset's `train.steps` (an upper bound: early stopping
at `train.target_accuracy` ends many runs sooner; evaluation every `train.eval_every` steps is not in it).
The table is written to `--out` (default $OUT or runs/bench_sweep_gpu) as Markdown and JSON, with a plot
when matplotlib is installed. A row whose processes fail prints their first error line; the rest still runs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.hidden_size=16", "model.mixer.num_heads=2", "model.mixer.backend=torch", "data.mqar.vocab_size=64",
        "data.mqar.train_cells=[[16,2],[32,4]]", "data.mqar.test_cells=[[32,4]]", "data.mqar.num_test=8",
        "data.mqar.num_val=8", "train.batch_size=4"]


def run_row(args, variant: str, graph: str, procs: int, streams: int, work: Path) -> dict:
    """P concurrent processes of one variant, eager or graphed (`train.cuda_graph`), each training `streams` runs at
    once (`ablate.streams`: a thread and a CUDA stream each); their runs' steps/s."""
    from lsm.config import load_config

    steps = args.windows * args.window
    overrides = [f"model.hidden_size={args.width}", f"train.batch_size={args.batch}", f"train.steps={steps}",
                 f"train.log_every={args.window}", "train.eval_every=0", "train.target_accuracy=0",
                 "train.warmup_steps=0", "train.threads=1", "train.progress=false", "train.tensorboard=false",
                 f"train.device={args.device}", f"train.cuda_graph={graph == 'on'}", *(TINY if args.tiny else []),
                 *args.overrides]
    kind = [f"model.mixer.rule={args.rule}", f"model.mixer.type={'mom' if variant == 'mom' else 'rule'}"]
    cfg = load_config(args.config, kind + overrides)
    seq_len = max(L for L, _ in cfg.data.mqar.train_cells) if cfg.data.mqar.train_cells else cfg.data.mqar.seq_len
    tokens_per_step = cfg.train.batch_size * seq_len
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    name = f"{variant}-{graph}-p{procs}-s{streams}"
    if streams == 1:   # P `lsm train` processes, as `lsm ablate` starts its workers: one CPU thread each, own seeds
        outs = [work / f"{name}-{i}" for i in range(procs)]
        cmds = [[sys.executable, "-m", "lsm", "train", args.config, *kind, *overrides, f"train.seed={i}",
                 f"data.seed={i}", f"train.out_dir={out}"] for i, out in enumerate(outs)]
    else:              # one `lsm ablate`: P workers, each training `streams` seeds of the same cell at once
        sweep = work / name
        cmds = [[sys.executable, "-m", "lsm", "ablate", args.config, *overrides, f"ablate.rules=[{args.rule}]",
                 f"ablate.variants=[{variant}]", "ablate.selection=mean", "ablate.grid={}",
                 f"ablate.lrs=[{cfg.train.lr}]", f"ablate.seeds=[{','.join(map(str, range(procs * streams)))}]",
                 f"ablate.jobs={procs}", f"ablate.streams={streams}", f"ablate.out_dir={sweep}"]]
    # each in a session of its own: a timed-out `lsm ablate` is killed with the workers it spawned
    runs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for cmd in cmds]
    errors = []
    deadline = time.monotonic() + args.timeout   # one limit for the row, not one per process
    for p in runs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate()
            errors.append(f"timed out after {args.timeout} s")
            continue
        if p.returncode != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            errors.append(lines[-1] if lines else f"exit status {p.returncode}")
    if streams > 1:
        outs = sorted((work / name / "cells").glob("*"))
        errors += [r["error"] for r in _csv_rows(work / name / "runs.csv") if r.get("status") != "ok"]
    rates = []
    for out in outs:
        path = out / "metrics.jsonl"
        records = [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []
        windows = [r["tok_per_s"] for r in records if "tok_per_s" in r][1:]   # the first window is the warm-up
        if windows:
            rates.append(statistics.fmean(windows) / tokens_per_step)
    row = {"variant": variant, "graph": graph, "rule": args.rule, "width": cfg.model.hidden_size, "procs": procs,
           "streams": streams, "ok": len(rates), "error": errors[0] if errors else ""}
    if rates:
        total = sum(rates) * procs * streams / len(rates)   # a failed run would have shared the GPU too
        row.update(per_proc_mean=statistics.fmean(rates), per_proc_min=min(rates), total=total,
                   runs_per_gpu_hour=total * 3600 / (args.run_steps or cfg.train.steps))
    return row


def _csv_rows(path: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(path.open())) if path.is_file() else []


def table(rows: list[dict], run_steps: int) -> str:
    lines = [f"| rule | variant | CUDA graph | width | processes | runs per process | steps/s per run (mean, min) | "
             f"steps/s in all | runs/GPU-hour at {run_steps} steps |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['rule']} | {r['variant']} | {r['graph']} | {r['width']} | {r['procs']} | {r.get('streams', 1)} | "
        if "total" in r:
            lines.append(head + f"{r['per_proc_mean']:.1f}, {r['per_proc_min']:.1f} | {r['total']:.1f} | "
                                f"{r['runs_per_gpu_hour']:.0f} |")
        else:
            lines.append(head + f"error: {r['error']} | | |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, graph in dict.fromkeys((r["variant"], r["graph"]) for r in rows):
        pts = [(r["procs"] * r.get("streams", 1), r["total"]) for r in rows
               if (r["variant"], r["graph"]) == (variant, graph) and "total" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{variant}, CUDA graph {graph}")
    ax.set(xlabel="runs sharing the GPU (processes x runs per process)", ylabel="training steps/s in all",
           title="sweep throughput, one GPU")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "zoology_mqar.yaml"))
    ap.add_argument("--rule", default="gated_deltanet")
    ap.add_argument("--variants", nargs="+", default=["single", "mom"], choices=["single", "mom"])
    ap.add_argument("--graph", nargs="+", default=["off", "on"], choices=["off", "on"],
                    help="train.cuda_graph off (eager steps) and/or on (the step replayed as one CUDA graph)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--streams", type=int, nargs="+", default=[1],
                    help="runs per process (ablate.streams: a thread and a CUDA stream each); 1 = one run per process")
    ap.add_argument("--window", type=int, default=100, help="steps per log window")
    ap.add_argument("--windows", type=int, default=3, help="log windows per run (the first is the warm-up)")
    ap.add_argument("--run-steps", type=int, default=0, help="steps of a sweep run for runs/GPU-hour; 0 = train.steps")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU-sized data (smoke test)")
    ap.add_argument("--timeout", type=int, default=540, help="seconds per row (all its processes together); the "
                    "first row on a cold machine compiles every kernel in every process at once: allow minutes")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/bench_sweep_gpu")
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    args = ap.parse_args()
    if args.windows < 2:
        ap.error("--windows must be >= 2 (the first window is the warm-up)")
    sys.path.insert(0, str(ROOT))
    from lsm.config import load_config

    run_steps = args.run_steps or load_config(args.config).train.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as work:
        for variant in args.variants:
            for graph in args.graph:
                for procs in args.procs:
                    for streams in args.streams:
                        rows.append(run_row(args, variant, graph, procs, streams, Path(work)))
                    print(table(rows[-1:], run_steps).splitlines()[-1], flush=True)
    text = table(rows, run_steps)
    print("\n" + text, end="")
    (out / "bench_sweep_gpu.md").write_text(text)
    (out / "bench_sweep_gpu.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "bench_sweep_gpu.png")


if __name__ == "__main__":
    main()
