"""Data-parallel training under torchrun: DDP or FSDP2, per `train.parallel` (none | ddp | fsdp).

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 -m lsm train configs/mqar_gdn_mom.yaml train.parallel=fsdp

The model knows nothing of distribution; these functions wrap a built model and the trainer calls them:

    ctx = setup(cfg, device)          # process group from torchrun's env (NCCL on GPU, gloo on CPU)
    model = wrap_model(model, cfg)    # DDP, or FSDP2 `fully_shard` per block then the root
    batch = train_shard(data, step, cfg.train.batch_size, micro, ctx)
    loss, value = token_mean_loss(logits, labels, ctx)
    ...
    teardown(ctx)

Batch semantics. `train.batch_size` is the *global* micro-batch: every rank draws the step's global
batch from the shared seeded stream (lsm.data: a function of seed, step and micro-batch) and keeps
the rows `rank::world_size` (a rank-strided sampler). So per-rank batch = batch_size / world_size,
the global batch per optimizer step = per-rank batch x world_size x grad_accum, and a run on N ranks
sees exactly the batches of a one-process run; it can resume on a different number of ranks.
The loss is the mean over the labelled tokens of the global micro-batch (token counts are summed
over ranks), so gradients equal the one-process ones up to float reduction order. The MoM
load-balancing loss is computed per rank on its shard, as in the single-process code.

Checkpoints (DCP shards under FSDP, rank 0's files otherwise) are lsm.checkpoint's.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lsm.config import PARALLEL, Config, ConfigError
from lsm.data import IGNORE, Batch

RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "LSM_DIST_TIMEOUT_S"  # collective timeout in seconds (default 600)

T = TypeVar("T")


class DistributedError(ConfigError):
    """A launch error (missing rendezvous variable, batch not divisible, ...): one line, on every rank."""


@dataclass
class DistContext:
    """Where this process sits: `parallel` mode, rank, world size, local rank and its device."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # this call initialised the process group, so `teardown` destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Checkpoints are DCP shards (FSDP) rather than rank 0's safetensors."""
        return self.parallel == "fsdp"


# --------------------------------------------------------------------------- process group
def setup(cfg: Config, device: torch.device) -> DistContext:
    """Read torchrun's environment, check the batch splits, initialise the process group.

    `train.parallel: none` returns a one-process context (and refuses to run as one of several
    torchrun workers, which would all write the same run). Raises `DistributedError` before any
    collective, so every rank reports the same error and none waits for the others.
    """
    t = cfg.train
    if t.parallel not in PARALLEL:
        raise DistributedError(f"train.parallel: unknown value {t.parallel!r} (choose from {', '.join(PARALLEL)})")
    if t.parallel == "none":
        world = _env_int("WORLD_SIZE", default=1)
        if world > 1:
            raise DistributedError(f"train.parallel: none, but this process is one of WORLD_SIZE={world} torchrun workers; "
                                   f"set train.parallel=ddp or train.parallel=fsdp")
        return DistContext(device=device)

    missing = [v for v in RENDEZVOUS_VARS if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"train.parallel={t.parallel} needs torchrun's rendezvous variables; {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Launch with "
            f"`torchrun --nproc_per_node N -m lsm train CONFIG.yaml train.parallel={t.parallel}` "
            f"(or set train.parallel=none for one process)")
    rank, world, local = (_env_int(v) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    check_batch(cfg, world)

    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s); "
                                   f"use --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 600)))
        bind = {"device_id": device} if device.type == "cuda" else {}  # NCCL: one GPU per rank, known up front
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world, timeout=timeout, **bind)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise DistributedError(f"a process group of rank {dist.get_rank()}/{dist.get_world_size()} is already "
                               f"initialised, but the environment says RANK={rank} WORLD_SIZE={world}")
    return DistContext(t.parallel, rank, world, local, device, owns)


def check_batch(cfg: Config, world_size: int) -> int:
    """The per-rank micro-batch, or `DistributedError` when `world_size` does not divide `train.batch_size`."""
    bs = cfg.train.batch_size
    if bs % world_size:
        raise DistributedError(
            f"train.batch_size: {bs} sequences (the global micro-batch) cannot be split over WORLD_SIZE={world_size} "
            f"ranks; use a multiple of {world_size} (global batch per step = per-rank batch x world size x "
            f"train.grad_accum = {bs} x {cfg.train.grad_accum} here)")
    return bs // world_size


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if `setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def on_all_ranks(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raises a user error on any rank, raise it on every rank.

    For checks whose outcome could differ between ranks (a file one node does not see, a
    checkpoint from another model): ranks that passed would otherwise wait in the next
    collective until the timeout.
    """
    error: Exception | None = None
    result = None
    try:
        result = fn()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        error = e
    if ctx.world_size > 1:
        messages: list = [None] * ctx.world_size
        dist.all_gather_object(messages, None if error is None else str(error))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed and error is None:
            r, m = failed[0]
            raise ConfigError(f"rank {r}: {m}")
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if not raw:
        if default is None:
            raise DistributedError(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer") from None


# --------------------------------------------------------------------------- wrapping
def wrap_model(model: nn.Module, cfg: Config) -> nn.Module:
    """Apply `cfg.train.parallel` to a built model on its device (call after `setup`).

    ddp:  DistributedDataParallel (gradients all-reduced, averaged over ranks).
    fsdp: FSDP2 `fully_shard` on every block, then on the root (embedding, final norm, head);
          bf16 parameters with float32 gradient reduction on GPU unless `train.precision: fp32`.
    none: the model itself.
    Parameters flagged `_no_weight_decay` keep the flag (FSDP2 replaces parameters by DTensors).
    """
    parallel = cfg.train.parallel
    if parallel == "none":
        return model
    if not dist.is_initialized():
        raise DistributedError(f"train.parallel={parallel}: no process group (call lsm.distributed.setup first)")
    device = next(model.parameters()).device
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    flagged = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    if device.type == "cuda" and cfg.train.precision != "fp32":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for block in getattr(model, "blocks", ()):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for name, p in model.named_parameters():
        if name in flagged:
            p._no_weight_decay = True
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model)


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: skip the gradient reduction unless `sync` (the last one)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def clip_grad_norm(parameters, max_norm: float) -> Tensor:
    """`nn.utils.clip_grad_norm_` returning a plain tensor (under FSDP2 the norm is a DTensor)."""
    from torch.distributed.tensor import DTensor

    norm = nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# --------------------------------------------------------------------------- data and loss
def train_shard(data, step: int, batch_size: int, micro: int, ctx: DistContext) -> Batch:
    """This rank's rows (`rank::world_size`) of the global micro-batch `micro` of step `step`."""
    batch = data.train_batch(step, batch_size, micro)
    if ctx.world_size == 1:
        return batch
    r, w = ctx.rank, ctx.world_size
    return Batch(batch.input_ids[r::w].contiguous(), batch.labels[r::w].contiguous())


def token_mean_loss(logits: Tensor, labels: Tensor, ctx: DistContext | None = None) -> tuple[Tensor, Tensor]:
    """(loss to backpropagate, the global micro-batch's mean loss, detached); `ctx` None: one process.

    logits `[b, T, V]`, labels `[b, T]` (this rank's shard). With several ranks the summed
    cross-entropy is divided by the labelled-token count of the *global* micro-batch and
    multiplied by the world size, because DDP/FSDP average gradients over ranks: the reduced
    gradient is the one of the global token mean, whatever each rank's share of labels.
    """
    flat_logits, flat_labels = logits.float().flatten(0, 1), labels.flatten()
    if ctx is None or ctx.world_size == 1:
        loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE)
        return loss, loss.detach()
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum")
    stats = torch.stack([total.detach(), (flat_labels != IGNORE).sum().to(total.dtype)])  # [2]: loss sum, count
    dist.all_reduce(stats)
    count = stats[1].clamp_min(1)
    return total * ctx.world_size / count, stats[0] / count


__all__ = ["DistContext", "DistributedError", "PARALLEL", "RENDEZVOUS_VARS", "barrier", "check_batch",
           "clip_grad_norm", "grad_sync", "on_all_ranks", "setup", "teardown", "token_mean_loss", "train_shard", "unwrap",
           "wrap_model"]
