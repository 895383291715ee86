"""The `lsm` command: train, eval, ablate, generate, and `main` (the default experiment).

    lsm main                                            # the MQAR recall sweep of configs/mqar_gdn_mom.yaml
    lsm train configs/mqar_gdn_mom.yaml train.steps=200 # dot-list overrides after the config
    lsm train configs/text_gdn.yaml --resume
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 -m lsm train configs/mqar_gdn_mom.yaml train.parallel=fsdp
    lsm info configs/mqar_gdn_mom.yaml                  # parameters, state and FLOPs of the declared model
    lsm eval runs/text_gdn
    lsm ablate configs/ablate_rules.yaml ablate.seeds=[0,1,2] ablate.jobs=2   # --shard 1/2, --merge, --rerun, --plan
    lsm generate runs/text_gdn --prompt "def main("
    lsm export runs/text_gdn out/text_gdn-hf            # a Hugging Face folder (see lsm.hf); eval/generate take it too

A bad config is one line on stderr and exit status 2; a diverged run exits with status 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_EXPERIMENT = "mqar_gdn_mom.yaml"


def _default_config() -> Path:
    """configs/mqar_gdn_mom.yaml of the current folder, else of the source tree this package sits in."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "configs" / DEFAULT_EXPERIMENT).is_file():
            return root / "configs" / DEFAULT_EXPERIMENT
    from lsm.config import ConfigError
    raise ConfigError(f"configs/{DEFAULT_EXPERIMENT} not found: run from the repository root or give a config file")


def _cmd_train(args) -> int:
    from lsm.config import load_config
    from lsm.evaluate import format_result
    from lsm.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume, max_steps=args.max_steps)
    if result.rank != 0:  # torchrun workers: rank 0 reports
        return 0
    if result.eval:
        print(format_result(result.eval), end="")
    print(f"{result.step} steps in {result.seconds:.1f} s; checkpoint {result.checkpoint}")
    return 0


def _cmd_info(args) -> int:
    from lsm.accounting import account_config
    from lsm.config import load_config
    from lsm.console import info_lines

    cfg = load_config(args.config, args.overrides)
    print(f"{cfg.name}:")
    print("\n".join(info_lines(cfg, account_config(cfg))))
    return 0


def _cmd_eval(args) -> int:
    from lsm.evaluate import evaluate_checkpoint, format_result

    cfg, result = evaluate_checkpoint(args.checkpoint, args.overrides, args.device)
    print(format_result(result), end="")
    return 0


def _cmd_ablate(args, config=None) -> int:
    from lsm.ablate import merge, parse_shard, run_sweep
    from lsm.config import load_config

    cfg = load_config(config or args.config, args.overrides)
    shard = parse_shard(args.shard)
    if args.merge and (shard or args.rerun):
        from lsm.config import ConfigError
        raise ConfigError("--merge only merges finished shards: give it without --shard and --rerun")
    if args.plan:
        if args.merge or args.rerun:
            from lsm.config import ConfigError
            raise ConfigError("--plan shows what a sweep would run: give it without --merge and --rerun")
        from lsm.ablate import plan_text
        print(plan_text(cfg, shard), end="")
        return 0
    t0 = time.perf_counter()
    if args.merge:
        merge(cfg)
    else:
        run_sweep(cfg, rerun=args.rerun, shard=shard)
    out = Path(cfg.ablate.out_dir)
    if shard is not None:
        print(f"\nshard {shard[0]}/{shard[1]} done in {time.perf_counter() - t0:.0f} s; rows in "
              f"{out / 'shards' / f'{shard[0]}of{shard[1]}' / 'runs.csv'}; merge with: lsm ablate CONFIG --merge")
        return 0
    print()
    print((out / "results.md").read_text(), end="")
    plots = ", ".join(str(p) for p in sorted(out.glob("*.png")))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; runs {out / 'runs.csv'}; table {out / 'results.md'}, "
          f"{out / 'results.csv'}" + (f"; plots {plots}" if plots else ""))
    return 0


def _cmd_main(args) -> int:
    return _cmd_ablate(args, args.config or _default_config())


def _cmd_export(args) -> int:
    from lsm.export import export

    out = export(args.checkpoint, args.out_dir)
    print(f"wrote {out} (config.json, model.safetensors); load it with `import lsm.hf` and "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}), or `lsm eval {out}`")
    return 0


def _cmd_generate(args) -> int:
    import torch

    from lsm.checkpoint import load_trained
    from lsm.config import ConfigError
    from lsm.runtime import resolve_device

    device = resolve_device(args.device)
    cfg, model = load_trained(args.checkpoint, (), device)
    if cfg.data.kind == "text":
        ids = list(args.prompt.encode("utf-8")) or [10]
    else:
        try:
            ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            raise ConfigError(f"--prompt: an MQAR model takes token ids separated by spaces, got {args.prompt!r}") from None
        if not ids:
            raise ConfigError("--prompt: give at least one token id")
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([ids], device=device)
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=g,
                         cuda_graph=args.cuda_graph)
    new = out[0, len(ids):].tolist()
    if cfg.data.kind == "text":
        sys.stdout.write(args.prompt + bytes(new).decode("utf-8", errors="replace") + "\n")
    else:
        print(" ".join(map(str, ids + new)))
    return 0


def _sweep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rerun", action="store_true", help="run the sweep's cells again, even the finished ones")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only the i-th of n shards of the cells")
    p.add_argument("--merge", action="store_true", help="merge out_dir/shards/*/runs.csv, then write the table")
    p.add_argument("--plan", action="store_true", help="print what the sweep would run now (cells finished, cells "
                                                      "to run by group), and run nothing")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsm", description="Linear sequence models with Mixture-of-Memories.")
    sub = p.add_subparsers(dest="command", required=True)
    ov = dict(nargs="*", default=[], help="OmegaConf dot-list overrides, e.g. train.steps=200 model.mixer.rule=gla")

    t = sub.add_parser("train", help="train the model a config declares")
    t.add_argument("config")
    t.add_argument("overrides", **ov)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("info", help="parameters (total, active), state per sequence and per token, FLOPs per token")
    i.add_argument("config")
    i.add_argument("overrides", **ov)
    i.set_defaults(func=_cmd_info)

    e = sub.add_parser("eval", help="evaluate a checkpoint (MQAR accuracy per pairs, or bits per byte)")
    e.add_argument("checkpoint", help="a run folder, a checkpoint folder or an `lsm export` folder")
    e.add_argument("overrides", **ov)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_cmd_eval)

    a = sub.add_parser("ablate", help="sweep rules x {single, MoM, same-state single} x grid x lrs x seeds: "
                                      "train, evaluate, statistics, plots")
    a.add_argument("config")
    a.add_argument("overrides", **ov)
    _sweep_flags(a)
    a.set_defaults(func=_cmd_ablate)

    m = sub.add_parser("main", help=f"the default experiment (configs/{DEFAULT_EXPERIMENT}): "
                                    "Gated DeltaNet: one memory, MoM, same-state one memory; 3 seeds; on MQAR")
    m.add_argument("--config", default=None, help=f"another experiment config (default configs/{DEFAULT_EXPERIMENT})")
    m.add_argument("overrides", **ov)
    _sweep_flags(m)
    m.set_defaults(func=_cmd_main)

    x = sub.add_parser("export", help="write a Hugging Face folder (config.json + model.safetensors) of a run")
    x.add_argument("checkpoint", help="a run folder or a checkpoint folder (single-file or sharded)")
    x.add_argument("out_dir")
    x.set_defaults(func=_cmd_export)

    g = sub.add_parser("generate", help="sample from a checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", default="", help="text (byte-level models) or token ids separated by spaces (MQAR)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the decoding step as a CUDA graph (default: wherever it applies, i.e. on CUDA for "
                        "models without attention blocks; --no-cuda-graph decodes eagerly)")
    g.set_defaults(func=_cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    from lsm.config import ConfigError
    from lsm.train import TrainingDiverged

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow a flag (`lsm ablate CONFIG --merge key=value`)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"lsm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"lsm {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lsm {args.command}: interrupted", file=sys.stderr)
        return 130
