"""Training throughput of a MoM language model on 1 vs N GPUs: tokens/s, speed-up, scaling efficiency.

    NCCL_NVLS_ENABLE=0 python benchmarks/bench_distributed.py --gpus 1 2 --parallel ddp fsdp
    python benchmarks/bench_distributed.py --device cpu --gpus 1 2 --tiny     # smoke test on CPU (gloo)

Each row is one real `lsm train` run, launched as users launch it: `python -m lsm train` for the
one-process baseline, `torchrun --standalone --nproc_per_node N -m lsm train ... train.parallel=P`
for N ranks. Weak scaling: every rank keeps `--per-gpu-batch` sequences, so the global batch is
per-GPU batch x N. A run takes 2 x `--steps` optimizer steps with `train.log_every = --steps`: the
first window holds the warm-up (Triton autotuning, allocator growth), the trainer's `tok_per_s` of
the second window (global tokens / rank 0's wall time, with the per-step loss sync) is the
result. Default model: MoM over Gated DeltaNet, d = 1024, 8 blocks, 4 heads x 256, 4 memories,
top-2 plus the shared memory, byte-level text, T = 2048, bf16 autocast (FSDP: bf16 parameters,
float32 reduction).

Every row runs in its own process with a timeout; a failure (out of memory, too few GPUs) prints
as an error row and the rest still runs. The Markdown table is printed and written, with the raw
JSON and a plot when matplotlib is installed, to `--out` (default $OUT or runs/bench_distributed).
NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 is set for every launch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODEL = ["model.hidden_size=1024", "model.num_layers=8", "model.mixer.type=mom", "model.mixer.rule=gated_deltanet",
         "model.mixer.num_heads=4", "model.mixer.num_memories=4", "model.mixer.topk=2",
         "model.mixer.shared_memory=true", "data.kind=text", "data.text.seq_len=2048", "data.text.max_bytes=20000000"]
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.mixer.type=mom", "model.mixer.rule=gated_deltanet",
        "model.mixer.num_heads=2", "model.mixer.num_memories=2", "model.mixer.topk=1", "model.mixer.backend=torch",
        "data.kind=text", "data.text.seq_len=64", "data.text.max_bytes=200000", "train.threads=1"]
# what every run shares: no mid-run evaluation, the smallest final one, one kept checkpoint
COMMON = ["train.eval_every=0", "eval.text_batches=1", "eval.batch_size=4", "train.keep_checkpoints=1",
          "train.progress=false", "train.tensorboard=false", "train.warmup_steps=1"]


def _command(n: int, parallel: str, config: Path, overrides: list[str]) -> list[str]:
    if parallel == "none":
        return [sys.executable, "-m", "lsm", "train", str(config), *overrides]
    # --standalone: a local rendezvous on a free port, so concurrent jobs on the host do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "lsm", "train", str(config), *overrides, f"train.parallel={parallel}"]


def run_one(n: int, parallel: str, args, base: list[str], work: Path) -> dict:
    """One `lsm train` launch; -> a result row (tok_per_s, or error)."""
    row = {"gpus": n, "parallel": parallel, "per_gpu_batch": args.per_gpu_batch, "global_batch": args.per_gpu_batch * n}
    run_dir = work / f"{parallel}_{n}"
    overrides = [*base, *COMMON, f"train.device={args.device}", f"train.batch_size={args.per_gpu_batch * n}",
                 f"train.steps={2 * args.steps}", f"train.log_every={args.steps}", f"train.out_dir={run_dir}",
                 *args.set]
    config = work / "bench.yaml"
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1", "LSM_DIST_TIMEOUT_S": str(args.timeout)}
    if args.device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    cmd = _command(n, parallel, config, overrides)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.timeout} s"}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        errors = [ln for ln in tail if "error" in ln.lower() or "Error" in ln]
        return {**row, "error": (errors or tail or [f"exit status {proc.returncode}"])[-1][:200]}
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    timed = [r for r in records if "tok_per_s" in r]
    if len(timed) < 2:
        return {**row, "error": f"expected 2 timing windows in metrics.jsonl, found {len(timed)}"}
    row["tok_per_s"] = timed[-1]["tok_per_s"]
    row["loss"] = timed[-1]["loss"]
    return row


def table(rows: list[dict]) -> str:
    base = next((r["tok_per_s"] for r in rows if r["gpus"] == 1 and "tok_per_s" in r), None)
    out = ["| GPUs | parallel | batch / GPU | global batch | tokens/s | speed-up vs 1 GPU | efficiency |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['gpus']} | {r['parallel']} | {r['per_gpu_batch']} | {r['global_batch']} |"
        if "error" in r:
            out.append(f"{head} error: {r['error']} | | |")
            continue
        speed = r["tok_per_s"] / base if base else float("nan")
        out.append(f"{head} {r['tok_per_s']:,.0f} | {speed:.2f}x | {speed / r['gpus']:.0%} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    if not any("tok_per_s" in r for r in rows):
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for parallel in dict.fromkeys(r["parallel"] for r in rows):
        pts = sorted((r["gpus"], r["tok_per_s"]) for r in rows if r["parallel"] == parallel and "tok_per_s" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=parallel)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("tokens / s")
    ax.set_title("MoM training throughput (weak scaling)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="rank counts to measure (1 = one process)")
    p.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"],
                   help="modes for N > 1 (N = 1 runs train.parallel=none)")
    p.add_argument("--per-gpu-batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after as many warm-up steps)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo smoke test")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    p.add_argument("--set", nargs="*", default=[], help="extra lsm overrides, e.g. model.num_layers=4")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_distributed"))
    p.add_argument("--keep-runs", action="store_true", help="keep each run's folder (metrics, checkpoint)")
    args = p.parse_args(argv)

    if args.device == "cuda":
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < max(args.gpus):
            p.error(f"--gpus {max(args.gpus)} asked for, but {have} CUDA device(s) are visible "
                    f"({'use --gpus up to ' + str(have) + ', ' if have else ''}or --device cpu for a smoke test)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = TINY if args.tiny else MODEL
    plan = [(n, "none") if n == 1 else (n, par) for n in sorted(set(args.gpus)) for par in
            (["none"] if n == 1 else args.parallel)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_distributed.", dir=out) as tmp:
        work = out / "runs" if args.keep_runs else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "bench.yaml").write_text("name: bench_distributed\n")
        for n, parallel in plan:
            print(f"{n} x {args.device}, parallel={parallel} ...", flush=True)
            row = run_one(n, parallel, args, base, work)
            print("  " + (f"{row['tok_per_s']:,.0f} tokens/s" if "tok_per_s" in row else f"error: {row['error']}"),
                  flush=True)
            rows.append(row)
    text = table(rows)
    print()
    print(text, end="")
    (out / "bench_distributed.md").write_text(text)
    (out / "bench_distributed.json").write_text(json.dumps({"args": vars(args), "model": base, "rows": rows}, indent=1))
    wrote_plot = plot(rows, out / "bench_distributed.png")
    print(f"\nwritten: {out / 'bench_distributed.md'}, {out / 'bench_distributed.json'}"
          + (f", {out / 'bench_distributed.png'}" if wrote_plot else ""))
    return 0 if all("tok_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
