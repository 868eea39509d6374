#!/usr/bin/env python3
"""Micro-benchmark of depth-wise convolutions on a GPU: cuDNN (+ ReLU) against matchrt.depthwise.

Times one call (triton.testing.do_bench_cudagraph: replayed from a CUDA graph, as compiled
pipelines run them, so Python's launch cost is not counted; median microseconds) of each layer
shape that the matchers run, fp16 channels-last, batch 2 (roma_plus's symmetric pair, eloftr's two
images):

    cudnn        F.conv2d (+ F.relu where the block has one): what torch runs without the kernel
    conv         F.conv2d alone
    cudnn_relu   torch.cudnn_convolution_relu: cuDNN's fused convolution + bias + ReLU (where it runs)
    matchrt      matchrt's op (5 x 5 stride 1: the row kernel; else the tile kernel), weight
                 preparation included, then each row-kernel block of --tiles for the 5 x 5 shapes
                 (channels x columns x band rows, warps, register cap); every output is checked
                 against cuDNN's

and adds up "calls per pair" x time per shape: the per-pair cost each way. Supporting evidence
for a kernel choice; whether a pipeline gets faster is `matchrt bench`'s to say. Each new block
compiles a Triton kernel (about a second).

    python scripts/depthwise_micro.py --json out.json [--only r4,u4] [--tiles 32x16x32w4,32x16x32w4r128]
"""

from __future__ import annotations

import argparse
import json
import os
import re

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


def parse_tile(text: str) -> tuple[tuple[int, int, int], int, int, bool]:
    """'32x16x32w4r128h' -> ((32, 16, 32), 4, 128, True): channels, columns, band rows (a multiple of 4);
    warps; registers a thread at most (0, the compiler's choice, without rN); h: multiply and accumulate
    in fp16 (packed) instead of fp32."""
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)(?:r(\d+))?(h)?", text)
    if not m:
        raise SystemExit(f"depthwise_micro: tile {text!r} is not CxWxBANDwWARPS[rMAXNREG][h]")
    c, w, band, warps = (int(v) for v in m.groups()[:4])
    return (c, w, band), warps, int(m.group(5) or 0), m.group(6) == "h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--only", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--tiles", default="", help="row-kernel blocks to try besides the default")
    args = parser.parse_args()
    from matchrt import depthwise

    if depthwise.triton is None or not torch.cuda.is_available():
        raise SystemExit("depthwise_micro: needs a CUDA GPU and Triton with torch >= 2.6 (CUDA wheels of torch ship "
                         "Triton); run it on the GPU machine")
    from triton.testing import do_bench_cudagraph

    def bench(fn) -> float:
        fn()
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=50) * 1e3

    torch.backends.cudnn.benchmark = True
    names = [n for n in args.only.split(",") if n] or list(SHAPES)
    tiles = [parse_tile(t) for t in args.tiles.split(",") if t]
    rows: dict[str, dict] = {}
    per_pair = {"cudnn_ms": 0.0, "cudnn_relu_ms": 0.0, "matchrt_ms": 0.0, "matchrt_best_ms": 0.0}
    for name in names:
        c, side, k, s, p, bias, relu, calls = SHAPES[name]
        x = torch.randn(2, c, side, side, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(c, 1, k, k, device="cuda", dtype=torch.float16) * 0.2
        b = torch.randn(c, device="cuda", dtype=torch.float16) * 0.3 if bias else None

        def cudnn() -> torch.Tensor:
            y = F.conv2d(x, w, b, s, p, groups=c)
            return F.relu(y) if relu else y

        def ours() -> torch.Tensor:
            return torch.ops.matchrt.depthwise_conv2d(x, w, b, s, p, relu, torch.float16)

        want = cudnn().float()
        row = {"channels": c, "side": side, "calls_per_pair": calls, "cudnn_us": bench(cudnn),
               "conv_us": bench(lambda: F.conv2d(x, w, b, s, p, groups=c)),
               "matchrt_us": bench(ours), "max_abs_vs_cudnn": float((ours().float() - want).abs().max()),
               "tiles": {}}
        if relu and bias:
            try:
                fused = lambda: torch.cudnn_convolution_relu(x, w, b, [s, s], [p, p], [1, 1], c)  # noqa: E731
                row["cudnn_relu_max_abs"] = float((fused().float() - want).abs().max())
                row["cudnn_relu_us"] = bench(fused)
            except RuntimeError as error:  # no engine for this grouped convolution
                row["cudnn_relu_error"] = str(error).splitlines()[0][:200]
        best = row["matchrt_us"]
        if depthwise.takes_rows(k, s, p):
            row["default_block"] = depthwise.row_tiles(c, side)
            for text, (tile, warps, maxnreg, half) in zip(args.tiles.split(","), tiles):
                def run(tile=tile, warps=warps, maxnreg=maxnreg, half=half) -> torch.Tensor:
                    return depthwise._launch_rows(x, w, b, relu, torch.float16, torch.library.wrap_triton, tile,
                                                  warps, maxnreg or None, half_sums=half)
                try:
                    err = float((run().float() - want).abs().max())
                    t = bench(run)
                except Exception as error:  # a block that does not compile (shared memory, registers)
                    row["tiles"][text] = {"error": str(error).splitlines()[0][:200]}
                    continue
                row["tiles"][text] = {"us": t, "max_abs_vs_cudnn": err}
                best = min(best, t)
        row["matchrt_best_us"] = best
        per_pair["cudnn_ms"] += row["cudnn_us"] * calls / 1e3
        per_pair["cudnn_relu_ms"] += row.get("cudnn_relu_us", row["cudnn_us"]) * calls / 1e3
        per_pair["matchrt_ms"] += row["matchrt_us"] * calls / 1e3
        per_pair["matchrt_best_ms"] += best * calls / 1e3
        rows[name] = row
        gbs = 2 * x.numel() * 2 / (row["matchrt_us"] * 1e-6) / 1e9
        print(f"{name:7s} C={c:5d} {side}^2  cudnn {row['cudnn_us']:7.1f} us  conv {row['conv_us']:7.1f}  "
              f"cudnn_relu {row.get('cudnn_relu_us', float('nan')):7.1f}  matchrt {row['matchrt_us']:7.1f} "
              f"({gbs:5.0f} GB/s) {row.get('default_block', '')}  best {best:7.1f}  "
              f"max |d| {row['max_abs_vs_cudnn']:.1e}", flush=True)
        # after every shape (a run cut short keeps what it measured), renamed into place whole
        with open(args.json + ".tmp", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "timer":
                       "triton.testing.do_bench_cudagraph", "rows": rows, "per_pair_ms_for_these_shapes": per_pair},
                      f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    print("per pair, these shapes:", {k: round(v, 3) for k, v in per_pair.items()})


if __name__ == "__main__":
    main()
