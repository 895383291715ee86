"""Where one training step of the recall study's model spends its GPU time (one process, nothing beside it).

    python benchmarks/profile_train_step.py [--rule gated_deltanet] [--variant mom] [--width 64] [overrides ...]
    python benchmarks/profile_train_step.py --device cpu model.mixer.backend=torch data.mqar.vocab_size=64   # smoke test

The model and step of `configs/zoology_mqar.yaml` (`lsm.step`: the eager step, and the whole step replayed as
one CUDA graph when `train.cuda_graph` is on). Prints, per step:
  - wall time of the eager step and of the graphed replay (CUDA events, median of --repeats windows),
  - kernels launched and GPU time summed over them (torch.profiler, one eager step): when the summed kernel time
    is close to the replay time, the step is GPU-bound by many tiny kernels, and processes sharing the GPU take
    turns on it (`gpu_session.sh mps` lets them overlap instead);
  - the --rows kernels with the most GPU time.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lsm import distributed
from lsm.config import load_config
from lsm.data import build_data
from lsm.model import build_model
from lsm.runtime import resolve_device, seed_everything
from lsm.step import EagerStep, GraphedTrainStep
from lsm.train import build_optimizer

ROOT = Path(__file__).resolve().parent.parent


def timed(step, start: int, n: int, device: torch.device) -> float:
    """Seconds per step over n steps from `start`, waiting for the device at both ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(start, start + n):
        step(i)
    sync()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "zoology_mqar.yaml"))
    ap.add_argument("--rule", default="gated_deltanet")
    ap.add_argument("--variant", default="single", choices=["single", "mom"])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20, help="steps per timing window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, [f"model.mixer.rule={args.rule}",
                                    f"model.mixer.type={'mom' if args.variant == 'mom' else 'rule'}",
                                    f"model.hidden_size={args.width}", f"train.device={args.device}", *args.overrides])
    device = resolve_device(cfg.train.device)
    ctx = distributed.DistContext(device=device)
    seed_everything(0, threads=cfg.train.threads)
    model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(model, cfg.train, fused=device.type == "cuda")
    data = build_data(cfg)
    eager = EagerStep(model, optimizer, data, cfg, ctx)
    for i in range(3):                                   # compilation, autotuning, optimizer state
        eager(i)
    t_eager = statistics.median(timed(eager, 3 + r * args.steps, args.steps, device) for r in range(args.repeats))
    print(f"{args.rule} {args.variant} d={args.width} batch {cfg.train.batch_size} on {device}: "
          f"eager step {t_eager * 1e3:.2f} ms")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        eager(1000)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        n = sum(e.count for e in kernels)
        busy = sum(e.self_device_time_total for e in kernels) / 1e3
        print(f"one eager step: {n} kernels, {busy:.2f} ms of summed kernel time ({busy / max(n, 1) * 1e3:.1f} us each)")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
        graphed = GraphedTrainStep(model, optimizer, data, cfg, ctx, warmup=1)
        for i in range(3):
            graphed(2000 + i)
        t_graph = statistics.median(timed(graphed, 3000 + r * args.steps, args.steps, device)
                                    for r in range(args.repeats))
        print(f"graphed replay {t_graph * 1e3:.2f} ms per step ({1 / t_graph:.0f} steps/s; eager {1 / t_eager:.0f})")
    else:
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
