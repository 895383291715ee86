"""One optimizer step of the trainer: forward, backward, clipping, AdamW — eager, or replayed from a CUDA graph.

    step = make_step(model, optimizer, data, cfg, ctx)      # train.cuda_graph picks the kind
    lm_loss, aux_loss, grad_norm, tokens = step(step_index)  # device tensors; nothing is read back

`EagerStep` is the general one (any device, gradient accumulation, DDP/FSDP). `GraphedTrainStep` is for the
tiny, launch-bound models of recall sweeps on one GPU: the whole step — forward under autocast, backward,
gradient clipping and the fused AdamW update — is captured once as a CUDA graph after `warmup` eager steps
(Triton compilation and autotuning, optimizer state, library workspaces happen there), then replayed: one
launch per step instead of hundreds. Batches are still drawn on the host as a function of the step
(lsm.data), copied into a pinned buffer and from there, asynchronously, into the graph's static input;
two pinned buffers alternate, so drawing batch k+1 overlaps the device running step k.

What the graph needs: static shapes (MQAR's mixed stream pads every batch to one length; text windows
have one length), no host synchronisation in the model (the MoM dispatch is sync-free), the learning rate
as a device tensor (the scheduler fills it in place; AdamW runs fused and `capturable`), and parameter
gradients that the graph itself allocates and overwrites on every replay. `graph=False` runs the same
static-buffer step without capture (CPU tests of everything but the capture).
"""
from __future__ import annotations

import threading
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from lsm import distributed
from lsm.config import Config, ConfigError, first_line
from lsm.data import labelled_positions
from lsm.runtime import autocast_context

StepValues = tuple[Tensor, Tensor, Tensor, int]   # lm loss, aux loss, grad norm (device tensors), tokens
_CAPTURE = threading.Lock()                       # one graph capture at a time in a process


class EagerStep:
    """The plain step: `grad_accum` micro-batches, each forward + backward, then clip and update."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data, cfg: Config,
                 ctx: distributed.DistContext):
        self.model, self.optimizer, self.data, self.cfg, self.ctx = model, optimizer, data, cfg, ctx
        # train.loss_positions: labelled: the head runs at a row's (at most) `at_labels` labelled positions only
        self.at_labels = data.max_labels() if cfg.train.loss_positions == "labelled" else None

    def __call__(self, step: int) -> StepValues:
        t, ctx, device = self.cfg.train, self.ctx, self.ctx.device
        lm_sum = torch.zeros((), device=device)       # this step's losses, kept on the device
        aux_sum = torch.zeros((), device=device)
        tokens = 0
        for micro in range(t.grad_accum):
            batch = distributed.train_shard(self.data, step, t.batch_size, micro, ctx).to(device)
            with distributed.grad_sync(self.model, micro == t.grad_accum - 1):  # reduce once per step
                lm_loss, lm_value, aux = loss_of(self.model, batch.input_ids, batch.labels, t.precision, device, ctx,
                                                 self.at_labels)
                ((lm_loss + aux) / t.grad_accum).backward()
            lm_sum += lm_value.float() / t.grad_accum
            aux_sum += aux.detach().float() / t.grad_accum
            tokens += batch.input_ids.numel() * ctx.world_size
        grad_norm = clip(self.model, t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lm_sum, aux_sum, grad_norm, tokens


def loss_of(model: nn.Module, input_ids: Tensor, labels: Tensor, precision: str, device: torch.device,
            ctx: distributed.DistContext, at_labels: int | None = None,
            cache_casts: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(language-model loss to backpropagate, its detached value, the router's aux loss) of one micro-batch.

    at_labels: the output head runs at each row's first `at_labels` labelled positions only (the same loss when
    no row holds more: `train.loss_positions: labelled`)."""
    positions = None
    if at_labels is not None:
        positions, labels = labelled_positions(labels, at_labels)
    with autocast_context(precision, device, cache_enabled=cache_casts):
        out = model(input_ids, positions=positions)
        # mean over the global micro-batch's labelled tokens
        lm_loss, lm_value = distributed.token_mean_loss(out.logits, labels, ctx)
    return lm_loss, lm_value, out.aux_loss


def clip(model: nn.Module, max_norm: float) -> Tensor:
    """Clip the global gradient norm (0 = off) and return it (a device tensor)."""
    return distributed.clip_grad_norm(model.parameters(), max_norm if max_norm > 0 else float("inf"))


class GraphedTrainStep:
    """The step as one CUDA graph (see the module docstring); `graph=False` runs it without capture."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data, cfg: Config,
                 ctx: distributed.DistContext, warmup: int = 3, graph: bool = True):
        t = cfg.train   # grad_accum 1 and parallel none: checked with the config (lsm.config)
        if ctx.world_size != 1 or t.grad_accum != 1:
            raise ValueError("GraphedTrainStep: one process and one micro-batch per step (train.cuda_graph's conditions)")
        if not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("GraphedTrainStep: build the optimizer with fused=True (a graph replays the fused update)")
        if warmup < 1:
            raise ValueError(f"GraphedTrainStep: warmup must be >= 1 (optimizer state, compilation and autotuning happen "
                             f"in eager steps, not in the capture), got {warmup}")
        self.eager = EagerStep(model, optimizer, data, cfg, ctx)
        self.model, self.optimizer, self.data, self.cfg, self.ctx = model, optimizer, data, cfg, ctx
        self.warmup, self.use_graph = warmup, graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        first = data.train_batch(0, t.batch_size)
        device = ctx.device
        self.ids = torch.zeros_like(first.input_ids, device=device)       # the graph's static input
        self.labels = torch.zeros_like(first.labels, device=device)
        pin = device.type == "cuda"
        self.pinned = [(torch.empty_like(first.input_ids, pin_memory=pin), torch.empty_like(first.labels, pin_memory=pin))
                       for _ in range(2)]
        self.copied = [torch.cuda.Event() if pin else None for _ in range(2)]
        self.values: tuple[Tensor, Tensor, Tensor] | None = None
        self.lrs: list[Tensor] = []   # the learning-rate tensors the graph reads (the scheduler fills them in place)
        # capture, copies and events on the run's device, not the current one (train.device=cuda:N, one process)
        self.on_device = torch.cuda.device(device) if pin else nullcontext()

    def __call__(self, step: int) -> StepValues:
        self.calls += 1
        if self.calls <= self.warmup:
            return self.eager(step)
        batch = self.data.train_batch(step, self.cfg.train.batch_size)
        if batch.input_ids.shape != self.ids.shape:
            raise ConfigError(f"train.cuda_graph: batch {step} has shape {tuple(batch.input_ids.shape)}, the graph "
                              f"{tuple(self.ids.shape)}; graphs need one batch shape (set train.cuda_graph: false)")
        with self.on_device:
            if self.values is None:
                self._setup()
            self._load(batch)
            if self.graph is not None:
                self.graph.replay()
            else:
                self.values = self._record()
        lm, aux, norm = self.values
        return lm, aux, norm, self.ids.numel()

    def _load(self, batch) -> None:
        """Host batch -> pinned buffer -> (asynchronously) the static input; the two pinned buffers alternate."""
        i = self.calls % 2
        if self.copied[i] is not None:
            self.copied[i].synchronize()     # the copy out of this buffer two steps ago is done (long since)
        ids, labels = self.pinned[i]
        ids.copy_(batch.input_ids)
        labels.copy_(batch.labels)
        self.ids.copy_(ids, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        if self.copied[i] is not None:
            self.copied[i].record()

    def _setup(self) -> None:
        """The learning rate becomes a device tensor (the scheduler fills it in place), AdamW capturable; capture."""
        for g in self.optimizer.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), device=self.ctx.device)
            g["capturable"] = True
        self.lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.zero_grad(set_to_none=True)    # the graph allocates the gradients it overwrites
        if not self.use_graph:
            self.values = ()
            return
        self.graph = torch.cuda.CUDAGraph()
        # Other threads' runs (ablate.streams) launch and synchronise meanwhile: thread-local capture, on this thread's
        # own stream (lsm.runtime.on_own_stream; a fresh one off the default stream), one capture at a time
        current = torch.cuda.current_stream(self.ctx.device)
        stream = torch.cuda.Stream(self.ctx.device) if current == torch.cuda.default_stream(self.ctx.device) else current
        try:
            with _CAPTURE, torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                self.values = self._record()
        except RuntimeError as e:
            raise ConfigError(f"train.cuda_graph: the training step could not be captured as a CUDA graph "
                              f"({first_line(e)}); set train.cuda_graph: false") from e

    def _record(self) -> tuple[Tensor, Tensor, Tensor]:
        t = self.cfg.train
        if not self.use_graph:
            self.optimizer.zero_grad(set_to_none=True)
        # autocast's weight-cast cache would hold casts made during capture: off inside the graph
        lm_loss, lm_value, aux = loss_of(self.model, self.ids, self.labels, t.precision, self.ctx.device, self.ctx,
                                         self.eager.at_labels, cache_casts=False)
        (lm_loss + aux).backward()
        norm = clip(self.model, t.grad_clip)
        self.optimizer.step()
        return lm_value.float(), aux.detach().float(), norm


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, data, cfg: Config, ctx: distributed.DistContext):
    """`GraphedTrainStep` when `train.cuda_graph` is set and the run is on a CUDA device, else `EagerStep`."""
    if cfg.train.cuda_graph and ctx.device.type == "cuda":
        return GraphedTrainStep(model, optimizer, data, cfg, ctx)
    return EagerStep(model, optimizer, data, cfg, ctx)


def plain_lr(optimizer: torch.optim.Optimizer) -> None:
    """Learning rates back to Python floats and `capturable` off (a checkpoint of a graphed run loads anywhere)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], Tensor):
            g["lr"] = float(g["lr"])
        g["capturable"] = False
