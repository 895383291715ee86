"""Config validation: every bad input is one ConfigError line naming the key; the CLI exits 2 without a traceback."""
import subprocess
import sys

import pytest

from lsm.config import Config, ConfigError, load_config, to_yaml, with_overrides


def _error(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: x\nmodel:\n  hidden_size: 32\n  mixer:\n    rule: gla\n")
    cfg = load_config(f, ["train.steps=7", "model.mixer.type=mom"])
    assert isinstance(cfg, Config)
    assert (cfg.name, cfg.model.hidden_size, cfg.model.mixer.rule, cfg.model.mixer.type) == ("x", 32, "gla", "mom")
    assert cfg.train.steps == 7 and cfg.train.out_dir == "runs/x"   # interpolation resolved
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg                                  # the resolved YAML round-trips


def test_unknown_key_names_nearest():
    assert "unknown key model.hiden_size; did you mean model.hidden_size?" in _error(["model.hiden_size=32"])
    assert "did you mean model.mixer.num_memories?" in _error(["model.mixer.num_memory=3"])
    assert "unknown key trian" in _error(["trian.steps=3"])


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stpes: 10\n")
    assert "did you mean train.steps?" in _error([], f)


def test_wrong_type():
    msg = _error(["model.hidden_size=wide"])
    assert msg.startswith("model.hidden_size: wrong type")
    assert _error(["train.progress=maybe"]).startswith("train.progress:")
    assert "expected a mapping" in _error(["model.mixer=3"])


def test_unknown_rule_lists_valid():
    msg = _error(["model.mixer.rule=gated_deltanett"])
    assert msg.startswith("model.mixer.rule:") and "gated_deltanet" in msg and "mamba2" in msg
    assert _error(["ablate.rules=[gla,nope]"]).startswith("ablate.rules:")


def test_topk_above_num_memories():
    msg = _error(["model.mixer.type=mom", "model.mixer.num_memories=2", "model.mixer.topk=3"])
    assert msg.startswith("model.mixer.topk: 3 > model.mixer.num_memories = 2")


def test_head_size_must_divide():
    assert _error(["model.hidden_size=64", "model.mixer.num_heads=3"]).startswith("model.mixer.num_heads:")
    assert load_config(None, ["model.mixer.num_heads=3", "model.mixer.head_dim=16"]).model.mixer.head_dim == 16
    assert "even for RoPE" in _error(["model.mixer.type=attention", "model.hidden_size=12", "model.mixer.num_heads=4"])


def test_missing_data_path(tmp_path):
    msg = _error(["data.kind=text", f"data.text.path={tmp_path / 'nowhere'}"])
    assert msg.startswith("data.text.path:") and "does not exist" in msg


def test_other_values():
    assert "did you mean 'mom'" in _error(["model.mixer.type=moe"])
    assert _error(["data.kind=images"]).startswith("data.kind:")
    assert _error(["data.mqar.seq_len=16", "data.mqar.train_pairs=[8]"]).startswith("data.mqar.train_pairs:")
    assert _error(["train.steps=0"]).startswith("train.steps: must be > 0")
    assert "not found" in _error([], "/nonexistent/config.yaml")
    assert _error(["steps"]).startswith("override 'steps' must look like key=value")
    mom = ["model.mixer.type=mom"]
    assert _error([*mom, "model.mixer.router_conv=-1"]).startswith("model.mixer.router_conv: must be >= 0")
    assert _error([*mom, "model.mixer.router_temperature=0"]).startswith("model.mixer.router_temperature: must be > 0")
    assert _error([*mom, "model.mixer.router_init_std=-1"]).startswith("model.mixer.router_init_std: must be >= 0")
    assert "did you mean 'per_memory'" in _error([*mom, "model.mixer.readout=per_mem"])
    assert _error(["data.mqar.train_cells=[[16,8]]"]).startswith("data.mqar.train_cells: cell [16, 8]")


def test_with_overrides_validates():
    cfg = load_config()
    assert with_overrides(cfg, {"model.mixer.type": "mom"}).model.mixer.type == "mom"
    with pytest.raises(ConfigError):
        with_overrides(cfg, {"model.mixer.topk": 9, "model.mixer.type": "mom"})


def test_cli_prints_one_line_and_exits_2(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  mixer:\n    type: mom\n    topk: 5\n")
    r = subprocess.run([sys.executable, "-m", "lsm", "train", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["lsm train: error: model.mixer.topk: 5 > model.mixer.num_memories = 4 "
                                             "(a token is routed to at most num_memories memories)"]
