#!/usr/bin/env python3
"""Micro-benchmark of the GP's Cholesky solve on a GPU: cuBLAS's triangular solves against the blocked
substitutions (both after cuSOLVER's factorisation), at roma_plus's size (M = 1225 support cells at
560, B = 2 matrices, 512 right-hand sides); and the factorisation alone, the two matrices one after
the other on one stream against side by side (gp.cholesky_factor's side streams).

Times each solve replayed from a CUDA graph (triton.testing.do_bench_cudagraph, as the replayed
coarse region runs it; median microseconds) and its error against a float64 solve. The system is
GP-like: the cosine kernel of random unit features plus sigma I (eigenvalues >= sigma).
Supporting evidence for the default block; whether the pipeline gets faster is `matchrt bench`'s
to say (`--sweep roma_plus.gp_block=0,128`).

    python scripts/gp_solve_micro.py --json out.json [--blocks 0,64,128,256] [--size 1225]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from matchrt.plugins.roma_full import gp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--blocks", default="0,64,128,256", help="block sizes (0: cuBLAS's triangular solves)")
    parser.add_argument("--size", type=int, default=1225, help="support cells M")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gp_solve_micro: needs a CUDA GPU; run it on the GPU machine")
    from triton.testing import do_bench_cudagraph

    torch.backends.cuda.matmul.allow_tf32 = False  # the GP's strict region
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, gp.GP_DIM, args.size, 1, generator=g)
    k_ss = gp.GaussianProcess.support_matrix(feats).cuda()
    basis = torch.randn(1, args.size, gp.GP_DIM, generator=g).cuda()
    want = gp.solve_exact(k_ss.double(), basis.double())
    rows = {}
    for block in (int(b) for b in args.blocks.split(",") if b):
        def solve(block=block) -> torch.Tensor:
            return gp.solve_cholesky(k_ss, basis, block)

        err = float(((solve().double() - want).abs().max() / want.abs().max()))
        us = do_bench_cudagraph(solve, rep=50) * 1e3
        rows[str(block)] = {"us": us, "max_rel_vs_float64": err}
        print(f"block {block:5d}: {us:8.1f} us  max rel err vs float64 {err:.2e}", flush=True)
    # the factorisation alone: the batch's matrices one after the other, or side by side (gp.cholesky_factor)
    factors = {}
    for name, factor in (("one stream", lambda: torch.stack([torch.linalg.cholesky_ex(m)[0] for m in k_ss])),
                         ("side streams", lambda: gp.cholesky_factor(k_ss))):
        factor()
        us = do_bench_cudagraph(factor, rep=50) * 1e3
        factors[name] = {"us": us}
        print(f"factorisation, {name}: {us:8.1f} us", flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size, "batch": 2,
           "rhs": gp.GP_DIM, "timer": "triton.testing.do_bench_cudagraph", "blocks": rows,
           "factorisation": factors}
    with open(args.json + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
