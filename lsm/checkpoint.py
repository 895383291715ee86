"""Every checkpoint read and write: single-file safetensors and sharded DCP, publish/latest/prune, RNG state.

    path = save(ctx, out_dir, model, optimizer, scheduler, step, cfg)   # on every rank
    ckpt = find_checkpoint("runs/x")                                     # a run, its checkpoints/, or step_N
    cfg, model = load_trained("runs/x", device="cuda")                   # lsm eval / lsm generate

A run's folder holds `checkpoints/step_000500/` (model.safetensors, config.yaml, trainer_state.pt)
and `checkpoints/latest`, the name of the newest complete checkpoint. A checkpoint is written into a
temporary folder and renamed into place (`os.replace`), then `latest` is replaced the same way, so a
crash never leaves a half-written one. trainer_state.pt holds the step, the optimizer, the scheduler
and every RNG, so a resumed run continues exactly.

none/ddp: rank 0 writes `model.safetensors` + `trainer_state.pt`. fsdp: every rank writes its
shards with `torch.distributed.checkpoint` (DCP) into `dcp/` (model and optimizer, keyed by
parameter names), rank 0 writes `config.yaml` and `trainer_state.pt` (step, scheduler, RNG). DCP
reshards on load, so a sharded checkpoint resumes on any number of ranks and in any mode, and
`load_model_weights` reads it into a plain model in one process (`lsm eval`, `lsm generate`). A
none/ddp checkpoint continues under FSDP through the full state dicts (`load_full_state`).
Multi-node runs need `train.out_dir` on a shared file system.

A checkpoint that cannot be read (a file missing or truncated, a config.yaml that does not match the
weights) is a `CheckpointError`: one line naming the file and what to do. `--resume` then falls back
to the newest intact checkpoint and says so; the bad one is left as it is, and `latest` moves only
when a new checkpoint is written.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from lsm.config import Config, ConfigError, first_line, from_dict, load_config, parse_overrides, to_yaml
from lsm.distributed import DistContext, barrier, unwrap
from lsm.model import LanguageModel, build_model
from lsm.step import plain_lr

CHECKPOINT_FILES = ("model.safetensors", "config.yaml", "trainer_state.pt")
# A Hugging Face folder written by `lsm export` (lsm.export writes it, lsm.hf loads it in transformers):
MODEL_TYPE = "lsm"
ARCHITECTURE = "LSMForCausalLM"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "model."   # LSMForCausalLM.model is the LanguageModel

SHARDED_DIR = "dcp"            # the DCP folder inside a checkpoint written under FSDP


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read: one line naming the file (`file`), the problem (`problem`) and what to do."""

    def __init__(self, file: Path, problem: str, advice: str = "use another checkpoint (another step_N folder "
                                                                  "beside it) or retrain"):
        super().__init__(f"{file} {problem}; {advice}")
        self.file, self.problem = file, problem


def _unreadable(file: Path, e: BaseException) -> CheckpointError:
    """The error for a damaged file; `e`'s first line only (library errors can span many lines)."""
    reason = f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__
    return CheckpointError(file, f"cannot be read, truncated or corrupt ({reason})")


def usual_mode(mode: int) -> int:
    """`mode` less the process's umask: the permissions of a plain `open`/`mkdir`, for files made by mkstemp/mkdtemp
    (which are private to their owner) before they are renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename (a crash leaves the old file or the new one, never half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, usual_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every RNG a run draws from, for an exact resume."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


# --------------------------------------------------------------------------- writing
def publish_checkpoint(tmp: Path, final: Path, root: Path, keep: int) -> None:
    """Make a fully written checkpoint folder visible atomically, point `root/latest` at it, prune old ones.

    Of the checkpoints up to `final`, the newest `keep` stay; newer ones (left by a run that was
    resumed from an earlier checkpoint) are not touched.
    """
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(root / "latest", final.name + "\n")
    older = [p for p in sorted(root.glob("step_*")) if p.name <= final.name]
    for old in older[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer, scheduler, step: int, cfg: Config, keep: int = 2) -> Path:
    """Write `checkpoints/step_{step}` atomically, point `checkpoints/latest` at it, keep the newest `keep`."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.", dir=root))
    os.chmod(tmp, usual_mode(0o777))  # as a sharded checkpoint's folder (mkdir), not mkdtemp's private one
    save_model(unwrap(model), str(tmp / "model.safetensors"))
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, tmp / "trainer_state.pt")
    publish_checkpoint(tmp, final, root, keep)
    return final


def save_sharded_checkpoint(out_dir: str | os.PathLike, model: nn.Module, optimizer, scheduler, step: int,
                            cfg: Config, keep: int, ctx: DistContext) -> Path:
    """Write `checkpoints/step_{step}` with DCP; call on every rank. Atomic like `save_checkpoint`.

    Every rank writes its shards into `.step_N.partial/dcp/`; rank 0 adds `config.yaml` and
    `trainer_state.pt`, renames the folder into place, points `latest` at it and prunes to `keep`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.partial"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDED_DIR).mkdir(parents=True)
    barrier(ctx)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))
    if ctx.is_main:
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "format": SHARDED_DIR,
                    "world_size": ctx.world_size}, tmp / "trainer_state.pt")
        publish_checkpoint(tmp, final, root, keep)
    barrier(ctx)
    return final


def save(ctx: DistContext, out_dir: Path, model: nn.Module, optimizer, scheduler, step: int, cfg: Config) -> Path:
    """Checkpoint on every rank: DCP shards under FSDP, else rank 0's files; all ranks return when it is complete."""
    keep = cfg.train.keep_checkpoints
    if ctx.sharded:
        return save_sharded_checkpoint(out_dir, model, optimizer, scheduler, step, cfg, keep, ctx)
    path = Path(out_dir) / "checkpoints" / f"step_{step:06d}"
    if ctx.is_main:
        path = save_checkpoint(out_dir, unwrap(model), optimizer, scheduler, step, cfg, keep)
    barrier(ctx)
    return path


# --------------------------------------------------------------------------- finding
def is_sharded_checkpoint(ckpt: str | os.PathLike) -> bool:
    """Whether a checkpoint folder holds DCP shards (written under FSDP)."""
    return (Path(ckpt) / SHARDED_DIR / ".metadata").is_file()


def _needed_files(ckpt: Path) -> tuple[str, ...]:
    """The files a checkpoint folder must hold: a sharded (FSDP) one keeps its weights in dcp/, not model.safetensors."""
    if is_sharded_checkpoint(ckpt):
        return tuple(f for f in CHECKPOINT_FILES if f != "model.safetensors")
    return CHECKPOINT_FILES


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself, a run folder, or a run's `checkpoints/` folder (its latest)."""
    p = Path(path)
    via_latest = False
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").is_file():
            p = candidate / (candidate / "latest").read_text().strip()
            via_latest = True
            break
    needed = _needed_files(p)
    missing = [f for f in needed if not (p / f).is_file()]
    if missing and (via_latest or len(missing) < len(needed)):  # a checkpoint, but an incomplete one
        raise CheckpointError(p / missing[0], "is missing")
    if missing:
        raise FileNotFoundError(f"{path}: not a checkpoint (no {', '.join(missing)}); give a run folder or "
                                f"runs/NAME/checkpoints/step_N")
    return p


def check_checkpoint(ckpt: Path, full: bool = False) -> None:
    """Raise `CheckpointError` unless every file of `ckpt` is present and readable.

    Cheap by default (safetensors header and size, the zip directory of trainer_state.pt, config.yaml);
    `full` also unpickles trainer_state.pt.
    """
    needed = _needed_files(ckpt)
    for name in needed:
        if not (ckpt / name).is_file():
            raise CheckpointError(ckpt / name, "is missing")
    try:
        load_config(ckpt / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(ckpt / "config.yaml", f"cannot be read ({e})") from None
    file = ckpt / "model.safetensors"
    if "model.safetensors" in needed:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # the Rust reader raises its own error types
            raise _unreadable(file, e) from None
    file = ckpt / "trainer_state.pt"
    try:
        if full:
            _read_trainer_state(ckpt, "cpu")
        else:
            zipfile.ZipFile(file).close()
    except CheckpointError:
        raise
    except Exception as e:  # zipfile.BadZipFile, OSError
        raise _unreadable(file, e) from None


def find_resume_checkpoint(cfg: Config, quiet: bool = False) -> Path | None:
    """The checkpoint to resume from (None: none yet), checked against this run's model.

    The newest intact one: when `latest` cannot be read, an older step_N is taken and one line on
    stderr says so (unless `quiet`); none intact is a `CheckpointError` naming them.
    """
    root = Path(cfg.train.out_dir) / "checkpoints"
    candidates = sorted(root.glob("step_*"), reverse=True)
    if (root / "latest").is_file():
        newest = root / (root / "latest").read_text().strip()
        candidates = [newest] + [c for c in candidates if c != newest]
    if not candidates:
        return None
    problems = []
    for ckpt in candidates:
        try:
            check_checkpoint(ckpt, full=True)
        except CheckpointError as e:
            problems.append(e)
            continue
        saved = load_config(ckpt / "config.yaml")
        if saved.model != cfg.model:
            raise ConfigError(f"--resume: the model in {ckpt}/config.yaml differs from this config's; "
                              f"resume with the same model.* settings")
        if problems and not quiet:
            bad = "; ".join(f"{e.file} {e.problem}" for e in problems)
            print(f"--resume: {bad}: resuming from {ckpt} instead (the unreadable checkpoint is left as it is)",
                  file=sys.stderr)
        return ckpt
    bad = "; ".join(f"{e.file} {e.problem}" for e in problems)
    raise CheckpointError(root, f"holds no intact checkpoint ({bad})",
                          f"restore the files, or remove {root} to start from step 0")


# --------------------------------------------------------------------------- reading
def load_model_weights(model: nn.Module, ckpt: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Weights of a checkpoint folder into a plain model in this process (no process group needed).

    Reads `model.safetensors` (none/ddp runs) or the DCP shards of an FSDP run, whatever its world size.
    """
    ckpt = Path(ckpt)
    if not is_sharded_checkpoint(ckpt):
        _load_safetensors(model, ckpt, device)
        return
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model_sd = get_model_state_dict(model)
    state = {"model": model_sd}
    _dcp_load(state, ckpt, no_dist=True)
    set_model_state_dict(model, state["model"])


def load_sharded_checkpoint(ckpt: str | os.PathLike, model: nn.Module, optimizer) -> None:
    """Load a DCP checkpoint's model and optimizer into `model` (plain, DDP or FSDP) and `optimizer`.

    Resharding is DCP's: the checkpoint may come from any number of ranks. Call on every rank.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    _dcp_load(state, ckpt, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_state(model: nn.Module, optimizer, plain_model: nn.Module, plain_optimizer) -> None:
    """Copy a one-process model and optimizer (e.g. a none/ddp checkpoint, loaded) into a wrapped pair.

    Goes through the full (unsharded, name-keyed) state dicts, so `model` may be FSDP-sharded on any
    number of ranks; every rank passes the same `plain_*` objects.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    model_sd = get_model_state_dict(plain_model, options=full)
    optim_sd = get_optimizer_state_dict(plain_model, plain_optimizer, options=full)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=full)


def _dcp_load(state: dict, ckpt: str | os.PathLike, no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns when it loads in one process: intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(Path(ckpt) / SHARDED_DIR), no_dist=no_dist)


def _load_safetensors(model: nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """`model.safetensors` of `ckpt` into `model`; unreadable or mismatched weights are a `CheckpointError`."""
    file = ckpt / "model.safetensors"
    try:
        load_model(model, str(file), device=str(device))
    except RuntimeError as e:  # missing/unexpected keys or shapes: the config does not describe these weights
        raise CheckpointError(file, f"does not match the model of {ckpt / 'config.yaml'} ({first_line(e)})",
                              "load it with the config it was trained with (no model.* overrides)") from None
    except Exception as e:  # the Rust reader's own error types
        raise _unreadable(file, e) from None


def _read_trainer_state(ckpt: Path, device: str | torch.device) -> dict:
    file = ckpt / "trainer_state.pt"
    try:
        return torch.load(file, map_location=device, weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise _unreadable(file, e) from None


def load_training_state(ckpt: Path, cfg: Config, ctx: DistContext, model: nn.Module, optimizer, scheduler,
                        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> int:
    """Restore model, optimizer, scheduler and RNGs from `ckpt` into a run's (wrapped) objects; -> its step.

    `make_optimizer(plain_model)` builds the run's optimizer for an unwrapped model: a none/ddp
    checkpoint continued under FSDP is loaded whole into one, then sharded.
    """
    device = ctx.device
    state = _read_trainer_state(ckpt, device)
    if is_sharded_checkpoint(ckpt):
        load_sharded_checkpoint(ckpt, model, optimizer)  # any world size: DCP reshards
    elif ctx.sharded:  # a none/ddp checkpoint continued under FSDP: load it whole, then shard it
        plain = build_model(cfg)
        _load_safetensors(plain, ckpt)
        plain_optimizer = make_optimizer(plain)
        plain_optimizer.load_state_dict(state["optimizer"])
        load_full_state(model, optimizer, plain, plain_optimizer)
    else:
        _load_safetensors(unwrap(model), ckpt, device)
        optimizer.load_state_dict(state["optimizer"])
    plain_lr(optimizer)   # a graphed run saved its learning rates as device tensors
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"]


# --------------------------------------------------------------------------- Hugging Face folders (lsm export)
def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with a Hugging Face `config.json` (lsm's or another model's)."""
    return (Path(path) / CONFIG_FILE).is_file()


def lsm_config_of(data: dict, where: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The lsm `Config` inside a config.json's content; `ConfigError` naming `where` for another model type."""
    if data.get("model_type") != MODEL_TYPE or not isinstance(data.get("lsm"), dict):
        raise ConfigError(f"{where}: a {data.get('model_type', 'untyped')!r} model, not an lsm export "
                          f"(model_type {MODEL_TYPE!r} with an 'lsm' config); write one with `lsm export RUN OUT_DIR`")
    extra = parse_overrides(overrides)
    try:
        merged = OmegaConf.merge(OmegaConf.create(data["lsm"]), extra)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: bad config or override: {first_line(e)}") from None
    return from_dict(merged)


def read_hf_config(folder: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The lsm config of an exported folder (dot-list overrides applied)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; give a folder written by `lsm export`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return lsm_config_of(data if isinstance(data, dict) else {}, str(path), overrides)


def load_hf_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """The weights of an exported folder into a `LanguageModel` (every parameter must be there; a tied head is)."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE}; give a folder written by `lsm export`")
    state = {k[len(PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"head.weight"} if model.head.weight is model.embed.weight else set()
    missing = set(missing) - tied
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not fit the model of its config.json "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def load_trained(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                 device: str | torch.device = "cpu") -> tuple[Config, LanguageModel]:
    """(config, model with the checkpoint's weights) of a checkpoint or run folder, or of an `lsm export` folder;
    `CheckpointError` if unreadable."""
    if is_hf_folder(path):
        cfg = read_hf_config(path, overrides)
        model = build_model(cfg)
        load_hf_weights(model, path)
        return cfg, model.to(device).eval()
    ckpt = find_checkpoint(path)
    check_checkpoint(ckpt)
    cfg = load_config(ckpt / "config.yaml", overrides)
    model = build_model(cfg)
    load_model_weights(model, ckpt, device)
    return cfg, model.to(device).eval()
