"""Load an `lsm export` folder with transformers' Auto classes and generate on the recurrent cache.

    lsm export runs/mqar_gdn_mom out/mqar-mom-hf
    python scripts/hf_generate.py out/mqar-mom-hf                       # MQAR: recall the values of 8 keys
    python scripts/hf_generate.py out/text-hf --prompt "def main(" --max-new-tokens 80 --sample

An MQAR model gets one prompt per key: the key-value pairs, then that key; greedy decoding's next
token must be the key's value. A byte-level text model continues `--prompt`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import lsm.hf  # noqa: F401  (registers the "lsm" model type with the Auto classes)
from lsm.data import mqar_examples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a folder written by `lsm export`")
    p.add_argument("--pairs", type=int, default=8, help="MQAR: key-value pairs in the prompt")
    p.add_argument("--prompt", default="def ", help="text models: the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="text: new bytes; MQAR: 8x the continuation")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-k 20) instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if not (Path(args.folder) / "config.json").is_file():
        p.error(f"{args.folder}: no config.json there; give a folder written by `lsm export RUN OUT_DIR`")

    model = AutoModelForCausalLM.from_pretrained(args.folder).to(args.device)
    cfg = model.config.lsm_config()
    print(f"{type(model).__name__} ({cfg.model.mixer.type} {cfg.model.mixer.rule}), "
          f"{sum(t.numel() for t in model.parameters()):,} parameters, from {args.folder}, on {args.device}")
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=0.8, top_k=20) if args.sample else dict(do_sample=False)
    if cfg.data.kind == "text":
        ids = torch.tensor([list(args.prompt.encode("utf-8"))], device=args.device)
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, **sampling)
        print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
        return
    n, V = args.pairs, cfg.data.mqar.vocab_size
    ex = mqar_examples(1, n, 4 * n, V, torch.Generator().manual_seed(args.seed))
    kv = ex.input_ids[0, :2 * n].to(args.device)                                                 # k1 v1 k2 v2 ... kn vn
    keys, values = kv[0::2], kv[1::2]
    prompts = torch.cat([kv.expand(n, -1), keys[:, None]], 1)                    # [n, 2n + 1]: pairs, then one key
    out = model.generate(prompts, max_new_tokens=1, **sampling)
    recalled = out[:, -1]
    print("pairs   ", " ".join(f"{k}:{v}" for k, v in zip(keys.tolist(), values.tolist())))
    print("recalled", " ".join(f"{k}:{r}" for k, r in zip(keys.tolist(), recalled.tolist())))
    print(f"{int((recalled == values).sum())}/{n} values recalled")
    # a longer greedy continuation (one recurrent step per token): the value, then filler / further queries
    more = model.generate(prompts[:1], max_new_tokens=args.max_new_tokens // 8, **sampling)
    print(f"continuation of the pairs + key {keys[0].item()}:", " ".join(map(str, more[0, 2 * n + 1:].tolist())))


if __name__ == "__main__":
    main()
