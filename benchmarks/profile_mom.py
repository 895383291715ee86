"""Where the time of the MoM layer goes, outside the rule's kernel (GPU).

    python benchmarks/profile_mom.py [--shape 8x4096] [--real] [--rows 30]
    python benchmarks/profile_mom.py --decode [--batch 16] [--backend triton]

The benchmark configuration of bench_mom.py (bf16, d = 1024, 4 heads x 256, 4 memories, top-2,
shared memory, gated_deltanet). By default `rule.chunk` is replaced by a stand-in that costs one
elementwise pass (o = v + <q, k>), so the rows show the layer's own work (projections, short
convolutions, norms, gates, dispatch and combine) of our MoM layer next to our single-memory layer,
on any GPU image (no fla, no kernel compilation). `--real` keeps the rule's backend.

Prints the median forward+backward time of both layers and the torch.profiler table of the
operators by GPU time for one forward+backward of each.

`--decode`: one eager decoding step (T = 1, B = `--batch`, after a 32-token prefill, the rule's own backend)
of each layer: the median step time, the host time of one step (wall clock of the Python call, before the GPU
has run it), the kernels it launches, and the operators by host (self CPU) time: where an eager step that is
bound by its launches spends the host's time.
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
    ap.add_argument("--decode", action="store_true", help="profile the eager decoding step instead")
    ap.add_argument("--batch", type=int, default=16, help="--decode: the batch size")
    args = ap.parse_args()
    if args.decode:
        return profile_decode(args)
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


def profile_decode(args) -> None:
    import statistics
    import time

    import bench_mom
    bench_mom.BACKEND = args.backend
    for name in ("lsm MoM", "lsm GDN"):
        step = bench_mom.decode_step(name, args.batch)
        step_ms = cuda_time(step, 50)
        host = []
        for _ in range(50):   # the host's share: the call returns once its kernels are queued
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"{name} decode step, B = {args.batch}, backend {args.backend}: {step_ms:.3f} ms per step, host "
              f"{statistics.median(host) * 1e3:.3f} ms (median of 50), {len(kernels)} kernels launched")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))

if __name__ == "__main__":
    main()
