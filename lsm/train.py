"""The trainer: AdamW, warm-up + cosine, clipping, autocast, accumulation, metrics, atomic checkpoints, exact resume.

    result = train(load_config("configs/mqar_gdn_mom.yaml"), resume=True)

It orchestrates only: the model comes from `lsm.model.build_model`, batches from `lsm.data`, scores
from `lsm.evaluate`, checkpoints are `lsm.checkpoint`'s. Output folder (`train.out_dir`):

    config.yaml                     the resolved config of the run
    metrics.jsonl                   one JSON object per logged step / evaluation
    checkpoints/step_000500/        model.safetensors, config.yaml, trainer_state.pt
    checkpoints/latest              name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, so a crash never leaves a
half-written one. Batches are a function of the step (see lsm.data), and the
optimizer, scheduler and RNG states are restored, so a resumed run continues exactly.

The step itself never waits for the device: loss, aux loss and gradient norm stay on the device
(`lsm.console.StepMeter`) and are read back once per log step (and at evaluation and checkpoint
steps), so on GPU the NaN/inf divergence check runs there too — it names the first bad step of the
window, and a diverged model is never evaluated or checkpointed. (On CPU, where reading a value
waits for nothing, every step is checked.) Every log step prints one line
(step, loss, lr, grad norm, tokens/s, TFLOP/s, MFU, GPU memory, ETA) and writes the same fields
to metrics.jsonl and TensorBoard.
Under torchrun (`train.parallel: ddp | fsdp`) lsm.distributed sets up the process group, wraps the
model and shards the batches; logging and the progress bar are rank 0's, and checkpoints are rank 0's
safetensors (ddp) or every rank's DCP shards (fsdp, `checkpoints/step_N/dcp/`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lsm import checkpoint, distributed
from lsm.accounting import account, config_seq_len, head_flops_per_token
from lsm.config import Config, TrainConfig, to_yaml
from lsm.console import StepMeter, StepRow, device_peak_tflops, format_line, info_lines
from lsm.data import build_data
from lsm.evaluate import evaluate, summary
from lsm.model import build_model
from lsm.runtime import resolve_device, seeded
from lsm.step import make_step


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf."""


@dataclass
class TrainResult:
    out_dir: Path
    step: int                                          # last completed optimizer step
    losses: list[float] = field(default_factory=list)  # training loss of every step run by this call
    eval: dict = field(default_factory=dict)           # the test evaluation at the end (see lsm.evaluate.evaluate)
    val: dict = field(default_factory=dict)            # the last evaluation on the validation stream
    steps_to_target: int | None = None                 # the step whose validation accuracy reached train.target_accuracy
    checkpoint: Path | None = None
    seconds: float = 0.0
    rank: int = 0                                      # this process's rank (0 when not distributed)


# --------------------------------------------------------------------------- setup helpers
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, embeddings or parameters flagged `_no_weight_decay`."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        skip = p.dim() < 2 or id(p) in embeddings or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, t: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with `train.*`'s learning rate, betas and weight decay (on matrices only, see `param_groups`)."""
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), fused=fused)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- metrics
class MetricsLogger:
    """Appends JSON lines to `metrics.jsonl` and mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop what an interrupted run logged after its last checkpoint: those steps are replayed
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            checkpoint.write_atomic(self.path, "".join(ln + "\n" for ln in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "final") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------- the loop
def train(cfg: Config, resume: bool = False, max_steps: int | None = None, quiet: bool = False) -> TrainResult:
    """Train the model `cfg` declares; checkpoint at `ckpt_every` and the end.

    Every `eval_every` steps the validation stream is scored; once its accuracy reaches
    `train.target_accuracy` (> 0) training stops early (`result.steps_to_target`). At the end both the
    validation stream (`result.val`) and the test set (`result.eval`) are scored; only the former may
    be used to select runs.

    resume: continue from the newest checkpoint in `train.out_dir` (a fresh start if there is none).
    max_steps: stop after this many steps in this call (the schedule still spans `train.steps`);
    a checkpoint is written where it stops, so `resume=True` continues the same run.
    With `train.parallel: ddp | fsdp`, call it on every torchrun worker (lsm.distributed).
    """
    ctx = distributed.setup(cfg, resolve_device(cfg.train.device))
    try:
        return _train(cfg, ctx, resume, max_steps, quiet)
    finally:
        distributed.teardown(ctx)


def _reads_back_every_step(device: torch.device) -> bool:
    """On CPU the step's values are on the host already (reading them waits for nothing): check every step,
    so a NaN stops the run at its own step, before the next step's input checks meet NaN weights."""
    return device.type == "cpu"


def _check_finite(rows: list[StepRow]) -> None:
    """Raise `TrainingDiverged` at the first step whose loss or gradient norm is NaN/inf."""
    for r in rows:
        if not math.isfinite(r.loss):
            raise TrainingDiverged(f"loss is {r.loss} at step {r.step}: training stopped "
                                   f"(lower train.lr, raise train.warmup_steps, or set train.grad_clip)")
        if not math.isfinite(r.grad_norm):
            raise TrainingDiverged(f"gradient norm is {r.grad_norm} at step {r.step}: training stopped "
                                   f"(lower train.lr or set train.grad_clip)")


def _train(cfg: Config, ctx: distributed.DistContext, resume: bool, max_steps: int | None, quiet: bool) -> TrainResult:
    t = cfg.train
    out_dir = Path(t.out_dir)
    main = ctx.is_main
    device = ctx.device
    ckpt = distributed.on_all_ranks(ctx, lambda: checkpoint.find_resume_checkpoint(cfg, quiet or not main)) if resume else None
    if resume and ckpt is None and main and not quiet:
        print(f"no checkpoint in {out_dir}: starting from step 0")

    with seeded(t.seed, threads=t.threads):   # other threads may be building models too (ablate.streams)
        model = build_model(cfg).to(device)
    acc = account(model, config_seq_len(cfg))
    head_flops = head_flops_per_token(model)
    model = distributed.wrap_model(model, cfg)
    optimizer = build_optimizer(model, t, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    start = 0
    if ckpt is not None:
        start = checkpoint.load_training_state(
            ckpt, cfg, ctx, model, optimizer, scheduler,
            lambda plain: build_optimizer(plain, t))

    data = distributed.on_all_ranks(ctx, lambda: build_data(cfg))
    train_step = make_step(model, optimizer, data, cfg, ctx)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_atomic(out_dir / "config.yaml", to_yaml(cfg))
    logger = MetricsLogger(out_dir, t.tensorboard, start if ckpt is not None else None) if main else None
    end = t.steps if max_steps is None else min(t.steps, start + max_steps)
    result = TrainResult(out_dir, start, rank=ctx.rank)
    if main and not quiet:
        ranks = f" x {ctx.world_size} ranks ({t.parallel})" if ctx.world_size > 1 else ""
        print(f"{cfg.name}: {acc.params_total / 1e6:.3f}M parameters on {device}{ranks}, steps {start} -> {end} of {t.steps}")
        print("\n".join(info_lines(cfg, acc)))

    from tqdm.auto import tqdm
    bar = tqdm(total=t.steps, initial=start, disable=not (t.progress and main) or quiet, dynamic_ncols=True,
               desc=cfg.name, unit="step")
    every_step = _reads_back_every_step(device)
    flops = acc.train_flops_per_token
    if t.loss_positions == "labelled":   # the head, forward and backward, runs at max_labels of seq_len positions only
        flops -= round(3 * head_flops * (1 - data.max_labels() / config_seq_len(cfg)))
    meter = StepMeter(device, flops_per_token=flops, peak_tflops=device_peak_tflops(device, t.peak_tflops))
    t0 = time.perf_counter()
    step = start
    try:
        model.train()
        for step in range(start, end):
            lm_sum, aux_sum, grad_norm, tokens = train_step(step)
            scheduler.step()
            meter.add(step + 1, lm_sum, aux_sum, grad_norm, tokens)
            result.step = step + 1
            bar.update(1)
            last = step + 1 == end
            log = (step + 1) % t.log_every == 0 or last
            do_val = bool(t.eval_every and (step + 1) % t.eval_every == 0)
            do_ckpt = bool(t.ckpt_every and (step + 1) % t.ckpt_every == 0) or last
            if log or do_val or do_ckpt or every_step:  # one host read; a diverged model is never evaluated or saved
                rows = meter.flush()
                _check_finite(rows)
                result.losses += [r.loss for r in rows]
            if main and log:
                rec = meter.record(float(scheduler.get_last_lr()[0]), end)  # a device tensor under train.cuda_graph
                logger.log(rec)
                if not quiet:
                    bar.write(format_line(rec, t.steps))
            if do_val:
                result.val = evaluate(model, cfg, data, device, split="val")
                model.train()
                if t.target_accuracy and result.val["accuracy"] >= t.target_accuracy:
                    result.steps_to_target = step + 1
                if main:
                    logger.log({"step": step + 1, **{f"val/{k}": v for k, v in summary(result.val).items()}})
                if main and not quiet:
                    bar.write(f"step {step + 1}: validation " + ", ".join(
                        f"{k} {v:.4f}" for k, v in summary(result.val).items() if not k.startswith("route/")))
            stop = result.steps_to_target is not None
            do_eval = stop or (last and end == t.steps)
            if do_eval:
                if not do_val:   # the validation a sweep's row reports, in the metrics stream too (lsm.ablate.recover)
                    result.val = evaluate(model, cfg, data, device, split="val")
                    if main:
                        logger.log({"step": step + 1, "final": True,
                                    **{f"val/{k}": v for k, v in summary(result.val).items()}})
                result.eval = evaluate(model, cfg, data, device)
                model.train()
                if main:
                    logger.log({"step": step + 1, **{f"eval/{k}": v for k, v in summary(result.eval).items()}})
                if main and not quiet:
                    bar.write(f"step {step + 1}: test " + ", ".join(
                        f"{k} {v:.4f}" for k, v in summary(result.eval).items() if not k.startswith("route/")))
            if do_ckpt or stop:
                result.checkpoint = checkpoint.save(ctx, out_dir, model, optimizer, scheduler, step + 1, cfg)
            if do_val or do_eval or do_ckpt:
                meter.restart_clock()
            if stop:
                if main and not quiet:
                    bar.write(f"step {step + 1}: validation accuracy reached "
                              f"train.target_accuracy = {t.target_accuracy}; stopped")
                break
    except KeyboardInterrupt:
        # several ranks may be interrupted at different points: no collective checkpoint then
        if ctx.world_size == 1 and result.step > start:
            rows = meter.flush()
            _check_finite(rows)  # never checkpoint a diverged model
            result.losses += [r.loss for r in rows]
            result.checkpoint = checkpoint.save(ctx, out_dir, model, optimizer, scheduler, result.step, cfg)
            bar.write(f"interrupted after step {result.step}: checkpoint {result.checkpoint}; continue with --resume")
        raise
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    result.seconds = time.perf_counter() - t0
    return result
