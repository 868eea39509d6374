#!/usr/bin/env python3
"""Does roma_plus's fp16 AOTInductor package stray from fp32 no more than torch's fp16 run does?

The bench's error column is the largest deviation, which a single coarse cell whose arg-max flipped
decides (up to the whole image). This compares whole warps instead, on the MegaDepth pair with the
deterministic weights: strict fp32 (TF32 off) is the reference; against it, the share of warp
entries that moved by more than 1e-2 (normalised units, ~4 px at 864), their mean deviation, and the
same on the pixels the reference is certain of (certainty > 0.05), for

    package      the fp16 package (--package, built with `matchrt build --backend inductor`)
    compiled ..  torch.compile + CUDA graphs fp16 with the given options (--compiled, repeatable)
    torch-fp16   torch eager fp16 with the same policy (what the compiled torch path computes)
    fp32-noise   strict fp32 on the images plus uniform noise of +-0.5/255 (their 8-bit rounding)

and the package (or each compiled run) against torch-fp16 directly.

Usage (GPU): python scripts/roma_package_check.py [--package roma_plus.pt2]
             [--compiled refiner_depthwise=rows-half ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matchrt.images import read_image
from matchrt.runner import open_pipeline
from matchrt.tf32 import tf32_switches

IMAGES = Path(__file__).resolve().parent.parent / "tests" / "data" / "images"
PAIR = ("02928139_3448003521.jpg", "17295357_9106075285.jpg")
MOVED = 1e-2


def deviation(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Warp and certainty deviations of ``run`` from ``ref`` (all pixels, and the certain ones)."""
    warp, warp_ref = (np.asarray(r["warp"].float().cpu()) for r in (run, ref))
    cert, cert_ref = (np.asarray(r["certainty"].float().cpu()) for r in (run, ref))
    d = np.abs(warp - warp_ref)
    certain = cert_ref > 0.05
    return {"warp_moved": float((d > MOVED).mean()), "warp_mean": float(d.mean()), "warp_max": float(d.max()),
            "certain_moved": float((d[certain] > MOVED).mean()) if certain.any() else 0.0,
            "certain_share": float(certain.mean()),
            "certainty_mean": float(np.abs(cert - cert_ref).mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--package", help="the fp16 roma_plus package (.pt2)")
    p.add_argument("--compiled", action="append", default=[],
                   help="KEY=V[,KEY=V]: options of a torch.compile + CUDA graphs fp16 run to check (repeatable)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    if not args.package and not args.compiled:
        p.error("nothing to check: give --package and/or --compiled")
    cuda = {"device": "cuda"}
    reference = open_pipeline("roma_plus", "torch", random_weights=True, backend_options=cuda)
    inputs, _ = reference.prepare(*(read_image(IMAGES / name) for name in PAIR))
    generator = torch.Generator().manual_seed(0)
    noisy = {k: ((v + (torch.rand(v.shape, generator=generator) - 0.5) / 255).clamp(0, 1)
                 if k.startswith("image") else v) for k, v in inputs.items()}
    with torch.inference_mode(), tf32_switches(False):
        ref = reference.run(inputs)
        runs = {"fp32-noise": reference.run(noisy)}
    half = open_pipeline("roma_plus", "torch", random_weights=True, backend_options={**cuda, "precision": "fp16"})
    with torch.inference_mode():
        runs["torch-fp16"] = half.run(inputs)
    checked = []
    if args.package:
        package = open_pipeline(None, "inductor", artifact=Path(args.package), backend_options=cuda)
        with torch.inference_mode():
            runs["package"] = package.run(inputs)
        checked.append("package")
    for text in args.compiled:
        extra = dict(item.split("=", 1) for item in text.split(",") if item)
        compiled = open_pipeline("roma_plus", "torch", random_weights=True, extra=extra,
                                 backend_options={**cuda, "precision": "fp16", "compile": True, "cuda_graph": True})
        name = f"compiled {text}"
        with torch.inference_mode():
            for _ in range(3):  # compile, record the CUDA graphs, replay
                runs[name] = compiled.run(inputs)
        checked.append(name)
    figures = {name: deviation(run, ref) for name, run in runs.items()}
    for name in checked:
        figures[f"{name} vs torch-fp16"] = deviation(runs[name], runs["torch-fp16"])
    print(f"{'run vs strict fp32':<44} {'moved >1e-2':>11} {'mean':>9} {'max':>7} {'certain moved':>13} "
          f"{'certainty mean':>14}")
    for name, f in figures.items():
        print(f"{name:<44} {f['warp_moved']:>11.2%} {f['warp_mean']:>9.2e} {f['warp_max']:>7.3f} "
              f"{f['certain_moved']:>13.2%} {f['certainty_mean']:>14.2e}")
    if args.json:
        from matchrt.atomic import atomic_text

        atomic_text(Path(args.json), json.dumps({"package": args.package, "compiled": args.compiled,
                                                 "gpu": torch.cuda.get_device_name(),
                                                 "moved_threshold": MOVED, "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
