"""Sweeps (lsm.ablate): the cell list, config hashes, determinism across runs and worker counts, resume
after a kill, shards + merge, failing cells, early stopping on the validation stream, the statistics and
the tie rule, and bad sweep configs as one-line CLI errors."""
import math
from pathlib import Path

import pytest
import torch

import lsm.ablate as ablate
from lsm.cli import main
from lsm.config import from_dict, load_config, with_overrides

TINY = ["model.hidden_size=16", "model.num_layers=1", "model.mixer.num_heads=2", "model.mixer.backend=torch",
        "model.mixer.num_memories=2", "model.mixer.topk=1",
        "data.mqar.vocab_size=32", "data.mqar.seq_len=16", "data.mqar.train_pairs=[2,4]", "data.mqar.test_pairs=[2,4]",
        "data.mqar.num_test=8", "data.mqar.num_val=8", "train.batch_size=4", "train.warmup_steps=0", "train.steps=3",
        "train.log_every=1", "train.tensorboard=false", "eval.batch_size=16", "ablate.rules=[mamba2]"]


def tiny(tmp_path, *extra):
    return load_config(None, [*TINY, f"ablate.out_dir={tmp_path / 'sweep'}", *extra])


def key_numbers(rows):
    """What must not change between runs of the same cells: metrics, validation, steps, loss."""
    return {r["cell"]: (r["accuracy"], r["acc@2"], r["acc@4"], r["val_accuracy"], r["steps"], r["final_loss"])
            for r in rows}


def test_cell_list_nests_rules_variants_grid_lrs_seeds(tmp_path):
    cfg = tiny(tmp_path, "ablate.rules=[mamba2,gla]", "ablate.variants=[single,mom]", "ablate.seeds=[0,1,2]",
               "ablate.lrs=[1e-3,3e-3]", "ablate.grid.model.mixer.topk=[1,2]")
    cells = ablate.all_cells(cfg)
    assert len(cells) == 2 * 2 * 2 * 2 * 3 and len({c.id for c in cells}) == len(cells)
    first = cells[:3]
    assert [(c.rule, c.variant, c.swept, c.lr, c.seed) for c in first] == [
        ("mamba2", "single", (("model.mixer.topk", 1),), 1e-3, s) for s in (0, 1, 2)]
    for c in cells:
        t = c.config
        assert t.train.seed == t.data.seed == c.seed and t.train.lr == c.lr and t.model.mixer.rule == c.rule
        assert t.model.mixer.topk == dict(c.swept)["model.mixer.topk"]
        assert t.model.mixer.type == ("mom" if c.variant == "mom" else "rule") and t.train.threads == 1
        assert t.train.out_dir.endswith(c.id)


def test_state_matched_variants():
    """single_same_state gets MoM's total state in heads, single_active_state its active (topk + shared) state."""
    from lsm.ablate import variant_config
    from lsm.accounting import account_config

    cfg = from_dict({"model": {"hidden_size": 32, "mixer": {"num_heads": 2, "num_memories": 4, "topk": 2}}})
    size = {v: account_config(variant_config(cfg, "deltanet", v)).memory_floats
            for v in ("single", "mom", "single_same_state", "single_active_state")}
    assert size["mom"] == size["single_same_state"] == 5 * size["single"]
    assert size["single_active_state"] == 3 * size["single"]
    active = variant_config(cfg, "deltanet", "single_active_state").model.mixer
    assert (active.type, active.num_heads, active.head_dim) == ("rule", 6, 16)
    no_shared = with_overrides(cfg, {"model.mixer.shared_memory": False})
    assert variant_config(no_shared, "deltanet", "single_active_state").model.mixer.num_heads == 4


def test_zoology_preset_plans_the_recall_study():
    """configs/zoology_mqar.yaml: 7 rules x 4 variants x 2 widths; stage one is the LR grid at seed 0 (per rule 24
    runs), then 2 more seeds per group at its best LR (16): 280 runs in all, each training on (seq_len, pairs) cells."""
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / "zoology_mqar.yaml"
    assert len(load_config(path).ablate.rules) == 7
    cfg = load_config(path, ["ablate.rules=[deltanet]"])   # one rule's cells: planning all 504 takes ~30 s here
    assert len(ablate.all_cells(cfg)) == 4 * 2 * 3 * 3 and len(ablate.plan(cfg, [])) == 4 * 2 * 3
    assert cfg.data.mqar.train_cells[-1] == [256, 16] and cfg.model.mixer.backend == "triton"
    assert max(L for L, _ in cfg.data.mqar.test_cells) == 512


def test_config_hash_changes_with_settings_not_with_names(tmp_path):
    cfg = tiny(tmp_path)
    h = ablate.config_hash(cfg)
    assert ablate.config_hash(with_overrides(cfg, {"name": "other", "train.out_dir": "x", "ablate.seeds": [5]})) == h
    for key, value in (("model.mixer.topk", 2), ("train.steps", 4), ("data.mqar.num_test", 9), ("train.lr", 1e-2)):
        assert ablate.config_hash(with_overrides(cfg, {key: value})) != h, key
    # the whole sweep section is left out, whatever it holds
    assert ablate.config_hash(with_overrides(cfg, {"ablate.streams": 4, "ablate.jobs": 3, "ablate.lrs": [1.0]})) == h


def test_rows_of_an_older_cell_id_are_found_by_their_stored_config(tmp_path, monkeypatch):
    """Rows written under another cell id (an earlier hash: here every id prefixed with `old`), from this host or
    another (run_dir elsewhere, config under out_dir/cells), are re-identified from their run's config.yaml: a merge
    keeps them as cells of the config, and a resumed sweep runs none of them again, even beside a failed row of the
    same cell. A row whose config is gone stays as it was. Rows re-used under a grid that sweeps a new key carry
    their cell's value of it."""
    import shutil

    cfg = tiny(tmp_path, "ablate.variants=[single,mom]", "ablate.seeds=[0]")
    out = tmp_path / "sweep"
    rows = ablate.run_sweep(cfg, shard=(1, 1), quiet=True)
    ids = {r["cell"] for r in rows}
    stale = [{**r, "cell": "old" + r["cell"]} for r in rows]
    moved = stale[0]["run_dir"]
    stale[0]["run_dir"] = "/elsewhere/cells/" + Path(moved).name   # rows from another host: config under out/cells
    lost = {**stale[1], "cell": "oldgone", "run_dir": "/elsewhere/cells/gone"}
    ablate.write_runs(stale + [lost], out / "shards" / "1of1" / "runs.csv")
    merged = ablate.merge(cfg, quiet=True)
    assert {r["cell"] for r in merged} == ids
    assert "oldgone" in {r["cell"] for r in ablate.read_runs(out / "runs.csv")}
    shutil.rmtree(out / "shards")
    # a failed row under today's id does not shadow the finished row under the old one
    failed = [{**r, "status": "failed", "error": "boom"} for r in rows]
    ablate.write_runs(stale + failed, out / "runs.csv")
    monkeypatch.setattr(ablate, "run_cells", lambda *a, **k: pytest.fail("a finished cell ran again"))
    again = ablate.run_sweep(cfg, quiet=True)
    assert {r["cell"] for r in again} == ids and all(r["status"] == "ok" for r in again)
    # under a grid that sweeps a key at the value these runs had (the default), the same rows are its cells and
    # carry the key as a column
    swept = with_overrides(cfg, {"ablate.grid": {"model.mixer.aux_loss_weight": [0.01]}})
    lines = ablate.write_results(ablate.merge(swept, quiet=True), swept)
    assert [ln["model.mixer.aux_loss_weight"] for ln in lines] == [0.01, 0.01]


def test_same_numbers_twice_and_with_two_workers(tmp_path):
    cfg = tiny(tmp_path, "ablate.variants=[single,mom]")
    first = key_numbers(ablate.run_sweep(cfg, quiet=True))
    again = key_numbers(ablate.run_sweep(cfg, rerun=True, quiet=True))
    two = key_numbers(ablate.run_sweep(with_overrides(cfg, {"ablate.jobs": 2, "ablate.out_dir": str(tmp_path / "j2")}),
                                       quiet=True))
    assert len(first) == 2 and first == again == two


def test_a_groups_seeds_start_while_another_groups_lr_grid_runs(tmp_path):
    """two_stage with workers (`ablate.drain`): the seeds of a group whose LR grid is in are queued at once, not after
    every group's grid: here mom's grid cells wait until single's second seed has run (a barrier between the stages
    would leave them waiting, and the test would fail on the timeout)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    cfg = tiny(tmp_path, "ablate.variants=[single,mom]", "ablate.seeds=[0,1]", "ablate.lrs=[1e-3,3e-3]",
               "ablate.selection=two_stage")
    every = ablate.all_cells(cfg)
    single_seed1 = threading.Event()
    rows, order, ended = {}, [], []

    def run(batch):
        out = []
        for c in batch:
            if c.variant == "mom" and c.seed == 0:
                assert single_seed1.wait(timeout=20), "mom's grid waited on a stage barrier"
            ended.append((c.variant, c.seed))
            if c.variant == "single" and c.seed == 1:
                single_seed1.set()
            out.append({"cell": c.id, "status": "ok", "seed": c.seed, "lr": c.lr, "val_accuracy": c.lr * 100})
        return out

    def on_row(row):
        rows[row["cell"]] = row
        order.append(row["cell"])

    first = ablate.plan(cfg, [], every)
    assert {c.seed for c in first} == {0} and len(first) == 4
    with ThreadPoolExecutor(4) as pool:
        ablate.drain(pool, run, first, 1, on_row,
                     more=lambda: [c for c in ablate.plan(cfg, list(rows.values()), every) if c.id not in rows])
    by_id = {c.id: c for c in every}
    ran = [by_id[i] for i in order]
    assert len(ran) == 6 and {(c.variant, c.seed, c.lr) for c in ran if c.seed == 1} == {("single", 1, 3e-3),
                                                                                          ("mom", 1, 3e-3)}
    assert ended.index(("single", 1)) < ended.index(("mom", 0))
    # a batch whose worker fails (not the cell: run_cell records those) is a failed row each; the others go on
    rows.clear()
    with ThreadPoolExecutor(2) as pool:
        ablate.drain(pool, lambda batch: 1 / 0 if batch[0].variant == "mom" else run(batch), first, 1, on_row)
    assert sorted((by_id[r["cell"]].variant, r["status"], r.get("error", "")) for r in rows.values()) == [
        ("mom", "failed", "ZeroDivisionError: division by zero")] * 2 + [("single", "ok", "")] * 2


def test_a_groups_seeds_go_before_the_next_groups_lr_grid(tmp_path):
    """drain with `slots` (the sweep's workers): cells wait in drain's queue, and a group's seeds, runnable once its
    LR grid is in, go to the queue's front: with one slot, mom's seed runs before single's grid (a sweep cut short
    leaves whole groups); with no bound every cell is in the pool at once, and the seed runs last."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = tiny(tmp_path, "ablate.variants=[single,mom]", "ablate.seeds=[0,1]", "ablate.lrs=[1e-3,3e-3]",
               "ablate.selection=two_stage")
    every = ablate.all_cells(cfg)
    by_id = {c.id: c for c in every}

    def order(slots):
        rows = {}

        def run(batch):
            return [{"cell": c.id, "status": "ok", "seed": c.seed, "lr": c.lr, "val_accuracy": c.lr * 100}
                    for c in batch]

        with ThreadPoolExecutor(1) as pool:
            ablate.drain(pool, run, ablate.plan(cfg, [], every), 1, lambda r: rows.setdefault(r["cell"], r),
                         more=lambda: [c for c in ablate.plan(cfg, list(rows.values()), every) if c.id not in rows],
                         slots=slots)
        return [(by_id[i].variant, by_id[i].seed) for i in rows]

    # one slot: each group's seed runs right after the last cell of its grid, before the other group's grid ends
    bounded = order(1)
    for v in ("single", "mom"):
        last = max(i for i, x in enumerate(bounded) if x == (v, 0))
        assert bounded[last + 1] == (v, 1)
    assert bounded[2][1] == 1 and sorted(bounded) == sorted(order(None))
    assert [s for _, s in order(None)] == [0, 0, 0, 0, 1, 1]   # unbounded: every grid cell was in the pool first


def test_a_broken_process_pool_fails_its_batches_and_submits_no_more(tmp_path):
    """When a worker process dies the pool breaks: the batches in it become failed rows that say so, no more cells
    are submitted to it (`drain` returns; the sweep plans again with a fresh pool), and nothing raises."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    class DeadPool:   # a pool whose first batch's worker died: it and the pool are broken
        def __init__(self):
            self.calls = 0

        def submit(self, fn, batch):
            self.calls += 1
            if self.calls > 2:
                raise BrokenProcessPool("pool is broken")
            f = Future()
            f.set_exception(BrokenProcessPool("a process terminated abruptly"))
            return f

    cfg = tiny(tmp_path, "ablate.variants=[single,mom]", "ablate.seeds=[0,1]", "ablate.lrs=[1e-3,3e-3]",
               "ablate.selection=two_stage")
    every = ablate.all_cells(cfg)
    first = ablate.plan(cfg, [], every)
    rows = []
    pool = DeadPool()
    ablate.drain(pool, None, first, 1, rows.append, more=lambda: every)
    assert len(rows) == 2 and pool.calls == 3      # two batches in the pool, the third submit refused
    assert all(r["status"] == "failed" and r["error"].startswith("BrokenProcessPool: a worker process died")
               for r in rows)


def test_streams_train_a_groups_cells_side_by_side_with_the_same_numbers(tmp_path):
    """ablate.streams: a group's cells (here the 2 seeds of each variant) train at once in threads of one process, or
    of each of 2 worker processes; every number equals the one-at-a-time sweep's (each model's init is its own
    seed's, whatever the other threads draw meanwhile)."""
    cfg = tiny(tmp_path, "ablate.variants=[single,mom]", "ablate.seeds=[0,1]")
    assert [len(b) for b in ablate._batches(ablate.all_cells(cfg), 2)] == [2, 2]
    assert [len(b) for b in ablate._batches(ablate.all_cells(cfg), 3)] == [2, 2]
    one = key_numbers(ablate.run_sweep(cfg, quiet=True))
    threads = key_numbers(ablate.run_sweep(with_overrides(cfg, {"ablate.streams": 2, "ablate.out_dir": str(tmp_path / "s")}),
                                           quiet=True))
    both = key_numbers(ablate.run_sweep(with_overrides(cfg, {"ablate.streams": 2, "ablate.jobs": 2,
                                                             "ablate.out_dir": str(tmp_path / "s2")}), quiet=True))
    assert len(one) == 4 and one == threads == both


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_streams_on_gpu_train_like_one_at_a_time(tmp_path, graph):
    """On a GPU (triton backend, bf16 autocast, eager or CUDA-graphed steps): 4 MoM runs of one process, each on a
    thread and a CUDA stream of its own, give the loss at every step of the same runs trained one at a time (bf16
    tolerances: kernels may pick other autotuned configs across streams)."""
    cfg = tiny(tmp_path, "ablate.variants=[mom]", "ablate.seeds=[0,1,2,3]", "model.mixer.backend=triton",
               "model.hidden_size=64", "train.device=cuda", "train.steps=8", f"train.cuda_graph={graph}",
               "model.mixer.num_memories=4", "model.mixer.topk=2", "ablate.rules=[gated_deltanet]")
    assert [len(b) for b in ablate._batches(ablate.all_cells(cfg), 4)] == [4]   # all four side by side
    one = ablate.run_sweep(cfg, quiet=True)
    side = ablate.run_sweep(with_overrides(cfg, {"ablate.streams": 4, "ablate.out_dir": str(tmp_path / "s")}),
                            quiet=True)
    assert len(one) == len(side) == 4 and all(r["status"] == "ok" for r in one + side)
    losses = lambda row: [m["loss"] for m in ablate.run_metrics(row) if "loss" in m]
    by_cell = {r["cell"]: r for r in side}
    for r in one:
        expected, got = losses(r), losses(by_cell[r["cell"]])
        assert len(expected) == len(got) == 8, r["cell"]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-2, atol=1e-3)
    assert len({tuple(losses(r)) for r in one}) == 4   # the seeds differ: the comparison is run by run


def test_killed_sweep_resumes_without_rerunning_finished_cells(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "ablate.variants=[single,mom]", "ablate.seeds=[0,1]")
    real, calls = ablate.run_cell, []

    def killed_on_third(cell, provenance=None):
        calls.append(cell.id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cell, provenance)
    monkeypatch.setattr(ablate, "run_cell", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        ablate.run_sweep(cfg, quiet=True)
    kept = ablate.read_runs(tmp_path / "sweep" / "runs.csv")
    assert [r["cell"] for r in kept] == calls[:2]
    calls.clear()
    rows = ablate.run_sweep(cfg, quiet=True)
    assert len(calls) == 2 and not set(calls) & {r["cell"] for r in kept}                 # only the rest ran
    assert {r["cell"]: r["train_s"] for r in rows if r["cell"] in {k["cell"] for k in kept}} == \
        {r["cell"]: r["train_s"] for r in kept}                                             # finished rows kept
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert "| mamba2 | MoM |" in (tmp_path / "sweep" / "results.md").read_text()


def test_shards_cover_the_sweep_and_merge(tmp_path):
    cfg = tiny(tmp_path, "ablate.variants=[single,mom]", "ablate.seeds=[0,1]")
    ids = {c.id for c in ablate.all_cells(cfg)}
    parts = [ablate.run_sweep(cfg, shard=(i, 2), quiet=True) for i in (1, 2)]
    got = [{r["cell"] for r in p} for p in parts]
    assert not got[0] & got[1] and got[0] | got[1] == ids
    assert not (tmp_path / "sweep" / "results.md").exists()
    rows = ablate.merge(cfg, quiet=True)
    assert {r["cell"] for r in rows} == ids and len(ablate.read_runs(tmp_path / "sweep" / "runs.csv")) == 4
    assert (tmp_path / "sweep" / "results.md").exists() and (tmp_path / "sweep" / "loss_curves.png").exists()


def test_half_way_step_from_the_curve_and_from_curves_merged_from_another_host(tmp_path):
    """half_step: the first validation step at half the last validation accuracy (None for a run that never left
    chance); rows merged from another host find their metrics under out_dir/cells/<run folder>, and the table gives
    the mean over the seeds that have one."""
    import json

    curve = lambda *accs: [{"step": 100 * (i + 1), "val/accuracy": a} for i, a in enumerate(accs)]
    assert ablate.half_step(curve(0.0, 0.01, 0.3, 0.5, 0.8) + [{"step": 500, "loss": 1.0}]) == 400
    assert ablate.half_step(curve(0.0, 0.02, 0.05)) is None and ablate.half_step([{"step": 1, "loss": 2.0}]) is None
    cfg = tiny(tmp_path, "ablate.seeds=[0,1]", "ablate.variants=[single]")
    rows = sorted(ablate.run_sweep(cfg, quiet=True), key=lambda r: r["seed"])
    assert all(r["half_step"] == "" or r["half_step"] % cfg.train.eval_every == 0 for r in rows)
    out = tmp_path / "merged"
    for seed, r in enumerate(rows):   # as if run elsewhere: run_dir names a folder that is not here
        r.update(run_dir=f"/elsewhere/cells/{seed}-run", half_step="")
        (out / "cells" / f"{seed}-run").mkdir(parents=True)
        records = curve(0.0, 0.2, 0.6, 0.8) if seed == 0 else curve(0.0, 0.0, 0.05)
        (out / "cells" / f"{seed}-run" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    lines = ablate.write_results(rows, with_overrides(cfg, {"ablate.out_dir": str(out)}))
    assert [r["half_step"] for r in rows] == [300, ""]
    assert lines[0]["half_step_mean"] == 300 and lines[0]["half_step_n"] == 1
    assert "| 300 (1/2) |" in (out / "results.md").read_text()


def test_merge_recovers_finished_runs_that_no_table_holds(tmp_path):
    """A sweep that ended before recording its rows (killed, or a crash elsewhere in it) leaves its finished runs'
    config and metrics under cells/: `merge` rebuilds their rows (lsm.ablate.recover) with the same test and
    validation numbers, steps and accounting; a run cut before its test evaluation is not a result."""
    cfg = tiny(tmp_path, "ablate.variants=[single,mom]")
    rows = {r["cell"]: r for r in ablate.run_sweep(cfg, quiet=True)}
    out = tmp_path / "sweep"
    (out / "runs.csv").unlink()
    cut = Path(rows[next(c for c in rows if rows[c]["variant"] == "mom")]["run_dir"]) / "metrics.jsonl"
    cut.write_text("".join(ln + "\n" for ln in cut.read_text().splitlines() if "eval/accuracy" not in ln))
    merged = {r["cell"]: r for r in ablate.merge(cfg, quiet=True)}
    assert len(merged) == 1 and set(merged) < set(rows)
    (cid, got), = merged.items()
    want = rows[cid]
    for k in ("accuracy", "acc@2", "acc@4", "val_accuracy", "steps", "state_floats", "params_total", "lr", "seed"):
        assert got[k] == want[k], k
    assert got["status"] == "ok" and got["recovered"] == "metrics.jsonl" and got["train_s"] in ("", None)
    # no periodic validation here (train.eval_every 0): the end's own validation is in the stream, marked `final`,
    # and gives no half-way step
    assert got["half_step"] in ("", None) and want["half_step"] in ("", None) and got["steps_to_target"] == ""
    assert ablate.merge(cfg, quiet=True)[0]["accuracy"] == want["accuracy"]   # a second merge reads it back
    # a torn stream (a partial copy) is skipped, and the merge goes on
    (out / "runs.csv").unlink()
    torn = Path(want["run_dir"]) / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"step": 3, "eval/acc')
    assert ablate.merge(cfg, quiet=True) == []


def test_provenance_never_decides_whether_a_cell_runs():
    """The backend in a row's provenance is resolved from a float32 q alone; a kernel that refuses that (fla on
    CPU, fla's delta rule on float32) is recorded as unresolved, not raised."""
    cfg = load_config(None, ["model.mixer.rule=deltanet", "model.mixer.backend=fla", "train.device=cpu"])
    assert ablate.provenance_of(cfg)["backend"].startswith("fla (unresolved from float32 q: deltanet: ")
    assert ablate.provenance_of(load_config(None, ["model.mixer.backend=torch"]))["backend"] == "torch"


def test_half_step_reads_the_periodic_validations_only():
    curve = [{"step": 100, "val/accuracy": 0.01}, {"step": 200, "val/accuracy": 0.5}, {"step": 300, "val/accuracy": 0.8}]
    assert ablate.half_step(curve) == 200
    assert ablate.half_step(curve + [{"step": 310, "final": True, "val/accuracy": 0.4}]) == 200
    assert ablate.half_step([{"step": 310, "final": True, "val/accuracy": 0.9}]) is None


def test_merge_from_the_cli_names_a_config_mismatch(tmp_path, capsys):
    """`lsm ablate CONFIG --merge key=value ...` takes overrides after the flag; merging under other overrides than
    the shards ran with finds none of their cells and says what to do."""
    from lsm.config import to_yaml

    cfg = tiny(tmp_path, "ablate.variants=[single]", "ablate.seeds=[0]")
    ablate.run_sweep(cfg, shard=(1, 1), quiet=True)
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(to_yaml(cfg))
    assert main(["ablate", str(cfg_file), "--merge", "ablate.seeds=[0]"]) == 0
    assert "1 of them are cells of this config" in capsys.readouterr().out
    assert main(["ablate", str(cfg_file), "--merge", "train.steps=4"]) == 0
    said = capsys.readouterr().out
    assert "0 of them are cells of this config" in said and "merge with the overrides the shards ran with" in said


def test_plan_shows_what_a_sweep_would_run_and_runs_nothing(tmp_path, capsys):
    """`lsm ablate CONFIG --plan`: the sweep's cells, those finished in its runs.csv, the cells to run now by group
    (two_stage: a group's seeds at its selected LR once its grid is in; the other groups' seeds counted as waiting),
    and nothing trained or written; with --merge or --rerun it is a one-line error."""
    from lsm.config import to_yaml

    over = ["ablate.variants=[single,mom]", "ablate.seeds=[0,1,2]", "ablate.lrs=[1e-3,3e-3]", "ablate.selection=two_stage"]
    cfg = tiny(tmp_path, *over)
    every = ablate.all_cells(cfg)
    out = Path(cfg.ablate.out_dir)
    assert ablate.plan_text(cfg).splitlines()[0] == (
        f"12 cells in {out}; 0 finished; 4 to run now, 4 more seed runs once their group's LR grid is in (two_stage)")
    # single's LR grid is in (3e-3 the better), one of mom's grid cells too
    done = [c for c in every if c.seed == 0 and (c.variant == "single" or c.lr == 1e-3)]
    ablate.write_runs([{"cell": c.id, "rule": c.rule, "variant": c.variant, "lr": c.lr, "seed": c.seed, "status": "ok",
                        "val_accuracy": c.lr * 100} for c in done], out / "runs.csv")
    text = ablate.plan_text(cfg)
    assert text.splitlines() == [
        f"12 cells in {out}; 3 finished; 3 to run now, 2 more seed runs once their group's LR grid is in (two_stage)",
        "  mamba2 single: lr 0.003; seed 1, 2 (2 runs)",
        "  mamba2 MoM: lr 0.003; seed 0 (1 run)"]
    # shards plan as the sweep does (over every cell and row, then the shard's): together they run the same cells
    import re
    now = lambda text: int(re.search(r"(\d+) to run now", text).group(1))
    assert now(ablate.plan_text(cfg, (1, 2))) + now(ablate.plan_text(cfg, (2, 2))) == 3
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(to_yaml(cfg))
    before = sorted(p.name for p in out.iterdir())
    assert main(["ablate", str(cfg_file), "--plan"]) == 0
    assert capsys.readouterr().out == text
    assert sorted(p.name for p in out.iterdir()) == before     # nothing trained, nothing written
    assert main(["ablate", str(cfg_file), "--plan", "--merge"]) == 2
    assert "--plan shows what a sweep would run" in capsys.readouterr().err


def test_failing_cell_is_recorded_and_the_others_finish(tmp_path, monkeypatch):
    import lsm.train

    real = lsm.train.train

    def crash_seed_one(cfg, **kw):
        if cfg.train.seed == 1:
            raise RuntimeError("boom\nsecond line")
        return real(cfg, **kw)
    monkeypatch.setattr(lsm.train, "train", crash_seed_one)
    cfg = tiny(tmp_path, "ablate.variants=[single]", "ablate.seeds=[0,1,2]")
    rows = ablate.run_sweep(cfg, quiet=True)
    status = {r["seed"]: (r["status"], r["error"]) for r in rows}
    assert status == {0: ("ok", ""), 1: ("failed", "RuntimeError: boom"), 2: ("ok", "")}
    assert "2 (+1 failed)" in (tmp_path / "sweep" / "results.md").read_text()


def test_a_cell_whose_provenance_fails_is_recorded_before_it_trains(tmp_path, monkeypatch):
    """The row's static columns (accounting, provenance) are taken before training: a failure there is a failed row
    that cost no training, and the sweep goes on."""
    import lsm.train

    trained = []
    monkeypatch.setattr(lsm.train, "train", lambda cfg, **kw: trained.append(cfg))
    monkeypatch.setattr(ablate, "provenance_of", lambda cfg: (_ for _ in ()).throw(AttributeError("no dtype")))
    rows = ablate.run_sweep(tiny(tmp_path, "ablate.variants=[single]", "ablate.seeds=[0,1]"), quiet=True)
    assert [(r["status"], r["error"]) for r in rows] == [("failed", "AttributeError: no dtype")] * 2
    assert trained == []


def test_early_stopping_looks_at_validation_only(tmp_path, monkeypatch):
    import lsm.evaluate
    import lsm.train

    real, splits = lsm.evaluate.evaluate, []

    def perfect_validation(model, cfg, data=None, device=None, split="test"):
        splits.append(split)
        result = real(model, cfg, data, device, split)
        return {**result, "accuracy": 1.0} if split == "val" else result
    monkeypatch.setattr(lsm.train, "evaluate", perfect_validation)  # the name the trainer calls
    cfg = tiny(tmp_path, "train.steps=8", "train.eval_every=2", "train.target_accuracy=0.99",
               f"train.out_dir={tmp_path / 'run'}", "train.progress=false")
    result = lsm.train.train(cfg, quiet=True)
    assert result.step == result.steps_to_target == 2 and splits == ["val", "test"]
    assert result.eval["accuracy"] < 1.0 and result.val["accuracy"] == 1.0


def test_validation_and_test_streams_differ():
    from lsm.config import MQARConfig
    from lsm.data import MQARData

    d = MQARData(MQARConfig(vocab_size=32, seq_len=16, num_test=8, num_val=8), seed=0)
    assert not (d.test_set(2, 16).input_ids == d.test_set(2, 16, "val").input_ids).all()


def _row(variant, lr, seed, acc, val, status="ok"):
    return {"cell": f"c{variant}{lr}{seed}", "rule": "gla", "variant": variant, "lr": lr, "seed": seed,
            "accuracy": acc, "val_accuracy": val, "steps": 10, "train_s": 1.0, "status": status,
            "state_floats": 100, "params_total": 1000}


def test_statistics_selection_and_tie_rule_on_a_hand_made_table(tmp_path):
    rows = [_row("single", 1e-3, s, a, a) for s, a in enumerate([0.5, 0.6, 0.7])]
    rows += [_row("single", 3e-3, s, a, v) for s, (a, v) in enumerate([(0.9, 0.8), (0.1, 0.1), (0.2, 0.2)])]
    rows += [_row("mom", 1e-3, s, a, a) for s, a in enumerate([0.6, 0.65, 0.8])]          # +0.1, +0.05, +0.1
    rows += [_row("single_same_state", 1e-3, s, a, a) for s, a in enumerate([0.8, 0.5, 0.75])]  # +0.3, -0.1, +0.05
    path = tmp_path / "runs.csv"
    ablate.write_runs(rows, path)
    back = ablate.read_runs(path)
    lines = {ln["variant"]: ln for ln in ablate.summarize(back, "mean", [0, 1, 2])}
    single, mom, same = lines["single"], lines["mom"], lines["single_same_state"]
    assert single["lr"] == 1e-3                             # mean validation 0.6 beats 0.367
    assert single["mean"] == pytest.approx(0.6) and single["std"] == pytest.approx(0.1)
    assert (single["min"], single["max"], single["n_seeds"]) == (0.5, 0.7, 3)
    assert mom["diff_mean"] == pytest.approx(0.25 / 3) and mom["wins"] == 2 + 1 and mom["verdict"] == "win"
    assert mom["diff_se"] == pytest.approx(math.sqrt(((1 / 60) ** 2 * 2 + (1 / 30) ** 2) / 2) / math.sqrt(3))
    assert same["wins"] == 2 and same["verdict"] == "tie"
    two = {ln["variant"]: ln for ln in ablate.summarize(back, "two_stage", [0, 1, 2])}
    assert two["single"]["lr"] == 3e-3                      # seed 0 alone: validation 0.8 beats 0.5
    cfg = load_config(None, ["ablate.seeds=[0,1,2]", "ablate.lrs=[1e-3,3e-3]"])
    table = ablate.markdown_table(list(lines.values()), cfg)
    assert "3 seeds (0, 1, 2)" in table and "LR grid [0.001, 0.003]" in table and "best LR by mean" in table
    assert "+0.083 ± 0.017 (3/3) | win |" in table
    # MoM against the state-matched single memory: mom - same = -0.2, +0.15, +0.05, a tie
    assert mom["vs_single_same_state_diff_mean"] == pytest.approx(0.0) and mom["vs_single_same_state_wins"] == 2
    assert mom["vs_single_same_state_verdict"] == "tie" and "vs_single_active_state_diff_mean" not in mom
    assert "| gla | +0.000 ± 0.104 (2/3) tie |" in table and "MoM vs single, MoM-size state" in table


def test_grid_values_against_the_keys_first_value_on_a_hand_made_table():
    """summarize(grid_base=...): each line against the line that differs in that grid key only, at the key's first
    grid value, paired per seed (each at its own selected LR); markdown_table lists them under the main table."""
    key = "model.mixer.readout"
    rows = [{**_row("mom", 1e-3, s, a, a), "cell": f"sum{s}", key: "sum", "model.hidden_size": 64}
            for s, a in enumerate([0.5, 0.6, 0.7])]
    rows += [{**_row("mom", lr, s, a, v), "cell": f"pm{lr}{s}", key: "per_memory", "model.hidden_size": 64}
             for lr, accs in ((1e-3, [0.1, 0.1, 0.1]), (3e-3, [0.6, 0.8, 0.75])) for s, a in enumerate(accs)
             for v in [a]]
    lines = ablate.summarize(rows, "two_stage", [0, 1, 2], {key: "sum"})
    pm = next(ln for ln in lines if ln[key] == "per_memory")
    p = ablate._grid_prefix(key)
    assert "." not in p and pm["lr"] == 3e-3
    assert pm[p + "diff_mean"] == pytest.approx(0.35 / 3) and pm[p + "wins"] == 3 and pm[p + "verdict"] == "win"
    assert not any(k.startswith(p) for k in next(ln for ln in lines if ln[key] == "sum"))
    cfg = load_config(None, ["ablate.seeds=[0,1,2]", "ablate.lrs=[1e-3,3e-3]"])
    table = ablate.markdown_table(lines, cfg)
    assert "| gla | MoM | hidden_size=64 | readout = per_memory | 0.717 ± 0.104 | +0.117 ± 0.044 (3/3) | win |" in table
    assert table.count("| readout |") == 1   # the comparison's columns are not taken for grid keys


def test_verdict_rule():
    assert ablate.verdict([0.1]) == "tie"                              # one seed decides nothing
    assert ablate.verdict([-0.1, -0.2]) == "loss"
    assert ablate.verdict([0.5, -0.01, 0.5]) == "tie"                  # mean 0.33 < 2 SE 0.34, signs differ
    assert ablate.verdict([1.0, -0.01, 1.0, 1.0]) == "win"             # mean 0.75 > 2 SE 0.50
    assert ablate.verdict([-0.1, -0.2, -0.05], higher=False) == "win"  # bits per byte: lower is better


def test_failed_lr_ranks_below_a_complete_one():
    rows = [_row("single", 1e-2, 0, 0.99, 0.99), _row("single", 1e-2, 1, 0, 0, status="failed"),
            _row("single", 1e-3, 0, 0.5, 0.5), _row("single", 1e-3, 1, 0.5, 0.5)]
    assert ablate.select_lr(rows, "mean", 0) == 1e-3


@pytest.mark.parametrize("override, message", [
    ("ablate.seeds=[]", "ablate.seeds: give at least one seed"),
    ("ablate.lrs=[-1e-3]", "ablate.lrs: must be > 0"),
    ("ablate.jobs=0", "ablate.jobs: must be > 0"),
    ("ablate.streams=0", "ablate.streams: must be > 0"),
    ("ablate.streams=17", "ablate.streams: at most 16 runs side by side per process"),
    ("ablate.streams=2 model.mixer.backend=fla", "ablate.streams: runs side by side in one process need "
                                                 "model.mixer.backend triton or torch"),
    ("ablate.grid.model.mixer.topq=[1,2]", "ablate.grid: unknown key model.mixer.topq; did you mean model.mixer.topk?"),
    ("train.target_accuracy=0.99", "train.eval_every: early stopping"),
])
def test_bad_sweep_config_is_one_line_exit_2(tmp_path, capsys, override, message):
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text("name: s\n")
    assert main(["ablate", str(cfg_file), *TINY, f"ablate.out_dir={tmp_path / 'o'}", *override.split()]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lsm ablate: error: {message}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_text_sweep_reports_bits_per_byte(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"def f(x):\n    return x + 1\n" * 400)
    cfg = load_config(None, [o for o in TINY if not o.startswith("data.mqar")] + [
        "data.kind=text", f"data.text.path={text}", "data.text.seq_len=16", "eval.text_batches=1",
        "ablate.variants=[single,mom]", "ablate.seeds=[0,1]", f"ablate.out_dir={tmp_path / 'sweep'}"])
    rows = ablate.run_sweep(cfg, quiet=True)
    assert len(rows) == 4 and all(r["bpb"] > 0 and r["val_bpb"] > 0 for r in rows)
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "bpb mean ± std" in table and "bits per byte (lower is better)" in table
    assert (tmp_path / "sweep" / "bpb_vs_state.png").exists() and not (tmp_path / "sweep" / "accuracy_vs_pairs.png").exists()
    assert not (tmp_path / "sweep" / "bpb_vs_state_by_rule.png").exists()   # one rule: no per-rule panels


# two rules x four variants x two widths x 3 seeds, one lr: accuracy per seed, and the verdicts they give
_STUDY = {  # (rule, width): {variant: accuracies at seeds 0, 1, 2}
    ("deltanet", 16): {"single_active_state": [0.5, 0.6, 0.7], "mom": [0.7, 0.8, 0.9], "single_same_state": [0.8, 0.9, 0.95]},
    ("deltanet", 32): {"single_active_state": [0.6, 0.6, 0.6], "mom": [0.7, 0.5, 0.65], "single_same_state": [0.7, 0.5, 0.6]},
    ("gla", 16): {"single_active_state": [0.2, 0.3, 0.4], "mom": [0.1, 0.2, 0.3], "single_same_state": [0.1, 0.2, 0.3]},
    ("gla", 32): {"single_active_state": [0.3, 0.3, 0.3], "mom": [0.4, 0.5, 0.6], "single_same_state": [0.3, 0.4, 0.5]},
}
_MEMORIES = {"single": 1, "single_active_state": 3, "mom": 5, "single_same_state": 5}


def _study_rows():
    rows = []
    for (rule, width), accs in _STUDY.items():
        for variant, memories in _MEMORIES.items():
            for seed, acc in enumerate(accs.get(variant, [0.1, 0.2, 0.3])):
                rows.append({"cell": f"c{rule}{variant}{width}{seed}", "rule": rule, "variant": variant,
                             "model.hidden_size": width, "lr": 1e-3, "seed": seed, "accuracy": acc, "val_accuracy": acc,
                             "steps": 10, "train_s": 1.0, "status": "ok", "memory_floats": memories * width ** 2,
                             "state_floats": memories * width ** 2 + 3 * width, "params_total": 1000})
    return rows


def test_recall_study_report_per_rule_figure_and_answer(tmp_path):
    """A merged sweep of the recall study's shape gives the per-rule accuracy-vs-state figure (one panel per rule, a
    line per variant through the widths at Zoology's byte count, Zoology's published points overlaid) and the
    generated per-rule answer with the verdicts and seed counts of the paired differences."""
    ablate.write_runs(_study_rows(), tmp_path / "runs.csv")
    rows = ablate.read_runs(tmp_path / "runs.csv")
    cfg = load_config(None, ["ablate.rules=[deltanet,gla]", "ablate.seeds=[0,1,2]", f"ablate.out_dir={tmp_path}",
                             "ablate.variants=[single,mom,single_active_state,single_same_state]",
                             "ablate.grid={model.hidden_size: [16,32]}"])
    lines = ablate.write_results(rows, cfg)
    assert (tmp_path / "accuracy_vs_state_by_rule.png").stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    answer = md[md.index("**Does MoM beat one memory of the same state?**"):]
    assert ("- **deltanet**: vs the same active state: beats at hidden_size 16 (3/3 seeds), ties at hidden_size 32 "
            "(2/3 seeds); vs the same total state: loses at hidden_size 16 (0/3 seeds), ties at hidden_size 32 "
            "(1/3 seeds).") in answer
    assert ("- **gla**: vs the same active state: loses at hidden_size 16 (0/3 seeds), beats at hidden_size 32 "
            "(3/3 seeds); vs the same total state: ties at hidden_size 16 (0/3 seeds), beats at hidden_size 32 "
            "(3/3 seeds).") in answer
    assert ("vs the same active state MoM beats in 2, ties in 1, loses in 1 of 4; "
            "vs the same total state MoM beats in 1, ties in 2, loses in 1 of 4.") in answer

    fig = ablate.plot_state_by_rule(rows, lines, tmp_path, "accuracy")
    assert [ax.get_title() for ax in fig.axes] == ["deltanet", "gla"]
    published = ablate.published_points()
    for ax, rule in zip(fig.axes, ("deltanet", "gla")):
        curves = {c.get_label(): c for c in ax.containers}
        assert set(curves) == {"single", "MoM", "single, MoM-active state", "single, MoM-size state",
                               "Zoology (published)"}
        for variant, memories in _MEMORIES.items():
            line = curves[ablate.VARIANT_LABELS[variant]].lines[0]
            assert list(line.get_xdata()) == [4 * memories * w ** 2 for w in (16, 32)]   # bytes, widths in order
            means = [sum(_STUDY[(rule, w)].get(variant, [0.1, 0.2, 0.3])) / 3 for w in (16, 32)]
            assert list(line.get_ydata()) == pytest.approx(means)
        stars = curves["Zoology (published)"].lines[0]
        assert list(zip(stars.get_xdata(), stars.get_ydata())) == published[rule]
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend.count("Zoology (published)") == 1 and legend[-1] == "Zoology (published)"


def test_mom_diagnostics_table_averages_each_runs_busiest_memory(tmp_path):
    """The busiest memory is taken per run (memory numbers differ between seeds) before the mean over seeds: two seeds
    whose pairs crowd into memory 0 and memory 1 give 0.7, where the mean loads would give 0.45; rows without pairs
    fall back to the all-token load (and have no write spread); the diagnostics table names every variant's half-way
    step."""
    assert ablate.busiest_memory({"route/L0/load0": 0.2, "route/L0/load1": 0.8, "route/L0/share": 0.5}) == \
        {"route/L0/busiest": 0.8}
    rows = [r for r in _study_rows() if r["rule"] == "deltanet" and r["model.hidden_size"] == 16]
    for r in rows:
        r["half_step"] = 100 * (1 + r["seed"])
        if r["variant"] == "mom":
            crowded = [0.7, 0.2, 0.1] if r["seed"] % 2 == 0 else [0.2, 0.7, 0.1]
            r.update({f"route/L1/write{m}": x for m, x in enumerate(crowded)}, **{"route/L1/share": 0.9, "route/L1/dead": 0})
    cfg = load_config(None, ["ablate.rules=[deltanet]", "ablate.seeds=[0,1,2]", f"ablate.out_dir={tmp_path}",
                             "ablate.variants=[single,mom,single_active_state,single_same_state]",
                             "ablate.grid={model.hidden_size: [16]}"])
    lines = ablate.write_results(rows, cfg)
    mom = next(ln for ln in lines if ln["variant"] == "mom")
    assert mom["route/L1/busiest"] == pytest.approx(0.7) and mom["route/L1/share"] == pytest.approx(0.9)
    md = (tmp_path / "results.md").read_text()
    spread = math.exp(-sum(x * math.log(x) for x in (0.7, 0.2, 0.1)))   # 2.23 memories of 3
    assert mom["route/L1/spread"] == pytest.approx(spread)
    assert f"| deltanet | 16 | 200 / 200 / 200 / 200 | 0.900 | 0.70 | {spread:.2f} | 0.00 |" in md
    even = ablate.busiest_memory({f"route/L0/write{m}": 0.25 for m in range(4)})
    assert even["route/L0/spread"] == pytest.approx(4) and even["route/L0/busiest"] == 0.25


def test_zoology_points_sit_where_zoology_counts_state():
    """The published points' bytes agree (within the figure's reading, 5%) with Zoology's state_size() count of the
    configuration they come from, and every point names its source."""
    import csv

    with ablate.ZOOLOGY_PUBLISHED.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["rule"] for r in table} == {"deltanet", "gated_deltanet", "gla", "mamba2"}
    for r in table:
        assert float(r["state_bytes"]) == pytest.approx(float(r["state_size_bytes"]), rel=0.05) and r["source"]
        assert 0 < float(r["accuracy"]) <= 1
    assert ablate.zoology_state_bytes({"memory_floats": 4096}) == 16384
