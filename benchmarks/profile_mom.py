"""Where the time of the MoM layer goes, outside the rule's kernel (GPU).

    python benchmarks/profile_mom.py [--shape 8x4096] [--real] [--rows 30]

The benchmark configuration of bench_mom.py (bf16, d = 1024, 4 heads x 256, 4 memories, top-2,
shared memory, gated_deltanet). By default `rule.chunk` is replaced by a stand-in that costs one
elementwise pass (o = v + <q, k>), so the rows show the layer's own work (projections, short
convolutions, norms, gates, dispatch and combine) of our MoM layer next to our single-memory layer,
on any GPU image (no fla, no kernel compilation). `--real` keeps the rule's backend.

Prints the median forward+backward time of both layers and the torch.profiler table of the
operators by GPU time for one forward+backward of each.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lsm import rules
from lsm.layers import RuleLayer
from lsm.mixture import MixtureOfMemories

from bench_mom import cuda_time  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

D, H, HEAD, M, TOPK = 1024, 4, 256, 4, 2


def stand_in(q, k, v, initial_state=None, output_final_state=False, **_):
    return v + (q * k).sum(-1, keepdim=True), initial_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8x4096")
    ap.add_argument("--real", action="store_true", help="run the rule's own backend instead of the stand-in")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    B, T = (int(s) for s in args.shape.split("x"))
    if not args.real:
        rules.get("gated_deltanet").chunk = stand_in
    torch.manual_seed(0)
    layers = {
        "lsm MoM": MixtureOfMemories("gated_deltanet", D, H, head_dim=HEAD, num_memories=M, topk=TOPK,
                                     shared_memory=True, backend=args.backend),
        "lsm GDN": RuleLayer("gated_deltanet", D, H, head_dim=HEAD, backend=args.backend),
    }
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    for name, layer in layers.items():
        layer.to("cuda", torch.bfloat16)

        def step():
            y = layer(x).output
            y.backward(dy)
        fwd = cuda_time(lambda: layer(x), 10)
        both = cuda_time(step, 10)
        print(f"{name}: fwd {fwd:.2f} ms, fwd+bwd {both:.2f} ms  ({'rule kernel' if args.real else 'stand-in chunk'})")
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
