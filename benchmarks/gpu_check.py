"""GPU correctness sweep: fla's kernels and ours against our float32 torch chunked form, every rule.

    python benchmarks/gpu_check.py [--quick-tune] [--rules ...] [--T 1000]

For each rule and backend in {fla, triton} (where the rule has it): bf16 inputs, a batch (B=2) and a
packed variable-length batch (4 sequences, one of length 1), an initial state; prints the relative
error ||x - ref|| / ||ref|| of the output, the final state and the gradient of every input.
`--quick-tune` keeps only the first config of every Triton autotuner (fla autotunes for about a
minute per kernel and shape; correctness does not depend on the config).
"""
from __future__ import annotations

import argparse
import time
import traceback


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick-tune", action="store_true")
    ap.add_argument("--rules", nargs="+", default=None)
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    if a.quick_tune:
        import os

        from _gpu import configure_autotuning
        os.environ["LSM_TUNE_FIRST"] = "1"
        configure_autotuning()
    import torch
    import torch.nn.functional as F

    import lsm.rules as R

    def rel(x, y):
        return ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()

    H, D, T = 4, a.dim, a.T
    cases = {"batch": (2, None), "varlen": (1, torch.tensor([0, T // 10, T // 10 + 1, (T * 6) // 10, T], device="cuda"))}
    print(f"{'rule':18s} {'backend':7s} {'case':7s} {'max rel err':>11s}  worst  (time)")
    worst_all = 0.0
    for name in a.rules or R.names():
        rule = R.get(name)
        backends = [b for b in ("fla", "triton") if (b == "fla" and rule.has_fla) or
                    (b == "triton" and type(rule)._chunk_triton is not R.UpdateRule._chunk_triton)]
        for case, (B, cu) in cases.items():
            g = torch.Generator(device="cuda").manual_seed(0)
            x = {"q": torch.randn(B, T, H, D, device="cuda", generator=g),
                 "k": F.normalize(torch.randn(B, T, H, D, device="cuda", generator=g), dim=-1),
                 "v": torch.randn(B, T, H, D, device="cuda", generator=g)}
            for n, spec in rule.gates.items():
                if spec.required:
                    shape = (B, T, H, D) if spec.per == "key" else (B, T, H)
                    z = torch.randn(shape, device="cuda", generator=g)
                    if n == "eta":
                        x[n] = z.sigmoid() / D
                    elif spec.kind == "rate":
                        x[n] = z.sigmoid()
                    else:
                        x[n] = F.logsigmoid(z + 2) / (4 if spec.per == "key" else 1)
            N = B if cu is None else cu.numel() - 1
            x["h0"] = torch.randn(N, H, D, D, device="cuda", generator=g) * 0.1
            dout = torch.randn(B, T, H, D, device="cuda", generator=g)
            dS = torch.randn(N, H, D, D, device="cuda", generator=g)

            def run(backend, dtype):
                leaves = {n: (t.to(dtype) if n != "h0" else t).detach().requires_grad_() for n, t in x.items()}
                gates = {n: t for n, t in leaves.items() if n not in ("q", "k", "v", "h0")}
                o, S = rule.chunk(leaves["q"], leaves["k"], leaves["v"], initial_state=leaves["h0"],
                                  output_final_state=True, cu_seqlens=cu, backend=backend, **gates)
                ((o.float() * dout).sum() + (S.float() * dS).sum()).backward()
                return o, S, {n: t.grad for n, t in leaves.items()}

            ref = run("torch", torch.float32)
            for backend in backends:
                t0 = time.time()
                try:
                    out = run(backend, torch.bfloat16)
                    torch.cuda.synchronize()
                    errs = {"o": rel(out[0], ref[0]), "S": rel(out[1], ref[1])}
                    errs.update({f"d{n}": rel(out[2][n], ref[2][n]) for n in ref[2]})
                    w = max(errs, key=errs.get)
                    worst_all = max(worst_all, errs[w])
                    print(f"{name:18s} {backend:7s} {case:7s} {errs[w]:11.2e}  {w:5s}  ({time.time() - t0:.0f} s)  "
                          + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
                except Exception as e:  # keep the sweep going; the row says what broke
                    print(f"{name:18s} {backend:7s} {case:7s} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    traceback.print_exc(limit=3)
    print(f"worst relative error over all rows: {worst_all:.2e} (bf16 inputs vs float32 reference)")


if __name__ == "__main__":
    main()
