"""The training console: no host reads in the step loop, one line and one record per log step, deferred NaN check."""
import json
import traceback

import pytest
import torch

import lsm.distributed
import lsm.train
from lsm.cli import main
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
    real = lsm.distributed.token_mean_loss

    def poisoned(logits, labels, ctx):
        calls["n"] += 1
        loss, value = real(logits, labels, ctx)
        return (loss * float("nan"), value * float("nan")) if calls["n"] == 3 else (loss, value)

    monkeypatch.setattr(lsm.distributed, "token_mean_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3"):
        train(_cfg(tmp_path, "nan", "train.steps=8", "train.log_every=4", "train.ckpt_every=4",
                   "model.mixer.rule=linear_attention"), quiet=True)
    assert not (tmp_path / "nan" / "checkpoints").exists()  # checked before the step-4 checkpoint


def test_lsm_info_against_a_hand_counted_model(tmp_path, capsys):
    # D = 8, H = 2, K = V = 4, conv 4, output gate, tied head, vocab 16, one block, no MLP, MoM M = 2, top-1, shared.
    # params: embed 16*8 + 2 RMSNorms 8 + q, g, o projections 3*64 + o_norm 4 + q conv 8*5
    #         + per-memory k, v projections 2 * 8*24 and convs 2 * 24*5 (3 memories' channels) + router 8*2 = 1020;
    #         active: the per-memory 624 count 2 of 3 memories -> 1020 - 624 + 416 = 812
    # memories 3 * 2*4*4 = 96; cache + conv tails (q 8*3, k 24*3, v 24*3) = 264, per step 96 * 2/3 + 168 = 232
    # forward FLOPs: 2 * (q 64 + k, v 2/3 of 192 each + g 64 + o 64 + router 16) = 2*464, + head 2*16*8,
    #   + 2 memories touched * H * (2*64*(4 + 4) + 4*16) = 2 * 2176 -> 5536
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("name: tiny\ndata: {mqar: {vocab_size: 16, seq_len: 64, train_pairs: [4], test_pairs: [4]}}\n"
                   "model: {hidden_size: 8, num_layers: 1, mlp_ratio: 0,\n"
                   "        mixer: {type: mom, rule: linear_attention, num_heads: 2, num_memories: 2, topk: 1}}\n")
    assert main(["info", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "linear_attention MoM (2 memories, top-1 + shared), 1 blocks, width 8, vocab 16, context 64" in out
    assert "parameters       1,020 total, 812 active per token" in out
    assert "memories         96 floats = 384B per sequence" in out
    assert "decode cache     264 floats = 1.06kB per sequence; 232 floats = 928B read/written per token" in out
    assert "FLOPs per token  5,536 forward, 16,608 training" in out
    assert main(["info", str(cfg), "model.mixer.topk=3"]) == 2           # a bad override: one clear error


@pytest.mark.gpu
def test_gpu_steps_do_not_synchronise(tmp_path):
    """On CUDA, the synchronising calls of a run do not grow with the steps between log steps (after a warm-up
    run that compiles and autotunes the kernels)."""
    import warnings

    counts = []
    for steps in (2, 4, 12):
        cfg = _cfg(tmp_path, f"gpu{steps}", f"train.steps={steps}", f"train.log_every={steps}", "train.device=cuda",
                   "model.mixer.backend=triton")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, quiet=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[1] == counts[2], counts
