"""Distributed training on CPU (gloo): 2 torchrun workers vs one process, DCP checkpoints, launch errors.

Each multi-process test launches `python -m torch.distributed.run --nproc_per_node 2 -m lsm train ...`
(the command users run) on a free port, with a wall-clock timeout, so a hang fails the test.

Tolerance: parameters after a few AdamW steps equal the one-process run's within 1e-4 absolute
(steps move a weight by up to lr = 3e-3; the gap is float32 reduction order, which Adam's
normalisation can amplify for gradients near its epsilon, and top-1 routing near ties), and
the logged losses within 1e-5 relative. A wrong batch split or loss scaling shows up at ~lr.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsm.checkpoint import find_checkpoint, is_sharded_checkpoint, load_trained
from lsm.config import ConfigError, load_config
from lsm.distributed import DistributedError
from lsm.train import train

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 120   # seconds for one torchrun launch (2 workers on 2 busy cores take ~10 s)
# the launches share 2 cores: keep this file's tests on one xdist worker, one after another
pytestmark = pytest.mark.xdist_group("distributed")

PARAM_ATOL = 1e-4
LOSS_RTOL = 1e-5

# A tiny MoM model on MQAR whose examples have different numbers of labelled tokens (2, 4 or 6
# pairs), so the global token-mean loss differs from a mean of per-rank means. The aux loss is
# off: it is computed per rank (on each rank's shard), which is not the global batch's value.
# Every token reads both memories (topk = num_memories, weights from the router): a top-1 choice is
# discrete, and a near-tie that float reduction order flips would change the run by more than noise.
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.mixer.type=mom", "model.mixer.rule=gated_deltanet",
        "model.mixer.num_heads=2", "model.mixer.num_memories=2", "model.mixer.topk=2",
        "model.mixer.aux_loss_weight=0.0", "model.mixer.backend=torch", "model.mixer.chunk_size=16",
        "data.mqar.vocab_size=64", "data.mqar.seq_len=32", "data.mqar.train_pairs=[2,4,6]",
        "data.mqar.test_pairs=[4]", "data.mqar.num_test=16", "eval.batch_size=16",
        "train.batch_size=8", "train.grad_accum=2", "train.lr=3e-3", "train.warmup_steps=1", "train.threads=1",
        "train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("name: tiny\n")
    return path


def _torchrun(tmp_path: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "lsm", "train", str(_config_file(tmp_path)), *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0", "LSM_DIST_TIMEOUT_S": "60"}
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT} s (a hang?); output:\n{e.stdout}\n{e.stderr}")


def _single(tmp_path: Path, name: str, *overrides: str, **kwargs):
    cfg = load_config(None, [*TINY, f"train.out_dir={tmp_path / name}", *overrides])
    return train(cfg, quiet=True, **kwargs)


def _weights(path) -> dict[str, torch.Tensor]:
    return load_trained(path)[1].state_dict()


def _assert_close_params(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=PARAM_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def _logged_losses(run: Path) -> list[float]:
    import json

    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def _rendezvous(monkeypatch, world_size: int = 1) -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)


# --------------------------------------------------------------------------- equality with one process
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """4 one-process steps with checkpoints at 2 and 4: (run folder, {step: weights})."""
    root = tmp_path_factory.mktemp("reference")
    res = _single(root, "one", "train.steps=4", "train.ckpt_every=2")
    return root / "one", {s: _weights(res.checkpoint.parent / f"step_{s:06d}") for s in (2, 4)}


def test_ddp_two_ranks_match_one_process_and_continue_under_fsdp(tmp_path, monkeypatch, reference):
    ref_run, ref = reference
    run = tmp_path / "ddp"
    proc = _torchrun(tmp_path, "train.steps=4", "train.parallel=ddp", f"train.out_dir={run}", "--max-steps", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("2 steps in") == 1                     # rank 0 reports, rank 1 stays quiet
    ckpt = find_checkpoint(run)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.yaml", "model.safetensors", "trainer_state.pt"]
    _assert_close_params(_weights(ckpt), ref[2])
    # the rank-0 checkpoint continues on one FSDP rank (loaded whole, then sharded)
    _rendezvous(monkeypatch, world_size=1)
    res = train(load_config(None, [*TINY, "train.steps=4", "train.parallel=fsdp", f"train.out_dir={run}"]),
                resume=True, quiet=True)
    assert res.step == 4 and is_sharded_checkpoint(res.checkpoint)
    _assert_close_params(_weights(run), ref[4])
    torch.testing.assert_close(_logged_losses(run), _logged_losses(ref_run), rtol=LOSS_RTOL, atol=0)


def test_fsdp_matches_one_process_and_its_checkpoint_reshards(tmp_path, monkeypatch, reference):
    ref_run, ref = reference
    # 2 FSDP ranks stop after step 2: a DCP checkpoint with one shard file per rank
    run = tmp_path / "fsdp"
    proc = _torchrun(tmp_path, "train.steps=4", "train.parallel=fsdp", f"train.out_dir={run}", "--max-steps", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ckpt = find_checkpoint(run)
    assert ckpt.name == "step_000002" and is_sharded_checkpoint(ckpt)
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((run / "checkpoints").glob(".*"))                # no partial folder left
    # a single process (no process group) loads the shards: `lsm eval` / `lsm generate`'s path
    _assert_close_params(_weights(ckpt), ref[2])
    # one process without a process group resumes it (model and optimizer from the shards)
    shutil.copytree(run, tmp_path / "plain")
    res = _single(tmp_path, "plain", "train.steps=4", resume=True)
    assert res.step == 4 and not is_sharded_checkpoint(res.checkpoint)
    _assert_close_params(_weights(tmp_path / "plain"), ref[4])
    # one FSDP rank resumes the 2-rank checkpoint (model and optimizer resharded by DCP)
    _rendezvous(monkeypatch, world_size=1)
    res = train(load_config(None, [*TINY, "train.steps=4", "train.parallel=fsdp", f"train.out_dir={run}"]),
                resume=True, quiet=True)
    assert res.step == 4 and is_sharded_checkpoint(res.checkpoint)
    _assert_close_params(_weights(run), ref[4])
    torch.testing.assert_close(_logged_losses(run), _logged_losses(ref_run), rtol=LOSS_RTOL, atol=0)


# --------------------------------------------------------------------------- bad input: one error, every rank, no hang
def test_checkpoint_of_another_model_fails_on_every_rank(tmp_path):
    run = tmp_path / "run"
    _single(tmp_path, "run", "train.steps=1", "model.hidden_size=16")
    proc = _torchrun(tmp_path, "train.steps=2", "train.parallel=fsdp", f"train.out_dir={run}", "--resume")
    assert proc.returncode != 0
    assert proc.stderr.count("lsm train: error: --resume: the model in") == 2, proc.stderr


def test_missing_rendezvous_variable_is_named(tmp_path, monkeypatch):
    _rendezvous(monkeypatch, world_size=2)
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(DistributedError, match=r"train.parallel=ddp needs torchrun's rendezvous variables; "
                                               r"MASTER_PORT is not set\. Launch with `torchrun --nproc_per_node N"):
        _single(tmp_path, "x", "train.parallel=ddp")


def test_world_size_not_dividing_the_batch_and_parallel_none_under_torchrun(tmp_path, monkeypatch):
    # raised from the environment alone, before the process group exists: every rank raises it, none waits
    _rendezvous(monkeypatch, world_size=3)
    with pytest.raises(DistributedError, match="train.batch_size: 8 .* WORLD_SIZE=3 ranks; use a multiple of 3"):
        _single(tmp_path, "x", "train.parallel=fsdp")
    with pytest.raises(DistributedError, match="train.parallel: none, but this process is one of WORLD_SIZE=3"):
        _single(tmp_path, "x")
    with pytest.raises(ConfigError, match="train.parallel: unknown value 'dpp'; did you mean 'ddp'"):
        load_config(None, ["train.parallel=dpp"])
