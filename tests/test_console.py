"""The training console: no host reads in the step loop, one line and one record per log step, deferred NaN check."""
import json
import traceback

import pytest
import torch

import lsm.train
from lsm.config import load_config
from lsm.console import format_line
from lsm.train import TrainingDiverged, train
from tests.test_train import TINY

MOM = ["model.mixer.type=mom", "model.mixer.num_memories=2", "model.mixer.topk=1"]


def _cfg(tmp_path, name, *extra):
    return load_config(None, TINY + [f"name={name}", f"train.out_dir={tmp_path / name}", *MOM, *extra])


def test_step_loop_reads_nothing_back_between_log_steps(tmp_path, monkeypatch):
    """Host reads of float tensors (loss, aux loss, grad norm) do not grow with the steps between log steps.

    The GPU policy is forced (on CPU the trainer reads every step, which waits for nothing there); CPU AdamW
    reads its step counter (the fused CUDA AdamW does not), so torch.optim is not counted.
    """
    monkeypatch.setattr(lsm.train, "_reads_back_every_step", lambda device: False)
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if self.is_floating_point() and "torch/optim" not in traceback.extract_stack(limit=2)[0].filename:
                reads["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_run = []
    for steps in (3, 9):
        reads["n"] = 0
        train(_cfg(tmp_path, f"s{steps}", f"train.steps={steps}", f"train.log_every={steps}"), quiet=True)
        per_run.append(reads["n"])
    assert per_run[0] == per_run[1] > 0


def test_log_record_fields_and_console_line(tmp_path, capsys):
    res = train(_cfg(tmp_path, "log", "train.steps=4", "train.log_every=2"))
    records = [json.loads(ln) for ln in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert {"step", "loss", "aux_loss", "lr", "grad_norm", "tok_per_s", "eta_s"} <= set(logged[0])
    assert logged[-1]["eta_s"] == 0 and logged[0]["tok_per_s"] > 0
    assert [r["loss"] for r in logged] == [round(res.losses[1], 6), round(res.losses[3], 6)]
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ") and "| loss" in ln]
    assert len(lines) == 2 and "tok/s" in lines[0] and "ETA" in lines[0]


def test_format_line_with_gpu_fields():
    rec = {"step": 20, "loss": 1.23456, "lr": 3e-3, "grad_norm": 0.5, "tok_per_s": 125000.0, "tflops": 12.5,
           "mfu": 0.0126, "mem_gib": 1.5, "mem_pct": 1.1, "eta_s": 75.0}
    assert format_line(rec, 1000) == ("step   20/1000 | loss 1.2346 | lr 3.00e-03 | gnorm 0.500 | 125k tok/s | "
                                      "12.5 TFLOP/s | MFU 1.26% | mem 1.50 GiB (1.1%) | ETA 01:15")


@pytest.mark.parametrize("deferred", [False, True])
def test_nan_inside_a_log_window_names_its_step(tmp_path, monkeypatch, deferred):
    """CPU: every step is checked; the GPU policy (deferred) checks at the log step and still names step 3."""
    monkeypatch.setattr(lsm.train, "_reads_back_every_step", lambda device: not deferred)
    calls = {"n": 0}
    real = lsm.train.loss_fn

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(lsm.train, "loss_fn", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3"):
        train(_cfg(tmp_path, "nan", "train.steps=8", "train.log_every=4", "train.ckpt_every=4",
                   "model.mixer.rule=linear_attention"), quiet=True)
    assert not (tmp_path / "nan" / "checkpoints").exists()  # checked before the step-4 checkpoint
