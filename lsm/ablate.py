"""Ablation: update rules x memory variants, each trained and evaluated, as a table and a plot.

Variants (MoM paper, arXiv 2502.13685, Table 5):
  single             one memory of the rule (`model.mixer` as declared, type rule)
  mom                Mixture-of-Memories over the rule (num_memories, topk, shared_memory)
  single_same_state  one memory with the same total state as the MoM variant: the MoM layer holds
                     (num_memories + shared) x H memories of K x V, so this one gets that many heads
                     of the same K x V

    lsm ablate configs/ablate_rules.yaml
writes `ablate.out_dir`/results.md, results.csv and accuracy_vs_pairs.png (one run folder per cell).
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

from lsm.config import Config, with_overrides
from lsm.evaluate import summary
from lsm.model import build_model, memory_state_size

VARIANT_LABELS = {"single": "single", "mom": "MoM", "single_same_state": "single, MoM-size state"}


def variant_config(cfg: Config, rule: str, variant: str) -> Config:
    """The config of one ablation cell: `cfg` with the rule and the memory variant applied."""
    m = cfg.model.mixer
    head_dim = m.head_dim or cfg.model.hidden_size // m.num_heads
    changes: dict = {"model.mixer.rule": rule, "name": f"{rule}-{variant}",
                     "train.out_dir": str(Path(cfg.ablate.out_dir) / f"{rule}-{variant}")}
    if variant == "mom":
        changes["model.mixer.type"] = "mom"
    else:
        changes["model.mixer.type"] = "rule"
    if variant == "single_same_state":
        changes["model.mixer.num_heads"] = m.num_heads * (m.num_memories + int(m.shared_memory))
        changes["model.mixer.head_dim"] = head_dim
        changes["model.mixer.value_dim"] = m.value_dim or head_dim
    return with_overrides(cfg, changes)


def run_ablation(cfg: Config, quiet: bool = False) -> list[dict]:
    """Train and evaluate every (rule, variant) of `cfg.ablate`; write and print the table; return its rows."""
    from lsm.train import train

    out = Path(cfg.ablate.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for rule in cfg.ablate.rules:
        for variant in cfg.ablate.variants:
            vc = variant_config(cfg, rule, variant)
            t0 = time.perf_counter()
            result = train(vc, quiet=quiet)
            row = {"rule": rule, "variant": variant, "params": build_model(vc).num_params(),
                   "state": memory_state_size(vc.model), "final_loss": result.losses[-1] if result.losses else float("nan"),
                   "train_s": time.perf_counter() - t0, **summary(result.eval)}
            rows.append(row)
            if not quiet:
                print(f"{rule:>16} {VARIANT_LABELS[variant]:<24} " +
                      ", ".join(f"{k} {v:.3f}" for k, v in summary(result.eval).items()) + f"  ({row['train_s']:.0f} s)")
    write_results(rows, out)
    return rows


def metric_columns(rows: list[dict]) -> list[str]:
    fixed = {"rule", "variant", "params", "state", "final_loss", "train_s"}
    return [k for k in rows[0] if k not in fixed] if rows else []


def markdown_table(rows: list[dict]) -> str:
    """rule | variant | params | state | <metrics> | train s, one line per run."""
    cols = metric_columns(rows)
    head = ["rule", "variant", "params", "state (floats)"] + cols + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        cells = [r["rule"], VARIANT_LABELS[r["variant"]], f"{r['params'] / 1e3:.0f}k", f"{r['state']:,}"]
        cells += [f"{r[c]:.3f}" for c in cols] + [f"{r['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], out: Path) -> None:
    """results.md, results.csv and (MQAR) accuracy_vs_pairs.png in `out`."""
    (out / "results.md").write_text(markdown_table(rows))
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if any(k.startswith("acc@") for k in rows[0]):
        plot_accuracy(rows, out / "accuracy_vs_pairs.png")


def plot_accuracy(rows: list[dict], path: Path) -> None:
    """Accuracy vs number of pairs: colour = rule, line style = variant; one panel per test length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def parse(key: str) -> tuple[int, str]:  # "acc@16" or "acc@16/T128"
        pairs, _, length = key[4:].partition("/")
        return int(pairs), length

    keys = [k for k in rows[0] if k.startswith("acc@")]
    lengths = sorted({parse(k)[1] for k in keys}, key=lambda s: int(s[1:]) if s else 0)
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    colours = plt.get_cmap("tab10")
    styles = {"single": ("-", "o"), "mom": ("--", "s"), "single_same_state": (":", "^")}
    outside = len(rows) > 4  # a long legend goes beside the plot, not over the lines
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths) + 3 * outside, 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for r in rows:
            pts = sorted((parse(k)[0], r[k]) for k in keys if parse(k)[1] == length)
            ls, marker = styles[r["variant"]]
            ax.plot([p for p, _ in pts], [a for _, a in pts], ls, marker=marker, color=colours(rules.index(r["rule"]) % 10),
                    label=f"{r['rule']} · {VARIANT_LABELS[r['variant']]}")
        ax.set_xscale("log", base=2)
        ticks = sorted({parse(k)[0] for k in keys if parse(k)[1] == length})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("recall accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("MQAR" + (f", T = {length[1:]}" if length else ""))
        ax.grid(alpha=0.3)
    if outside:
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
