"""Hugging Face folders of trained runs, without importing transformers.

    lsm export runs/text_gdn out/text_gdn-hf    # a run, a checkpoint folder, single-file or sharded (DCP)
    lsm eval out/text_gdn-hf                     # lsm reads the folder back
    lsm generate out/text_gdn-hf --prompt "def "

A folder holds
    config.json         {"model_type": "lsm", "architectures": ["LSMForCausalLM"], "lsm": <the full resolved lsm
                        config>, "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"}
    model.safetensors   the `LanguageModel`'s weights under the prefix `model.` (the attribute of `LSMForCausalLM`
                        that holds it); a tied head is stored once, as the embedding
so that `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it after `import lsm.hf`
(which registers the model type), and lsm itself reads it here. The folder is written next to its
destination and renamed into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lsm.config import Config, ConfigError, from_dict, model_vocab_size

MODEL_TYPE = "lsm"
ARCHITECTURE = "LSMForCausalLM"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "model."   # LSMForCausalLM.model is the LanguageModel


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with a Hugging Face `config.json` (lsm's or another model's)."""
    return (Path(path) / CONFIG_FILE).is_file()


def hf_config_dict(cfg: Config) -> dict:
    """config.json's content for a model of `cfg` (what `lsm.hf.LSMConfig` reads)."""
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "lsm": OmegaConf.to_container(OmegaConf.structured(cfg)),
            "vocab_size": model_vocab_size(cfg), "hidden_size": cfg.model.hidden_size,
            "num_hidden_layers": cfg.model.num_layers, "tie_word_embeddings": cfg.model.tie_embeddings}


def lsm_config_of(data: dict, where: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The lsm `Config` inside a config.json's content; `ConfigError` naming `where` for another model type."""
    if data.get("model_type") != MODEL_TYPE or not isinstance(data.get("lsm"), dict):
        raise ConfigError(f"{where}: a {data.get('model_type', 'untyped')!r} model, not an lsm export "
                          f"(model_type {MODEL_TYPE!r} with an 'lsm' config); write one with `lsm export RUN OUT_DIR`")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key=value (e.g. eval.batch_size=64)")
    try:
        merged = OmegaConf.merge(OmegaConf.create(data["lsm"]), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: bad config or override: {str(e).strip().splitlines()[0]}") from None
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


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under PREFIX, each stored once (a tied head is the embedding)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[PREFIX + name] = t.detach().contiguous().cpu()
    return out


def write_hf_folder(model: torch.nn.Module, cfg: Config, out_dir: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors for `model` (a LanguageModel of `cfg`) into `out_dir`, atomically.

    `out_dir` must not exist, or be an empty folder or an earlier lsm export (replaced).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{out}: exists and is not a folder; choose another OUT_DIR")
        if any(out.iterdir()):
            try:
                read_hf_config(out)
            except (ConfigError, FileNotFoundError):
                raise ConfigError(f"{out}: exists and is not an lsm export; remove it or choose another OUT_DIR") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
        for path, mode in ((tmp, 0o777), (tmp / WEIGHTS_FILE, 0o666), (tmp / CONFIG_FILE, 0o666)):
            os.chmod(path, mode & ~umask)  # a folder to share: the usual permissions, not mkdtemp's private ones
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A trained run or checkpoint (single-file or sharded DCP) -> a Hugging Face folder at `out_dir`."""
    from lsm.train import load_trained

    cfg, model = load_trained(src)
    return write_hf_folder(model, cfg, out_dir)
