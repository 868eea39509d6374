#!/usr/bin/env python3
"""Micro-benchmark of depth-wise convolutions on a GPU: cuDNN (+ ReLU) against matchrt.depthwise.

Times one call (triton.testing.do_bench, median microseconds) of each layer shape that the
matchers run, fp16 channels-last, batch 2 (roma_plus's symmetric pair, eloftr's two images):

    cudnn        F.conv2d (+ F.relu where the block has one): what torch runs without the kernel
    conv         F.conv2d alone
    triton       matchrt.depthwise with its default tile, then each tile of --tiles
                 (channels x rows x columns, warps); every tile's output is checked against cuDNN's

and adds up "calls per pair" x time per shape: the per-pair cost each way. Supporting evidence
for a kernel choice; whether a pipeline gets faster is `matchrt bench`'s to say. Each new tile
compiles a Triton kernel (about a second), so a long --tiles list runs for minutes.

    python scripts/depthwise_micro.py --json out.json [--only r4,u4] [--tiles 128x2x16w4,64x4x16w4]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

# name -> (channels, side, kernel, stride, padding, bias, relu, calls per pair)
SHAPES: dict[str, tuple[int, int, int, int, int, bool, bool, int]] = {
    # roma_plus refiner blocks (widths padded to multiples of 8), first pass at 560 and upsampling pass at 864
    "r16": (1384, 35, 5, 1, 2, True, True, 9), "r8": (1144, 70, 5, 1, 2, True, True, 9),
    "r4": (576, 140, 5, 1, 2, True, True, 9), "r2": (144, 280, 5, 1, 2, True, True, 9),
    "r1": (24, 560, 5, 1, 2, True, True, 9), "u8": (1144, 108, 5, 1, 2, True, True, 9),
    "u4": (576, 216, 5, 1, 2, True, True, 9), "u2": (144, 432, 5, 1, 2, True, True, 9),
    "u1": (24, 864, 5, 1, 2, True, True, 9),
    # eloftr's query pooling at 832 (4 x 4, stride 4, 256 channels, 16 calls)
    "e_pool": (256, 104, 4, 4, 0, False, False, 16),
}


def parse_tile(text: str) -> tuple[tuple[int, int, int], int]:
    """'128x2x16w4' -> ((128, 2, 16), 4)."""
    dims, warps = text.split("w")
    c, h, w = (int(v) for v in dims.split("x"))
    return (c, h, w), int(warps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--only", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--tiles", default="128x2x16w4,64x4x16w4,32x8x16w4", help="tiles to try besides the default")
    args = parser.parse_args()
    from matchrt import depthwise

    if depthwise.triton is None or not torch.cuda.is_available():
        raise SystemExit("depthwise_micro: needs a CUDA GPU and Triton with torch >= 2.6 (CUDA wheels of torch ship "
                         "Triton); run it on the GPU machine")
    from triton.testing import do_bench
    torch.backends.cudnn.benchmark = True
    names = [n for n in args.only.split(",") if n] or list(SHAPES)
    tiles = [parse_tile(t) for t in args.tiles.split(",") if t]
    rows: dict[str, dict] = {}
    per_pair = {"cudnn_ms": 0.0, "triton_default_ms": 0.0, "triton_best_ms": 0.0}
    for name in names:
        c, side, k, s, p, bias, relu, calls = SHAPES[name]
        x = torch.randn(2, c, side, side, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(c, 1, k, k, device="cuda", dtype=torch.float16) * 0.2
        b = torch.randn(c, device="cuda", dtype=torch.float16) * 0.3 if bias else None

        def cudnn() -> torch.Tensor:
            y = F.conv2d(x, w, b, s, p, groups=c)
            return F.relu(y) if relu else y

        def triton_run(tile=None, warps: int = 4) -> torch.Tensor:
            return depthwise._launch(x, w, b, s, p, relu, torch.float16, lambda kernel: kernel, tile, warps)

        want = cudnn()
        default_tile = depthwise.tiles(c, (side + 2 * p - k) // s + 1)
        row = {"channels": c, "side": side, "calls_per_pair": calls,
               "cudnn_us": do_bench(cudnn, warmup=10, rep=40) * 1e3,
               "conv_us": do_bench(lambda: F.conv2d(x, w, b, s, p, groups=c), warmup=10, rep=40) * 1e3,
               "default_tile": default_tile,
               "max_abs_vs_cudnn": float((triton_run().float() - want.float()).abs().max()),
               "triton_default_us": do_bench(triton_run, warmup=10, rep=40) * 1e3, "tiles": {}}
        best = row["triton_default_us"]
        for tile, warps in tiles:
            if tile == default_tile or tile[0] > 2 * depthwise.triton.next_power_of_2(c):
                continue
            err = float((triton_run(tile, warps).float() - want.float()).abs().max())
            t = do_bench(lambda: triton_run(tile, warps), warmup=10, rep=40) * 1e3
            row["tiles"][f"{tile[0]}x{tile[1]}x{tile[2]}w{warps}"] = {"us": t, "max_abs_vs_cudnn": err}
            best = min(best, t)
        row["triton_best_us"] = best
        per_pair["cudnn_ms"] += row["cudnn_us"] * calls / 1e3
        per_pair["triton_default_ms"] += row["triton_default_us"] * calls / 1e3
        per_pair["triton_best_ms"] += best * calls / 1e3
        rows[name] = row
        print(f"{name:7s} C={c:5d} {side}^2  cudnn {row['cudnn_us']:8.1f} us  conv {row['conv_us']:8.1f}  "
              f"triton {row['triton_default_us']:8.1f} {default_tile}  best {best:8.1f}  "
              f"max |d| {row['max_abs_vs_cudnn']:.1e}", flush=True)
        # after every shape (a run cut short keeps what it measured), renamed into place whole
        with open(args.json + ".tmp", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                       "per_pair_ms_for_these_shapes": per_pair}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    print("per pair, these shapes:", {k: round(v, 3) for k, v in per_pair.items()})


if __name__ == "__main__":
    main()
