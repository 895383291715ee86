"""Checkpoints that cannot be read: one line naming the file and what to do, for `lsm train --resume`,
`lsm eval` and `lsm generate`; `--resume` falls back to the newest intact checkpoint and says so."""
import os
import shutil
import stat

import pytest
import torch

from lsm.checkpoint import CheckpointError, check_checkpoint, find_checkpoint, load_trained, write_atomic
from lsm.cli import main
from lsm.config import load_config
from lsm.train import train

TINY = ["model.hidden_size=16", "model.num_layers=1", "model.mixer.num_heads=2", "model.mixer.backend=torch",
        "data.mqar.vocab_size=32", "data.mqar.seq_len=16", "data.mqar.train_pairs=[2,4]", "data.mqar.test_pairs=[2,4]",
        "data.mqar.num_test=16", "train.batch_size=4", "train.warmup_steps=2", "train.log_every=1",
        "train.progress=false", "train.tensorboard=false", "eval.batch_size=16", "train.steps=6",
        "train.ckpt_every=2", "train.keep_checkpoints=3", "train.eval_every=0"]

DAMAGE = {
    "truncated model.safetensors": ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:1000])),
    "missing model.safetensors": ("model.safetensors", lambda f: f.unlink()),
    "truncated trainer_state.pt": ("trainer_state.pt", lambda f: f.write_bytes(f.read_bytes()[:1000])),
    "missing trainer_state.pt": ("trainer_state.pt", lambda f: f.unlink()),
}


def _overrides(run):
    return TINY + ["name=ck", f"train.out_dir={run}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run stopped after step 4 (checkpoints step 2 and 4) and the same run trained to 6 in one go."""
    root = tmp_path_factory.mktemp("ckpt")
    split = train(load_config(None, _overrides(root / "split")), max_steps=4, quiet=True)
    full = train(load_config(None, _overrides(root / "full")), quiet=True)
    assert split.step == 4 and find_checkpoint(root / "split").name == "step_000004"
    return root / "split", full.losses


@pytest.fixture
def run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained[0], dst)
    return dst


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_unreadable_latest_is_one_line_for_eval_and_generate(run, capsys, damage):
    name, hurt = DAMAGE[damage]
    bad = run / "checkpoints" / "step_000004" / name
    hurt(bad)
    line = _one_line_error(capsys, main(["eval", str(run)]), str(bad), "another checkpoint")
    assert line.startswith("lsm eval: error: ")
    _one_line_error(capsys, main(["generate", str(run), "--prompt", "1 2", "--max-new-tokens", "2"]), str(bad))
    assert main(["eval", str(run / "checkpoints" / "step_000002")]) == 0   # the intact one still evaluates


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(run, trained, capsys, damage):
    name, hurt = DAMAGE[damage]
    bad_dir = run / "checkpoints" / "step_000004"
    hurt(bad_dir / name)
    before = {p.name: p.read_bytes() for p in bad_dir.iterdir()}
    cfg_file = run.parent / "c.yaml"
    cfg_file.write_text("name: ck\n")
    assert main(["train", str(cfg_file), *_overrides(run), "--resume", "--max-steps", "1"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("--resume")]
    assert len(err) == 1 and str(bad_dir / name) in err[0] and "step_000002 instead" in err[0], err
    assert {p.name: p.read_bytes() for p in bad_dir.iterdir()} == before        # the bad one is left untouched
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"  # moved by the new checkpoint
    # continuing from the intact step 2 reproduces the one-go run exactly
    rest = train(load_config(None, _overrides(run)), resume=True, quiet=True)
    assert rest.step == 6 and rest.losses == trained[1][3:]


def test_latest_is_not_moved_by_a_fallback_that_writes_nothing(run):
    (run / "checkpoints" / "step_000004" / "model.safetensors").unlink()
    cfg = load_config(None, _overrides(run))
    with pytest.raises(CheckpointError):
        check_checkpoint(run / "checkpoints" / "step_000004")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    res = train(cfg, resume=True, max_steps=0, quiet=True)
    assert res.step == 2 and (run / "checkpoints" / "latest").read_text().strip() == "step_000004"


def test_resume_without_any_intact_checkpoint_is_one_line(run, capsys):
    for step in ("step_000002", "step_000004"):
        (run / "checkpoints" / step / "trainer_state.pt").write_bytes(b"garbage")
    cfg_file = run.parent / "c.yaml"
    cfg_file.write_text("name: ck\n")
    _one_line_error(capsys, main(["train", str(cfg_file), *_overrides(run), "--resume"]),
                    "holds no intact checkpoint", "step_000002", "step_000004")


def test_config_that_does_not_match_the_weights_is_one_line(run, capsys):
    ckpt = run / "checkpoints" / "step_000004"
    text = (ckpt / "config.yaml").read_text()
    assert "hidden_size: 16" in text
    (ckpt / "config.yaml").write_text(text.replace("hidden_size: 16", "hidden_size: 32"))
    for cmd in (["eval", str(run)], ["generate", str(run), "--prompt", "1", "--max-new-tokens", "1"]):
        _one_line_error(capsys, main(cmd), str(ckpt / "model.safetensors"), "does not match the model",
                        "config it was trained with")
    _one_line_error(capsys, main(["eval", str(run / "checkpoints" / "step_000002"), "model.num_layers=2"]),
                    "does not match the model")
    cfg_file = run.parent / "c.yaml"
    cfg_file.write_text("name: ck\n")
    _one_line_error(capsys, main(["train", str(cfg_file), *_overrides(run), "--resume"]), "differs from this config")


def test_intact_checkpoint_loads_the_trained_weights(run):
    _, model = load_trained(run)
    _, same = load_trained(run / "checkpoints" / "step_000004")
    for p, q in zip(model.parameters(), same.parameters()):
        assert torch.equal(p, q)


def test_write_atomic_replaces_the_whole_file_or_nothing(tmp_path, monkeypatch):
    """A run's small files (config.yaml, metrics.jsonl, checkpoints/latest): the old file or the new one, with
    the usual permissions, and no temporary file left behind when the rename fails."""
    path = tmp_path / "run" / "config.yaml"
    write_atomic(path, "one\n")
    write_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "three\n")
    assert path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
