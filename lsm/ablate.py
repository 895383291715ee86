"""Sweeps: rules x memory variants x any-key grid x learning rates x seeds, with statistics a reader can trust.

Variants (MoM paper, arXiv 2502.13685, Table 5):
  single             one memory of the rule (`model.mixer` as declared, type rule)
  mom                Mixture-of-Memories over the rule (num_memories, topk, shared_memory)
  single_same_state  one memory with the same total state as the MoM variant: the MoM layer holds
                     (num_memories + shared) x H memories of K x V, so this one gets that many heads
                     of the same K x V
  single_active_state  one memory with MoM's active state: a token of the MoM layer reads and writes
                     (topk + shared) x H memories of K x V, so this one gets that many heads

    lsm ablate configs/ablate_rules.yaml ablate.seeds=[0,1,2] ablate.lrs=[1e-3,3e-3] ablate.jobs=2
    lsm ablate configs/x.yaml --shard 1/2        # this host runs half of the cells ...
    lsm ablate configs/x.yaml --merge            # ... and the shards' runs.csv are merged into one table

A *cell* is one training run: (rule, variant, grid values, lr, seed); its seed sets both the
parameter-init seed and the data seed. A cell is identified by a hash of its resolved config, so a
changed setting is a new cell and a finished cell is never run twice (a killed sweep continues where
it stopped; `--rerun` runs the sweep's cells again). A cell that raises is recorded as `failed` with
its one-line error, and the others go on (the next call tries it again). Model selection looks only at the validation stream
(`lsm.data`): early stopping (`train.target_accuracy`) and the best learning rate, either by the mean
over all seeds (`ablate.selection: mean`) or at the first seed, the other seeds then run at the
chosen rate only (`two_stage`). Test numbers are reported, never selected on.

Output in `ablate.out_dir`:
  runs.csv                  one row per cell (metrics, validation, accounting, steps, seconds, status, provenance)
  results.md, results.csv   per (rule, variant, grid values): selected lr, mean ± std, min–max over seeds,
                            paired per-seed difference vs the single variant (mean, SE, wins) and its verdict;
                            MoM's paired differences vs single_active_state and single_same_state (a second table);
                            MoM's routing diagnostics (route/<layer>/..., lsm.mixture.diagnostics) averaged over seeds;
                            the per-rule answer (`mom_answer`): MoM beats / ties / loses vs each state-matched baseline
  accuracy_vs_pairs.png     MQAR: accuracy vs number of pairs, band = min–max over seeds
  <metric>_vs_state.png     accuracy (or bits per byte) vs decode-state floats, log x
  loss_curves.png           training loss, band = min–max over seeds
  <metric>_vs_state_by_rule.png  several rules: a panel per rule, a line per variant through the widths, x = state
                            bytes as Zoology counts them, Zoology's published points overlaid (`plot_state_by_rule`)
  cells/<name>/             each cell's run folder (config, metrics.jsonl, checkpoint)
  shards/<i>of<n>/runs.csv  the rows of `--shard i/n`
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lsm.checkpoint import write_atomic
from lsm.config import AblateConfig, Config, ConfigError, first_line, to_yaml, with_overrides

VARIANT_LABELS = {"single": "single", "mom": "MoM", "single_same_state": "single, MoM-size state",
                  "single_active_state": "single, MoM-active state"}
STATE_MATCHED = ("single_active_state", "single_same_state")  # the baselines MoM is compared with at equal state
SELECTION_LABELS = {"mean": "best LR by mean validation score over all seeds",
                    "two_stage": "two-stage: best LR by validation score at the first seed, other seeds at that LR"}
# columns of runs.csv kept as text when read back (the rest are numbers, or JSON for swept values)
_TEXT_COLUMNS = {"cell", "rule", "variant", "status", "error", "run_dir", "commit", "torch", "triton", "lsm", "recovered",
                 "device", "backend"}


# --------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One training run of a sweep."""

    rule: str
    variant: str
    swept: tuple[tuple[str, Any], ...]   # (grid key, value) pairs, in the grid's order
    lr: float
    seed: int
    config: Config                       # the resolved config the run trains
    id: str                              # hash of `config` (see config_hash)

    @property
    def group(self) -> tuple:
        """What the statistics aggregate over seeds: (rule, variant, swept values)."""
        return (self.rule, self.variant, self.swept)


def variant_config(cfg: Config, rule: str, variant: str) -> Config:
    """`cfg` with the rule and the memory variant applied."""
    m = cfg.model.mixer
    head_dim = m.head_dim or cfg.model.hidden_size // m.num_heads
    changes: dict = {"model.mixer.rule": rule, "model.mixer.type": "mom" if variant == "mom" else "rule"}
    if variant in ("single_same_state", "single_active_state"):
        memories = m.num_memories if variant == "single_same_state" else m.topk
        changes["model.mixer.num_heads"] = m.num_heads * (memories + int(m.shared_memory))
        changes["model.mixer.head_dim"] = head_dim
        changes["model.mixer.value_dim"] = m.value_dim or head_dim
    return with_overrides(cfg, changes)


def config_hash(cfg: Config) -> str:
    """Identity of a run: a hash of every setting that can change its numbers (not its name, output folder,
    progress bar, GPU index (`cuda:1` is `cuda`: `ablate.devices` places cells) or the sweep section: the `ablate:`
    block is left out of the hashed YAML, so a sweep option added later leaves every cell's id as it was)."""
    device = re.sub(r"^cuda:\d+$", "cuda", cfg.train.device)
    neutral = replace(cfg, name="", train=replace(cfg.train, out_dir="", progress=False, tensorboard=False,
                                                  device=device))
    return "c" + hashlib.sha256(to_yaml(neutral, without=("ablate",)).encode()).hexdigest()[:11]


def identify(rows: list[dict], cells: list[Cell], out: Path, seen: dict | None = None) -> list[dict]:
    """`rows` (of runs.csv tables) as rows of `cells` where they are: a row under another cell id (an earlier hash,
    or a config from before a setting was added at a default that keeps its numbers) is re-identified from the
    config its run stored (`<run_dir>/config.yaml`, or `out/cells/<its folder name>/config.yaml` for rows from
    another host), loaded and hashed as today; and a row of one of `cells` gets that cell's swept values as its
    grid columns (a row that ran under another grid lacks a key swept now, or has one that is not). Rows of other
    rules or variants are left alone unread; so are rows without a stored config, or whose config no longer loads
    or matches. `seen`: a run folder -> id memo to share between calls (tables often hold the same runs)."""

    by_id = {c.id: c for c in cells}
    kinds = {(c.rule, c.variant) for c in cells}
    seen = {} if seen is None else seen
    fixed = []
    for r in rows:
        run_dir = Path(r.get("run_dir") or "")
        if r["cell"] not in by_id and run_dir.name and (r.get("rule"), r.get("variant")) in kinds:
            if run_dir not in seen:
                seen[run_dir] = next((_stored_id(p) for p in (run_dir / "config.yaml",
                                                               out / "cells" / run_dir.name / "config.yaml")
                                      if p.is_file()), None)
            if seen[run_dir] in by_id:
                r = {**r, "cell": seen[run_dir]}
        if r["cell"] in by_id:   # the grid columns right after the variant, as run_cell writes them
            swept, r = dict(by_id[r["cell"]].swept), {k: v for k, v in r.items() if "." not in k}
            at = list(r).index("variant") + 1 if "variant" in r else len(r)
            r = {**dict(list(r.items())[:at]), **swept, **dict(list(r.items())[at:])}
        fixed.append(r)
    return fixed


def _stored_id(path: Path) -> str | None:
    """The cell id of a run's stored config, hashed as today; None when it no longer loads."""
    from lsm.config import load_config

    try:
        return config_hash(load_config(path))
    except Exception:   # noqa: BLE001 - one unreadable run must not stop a merge
        return None


def recover(out: Path, cells: list[Cell], rows: list[dict], seen: dict | None = None) -> list[dict]:
    """Rows for the finished runs under `out/cells/` that `rows` lack (a sweep ended before it recorded them: killed,
    or a crash elsewhere in it), rebuilt from what each run stored: its config (hashed as today: the cell) and its
    metrics stream, whose last `eval/` record is written once training has ended. The test and validation numbers,
    steps, steps to target, half-way step and accounting are the run's; the wall time, last step's loss and
    provenance are not in the stream and stay blank; `recovered` says where the row came from."""
    from lsm.accounting import account_config
    from lsm.config import load_config

    by_id = {c.id: c for c in cells}
    have = {r["cell"] for r in rows if r.get("status") == "ok"}
    seen = {} if seen is None else seen
    out_rows = []
    for folder in sorted(p for p in (out / "cells").glob("*") if (p / "metrics.jsonl").is_file()):
        if folder.name.rsplit("-", 1)[-1] in have:   # a cell's folder is named by its id when it ran
            continue
        key = folder.resolve()
        if key not in seen:
            seen[key] = _stored_id(folder / "config.yaml")
        cell = by_id.get(seen[key])
        if cell is None or cell.id in have:
            continue
        try:
            records = run_metrics({"run_dir": str(folder)})
        except ValueError:   # a torn stream (json.JSONDecodeError): not a result
            continue
        final = next((r for r in reversed(records) if "eval/accuracy" in r or "eval/bpb" in r), None)
        metric = "accuracy" if final is not None and "eval/accuracy" in final else "bpb"
        val = [r for r in records if f"val/{metric}" in r and final is not None and r["step"] == final["step"]]
        if not val:   # stopped before its test evaluation (or its stream lacks the final validation): no result
            continue
        t = cell.config.train
        # as the trainer counts it: a periodic validation at or above the target (which then stops the run)
        reached = (metric == "accuracy" and t.target_accuracy and t.eval_every and final["step"] % t.eval_every == 0
                   and val[-1]["val/accuracy"] >= t.target_accuracy)
        test = {k[len("eval/"):]: v for k, v in final.items() if k.startswith("eval/") and k != "eval/loss"}
        out_rows.append({
            "cell": cell.id, "rule": cell.rule, "variant": cell.variant, **dict(cell.swept), "lr": cell.lr,
            "seed": cell.seed, **test, f"val_{metric}": val[-1][f"val/{metric}"], "status": "ok",
            "error": "", "steps": final["step"], "steps_to_target": final["step"] if reached else "",
            "half_step": _blank(half_step(records)), "final_loss": "", "train_s": "",
            **account_config(cell.config).as_dict(), "run_dir": load_config(folder / "config.yaml").train.out_dir,
            "recovered": "metrics.jsonl"})
        have.add(cell.id)
    return out_rows


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def group_config(cfg: Config, rule: str, variant: str, swept: tuple) -> Config:
    """The resolved config of a (rule, variant, grid values) group, before its lr and seed are set."""
    base = with_overrides(cfg, {**dict(swept),
                                # CPU runs are one thread each unless asked otherwise: numbers then do not
                                # depend on how many cells run side by side
                                "train.threads": cfg.train.threads or 1, "train.progress": False})
    return variant_config(base, rule, variant)


def make_cell(cfg: Config, rule: str, variant: str, swept: tuple, lr: float, seed: int,
              group: Config | None = None) -> Cell:
    """The cell of (rule, variant, grid values, lr, seed): its resolved config and id. `group`: the group's
    `group_config`, when the caller has it (validating a config is the slow part of planning a sweep)."""
    group = group or group_config(cfg, rule, variant, swept)
    # lr and seeds are validated where they are declared (ablate.lrs, ablate.seeds): set them directly
    vc = replace(group, train=replace(group.train, lr=float(lr), seed=seed), data=replace(group.data, seed=seed))
    cid = config_hash(vc)
    name = f"{rule}-{variant}-{cid}"
    vc = replace(vc, name=name, train=replace(vc.train, out_dir=str(Path(cfg.ablate.out_dir) / "cells" / name)))
    return Cell(rule, variant, tuple(swept), lr, seed, vc, cid)


def grid_points(a: AblateConfig) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of the grid's values, as ((key, value), ...)."""
    keys = list(a.grid)
    return [tuple(zip(keys, values)) for values in itertools.product(*(a.grid[k] for k in keys))]


def learning_rates(cfg: Config) -> list[float]:
    return list(cfg.ablate.lrs) or [cfg.train.lr]


def all_cells(cfg: Config) -> list[Cell]:
    """rules x variants x grid x lrs x seeds, in that nesting order."""
    a = cfg.ablate
    groups = [(rule, variant, swept) for rule in a.rules for variant in a.variants for swept in grid_points(a)]
    return [make_cell(cfg, *g, lr, seed, group=group)
            for g, group in ((g, group_config(cfg, *g)) for g in groups)
            for lr in learning_rates(cfg) for seed in a.seeds]


def plan(cfg: Config, rows: list[dict], cells: list[Cell] | None = None) -> list[Cell]:
    """The cells the sweep needs given the rows finished so far.

    mean: every cell. two_stage: every lr at the first seed; a group's other seeds once its first-seed
    cells are all finished (at the lr they select), or at once when there is one lr.
    """
    cells = all_cells(cfg) if cells is None else cells
    a = cfg.ablate
    if a.selection == "mean" or len(learning_rates(cfg)) == 1:
        return cells
    by_id = {r["cell"]: r for r in rows}
    higher = _higher_is_better(rows)
    out = []
    for group, members in itertools.groupby(cells, key=lambda c: c.group):
        members = list(members)
        first = [c for c in members if c.seed == a.seeds[0]]
        out += first
        done = [by_id[c.id] for c in first if c.id in by_id]
        if len(done) == len(first):
            lr = select_lr(done, "two_stage", a.seeds[0], higher)
            out += [c for c in members if c.seed != a.seeds[0] and c.lr == lr]
    return out


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"2/3" -> (2, 3): the second of three shards."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: expected i/n such as 1/2, got {text!r}") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--shard: need 1 <= i <= n, got {text!r}")
    return i, n


def in_shard(cell: Cell, shard: tuple[int, int] | None) -> bool:
    """Cells are dealt to shards by their id, so a shard's cells do not depend on the plan's order."""
    return shard is None or int(cell.id[1:], 16) % shard[1] == shard[0] - 1


# --------------------------------------------------------------------------- running
_WORKER_DEVICE: str | None = None


def _init_worker(devices) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = devices.get()


def run_cell(cell: Cell, provenance: dict | None = None) -> dict:
    """Train and evaluate one cell; its runs.csv row. An exception becomes status `failed` with its first line."""
    from lsm.evaluate import summary
    from lsm.train import train

    cfg = cell.config
    if _WORKER_DEVICE is not None:
        cfg = replace(cfg, train=replace(cfg.train, device=_WORKER_DEVICE))
    row = _row_head(cell)
    t0 = time.perf_counter()
    static: dict = {}
    try:
        static = _static_columns(cfg, provenance)   # before training: what fails here fails before the GPU time
        result = train(cfg, quiet=True)
        half = half_step(run_metrics({"run_dir": cfg.train.out_dir}))
    except Exception as e:  # a crashing cell is recorded, the sweep goes on
        return {**row, "status": "failed", "error": _error_text(e), "train_s": round(time.perf_counter() - t0, 2),
                **static}
    test, val = summary(result.eval), summary(result.val)
    metric = "accuracy" if "accuracy" in test else "bpb"
    row.update({metric: test[metric], **{k: v for k, v in test.items() if k != metric and k != "loss"},
                f"val_{metric}": val[metric], "status": "ok", "error": "",
                "steps": result.step, "steps_to_target": result.steps_to_target if result.steps_to_target else "",
                "half_step": _blank(half),
                "final_loss": result.losses[-1] if result.losses else "",
                "train_s": round(time.perf_counter() - t0, 2), **static})
    return row


def _row_head(cell: Cell) -> dict:
    """A runs.csv row's first columns: the cell, its rule, variant, grid values, lr and seed."""
    return {"cell": cell.id, "rule": cell.rule, "variant": cell.variant, **dict(cell.swept), "lr": cell.lr,
            "seed": cell.seed}


def _error_text(e: BaseException) -> str:
    return (f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__)[:300]


def _static_columns(cfg: Config, provenance: dict | None) -> dict:
    """Accounting (parameters, state floats, FLOPs: lsm.accounting) and provenance of a cell's config."""
    from lsm.accounting import account_config

    return {**account_config(cfg).as_dict(), "run_dir": cfg.train.out_dir, **(provenance or provenance_of(cfg))}


def provenance_of(cfg: Config) -> dict:
    """Where the numbers come from: git commit, versions, device, the rule backend the device runs."""
    import torch

    import lsm
    from lsm import rules
    from lsm.runtime import resolve_device

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = commit + ("-dirty" if commit and dirty else "")
    except (OSError, subprocess.SubprocessError):
        commit = ""
    device = resolve_device(cfg.train.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    q = torch.zeros(1, device=device, requires_grad=True)
    backend = ""
    if cfg.model.mixer.type != "attention":
        try:   # from q alone (float32, no gates): provenance, which must never decide whether a cell runs
            backend = rules.get(cfg.model.mixer.rule).resolve_backend(cfg.model.mixer.backend, q)
        except ValueError as e:   # a kernel that refuses float32 q (fla's delta rule) may take the run's bf16 inputs
            backend = f"{cfg.model.mixer.backend} (unresolved from float32 q: {first_line(e)})"
    return {"commit": commit, "torch": torch.__version__, "triton": triton_version, "lsm": lsm.__version__,
            "device": f"{device} ({name})", "backend": backend}


def run_cells(cells: list[Cell], provenance: dict | None = None) -> list[dict]:
    """Train `cells` at once, each in a thread of its own and, on a CUDA device, on a CUDA stream of its own (their
    kernels can overlap on the GPU); their rows in order. One cell runs in the calling thread."""
    if len(cells) == 1:
        return [run_cell(cells[0], provenance)]
    from concurrent.futures import ThreadPoolExecutor

    from lsm.runtime import on_own_stream

    def one(slot: int, cell: Cell) -> dict:
        with on_own_stream(_WORKER_DEVICE or cell.config.train.device, slot):
            return run_cell(cell, provenance)

    with ThreadPoolExecutor(len(cells)) as pool:
        return list(pool.map(one, range(len(cells)), cells))


def _batches(cells: list[Cell], streams: int) -> list[list[Cell]]:
    """Up to `streams` cells of one group (same rule, variant, grid point: the same model and step cost, so a batch
    has no straggler) per batch."""
    out = []
    for _, members in itertools.groupby(sorted(cells, key=lambda c: repr(c.group)), key=lambda c: repr(c.group)):
        members = list(members)
        out += [members[i:i + streams] for i in range(0, len(members), streams)]
    return out


def _run_cells(cells: list[Cell], cfg: Config, on_row, more=lambda: []) -> None:
    """Run `cells` (in this process for jobs = 1, else in `ablate.jobs` spawned workers), `ablate.streams` cells of a
    group at a time per process (`run_cells`); `on_row(row)` as each ends. `more()`, asked after every batch, names
    cells that became runnable meanwhile (two_stage: a group's seeds once its LR grid is in); they go to the
    queue's front (`drain`), so no worker idles while one group's grid waits for another's, and groups end whole."""
    a = cfg.ablate
    if not cells:
        return
    if a.jobs == 1 and not a.devices:   # one at a time: the caller plans again once these are done
        try:
            prov = provenance_of(cells[0].config)
        except Exception:   # each cell's row then says why (run_cell)
            prov = None
        for batch in _ordered_batches(cells, a.streams):
            for row in run_cells(batch, prov):
                on_row(row)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
    devices = ctx.Queue()
    for i in range(a.jobs):
        devices.put(a.devices[i % len(a.devices)] if a.devices else None)
    # spawned workers start on demand: no more processes than there are batches queued
    pool = ProcessPoolExecutor(a.jobs, mp_context=ctx, initializer=_init_worker, initargs=(devices,))
    try:
        drain(pool, run_cells, cells, a.streams, on_row, more, slots=a.jobs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ordered_batches(cells: list[Cell], streams: int) -> list[list[Cell]]:
    """`_batches`, the costliest first, so that the last to finish is a short one (order changes no number)."""
    from lsm.accounting import account_config

    cost = lambda batch: -account_config(batch[0].config).train_flops_per_token * batch[0].config.train.steps
    return sorted(_batches(cells, streams), key=cost)


def drain(pool, run, cells: list[Cell], streams: int, on_row, more=lambda: [], slots: int | None = None) -> None:
    """Submit `cells` to `pool` in batches (`run(batch)` -> rows); as each batch ends, hand its rows to `on_row`
    and queue the cells of `more()` not queued before. Returns when nothing is running or left.

    `slots` bounds the batches in the pool at once (the pool's workers: `ablate.jobs`); the rest wait here, and
    `more()`'s cells go to the front of that queue, so a group whose LR grid is in gets its seeds before the next
    group's grid starts: a sweep cut short leaves whole groups (seeds included), not many grids without seeds.
    None submits everything at once.

    A batch whose worker raised is a failed row per cell. A process pool breaks as a whole when a worker dies
    (killed: out of memory, say): every batch still in it is then a failed row saying so, nothing more is
    submitted, and the caller plans again with a fresh pool; running the sweep again retries the failed cells."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    queued: set[str] = set()
    waiting: list[list[Cell]] = []
    batch_of: dict = {}
    broken = False

    def queue(new: list[Cell], front: bool) -> None:
        new = [c for c in new if c.id not in queued]
        queued.update(c.id for c in new)
        batches = _ordered_batches(new, streams) if new else []
        waiting[:0 if front else len(waiting)] = batches

    def submit(running: set) -> set:
        nonlocal broken
        fresh = set()
        while waiting and not broken and (slots is None or len(running) + len(fresh) < slots):
            batch = waiting.pop(0)
            try:
                f = pool.submit(run, batch)
            except BrokenProcessPool:
                broken = True
                break
            batch_of[f] = batch
            fresh.add(f)
        return fresh

    queue(cells, front=False)
    pending = submit(set())
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            try:
                rows = f.result()
            except BrokenProcessPool:
                broken = True
                rows = [{**_row_head(c), "status": "failed", "error": "BrokenProcessPool: a worker process died "
                         "(killed: out of memory?) before this cell finished; run the sweep again to retry it"}
                        for c in batch_of[f]]
            except Exception as e:   # the worker itself failed (run_cell records a cell's own errors): the rest goes on
                rows = [{**_row_head(c), "status": "failed", "error": _error_text(e)} for c in batch_of[f]]
            for row in rows:
                on_row(row)
        queue(more(), front=True)
        pending |= submit(pending)


def run_sweep(cfg: Config, rerun: bool = False, shard: tuple[int, int] | None = None, quiet: bool = False) -> list[dict]:
    """Run the cells of `cfg.ablate` not finished yet (all of them with `rerun`), record each as it ends in
    runs.csv (atomically), then write results and plots (not for a shard: merge the shards first).
    Returns the rows of the sweep's cells."""
    out = Path(cfg.ablate.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = _runs_path(out, shard)
    with _exclusive(runs_path):
        return _run_sweep(cfg, rerun, shard, quiet, out, runs_path)


@contextmanager
def _exclusive(runs_path: Path):
    """One sweep at a time writes a runs.csv: a second `lsm ablate` on the same folder (and shard) is an error."""
    import fcntl

    runs_path.parent.mkdir(parents=True, exist_ok=True)
    with open(runs_path.parent / f".{runs_path.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"ablate.out_dir: another `lsm ablate` is writing {runs_path}; wait for it, or give "
                              f"this one another ablate.out_dir or --shard") from None
        yield


def _runs_path(out: Path, shard) -> Path:
    """A sweep's runs.csv: out_dir's, or its shard's under out_dir/shards/."""
    return out / "runs.csv" if shard is None else out / "shards" / f"{shard[0]}of{shard[1]}" / "runs.csv"


def _by_cell(*tables: list[dict]) -> dict:
    """One row per cell id (a finished row wins: merge_rows)."""
    return {r["cell"]: r for r in merge_rows(list(tables))}


def _sweep_rows(every: list[Cell], out: Path, shard) -> tuple[dict, dict]:
    """The rows a sweep starts from: its own runs.csv (the shard's, for a shard) and, for a shard, the merged table
    beside it; each by cell id, rows of an older id re-identified (identify)."""
    seen: dict = {}
    mine = _by_cell(identify(read_runs(_runs_path(out, shard)), every, out, seen))
    merged = _by_cell(identify(read_runs(out / "runs.csv"), every, out, seen)) if shard is not None else {}
    return mine, merged


def plan_text(cfg: Config, shard: tuple[int, int] | None = None) -> str:
    """What `lsm ablate` would run now, without running it (`--plan`): the sweep's cells, those finished in its
    runs.csv, the cells to run now by group (learning rates x seeds), and, for two_stage, how many seed runs wait
    for their group's LR grid."""
    out = Path(cfg.ablate.out_dir)
    every = all_cells(cfg)   # planned as the sweep plans: over every cell and every finished row, then the shard's
    ids = {c.id for c in every}
    rows = _by_cell(*(list(t.values()) for t in _sweep_rows(every, out, shard)))
    done = {k: r for k, r in rows.items() if r.get("status") == "ok" and k in ids}
    planned = plan(cfg, list(done.values()), every)
    todo = [c for c in planned if in_shard(c, shard) and c.id not in done]
    mine = [c for c in every if in_shard(c, shard)]
    a = cfg.ablate
    waiting = 0
    if a.selection == "two_stage" and len(learning_rates(cfg)) > 1:   # groups whose LR grid is not in yet
        open_groups = {c.group for c in planned if c.seed == a.seeds[0] and c.id not in done}
        waiting = len(open_groups) * (len(a.seeds) - 1)
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    lines = [f"{len(mine)} cells{where} in {out}; {sum(c.id in done for c in mine)} finished; {len(todo)} to run now"
             + (f", {waiting} more seed runs{' (all shards)' if shard else ''} once their group's LR grid is in "
                f"(two_stage)" if waiting else "")]
    for (rule, variant, swept), members in itertools.groupby(todo, key=lambda c: c.group):
        members = list(members)
        point = "".join(f" {k.split('.')[-1]}={_fmt(v)}" for k, v in swept)
        lrs = ", ".join(_fmt(x) for x in dict.fromkeys(c.lr for c in members))
        seeds = ", ".join(str(x) for x in dict.fromkeys(c.seed for c in members))
        lines.append(f"  {rule} {VARIANT_LABELS[variant]}{point}: lr {lrs}; seed {seeds} ({len(members)} run"
                     f"{'s' if len(members) != 1 else ''})")
    return "\n".join(lines) + "\n"


def _run_sweep(cfg: Config, rerun: bool, shard, quiet: bool, out: Path, runs_path: Path) -> list[dict]:
    every = all_cells(cfg)  # once: resolving and hashing hundreds of configs takes seconds
    ids = {c.id for c in every}
    mine, merged = _sweep_rows(every, out, shard)
    ran: set[str] = set()
    fresh = {c.id for c in every if in_shard(c, shard)} if rerun else set()  # --rerun: run these again
    t0 = time.perf_counter()

    def finished() -> dict:
        rows = _by_cell(list(mine.values()), list(merged.values()))
        return {k: r for k, r in rows.items() if r.get("status") == "ok" and (k not in fresh or k in ran)}

    def record(row: dict) -> None:
        mine[row["cell"]] = row
        ran.add(row["cell"])
        write_runs(list(mine.values()), runs_path)
        if not quiet:
            print(_progress_line(row, len(ran), time.perf_counter() - t0), flush=True)

    while True:  # two_stage plans its second stage once the first is done
        done = finished()
        cells = [c for c in plan(cfg, list(done.values()), every) if in_shard(c, shard)]
        todo = [c for c in cells if c.id not in done and c.id not in ran]
        if not todo:
            break
        if not quiet:
            print(f"{len(todo)} cells to run ({len(cells) - len(todo)} of this plan finished before), "
                  f"{min(cfg.ablate.jobs, len(todo))} at a time", flush=True)
        def more() -> list[Cell]:   # cells runnable now that were not before (asked after every batch)
            done = finished()
            return [c for c in plan(cfg, list(done.values()), every)
                    if in_shard(c, shard) and c.id not in done and c.id not in ran]
        _run_cells(todo, cfg, record, more)
    rows = [r for r in _by_cell(list(mine.values()), list(merged.values())).values() if r["cell"] in ids]
    if shard is None:
        write_results(rows, cfg)
    return rows


def _progress_line(row: dict, n: int, seconds: float) -> str:
    swept = "".join(f" {k.split('.')[-1]}={_fmt(v)}" for k, v in row.items() if "." in k)
    head = f"[{n}, {seconds:.0f} s] {row['rule']} {VARIANT_LABELS[row['variant']]}{swept} lr {_fmt(row['lr'])} seed {row['seed']}"
    if row["status"] != "ok":
        return f"{head}: FAILED {row['error']}"
    metric = "accuracy" if "accuracy" in row else "bpb"
    target = f", target at step {row['steps_to_target']}" if row.get("steps_to_target") not in ("", None) else ""
    return (f"{head}: {metric} {row[metric]:.3f} (validation {row['val_' + metric]:.3f}), {row['steps']} steps"
            f"{target}, {row['train_s']:.0f} s")


def merge(cfg: Config, quiet: bool = False) -> list[dict]:
    """Merge `out_dir/shards/*/runs.csv` into `out_dir/runs.csv` (a finished row wins over a failed one of
    the same cell), then write results and plots. Returns the sweep's rows."""
    out = Path(cfg.ablate.out_dir)
    sources = [out / "runs.csv"] + sorted(out.glob("shards/*/runs.csv"))
    every = all_cells(cfg)
    ids = {c.id for c in every}
    seen: dict = {}
    rows = merge_rows([identify(read_runs(p), every, out, seen) for p in sources])
    found = recover(out, every, rows, seen)
    rows = merge_rows([rows, found])
    write_runs(rows, out / "runs.csv")
    mine = [r for r in rows if r["cell"] in ids]
    write_results(mine, cfg)
    if not quiet:
        print(f"merged {len(rows)} rows from {len([p for p in sources if p.exists()])} files into {out / 'runs.csv'}"
              + (f" and {len(found)} finished runs under {out / 'cells'} that no table held (lsm.ablate.recover)"
                 if found else "") + f"; {len(mine)} of them are cells of this config")
        if rows and not mine:
            print("none of the merged rows is a cell of this config (cells are hashed from their resolved config): "
                  "merge with the overrides the shards ran with (ablate.rules, ablate.grid, and any others)")
    return mine


def merge_rows(tables: list[list[dict]]) -> list[dict]:
    """One row per cell from several runs.csv tables: the first finished row, else the last failed one."""
    best: dict[str, dict] = {}
    for table in tables:
        for r in table:
            old = best.get(r["cell"])
            if old is None or old.get("status") != "ok":
                best[r["cell"]] = r
    return list(best.values())


# --------------------------------------------------------------------------- runs.csv
def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns or _columns(rows), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if "." in k and not isinstance(v, str) else v for k, v in r.items()})
    return buf.getvalue()


def write_runs(rows: list[dict], path: Path) -> None:
    """runs.csv, written into a temporary file and renamed into place."""
    write_atomic(Path(path), _csv_text(rows))


def _parse(key: str, text: str) -> Any:
    if key in _TEXT_COLUMNS or text == "":
        return text if key in _TEXT_COLUMNS else None
    try:
        return json.loads(text)
    except ValueError:
        try:
            return float(text)  # nan, inf
        except ValueError:
            return text


def read_runs(path: Path) -> list[dict]:
    """The rows of a runs.csv (empty when it does not exist); numbers parsed, swept values from JSON."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: _parse(k, v) for k, v in r.items() if v is not None} for r in csv.DictReader(f)]


# --------------------------------------------------------------------------- statistics
def _higher_is_better(rows: list[dict]) -> bool:
    return not any("bpb" in r for r in rows)


def _metric(rows: list[dict]) -> str:
    return "accuracy" if _higher_is_better(rows) else "bpb"


def select_lr(rows: list[dict], selection: str, first_seed: int, higher: bool = True) -> float:
    """The learning rate a group's rows select on the validation stream.

    mean: the best mean over seeds, among the rates with the fewest failed runs (a rate that diverges on
    some seed ranks below one that trains on all). two_stage: the best at `first_seed`.
    """
    metric = "val_accuracy" if higher else "val_bpb"
    by_lr: dict[float, list[dict]] = {}
    for r in rows:
        if selection == "mean" or r["seed"] == first_seed:
            by_lr.setdefault(r["lr"], []).append(r)
    if not by_lr:
        raise ValueError("select_lr: no rows to select from")

    def key(lr: float):
        ok = [r[metric] for r in by_lr[lr] if r.get("status") == "ok"]
        failed = len(by_lr[lr]) - len(ok)
        score = statistics.fmean(ok) if ok else -math.inf if higher else math.inf
        return (failed, -score if higher else score, lr)
    return min(by_lr, key=key)


def verdict(diffs: list[float], higher: bool = True) -> str:
    """"win", "loss" or "tie" for paired per-seed differences (variant - baseline).

    A difference counts only if every seed shows the same sign or the mean exceeds two standard errors;
    one seed decides nothing."""
    n = len(diffs)
    if n < 2:
        return "tie"
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    one_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if one_sign or abs(mean) > 2 * se:
        return "win" if (mean > 0) == higher else "loss"
    return "tie"


def summarize(rows: list[dict], selection: str = "mean", seeds: list[int] | None = None,
              grid_base: dict | None = None) -> list[dict]:
    """One line per (rule, variant, swept values): selected lr and the statistics over seeds at that lr.

    The paired difference is against the `single` variant of the same rule and swept values, on the
    seeds both finished, each at its own selected lr; and, for each grid key of `grid_base` (key -> its first
    value), against the line that differs from this one in that key only, at that first value (`_grid_prefix`)."""
    higher = _higher_is_better(rows)
    metric = _metric(rows)
    swept_keys = [k for k in _columns(rows) if "." in k]
    seeds = seeds or sorted({r["seed"] for r in rows})
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["rule"], r["variant"], tuple(json.dumps(r.get(k)) for k in swept_keys)), []).append(r)
    out, per_seed = [], {}
    for (rule, variant, swept), members in groups.items():
        lr = select_lr(members, selection, seeds[0], higher)
        at = [r for r in members if r["lr"] == lr]
        ok = sorted((r for r in at if r.get("status") == "ok"), key=lambda r: r["seed"])
        values = [r[metric] for r in ok]
        per_seed[(rule, variant, swept)] = {r["seed"]: r[metric] for r in ok}
        line = {"rule": rule, "variant": variant, **{k: json.loads(v) for k, v in zip(swept_keys, swept)},
                "lr": lr, "n_seeds": len(values), "failed": len(at) - len(ok),
                "mean": statistics.fmean(values) if values else math.nan,
                "std": statistics.stdev(values) if len(values) > 1 else math.nan,
                "min": min(values, default=math.nan), "max": max(values, default=math.nan),
                "val_mean": statistics.fmean(r[f"val_{metric}"] for r in ok) if ok else math.nan,
                "steps_mean": statistics.fmean(r["steps"] for r in ok) if ok else math.nan,
                "reached_target": sum(1 for r in ok if r.get("steps_to_target") not in ("", None)),
                "half_step_mean": statistics.fmean(halves) if (halves := [r["half_step"] for r in ok
                                                                           if r.get("half_step") not in ("", None)])
                else math.nan, "half_step_n": len(halves),
                "train_s_mean": statistics.fmean(times) if (times := [r["train_s"] for r in ok
                                                                      if r.get("train_s") not in ("", None)])
                else math.nan}   # rows rebuilt from a run's metrics (recover) have no wall time
        for k in ("params_total", "params_active", "state_floats", "memory_floats", "state_rw_floats"):
            if members[0].get(k) is not None:
                line[k] = members[0][k]
        for c in (ok[0] if ok else {}):   # per-cell scores and routing diagnostics (MoM rows only), over seeds
            seen = [r[c] for r in ok if r.get(c) is not None]
            if seen and c.startswith(("acc@", "val_", "route/")):
                line[c] = statistics.fmean(seen)
        out.append(line)
    for line in out:
        key = lambda variant: (line["rule"], variant, tuple(json.dumps(line.get(k)) for k in swept_keys))
        mine = per_seed[key(line["variant"])]
        if line["variant"] != "single":
            line.update(_paired(per_seed.get(key("single")), mine, higher, ""))
        if line["variant"] == "mom":  # MoM against the single memories of its active and of its total state
            for baseline in STATE_MATCHED:
                line.update(_paired(per_seed.get(key(baseline)), mine, higher, f"vs_{baseline}_"))
        for k, first in (grid_base or {}).items():   # a grid value against the grid's first value of that key
            if k in swept_keys and line.get(k) != first:
                at = tuple(json.dumps(first if j == k else line.get(j)) for j in swept_keys)
                line.update(_paired(per_seed.get((line["rule"], line["variant"], at)), mine, higher, _grid_prefix(k)))
    return out


def _paired(base: dict | None, mine: dict, higher: bool, prefix: str) -> dict:
    """Paired per-seed difference mine - base on the seeds both finished: {prefix}diff_mean, diff_se, wins,
    paired, verdict (nothing when no seed pairs up)."""
    diffs = [mine[s] - base[s] for s in sorted(set(base or {}) & set(mine))]
    if not diffs:
        return {}
    return {f"{prefix}diff_mean": statistics.fmean(diffs),
            f"{prefix}diff_se": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan,
            f"{prefix}wins": sum(1 for d in diffs if (d > 0) == higher and d != 0), f"{prefix}paired": len(diffs),
            f"{prefix}verdict": verdict(diffs, higher)}


def _num(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(lines: list[dict], cfg: Config, metric: str = "accuracy") -> str:
    """The results table, headed by what it rests on: seeds, LR grid, selection mode, the tie rule."""
    a = cfg.ablate
    swept = [k for k in _columns(lines) if "." in k]
    what = "test accuracy (mean over the test cells)" if metric == "accuracy" else "test bits per byte (lower is better)"
    head = (f"{len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}) per line; LR grid "
            f"[{', '.join(_fmt(x) for x in learning_rates(cfg))}]; selection: {SELECTION_LABELS[a.selection]}; "
            f"{what} reported at the selected LR, never selected on. vs single: paired per-seed difference, "
            f"mean ± standard error, wins/seeds; a win or loss only if every seed agrees in sign or |mean| > 2 SE, "
            f"else a tie. Half-way step: the first validation step at half the run's last validation accuracy "
            f"(mean over seeds; how long runs sat on a plateau first).\n\n")
    cols = ["rule", "variant", *[k.split(".")[-1] for k in swept], "lr", "seeds", f"{metric} mean ± std", "min–max",
            "validation", "state (floats)", "params", "steps", "half-way step", "vs single", "verdict"]
    align = ["---"] * (2 + len(swept)) + ["---:"] * (len(cols) - 3 - len(swept)) + ["---"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    for ln in lines:
        vs = "" if "diff_mean" not in ln else (f"{ln['diff_mean']:+.3f} ± {_num(ln['diff_se'])} "
                                               f"({ln['wins']}/{ln['paired']})")
        n = f"{ln['n_seeds']}" + (f" (+{ln['failed']} failed)" if ln["failed"] else "")
        cells = [ln["rule"], VARIANT_LABELS[ln["variant"]], *[_fmt(ln.get(k)) for k in swept], _fmt(ln["lr"]), n,
                 f"{_num(ln['mean'])} ± {_num(ln['std'])}", f"{_num(ln['min'])}–{_num(ln['max'])}",
                 _num(ln["val_mean"]), f"{ln.get('state_floats', 0):,}",
                 f"{ln.get('params_total', 0) / 1e3:.0f}k", _num(ln["steps_mean"], ".0f"), _half(ln), vs,
                 ln.get("verdict", "")]
        out.append("| " + " | ".join(cells) + " |")
    return (head + "\n".join(out) + "\n" + _grid_table(lines, swept) + _state_matched_table(lines, swept)
            + mom_answer(lines) + _mom_diagnostics(lines, swept))


def _grid_prefix(key: str) -> str:
    """The summary columns of a grid key's paired comparison: vs_grid/model/mixer/readout/diff_mean, ... (no dots:
    a dotted column is a grid key)."""
    return "vs_grid/" + key.replace(".", "/") + "/"


def _grid_table(lines: list[dict], swept: list[str]) -> str:
    """Each grid value against the key's first grid value, all else equal (summarize's `_grid_prefix` columns)."""
    out = []
    for ln in lines:
        for k in swept:
            p = _grid_prefix(k)
            if p + "diff_mean" in ln:
                others = ", ".join(f"{j.split('.')[-1]}={_fmt(ln.get(j))}" for j in swept if j != k)
                out.append(f"| {ln['rule']} | {VARIANT_LABELS[ln['variant']]} | {others} | {k.split('.')[-1]} = "
                           f"{_fmt(ln.get(k))} | {_num(ln['mean'])} ± {_num(ln['std'])} | {ln[p + 'diff_mean']:+.3f} ± "
                           f"{_num(ln[p + 'diff_se'])} ({ln[p + 'wins']}/{ln[p + 'paired']}) | {ln[p + 'verdict']} |")
    if not out:
        return ""
    return ("\nEach grid value against the first value of its key in `ablate.grid`, everything else equal: paired "
            "per-seed difference (each side at its own selected LR), mean ± SE (wins/seeds), verdict.\n\n"
            "| rule | variant | at | value | mean ± std | vs the key's first value | verdict |\n"
            "|---|---|---|---|---:|---:|---|\n" + "\n".join(out) + "\n")


def _half(line: dict) -> str:
    """The half-way step column: mean over the seeds that have one, and how many of the line's seeds do."""
    if not line.get("half_step_n"):
        return "–"
    n = "" if line["half_step_n"] == line["n_seeds"] else f" ({line['half_step_n']}/{line['n_seeds']})"
    return f"{line['half_step_mean']:.0f}{n}"


def _state_matched_table(lines: list[dict], swept: list[str]) -> str:
    """MoM against the single memories with its active and with its total state (paired per seed), when run."""
    have = [b for b in STATE_MATCHED if any(f"vs_{b}_diff_mean" in ln for ln in lines)]
    if not have:
        return ""
    cols = ["rule", *[k.split(".")[-1] for k in swept], *[f"MoM vs {VARIANT_LABELS[b]}" for b in have]]
    out = ["", "MoM against the single memory of the same active state (K + shared memories' worth of heads) and of the "
           "same total state (M + shared): paired per-seed difference, mean ± SE (wins/seeds), verdict.", "",
           "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * (1 + len(swept)) + ["---:"] * len(have)) + "|"]
    for ln in lines:
        if ln["variant"] != "mom":
            continue
        vs = [(f"{ln[f'vs_{b}_diff_mean']:+.3f} ± {_num(ln[f'vs_{b}_diff_se'])} ({ln[f'vs_{b}_wins']}/"
               f"{ln[f'vs_{b}_paired']}) {ln[f'vs_{b}_verdict']}") if f"vs_{b}_diff_mean" in ln else "" for b in have]
        out.append("| " + " | ".join([ln["rule"], *[_fmt(ln.get(k)) for k in swept], *vs]) + " |")
    return "\n".join(out) + "\n"


def _mom_diagnostics(lines: list[dict], swept: list[str]) -> str:
    """Why MoM wins, ties or loses: per MoM line, the half-way step of every variant of its rule and grid point (when
    runs learned), and per MoM layer the write/read share, the busiest memory's share of the pairs' writes (of the
    tokens' routing without MQAR pairs) and the dead memories, all means over the seeds at the selected LR."""
    moms = [ln for ln in lines if ln["variant"] == "mom" and any(k.startswith("route/") for k in ln)]
    if not moms:
        return ""
    layers = sorted({k.split("/")[1] for ln in moms for k in ln if k.startswith("route/")}, key=lambda x: int(x[1:]))
    variants = [v for v in ("mom", "single", *STATE_MATCHED) if any(ln["variant"] == v for ln in lines)]
    cols = ["rule", *[k.split(".")[-1] for k in swept], "half-way step: " + " / ".join(VARIANT_LABELS[v] for v in variants),
            *[f"{layer} {what}" for layer in layers for what in ("share", "busiest memory", "write spread", "dead")]]
    out = ["", "MoM's diagnostics (means over seeds at the selected LR): half-way steps of every variant; per MoM layer the "
           "fraction of queries that read a memory their pair was written to (share), the busiest memory's fraction of "
           "the pairs' writes (of all tokens' routing when there are no pairs; 1 / num_memories is a fair share), the "
           "number of memories the pairs' writes spread over (exp of their entropy: top-k of M gives k when every pair "
           "goes to the same k memories, M when evenly; – without pair counts), and dead memories.", "",
           "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * (2 + len(swept)) + ["---:"] * 4 * len(layers)) + "|"]
    for ln in moms:
        at = [json.dumps(ln.get(k)) for k in swept]
        same = {o["variant"]: o for o in lines if o["rule"] == ln["rule"] and [json.dumps(o.get(k)) for k in swept] == at}
        halves = " / ".join(_half(same[v]) if v in same else "–" for v in variants)
        diag = []
        for layer in layers:
            diag += [_num(ln.get(f"route/{layer}/share")), _num(ln.get(f"route/{layer}/busiest"), ".2f"),
                     _num(ln.get(f"route/{layer}/spread"), ".2f"), _num(ln.get(f"route/{layer}/dead"), ".2f")]
        out.append("| " + " | ".join([ln["rule"], *[_fmt(ln.get(k)) for k in swept], halves, *diag]) + " |")
    return "\n".join(out) + "\n"


_VERDICT_VERBS = {"win": "beats", "tie": "ties", "loss": "loses"}
_BASELINE_NAMES = {"single_active_state": "the same active state", "single_same_state": "the same total state"}


def mom_answer(lines: list[dict]) -> str:
    """The per-rule answer to "does MoM beat one memory of the same active / total state?", worded from the paired
    verdicts of `summarize` (the numbers of `_state_matched_table`): per rule, each grid point's verdict with the
    seeds MoM is ahead on out of the seeds paired, then the totals. Empty when no state-matched baseline ran."""
    have = [b for b in STATE_MATCHED if any(f"vs_{b}_verdict" in ln for ln in lines)]
    if not have:
        return ""
    swept = [k for k in _columns(lines) if "." in k]
    out = ["", "**Does MoM beat one memory of the same state?** Per rule and grid point, from the paired verdicts above "
           "(seeds MoM is ahead on / seeds paired):", ""]
    tally = {b: {"win": 0, "tie": 0, "loss": 0} for b in have}
    by_rule: dict[str, list[dict]] = {}
    for ln in lines:
        if ln["variant"] == "mom":
            by_rule.setdefault(ln["rule"], []).append(ln)
    for rule, moms in by_rule.items():
        parts = []
        for b in have:
            said = []
            for ln in moms:
                at = "".join(f" at {k.split('.')[-1]} {_fmt(ln.get(k))}" for k in swept)
                if f"vs_{b}_verdict" not in ln:
                    said.append(f"not compared{at} (no paired seeds)")
                    continue
                v = ln[f"vs_{b}_verdict"]
                tally[b][v] += 1
                said.append(f"{_VERDICT_VERBS[v]}{at} ({ln[f'vs_{b}_wins']}/{ln[f'vs_{b}_paired']} seeds)")
            parts.append(f"vs {_BASELINE_NAMES[b]}: " + ", ".join(said))
        out.append(f"- **{rule}**: " + "; ".join(parts) + ".")
    totals = [f"vs {_BASELINE_NAMES[b]} MoM beats in {t['win']}, ties in {t['tie']}, loses in {t['loss']} of "
              f"{sum(t.values())}" for b, t in tally.items()]
    out += ["", "In all (rule x grid point): " + "; ".join(totals) + "."]
    return "\n".join(out) + "\n"


def run_metrics(row: dict, out: Path | None = None) -> list[dict]:
    """A row's metrics.jsonl records: in its run_dir, or, for rows merged from another host, in
    `out/cells/<the run's folder name>` (where `gpu_session.sh zoofetch` unpacks them). [] when neither exists."""
    run_dir = Path(row.get("run_dir") or "")
    if not run_dir.name:
        return []
    for d in (run_dir, *([out / "cells" / run_dir.name] if out is not None else [])):
        path = d / "metrics.jsonl"
        if path.is_file():
            return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return []


def half_step(records: list[dict], floor: float = 0.1) -> int | None:
    """The first validation step whose accuracy reached half of the run's last validation accuracy: how long a run
    sat on a plateau (MQAR's) before it learned. None without a validation accuracy, or when the last is below
    `floor` (a run that never left chance has no half-way point). The periodic validations only: the one a run
    adds at its end when that is not a validation step (`final`) would make a run without them look half-way there
    at its last step."""
    curve = [(r["step"], r["val/accuracy"]) for r in records if "val/accuracy" in r and not r.get("final")]
    if not curve or curve[-1][1] < floor:
        return None
    return next(step for step, acc in curve if acc >= curve[-1][1] / 2)


def busiest_memory(row: dict) -> dict:
    """route/<layer>/busiest of a MoM row: the largest share of the pairs' writes one memory took (write<m>), or of all
    routed tokens (load<m>) where no pairs were counted; and route/<layer>/spread, the number of memories the pairs'
    writes spread over, exp(entropy of the write shares): top-k routing of M memories gives k (every pair into the
    same k) to M (evenly), blank without pair counts. Per run, so a mean over seeds does not average memories whose
    numbering differs between seeds."""
    out = {}
    for layer in sorted({k.split("/")[1] for k in row if k.startswith("route/")}):
        for kind in ("write", "load"):
            shares = [v for k, v in row.items() if k.startswith(f"route/{layer}/{kind}") and v not in ("", None)]
            if shares:
                out[f"route/{layer}/busiest"] = max(shares)
                if kind == "write":
                    out[f"route/{layer}/spread"] = math.exp(-sum(x * math.log(x) for x in shares if x > 0))
                break
    return out


def _blank(x: Any) -> Any:
    return "" if x is None else x


def write_results(rows: list[dict], cfg: Config) -> list[dict]:
    """results.md, results.csv and the plots from a sweep's rows; returns the summary lines."""
    out = Path(cfg.ablate.out_dir)
    if not any(r.get("status") == "ok" for r in rows):
        write_atomic(out / "results.md", "no finished runs\n")
        return []
    a = cfg.ablate
    position = lambda values, v: values.index(v) if v in values else len(values)
    order = lambda ln: (position(a.rules, ln["rule"]), position(a.variants, ln["variant"]),
                        *(position(list(values), ln.get(k)) for k, values in a.grid.items()))
    for r in rows:   # rows from before the column, or from another host: from the metrics that came with them
        if r.get("status") == "ok" and r.get("half_step") in (None, ""):
            r["half_step"] = _blank(half_step(run_metrics(r, out)))
        r.update(busiest_memory(r))
    grid_base = {k: list(v)[0] for k, v in a.grid.items() if len(v) > 1}
    lines = sorted(summarize(rows, a.selection, list(a.seeds), grid_base), key=order)  # the config's order
    metric = _metric(rows)
    write_atomic(out / "results.md", markdown_table(lines, cfg, metric))
    write_atomic(out / "results.csv", _csv_text(lines))
    plot_all(rows, lines, out, metric)
    return lines


# --------------------------------------------------------------------------- plots
def _selected(rows: list[dict], line: dict) -> list[dict]:
    swept = {k: v for k, v in line.items() if "." in k}
    return [r for r in rows if r.get("status") == "ok" and r["rule"] == line["rule"] and r["variant"] == line["variant"]
            and r["lr"] == line["lr"] and all(r.get(k) == v for k, v in swept.items())]


def _label(line: dict) -> str:
    swept = " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in line.items() if "." in k)
    return f"{line['rule']} · {VARIANT_LABELS[line['variant']]}" + (f" · {swept}" if swept else "")


def plot_all(rows: list[dict], lines: list[dict], out: Path, metric: str) -> None:
    """accuracy_vs_pairs.png (MQAR), <metric>_vs_state.png, loss_curves.png and, when the rows hold more than one
    rule, <metric>_vs_state_by_rule.png (`plot_state_by_rule`); bands span min–max over seeds."""
    plt = _pyplot()
    rules = list(dict.fromkeys(ln["rule"] for ln in lines))
    style = lambda line, i: _style(line, i, rules)
    save = lambda fig, ax, name: _save(plt, fig, ax, out, name)

    # acc@<pairs> or acc@<pairs>/T<len> (test cells of several lengths), ordered by pairs then length
    pair_keys = sorted({k for r in rows for k in r if k.startswith("acc@")},
                       key=lambda k: tuple(int(x.lstrip("T")) for x in k[4:].split("/")))
    if metric == "accuracy" and pair_keys:
        fig, ax = plt.subplots(figsize=(8, 4))
        for i, ln in enumerate(lines):
            sel = _selected(rows, ln)
            if not sel:
                continue
            xs = [int(k[4:].split("/")[0]) for k in pair_keys]
            ys = [[r[k] for r in sel] for k in pair_keys]
            st = style(ln, i)
            ax.plot(xs, [statistics.fmean(y) for y in ys], label=f"{_label(ln)} (n={len(sel)})", **st)
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=st["color"], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [k[4:] for k in pair_keys])
        ax.minorticks_off()
        ax.set(xlabel="key-value pairs", ylabel="recall accuracy (mean, band min–max over seeds)", ylim=(-0.02, 1.02),
               title="MQAR recall")
        save(fig, ax, "accuracy_vs_pairs.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, ln in enumerate(lines):
        x = ln.get("state_floats")
        if x and not math.isnan(ln["mean"]):
            st = style(ln, i)
            ax.errorbar([x], [ln["mean"]], yerr=[[0 if math.isnan(ln["std"]) else ln["std"]]], ls="none",
                        marker=st["marker"], color=st["color"], capsize=3, label=_label(ln))
    ax.set_xscale("log")
    ax.set(xlabel="decode cache per sequence (floats: memories, conv tails, ttt extra; log)",
           ylabel=f"{metric} (mean ± std over seeds)",
           title=f"{metric} vs state size")
    save(fig, ax, f"{metric}_vs_state.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, ln in enumerate(lines):
        by_step: dict[int, list[float]] = {}
        for r in _selected(rows, ln):
            for rec in run_metrics(r, out):
                if "loss" in rec:
                    by_step.setdefault(rec["step"], []).append(rec["loss"])
        if by_step:
            steps = sorted(by_step)
            st = style(ln, i)
            ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], ls=st["ls"], color=st["color"], label=_label(ln))
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                            color=st["color"], alpha=0.15)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="training loss (mean, band min–max over seeds)", title="training loss")
    save(fig, ax, "loss_curves.png")

    if len(rules) > 1:
        plot_state_by_rule(rows, lines, out, metric)


ZOOLOGY_PUBLISHED = Path(__file__).with_name("zoology_published.csv")
WIDTH_KEY = "model.hidden_size"   # the grid key the per-rule plot draws as points along a line


def zoology_state_bytes(line: dict) -> float:
    """State per sequence in bytes as Zoology counts it: float32 matrix memories of every layer (lsm.accounting's
    `memory_floats`, all memories of a MoM layer included).

    Zoology (HazyResearch/zoology, `LanguageModel.state_size`) sums each layer's mixer `state_size()` and multiplies
    by 4 bytes: DeltaNet and Gated DeltaNet count heads x key dim x value dim, GLA key dim x head value dim, Mamba-2
    2 x d_model x d_state (its SSM state), none of them their short-conv tails; its hybrids' BaseConv layer adds
    d_model x kernel (3), at most 9% of a published point. Our short-conv tails are left out the same way, and so is
    ttt's mini-batch starting memory (both are in `state_floats`, the decode cache)."""
    from lsm.accounting import STATE_FLOAT_BYTES

    return STATE_FLOAT_BYTES * line["memory_floats"]


def published_points(path: Path = ZOOLOGY_PUBLISHED) -> dict[str, list[tuple[float, float]]]:
    """Zoology's published (state bytes, accuracy) points per rule, from `path` (rule, accuracy, state_bytes, source)."""
    points: dict[str, list[tuple[float, float]]] = {}
    with Path(path).open(newline="") as f:
        for r in csv.DictReader(f):
            points.setdefault(r["rule"], []).append((float(r["state_bytes"]), float(r["accuracy"])))
    return {rule: sorted(p) for rule, p in points.items()}


def plot_state_by_rule(rows: list[dict], lines: list[dict], out: Path, metric: str,
                       published: dict[str, list[tuple[float, float]]] | None = None):
    """<metric>_vs_state_by_rule.png: one panel per rule. x: state per sequence in bytes (`zoology_state_bytes`, log);
    y: the test metric at each group's selected LR, mean with min–max bars over seeds, each seed a faint dot; one line
    per variant (and other swept values) through its widths (`WIDTH_KEY`). For accuracy, Zoology's published points
    (`published_points`; best LR, its own test cells) are overlaid in black stars. Returns the figure (closed)."""
    plt = _pyplot()
    if published is None:
        published = published_points() if metric == "accuracy" else {}
    rules = list(dict.fromkeys(ln["rule"] for ln in lines))
    ncols = min(4, len(rules))
    nrows = math.ceil(len(rules) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 2.6, 2.9 * nrows + 0.9), sharex=True, sharey=True,
                             squeeze=False)
    panels = list(axes.flat)
    for ax in panels[len(rules):]:
        fig.delaxes(ax)
    for ax in panels[max(0, len(rules) - ncols):len(rules)]:
        ax.xaxis.set_tick_params(labelbottom=True)   # the lowest panel of each column, also above a removed one
    for ax, rule in zip(panels, rules):
        curves: dict[tuple, list[dict]] = {}   # (variant, other swept values) -> its lines, one per width
        for ln in lines:
            if ln["rule"] == rule and ln.get("memory_floats") and ln["n_seeds"]:
                other = tuple((k, v) for k, v in ln.items() if "." in k and k != WIDTH_KEY)
                curves.setdefault((ln["variant"], other), []).append(ln)
        for i, ((variant, other), members) in enumerate(curves.items()):
            members.sort(key=lambda ln: ln["memory_floats"])
            st = _style(members[0], i, rules, by_variant=True)
            xs = [zoology_state_bytes(ln) for ln in members]
            for x, ln in zip(xs, members):
                seeds = [r[metric] for r in _selected(rows, ln)]
                ax.plot([x] * len(seeds), seeds, ls="none", marker=st["marker"], color=st["color"], alpha=0.25, ms=3)
            ax.errorbar(xs, [ln["mean"] for ln in members],
                        yerr=[[ln["mean"] - ln["min"] for ln in members], [ln["max"] - ln["mean"] for ln in members]],
                        capsize=2, ms=5, label=VARIANT_LABELS[variant] + "".join(
                            f" · {k.split('.')[-1]}={_fmt(v)}" for k, v in other), **st)
        if rule in published:
            px, py = zip(*published[rule])
            # an errorbar container (no bars), so that the legend lists it after the variants
            ax.errorbar(px, py, ls=":", marker="*", ms=10, color="black", label="Zoology (published)")
        ax.set_xscale("log")
        ax.set_title(rule, fontsize=10)
    if metric == "accuracy":
        panels[0].set_ylim(-0.02, 1.02)
    fig.supxlabel("state per sequence, bytes: float32 matrix memories of all layers, as Zoology counts (log)", fontsize=9)
    fig.supylabel(f"test {metric} at the selected LR\n(mean, bars min–max, dots: seeds)", fontsize=9)
    fig.suptitle(f"{metric} vs state, per rule; points along a line: " + WIDTH_KEY.split(".")[-1]
                 + (" · Zoology (published): its README MQAR figure, best LR, its test cells" if published else ""),
                 fontsize=9)
    return _save(plt, fig, panels[:len(rules)], out, f"{metric}_vs_state_by_rule.png")


# (line style, marker) per variant
_VARIANT_STYLES = {"single": ("-", "o"), "mom": ("--", "s"), "single_same_state": (":", "^"),
                   "single_active_state": ("-.", "v")}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _style(line: dict, i: int, rules: list[str], by_variant: bool = False) -> dict:
    """Line style and marker by variant; colour by variant (`by_variant`), else by rule when there are several,
    else by line index `i`."""
    ls, marker = _VARIANT_STYLES[line["variant"]]
    k = list(_VARIANT_STYLES).index(line["variant"]) if by_variant else rules.index(line["rule"]) if len(rules) > 1 else i
    return dict(ls=ls, marker=marker, color=_pyplot().get_cmap("tab10")(k % 10))


def _save(plt, fig, axes, out: Path, name: str):
    """Grid on every axes, one legend (labels of all axes, once each; in as many columns as the figure's height
    needs) right of the top-right axes, then `out/name` written atomically; returns the closed figure."""
    axes = list(axes) if isinstance(axes, (list, tuple)) else [axes]
    handles: dict = {}
    for ax in axes:
        ax.grid(alpha=0.3)
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    top_right = max(axes, key=lambda ax: (round(ax.get_position().y1, 3), ax.get_position().x1))
    per_column = max(1, int(fig.get_figheight() * 72 / 14))   # 7-point entries, ~14 points apart
    if handles:
        top_right.legend(list(handles.values()), list(handles), fontsize=7, loc="upper left",
                         bbox_to_anchor=(1.02, 1.0), ncol=math.ceil(len(handles) / per_column))
    with warnings.catch_warnings():   # a legend wider than the figure: the tight bounding box below keeps it whole
        warnings.filterwarnings("ignore", "Tight layout not applied")
        fig.tight_layout()
    tmp = out / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, out / name)
    plt.close(fig)
    return fig
