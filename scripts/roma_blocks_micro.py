#!/usr/bin/env python3
"""roma_plus's split transformer regions on a GPU: DINOv2 ViT-L/14 on the symmetric pair at 560
(2 x 3 x 560 x 560) and the coordinate decoder's five blocks (2 x 1225 x 1024 tokens), through
their split copies (``-O coarse_precision``'s kind, default bf16x2-flash), each replayed from a
CUDA graph as roma_plus runs them. Reports GPU kernel time per call (torch profiler), wall time
per replay (CUDA events, median) and the top kernels.

``--baseline FILE``: another split_products.py (e.g. ``git show REV:plugins/roma_plus/split_products.py``),
loaded beside the current one and timed in the same process, with the largest difference between
the two outputs (relative to the output's largest value): an A/B of a change to the split regions.

Usage (a CUDA GPU): python scripts/roma_blocks_micro.py [--baseline FILE] [--kind K] [--json F]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from types import ModuleType

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from matchrt.plugins.roma_full.decoder import CoordinateDecoder
from matchrt.plugins.roma_full.dinov2 import DinoV2ViTL14
from matchrt.plugins.roma_plus import replay, split_products
from matchrt.tf32 import tf32_switches


def load_baseline(path: str) -> ModuleType:
    """``path`` as a sibling module of split_products (its relative imports resolve alike)."""
    name = "matchrt.plugins.roma_plus._baseline_split_products"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def randomised(module: nn.Module) -> nn.Module:
    """Default init, plus LayerScales and LayerNorm affines away from their identities."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.05, 0.5)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "pos_embed" in name or "cls_token" in name:
                p.normal_(0, 0.02)
    return module.cuda().eval()


def timed(fn, x: torch.Tensor, runs: int) -> dict:
    for _ in range(3):  # eager, capture, replay
        fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn(x)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / runs / 1e3, e.count / runs) for e in prof.key_averages()
            if e.device_time_total > 0]
    walls = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        walls.append(start.elapsed_time(end))
    top = sorted(rows, key=lambda r: -r[1])[:8]
    return {"kernel_ms": sum(t for _, t, _ in rows), "launches": sum(c for _, _, c in rows),
            "wall_ms_median": statistics.median(walls),
            "top": [{"ms": round(t, 4), "calls": c, "name": k[:100]} for k, t, c in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another split_products.py to time beside the current one")
    parser.add_argument("--kind", default="bf16x2-flash", choices=split_products.KINDS)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    versions = {"current": split_products}
    if args.baseline:
        versions["baseline"] = load_baseline(args.baseline)
    regions = {"dinov2": (randomised(DinoV2ViTL14()), torch.randn(2, 3, 560, 560, device="cuda")),
               "decoder.blocks": (randomised(CoordinateDecoder()).blocks, torch.randn(2, 1225, 1024, device="cuda"))}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kind": args.kind, "regions": {}}
    with torch.inference_mode(), tf32_switches(False):
        for region, (module, x) in regions.items():
            outputs = {}
            for version, split in versions.items():
                copy = split.split_linears(module, args.kind)
                outputs[version] = replay.replayed(copy, x).clone()
                result = timed(lambda t, c=copy: replay.replayed(c, t), x, args.runs)
                report["regions"].setdefault(region, {})[version] = result
                print(f"{region} {version}: {result['kernel_ms']:.3f} ms of kernels ({result['launches']:.0f} "
                      f"launches), replay {result['wall_ms_median']:.3f} ms")
                for row in result["top"]:
                    print(f"    {row['ms']:.3f} x{row['calls']:.0f} {row['name']}")
            if "baseline" in outputs:
                want = outputs["baseline"]
                diff = float((outputs["current"] - want).abs().max() / want.abs().max())
                report["regions"][region]["max_difference_relative"] = diff
                print(f"{region}: current against baseline, max |difference| / max |output| {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
