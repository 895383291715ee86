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
(which registers the model type), and lsm itself reads it back (`lsm.checkpoint.load_trained`). The folder is written next to its
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

from lsm.checkpoint import (
    ARCHITECTURE,
    CONFIG_FILE,
    MODEL_TYPE,
    PREFIX,
    WEIGHTS_FILE,
    load_trained,
    read_hf_config,
    usual_mode,
)
from lsm.config import Config, ConfigError, model_vocab_size


def hf_config_dict(cfg: Config) -> dict:
    """config.json's content for a model of `cfg` (what `lsm.hf.LSMConfig` reads)."""
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "lsm": OmegaConf.to_container(OmegaConf.structured(cfg)),
            "vocab_size": model_vocab_size(cfg), "hidden_size": cfg.model.hidden_size,
            "num_hidden_layers": cfg.model.num_layers, "tie_word_embeddings": cfg.model.tie_embeddings}


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
    try:
        save_file(_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
        for path, mode in ((tmp, 0o777), (tmp / WEIGHTS_FILE, 0o666), (tmp / CONFIG_FILE, 0o666)):
            os.chmod(path, usual_mode(mode))  # a folder to share, not mkdtemp's private one
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A trained run or checkpoint (single-file or sharded DCP) -> a Hugging Face folder at `out_dir`."""
    cfg, model = load_trained(src)
    return write_hf_folder(model, cfg, out_dir)
