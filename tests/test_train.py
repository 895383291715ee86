"""Tiny end-to-end runs on CPU: train, evaluate, resume exactly, stop on NaN, ablate, CLI."""
import json

import pytest
import torch

from lsm.checkpoint import find_checkpoint, load_trained
from lsm.cli import main
from lsm.config import load_config
from lsm.train import train

TINY = ["model.hidden_size=16", "model.num_layers=1", "model.mixer.num_heads=2", "model.mixer.backend=torch",
        "data.mqar.vocab_size=32", "data.mqar.seq_len=16", "data.mqar.train_pairs=[2,4]", "data.mqar.test_pairs=[2,4]",
        "data.mqar.num_test=16", "train.batch_size=4", "train.warmup_steps=2", "train.log_every=1",
        "train.progress=false", "train.tensorboard=false", "eval.batch_size=16"]


def _cfg(tmp_path, name, *extra):
    return load_config(None, TINY + [f"name={name}", f"train.out_dir={tmp_path / name}", *extra])


def _logged_losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_continues_exactly(tmp_path):
    extra = ["model.mixer.type=mom", "model.mixer.num_memories=2", "model.mixer.topk=1", "train.steps=6",
             "train.grad_accum=2", "train.ckpt_every=2"]
    full = train(_cfg(tmp_path, "full", *extra), quiet=True)
    first = train(_cfg(tmp_path, "split", *extra), max_steps=3, quiet=True)
    assert first.step == 3 and find_checkpoint(tmp_path / "split").name == "step_000003"
    rest = train(_cfg(tmp_path, "split", *extra), resume=True, quiet=True)
    assert rest.step == 6
    assert first.losses + rest.losses == full.losses                     # bit-for-bit on CPU
    assert _logged_losses(tmp_path / "split") == _logged_losses(tmp_path / "full")
    assert rest.eval == full.eval
    _, model = load_trained(tmp_path / "split")
    _, ref = load_trained(tmp_path / "full")
    for (n, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), n


def test_checkpoint_contents_and_eval(tmp_path):
    res = train(_cfg(tmp_path, "run", "train.steps=2", "train.keep_checkpoints=1", "train.ckpt_every=1"), quiet=True)
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt == res.checkpoint and sorted(p.name for p in ckpt.iterdir()) == \
        ["config.yaml", "model.safetensors", "trainer_state.pt"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_000002"]  # older ones pruned
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))                                 # no temp leftovers
    assert [c["num_pairs"] for c in res.eval["mqar"]] == [2, 4]
    assert all(0 <= c["accuracy"] <= 1 for c in res.eval["mqar"])


def test_cli_train_eval_generate_on_text(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    run = tmp_path / "text"
    args = ["train.steps=2", "data.kind=text", f"data.text.path={text}", "data.text.seq_len=16",
            "eval.text_batches=2", f"train.out_dir={run}"] + [o for o in TINY if not o.startswith("data.mqar")]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: text\n")
    assert main(["train", str(cfg_file), *args]) == 0
    assert "bpb" in capsys.readouterr().out
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| bpb |" in out
    bpb = float(out.split("| bpb |")[1].split("|")[0])
    assert 0 < bpb < 9
    assert main(["generate", str(run), "--prompt", "the ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(["eval", str(tmp_path / "missing")]) == 2


def test_ablate_writes_table_csv_and_plot(tmp_path, capsys):
    from lsm.ablate import read_runs

    cfg_file = tmp_path / "ab.yaml"
    cfg_file.write_text("name: ab\nablate:\n  rules: [mamba2]\n"
                        "  variants: [single, mom, single_same_state, single_active_state]\n")
    assert main(["ablate", str(cfg_file), *TINY, "train.steps=1", "model.mixer.num_memories=2",
                 "model.mixer.topk=1", f"ablate.out_dir={tmp_path / 'ab'}"]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "ab" / "results.md").read_text()
    # four variants, MoM's line of the table against the state-matched single memories, and its diagnostics line
    assert table in out and len([ln for ln in table.splitlines() if ln.startswith("| mamba2")]) == 4 + 1 + 1
    assert "MoM vs single, MoM-active state" in table and "L0 busiest memory" in table
    assert "acc@2" in (tmp_path / "ab" / "results.csv").read_text() and "MoM" in table
    assert (tmp_path / "ab" / "results.csv").read_text().count("\n") == 5
    for plot in ("accuracy_vs_pairs.png", "accuracy_vs_state.png", "loss_curves.png"):
        assert (tmp_path / "ab" / plot).stat().st_size > 1000
    runs = read_runs(tmp_path / "ab" / "runs.csv")
    memory = {r["variant"]: r["memory_floats"] for r in runs}
    routed = {r["variant"]: r.get("route/L0/share") for r in runs}                # routing diagnostics: MoM rows only
    assert 0 <= routed["mom"] <= 1 and routed["single"] is None
    assert memory["mom"] == memory["single_same_state"] == 3 * memory["single"]  # same-state baseline matches MoM
    assert memory["single_active_state"] == 2 * memory["single"]                  # top-1 + shared: 2 memories active


# --------------------------------------------------------------------------- train.cuda_graph (lsm.step)
def _fused(monkeypatch):
    """Both runs use the fused AdamW a graphed step needs (on CPU the trainer builds the foreach one)."""
    import lsm.train as lt
    from lsm.train import build_optimizer
    monkeypatch.setattr(lt, "build_optimizer", lambda model, t, fused=None: build_optimizer(model, t, fused=True))


def test_static_buffer_step_matches_eager_and_resumes_eagerly(tmp_path, monkeypatch):
    """The graphed step without the capture (static input buffers, the learning rate as a tensor the scheduler
    fills in place, capturable fused AdamW) trains like the eager step, and its checkpoint resumes in an eager
    run (learning rates back to floats). The capture itself, pinned copies and events: the GPU test below."""
    import lsm.train as lt
    from lsm.step import GraphedTrainStep

    _fused(monkeypatch)
    extra = ["model.mixer.type=mom", "model.mixer.num_memories=2", "model.mixer.topk=1", "train.steps=8",
             "train.ckpt_every=4", "train.eval_every=3", "train.grad_clip=0.5", "train.loss_positions=labelled"]
    eager = train(_cfg(tmp_path, "eager", *extra), quiet=True)
    made = []
    monkeypatch.setattr(lt, "make_step", lambda *a: made.append(GraphedTrainStep(*a, warmup=2, graph=False)) or made[-1])
    first = train(_cfg(tmp_path, "graphed", *extra), max_steps=5, quiet=True)
    _lr_filled_in_place(made[-1], steps=5, cfg=_cfg(tmp_path, "graphed", *extra))
    monkeypatch.undo()
    _fused(monkeypatch)
    rest = train(_cfg(tmp_path, "graphed", *extra), resume=True, quiet=True)
    assert len(first.losses) == 5 and len(rest.losses) == 3
    # a float32 learning-rate tensor against a Python float: equal to rounding
    torch.testing.assert_close(torch.tensor(first.losses + rest.losses), torch.tensor(eager.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rest.eval["accuracy"], eager.eval["accuracy"], rtol=0, atol=1 / 16)


def _lr_filled_in_place(step, steps: int, cfg) -> None:
    """The graph reads the learning-rate tensors it was captured with: the scheduler must have filled those very
    tensors (not replaced them by floats) with the schedule's value after `steps` steps."""
    from lsm.train import lr_factor

    t = cfg.train
    assert step.lrs and all(g["lr"] is lr for g, lr in zip(step.optimizer.param_groups, step.lrs))
    want = t.lr * lr_factor(steps, t.warmup_steps, t.steps, t.min_lr_ratio)
    torch.testing.assert_close(torch.stack(step.lrs).cpu(), torch.full((len(step.lrs),), want), rtol=1e-6, atol=0)


def test_cuda_graph_config_errors_and_cpu_fallback(tmp_path):
    from lsm.config import ConfigError
    from lsm.distributed import DistContext
    from lsm.step import EagerStep, GraphedTrainStep, make_step

    with pytest.raises(ConfigError, match=r"train.loss_positions"):
        _cfg(tmp_path, "x", "train.loss_positions=queries")
    with pytest.raises(ConfigError, match=r"train.cuda_graph: needs train.grad_accum: 1"):
        _cfg(tmp_path, "x", "train.cuda_graph=true", "train.grad_accum=2")
    cfg = _cfg(tmp_path, "x", "train.cuda_graph=true")
    ctx = DistContext(device=torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    assert isinstance(make_step(model, opt, None, cfg, ctx), EagerStep)   # CPU: the option is ignored
    with pytest.raises(ValueError, match="fused=True"):
        GraphedTrainStep(model, opt, None, cfg, ctx, graph=False)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedTrainStep(model, torch.optim.AdamW(model.parameters(), fused=True), None, cfg, ctx, warmup=0, graph=False)


@pytest.mark.gpu
@pytest.mark.parametrize("mixer,rule,readout", [("rule", "gated_deltanet", "sum")] + [
    ("mom", r, "sum") for r in ("linear_attention", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "ttt")]
    + [("mom", r, "per_memory") for r in ("gla", "gated_deltanet")])
def test_cuda_graph_step_trains_like_eager(tmp_path, monkeypatch, mixer, rule, readout):
    """On a GPU (triton backend, bf16 autocast), every rule of the recall study and MoM's per-memory readout: the
    replayed graph gives the eager run's losses and scores, with validation and checkpoints between replays, and the
    graph's learning rate follows the schedule."""
    import lsm.train as lt

    made = []
    real = lt.make_step
    monkeypatch.setattr(lt, "make_step", lambda *a: made.append(real(*a)) or made[-1])
    extra = [f"model.mixer.type={mixer}", f"model.mixer.rule={rule}", "model.mixer.backend=triton", "train.device=cuda",
             "train.steps=12", "train.eval_every=4", "train.ckpt_every=6", "model.mixer.num_memories=4",
             "model.mixer.topk=2", "data.mqar.seq_len=64", "train.loss_positions=labelled",
             "model.hidden_size=64", f"model.mixer.readout={readout}"]  # head_dim 32: the Triton kernels need >= 16
    eager = train(_cfg(tmp_path, "eager", *extra), quiet=True)
    graphed = train(_cfg(tmp_path, "graphed", *extra, "train.cuda_graph=true"), quiet=True)
    assert made[-1].graph is not None and made[-1].calls == 12
    _lr_filled_in_place(made[-1], steps=12, cfg=_cfg(tmp_path, "graphed", *extra))
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=2e-2, atol=1e-3)
    assert abs(graphed.eval["accuracy"] - eager.eval["accuracy"]) <= 0.1


def test_loss_at_labelled_positions_equals_the_full_loss(tmp_path):
    """train.loss_positions: labelled runs the head at MQAR's queries only: the same loss and gradients as the head at
    every position, for a MoM model (float64 model; the cross-entropy runs in float32, hence the tolerances); and a
    trainer run gives the same losses."""
    from lsm.data import build_data
    from lsm.distributed import DistContext
    from lsm.model import build_model
    from lsm.step import loss_of

    cfg = _cfg(tmp_path, "x", "model.mixer.type=mom", "model.mixer.num_memories=2", "model.mixer.topk=1")
    data = build_data(cfg)
    model = build_model(cfg).double()
    batch = data.train_batch(0, 8)
    ctx = DistContext()
    values = []
    for at in (None, data.max_labels()):
        model.zero_grad(set_to_none=True)
        loss, value, aux = loss_of(model, batch.input_ids, batch.labels, "fp32", torch.device("cpu"), ctx, at)
        (loss + aux).backward()
        values.append((value, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (v_all, g_all), (v_lab, g_lab) = values
    torch.testing.assert_close(v_lab, v_all, rtol=1e-6, atol=0)
    assert len(g_all) == len(g_lab) > 0
    for a, b in zip(g_lab, g_all):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    runs = [train(_cfg(tmp_path, f"r{i}", "train.steps=4", f"train.loss_positions={lp}"), quiet=True)
            for i, lp in enumerate(("all", "labelled"))]
    torch.testing.assert_close(torch.tensor(runs[1].losses), torch.tensor(runs[0].losses), rtol=1e-5, atol=1e-6)
