"""Evaluation: MQAR recall accuracy per (number of pairs, sequence length); bits per byte on text.

    lsm eval runs/mqar_gdn_mom/gated_deltanet-mom        # a run folder or a checkpoint folder
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lsm.config import Config
from lsm.data import IGNORE, Batch, MQARData, TextData, build_data, mqar_write_positions
from lsm.mixture.diagnostics import RoutingTally, record_routing
from lsm.runtime import autocast_context, resolve_device


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, data: MQARData | TextData | None = None,
             device: torch.device | str | None = None, split: str = "test") -> dict:
    """Score `model` on the test split of `cfg`'s data (split="val": the validation stream, what selection uses).

    MQAR -> {"mqar": [{"num_pairs", "seq_len", "accuracy"}, ...], "accuracy": mean over cells}
            (accuracy = fraction of queried values predicted exactly, by argmax).
    text -> {"loss": nats per byte, "bpb": bits per byte}.
    With MoM layers both add {"routing": {layer: {load0.., entropy, dead[, share (MQAR)]}}}
    (`lsm.mixture.diagnostics`: counted on the device, read back once at the end).
    """
    data = data or build_data(cfg)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    bs = cfg.eval.batch_size
    was_training = model.training
    model.eval()
    try:
        with autocast_context(cfg.train.precision, device), record_routing(model) as routings:
            tallies = {name: RoutingTally() for name in routings}

            def count_routing(write_pos=None):
                for name, calls in routings.items():
                    for r in calls:
                        tallies[name].add(r, write_pos)
                    calls.clear()

            if isinstance(data, MQARData):
                cells = []
                for n, T in data.test_cells():
                    test = data.test_set(n, T, split)
                    correct = total = 0
                    for i in range(0, test.input_ids.shape[0], bs):
                        part = Batch(test.input_ids[i:i + bs], test.labels[i:i + bs])
                        ids, labels = part.input_ids.to(device), part.labels.to(device)
                        pred = model(ids).logits.argmax(-1)                         # [b, T]
                        count_routing(mqar_write_positions(part, n) if routings else None)
                        mask = labels != IGNORE
                        correct += int((pred == labels)[mask].sum())
                        total += int(mask.sum())
                    cells.append({"num_pairs": n, "seq_len": T, "accuracy": correct / total})
                return {"mqar": cells, "accuracy": sum(c["accuracy"] for c in cells) / len(cells),
                        **_routing_result(tallies)}
            nats = count = 0.0
            for batch in data.test_batches(bs, cfg.eval.text_batches, split):
                logits = model(batch.input_ids.to(device)).logits.float()
                count_routing()
                nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.to(device).flatten(),
                                                                reduction="sum"))
                count += batch.labels.numel()
            loss = nats / count
            return {"loss": loss, "bpb": loss / math.log(2), **_routing_result(tallies)}
    finally:
        model.train(was_training)


def _routing_result(tallies: dict[str, RoutingTally]) -> dict:
    """{"routing": {layer: {load0.., entropy, dead[, share]}}} for models with MoM layers, else nothing."""
    routing = {name: t.summary() for name, t in tallies.items()}
    return {"routing": routing} if routing else {}


def summary(result: dict) -> dict[str, float]:
    """Flat scalars of an evaluation result, for logs: accuracy and acc@pairs[/len], or loss and bpb; with MoM
    layers also the routing diagnostics route/<layer>/<name> (lsm.mixture.diagnostics)."""
    routing = {f"route/{layer}/{k}": v for layer, d in result.get("routing", {}).items() for k, v in d.items()}
    if "mqar" not in result:
        return {**{k: v for k, v in result.items() if k != "routing"}, **routing}
    lens = {c["seq_len"] for c in result["mqar"]}
    out = {"accuracy": result["accuracy"]}
    for c in result["mqar"]:
        key = f"acc@{c['num_pairs']}" + (f"/T{c['seq_len']}" if len(lens) > 1 else "")
        out[key] = c["accuracy"]
    return {**out, **routing}


def format_result(result: dict) -> str:
    """A Markdown table of an evaluation result (and one of the routing diagnostics, with MoM layers)."""
    if "mqar" not in result:
        text = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v:.4f} |\n" for k, v in result.items()
                                                          if k != "routing")
    else:
        rows = ["| pairs | seq len | accuracy |", "|---:|---:|---:|"]
        rows += [f"| {c['num_pairs']} | {c['seq_len']} | {c['accuracy']:.3f} |" for c in result["mqar"]]
        rows.append(f"| mean | | {result['accuracy']:.3f} |")
        text = "\n".join(rows) + "\n"
    routing = result.get("routing") or {}
    if routing:
        text += ("\n| layer | load per memory | router entropy (nats) | dead memories | write/read share a memory "
                 "| pair writes per memory |\n")
        text += "|---|---|---:|---:|---:|---|\n"
        for layer, d in routing.items():
            load = " ".join(f"{d[k]:.2f}" for k in d if k.startswith("load"))
            share = f"{d['share']:.3f}" if "share" in d else ""
            writes = " ".join(f"{d[k]:.2f}" for k in d if k.startswith("write"))
            text += f"| {layer} | {load} | {d['entropy']:.3f} | {d['dead']} | {share} | {writes} |\n"
    return text


def evaluate_checkpoint(path: str, overrides: list[str] | tuple[str, ...] = (), device: str = "auto") -> tuple[Config, dict]:
    """Load a checkpoint (or a run's latest) and evaluate it; overrides may change data/eval settings."""
    from lsm.checkpoint import load_trained

    dev = resolve_device(device)
    cfg, model = load_trained(path, overrides, dev)
    return cfg, evaluate(model, cfg, device=dev)
