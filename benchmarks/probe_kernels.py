"""Which kernel, at which autotune config, faults on the GPU: each case in its own process, CUDA_LAUNCH_BLOCKING=1.

    python benchmarks/probe_kernels.py                       # every case x every autotune config, heads of 8 and 16
    python benchmarks/probe_kernels.py --cases delta_bwd --heads 8 --configs 4
    python benchmarks/probe_kernels.py --case delta_bwd --head 8 --config 4/9     # one run (what each child does)

The cases are the pieces of the 1-layer gated_deltanet training step that crashed with `an illegal memory access`
on an H200 at width 16 (2 heads of 8; batch 4, T = 64, bf16 autocast, backend "triton"), at that step's shapes:
`train` (the step itself, through lsm.train as tests/test_train.py ran it), `layer` (one RuleLayer forward +
backward), `mom_layer` (the same for a MixtureOfMemories of 4 memories, top-2), `conv_fwd` / `conv_bwd`
(lsm_kernels.conv, q/k with the per-head L2 norm and v without), `norm_fwd` / `norm_bwd` (lsm_kernels.norm),
`delta_fwd` / `delta_bwd` (lsm_kernels.delta with its cumsum).
A fault poisons the CUDA context, so every (case, head, config) runs in a fresh process; with
CUDA_LAUNCH_BLOCKING=1 the failing launch is the one the error is raised at, and the child prints the innermost
line of kernels/ in the traceback (the launcher line names the kernel). `--config i/9` keeps the i-th of the
9 configs of every `_tune` autotuner (num_warps 2/4/8 x num_stages 2/3/4, in that order) through LSM_WARM_SHARD;
the conv and norm kernels are not tuned and run once.
Prints one row per run: case, head, config, `ok` or the failing line and the error's first line.
`--device cpu` (with TRITON_INTERPRET=1) runs the same plumbing on the CPU: no fault to find there, and `train`
diverges there because the interpreter's bf16 dots are wrong (it multiplies the raw bf16 bits).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback

CASES = ("train", "layer", "mom_layer", "conv_fwd", "conv_bwd", "norm_fwd", "norm_bwd", "delta_fwd", "delta_bwd")
UNTUNED = {"conv_fwd", "conv_bwd", "norm_fwd", "norm_bwd"}   # fixed launch parameters: one config is all there is
WARPS, STAGES = (2, 4, 8), (2, 3, 4)
B, T, H = 4, 64, 2


def config_name(i: int) -> str:
    return f"warps {WARPS[i // len(STAGES)]} stages {STAGES[i % len(STAGES)]}"


def run_case(case: str, head: int, dev: str = "cuda") -> None:
    import torch
    import torch.nn.functional as F

    bf16 = torch.bfloat16
    C = H * head
    torch.manual_seed(0)
    if case == "train":
        from lsm.config import load_config
        from lsm.train import train
        out = tempfile.mkdtemp()
        cfg = load_config(None, [
            f"model.hidden_size={C}", "model.num_layers=1", f"model.mixer.num_heads={H}", "model.mixer.type=rule",
            "model.mixer.rule=gated_deltanet", "model.mixer.backend=triton", "data.mqar.vocab_size=32",
            f"data.mqar.seq_len={T}", "data.mqar.train_pairs=[2,4]", "data.mqar.test_pairs=[2,4]",
            "data.mqar.num_test=16", f"train.batch_size={B}", "train.steps=1", "train.warmup_steps=1",
            f"train.device={dev}", "train.precision=bf16", "train.progress=false", "train.tensorboard=false",
            "eval.batch_size=16", "name=probe", f"train.out_dir={out}/probe"])
        train(cfg, quiet=True)
    elif case in ("layer", "mom_layer"):
        from lsm.layers import RuleLayer
        from lsm.mixture import MixtureOfMemories
        layer = (RuleLayer("gated_deltanet", C, H, chunk_size=64, backend="triton") if case == "layer" else
                 MixtureOfMemories("gated_deltanet", C, H, num_memories=4, topk=2, backend="triton")).to(dev)
        x = torch.randn(B, T, C, device=dev, requires_grad=True)
        with torch.autocast(torch.device(dev).type, dtype=bf16):
            y = layer(x).output
        y.float().square().mean().backward()
    elif case.startswith("conv"):
        from lsm_kernels.conv import short_conv
        w, b = torch.randn(C, 4, device=dev), torch.randn(C, device=dev)
        for norm in (head, None):
            x = torch.randn(B, T, C, device=dev, dtype=bf16, requires_grad=True)
            y = short_conv(x, w, b, None, True, norm)
            if case == "conv_bwd":
                y.float().square().sum().backward()
    elif case.startswith("norm"):
        from lsm_kernels.norm import gated_rms_norm
        x = torch.randn(B, T, H, head, device=dev, dtype=bf16, requires_grad=True)
        g = torch.randn(B, T, H, head, device=dev, dtype=bf16, requires_grad=True)
        y = gated_rms_norm(x, torch.ones(head, device=dev, requires_grad=True), g)
        if case == "norm_bwd":
            y.float().square().sum().backward()
    else:
        from lsm_kernels.delta import chunk_delta
        q = F.normalize(torch.randn(B, T, H, head, device=dev), dim=-1).to(bf16).requires_grad_()
        k = F.normalize(torch.randn(B, T, H, head, device=dev), dim=-1).to(bf16).requires_grad_()
        v = torch.randn(B, T, H, head, device=dev, dtype=bf16, requires_grad=True)
        beta = torch.rand(B, T, H, device=dev, requires_grad=True)
        g = F.logsigmoid(torch.randn(B, T, H, device=dev) + 2).requires_grad_()
        o, _ = chunk_delta(q, k, v, beta, g, chunk_size=64)
        if case == "delta_bwd":
            o.float().square().sum().backward()
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def child(a) -> int:
    i, n = (int(x) for x in a.config.split("/"))
    os.environ["LSM_WARM_SHARD"] = f"{i}/{n}"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _gpu import configure_autotuning
    configure_autotuning()
    try:
        run_case(a.case, a.head, a.device)
    except Exception as e:  # the row says where and what; the parent reads it
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}kernels{os.sep}" in f.filename]
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].line}" if frames else "-"
        print(f"FAIL {where} | {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return 1
    print("ok")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--heads", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--configs", nargs="+", type=int, default=list(range(len(WARPS) * len(STAGES))))
    ap.add_argument("--timeout", type=float, default=300, help="seconds per child run")
    ap.add_argument("--device", default="cuda", help="cpu runs the plumbing under TRITON_INTERPRET=1 (no faults)")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--head", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        return child(a)
    n = len(WARPS) * len(STAGES)
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    failed = 0
    print(f"{'case':10} {'head':>4}  {'config':18} result", flush=True)
    for case in a.cases:
        for head in a.heads:
            for i in (a.configs[:1] if case in UNTUNED else a.configs):
                cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--head", str(head),
                       "--config", f"{i}/{n}", "--device", a.device]
                try:
                    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
                    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
                    res = lines[-1] if lines else f"exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}"
                except subprocess.TimeoutExpired:
                    res = f"timed out after {a.timeout:g} s"
                failed += res != "ok"
                print(f"{case:10} {head:>4}  {config_name(i):18} {res}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
