"""Hugging Face interop: lsm export -> transformers Auto classes, logits kept, cached generate, sharded export, errors."""
from __future__ import annotations

import json

import pytest
import torch
import transformers  # the `hf` extra (also a dependency of flash-linear-attention); in the `test` extra

import lsm.hf  # noqa: F401  (registers the model type)
from lsm.checkpoint import load_trained
from lsm.cli import main
from lsm.config import ConfigError, load_config
from lsm.export import export, write_hf_folder
from lsm.hf import LSMCache, LSMConfig, LSMForCausalLM
from lsm.model import build_model
from lsm.train import train
from tests.test_train import TINY

VARIANTS = {
    "single": [],
    "mom": ["model.mixer.type=mom", "model.mixer.num_memories=2", "model.mixer.topk=1"],
    "hybrid": ["model.mixer.type=mom", "model.mixer.num_memories=2", "model.mixer.topk=1", "model.num_layers=2",
               "model.attention_every=2"],
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    """(run folder, exported folder) of a 2-step run of each variant."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = load_config(None, TINY + VARIANTS[request.param] + ["train.steps=2", f"train.out_dir={root / 'run'}"])
    train(cfg, quiet=True)
    return root / "run", export(root / "run", root / "hf")


def _ids(vocab: int = 32, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def test_auto_classes_load_the_export_with_its_logits(exported, tmp_path):
    run, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = transformers.AutoConfig.from_pretrained(folder)
    assert isinstance(config, LSMConfig) and config.lsm_config() == load_trained(run)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, LSMForCausalLM) and not model.training
    _, ref = load_trained(run)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.equal(model(ids).logits, want)
        model.save_pretrained(tmp_path / "again")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
        assert torch.equal(again(ids).logits, want)
    # lsm reads the folder too
    assert load_trained(folder)[1].state_dict().keys() == ref.state_dict().keys()
    assert main(["eval", str(folder)]) == 0
    assert main(["generate", str(folder), "--prompt", "3 4 5", "--max-new-tokens", "2"]) == 0


def _forward_lengths(model: LSMForCausalLM) -> list[int]:
    """Record the token count of every LanguageModel call."""
    lengths: list[int] = []
    real = model.model.forward

    def recorded(input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return real(input_ids, *args, **kwargs)

    model.model.forward = recorded
    return lengths


def test_cached_generate_equals_prefix_rerun(exported):
    _, folder = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    ids, new = _ids(), 5
    lengths = _forward_lengths(model)
    greedy = model.generate(ids, max_new_tokens=new, do_sample=False)
    assert lengths == [ids.shape[1]] + [1] * (new - 1)                # prefill once, then one recurrent step a token
    # re-running the whole prefix for every token (no cache) picks the same tokens
    seq = ids
    with torch.no_grad():
        for _ in range(new):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq)
    assert torch.equal(model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=False), greedy)
    # sampling: the same draws with the cache as without it
    torch.manual_seed(1)
    sampled = model.generate(ids, max_new_tokens=new, do_sample=True, top_k=8, temperature=1.5)
    torch.manual_seed(1)
    rerun = model.generate(ids, max_new_tokens=new, do_sample=True, top_k=8, temperature=1.5, use_cache=False)
    assert torch.equal(sampled, rerun) and sampled.shape == (2, ids.shape[1] + new)


def test_cache_is_a_transformers_cache_and_refuses_beam_search(exported):
    _, folder = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    out = model(_ids(), use_cache=True)
    cache = out.get("cache", out.get("past_key_values"))
    assert isinstance(cache, transformers.Cache) and isinstance(cache, LSMCache) and cache.get_seq_length() == 9
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(_ids(), max_new_tokens=3, num_beams=2, do_sample=False)


def test_export_of_a_sharded_checkpoint(tmp_path, monkeypatch):
    from lsm.checkpoint import is_sharded_checkpoint
    from tests.test_distributed import TINY as DIST_TINY
    from tests.test_distributed import _rendezvous

    _rendezvous(monkeypatch, world_size=1)
    cfg = load_config(None, DIST_TINY + ["train.steps=1", "train.parallel=fsdp", f"train.out_dir={tmp_path / 'run'}"])
    res = train(cfg, quiet=True)
    assert is_sharded_checkpoint(res.checkpoint)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    _, ref = load_trained(tmp_path / "run")
    ids = _ids(64, 2, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_missing_or_foreign_folder_is_one_clear_error(tmp_path, capsys):
    foreign = tmp_path / "gpt2"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["eval", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "a 'gpt2' model, not an lsm export" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="not an lsm export"):
        LSMForCausalLM.from_pretrained(foreign)
    cfg = load_config(None, TINY)
    with pytest.raises(ConfigError, match="exists and is not an lsm export"):    # never written over
        write_hf_folder(build_model(cfg), cfg, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"] and not list(tmp_path.glob(".gpt2.*"))
