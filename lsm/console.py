"""The training console: per-step metrics kept on the device, read back once per log step, one line each.

    meter = StepMeter(device, flops_per_token=train_flops, peak_tflops=device_peak_tflops(device))
    for step in ...:
        ...                                   # forward, backward, clip, optimizer step
        meter.add(step + 1, loss, aux_loss, grad_norm, tokens)  # device tensors: no host wait
        if log_step:
            rows = meter.flush()              # the one host read of the window: [(step, loss, aux, grad_norm)]
            rec = meter.record(lr, end)       # the last flushed step's record; starts a new window
            print(format_line(rec, total_steps))

A record holds step, loss, aux_loss, lr, grad_norm, tok_per_s, tflops (achieved TFLOP/s of the
training step: 3 x the forward FLOPs per token, from `lsm.accounting`), mfu (tflops / the device's
peak), mem_gib / mem_pct (peak allocated GPU memory in the window, and its share of the device's
memory) and eta_s (seconds to the end of this call at the window's pace). Fields a device cannot
give (MFU and memory on CPU) are left out. Timings are taken after the window's read-back, so they
measure finished GPU work, not queued launches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity), matched by substring of
# `torch.cuda.get_device_name()`, first match wins; `train.peak_tflops` overrides.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.5), ("H200", 989.5), ("H100 PCIe", 756.0), ("H100", 989.5), ("H800", 989.5), ("H20", 148.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("A10G", 70.0), ("A10", 125.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
    ("A6000", 154.8), ("V100", 125.0), ("T4", 65.0),
)


def device_peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The device's peak TFLOP/s: `override` when > 0, else the table's entry for a CUDA device's name, else None."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


@dataclass
class StepRow:
    step: int
    loss: float
    aux_loss: float
    grad_norm: float


class StepMeter:
    """Keeps each step's (loss, aux loss, grad norm) as device tensors and reads a window back at once."""

    def __init__(self, device: torch.device, flops_per_token: float | None = None, peak_tflops: float | None = None):
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self._steps: list[int] = []
        self._values: list[Tensor] = []
        self._last: StepRow | None = None
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start a new timing window (after an evaluation or a checkpoint, whose time is not training)."""
        self._tokens, self._window_steps, self._t0 = 0, 0, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def add(self, step: int, loss: Tensor, aux_loss: Tensor, grad_norm: Tensor, tokens: int) -> None:
        """Record a finished step; the tensors stay on the device (no host wait)."""
        self._steps.append(step)
        self._values.append(torch.stack([loss.detach().float(), aux_loss.detach().float(),
                                         grad_norm.detach().float().to(loss.device)]))  # [3]
        self._tokens += tokens
        self._window_steps += 1

    def flush(self) -> list[StepRow]:
        """The steps added since the last flush, read back in one transfer (the host waits here)."""
        if not self._values:
            return []
        values = torch.stack(self._values).tolist()                 # [n, 3]: the one host read of the window
        rows = [StepRow(s, *v) for s, v in zip(self._steps, values)]
        self._steps, self._values = [], []
        self._last = rows[-1]
        return rows

    def record(self, lr: float, end: int) -> dict:
        """The log record of the last flushed step, with the window's throughput; starts a new window."""
        assert self._last is not None, "flush() before record()"
        last = self._last
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tok_s = self._tokens / elapsed
        rec = {"step": last.step, "loss": round(last.loss, 6), "aux_loss": round(last.aux_loss, 6), "lr": lr,
               "grad_norm": round(last.grad_norm, 6), "tok_per_s": round(tok_s, 1)}
        if self.flops_per_token is not None:
            rec["tflops"] = round(tok_s * self.flops_per_token / 1e12, 4)
            if self.peak_tflops:
                rec["mfu"] = round(rec["tflops"] / self.peak_tflops, 6)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            rec["mem_gib"] = round(peak / 2**30, 3)
            rec["mem_pct"] = round(100 * peak / torch.cuda.get_device_properties(self.device).total_memory, 2)
        rec["eta_s"] = round((end - last.step) * elapsed / max(self._window_steps, 1), 1)
        self.restart_clock()
        return rec


def format_line(rec: dict, total_steps: int) -> str:
    """One console line of a log record (fields a device cannot give are left out)."""
    width = len(str(total_steps))
    parts = [f"step {rec['step']:>{width}}/{total_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"gnorm {rec['grad_norm']:.3f}", f"{tqdm.format_sizeof(rec['tok_per_s'])} tok/s"]
    if "tflops" in rec:
        parts.append(f"{rec['tflops']:.3g} TFLOP/s")
    if "mfu" in rec:
        parts.append(f"MFU {100 * rec['mfu']:.2f}%")
    if "mem_gib" in rec:
        parts.append(f"mem {rec['mem_gib']:.2f} GiB ({rec['mem_pct']:.1f}%)")
    parts.append(f"ETA {tqdm.format_interval(rec['eta_s'])}")
    return " | ".join(parts)


def _floats(n: int) -> str:
    return f"{n:,} floats = {tqdm.format_sizeof(4 * n, 'B')}"


def info_lines(cfg, acc) -> list[str]:
    """What `lsm info` and the start of training print: the model, and its `lsm.accounting.Account`."""
    m, mx = cfg.model, cfg.model.mixer
    from lsm.accounting import config_seq_len
    from lsm.config import model_vocab_size

    if mx.type == "mom":
        mixer = (f"{mx.rule} MoM ({mx.num_memories} memories, top-{mx.topk}"
                 f"{' + shared' if mx.shared_memory else ''})")
    else:
        mixer = "softmax attention" if mx.type == "attention" else mx.rule
    hybrid = " + attention blocks" if mx.type != "attention" and (m.attention_every or m.attention_layers) else ""
    lines = [f"model            {mixer}{hybrid}, {m.num_layers} blocks, width {m.hidden_size}, "
             f"vocab {model_vocab_size(cfg)}, context {config_seq_len(cfg)}",
             f"parameters       {acc.params_total:,} total, {acc.params_active:,} active per token",
             f"memories         {_floats(acc.memory_floats)} per sequence (the matrix memories S)",
             f"decode cache     {_floats(acc.state_floats)} per sequence; "
             f"{_floats(acc.state_rw_floats)} read/written per token"]
    if acc.kv_floats_per_token:
        lines.append(f"attention KV     {_floats(acc.kv_floats_per_token)} per token of context")
    lines.append(f"FLOPs per token  {acc.flops_per_token:,} forward, {acc.train_flops_per_token:,} training "
                 f"(forward + backward)")
    return lines
