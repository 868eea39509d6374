#!/usr/bin/env python3
"""Micro-benchmark of roma_plus's refiner heads on a GPU: the last block's 1 x 1 convolution and the
3-channel fp32 head, compiled, four ways on the same activations (the last ReLU's fp16 output,
channels-last, batch 2: a symmetric pair):

    before     the last 1 x 1 convolution under fp16 autocast, then the head as an fp32 matrix
               product of its fp32 copy (what ran before ``refiner.fold_head`` and ``head_conv``)
    folded     the two folded into one 3-channel convolution (``fold_head``), the head still an
               fp32 matrix product
    broadcast  folded, the head as one reduction over pixels x outputs (session 22's first form:
               the three outputs of a pixel are three rows of the reduction, each loading the pixel)
    reduction  folded, the head as ``head_conv``'s sums, one per output over the same pixels (one
               reduction kernel with three results): what roma_plus runs now

Times each (torch.compile, then triton.testing.do_bench_cudagraph: replayed from a CUDA graph as the
compiled pipeline runs it; median microseconds) at every refiner shape of a 560 / 864 pair, sums
them per pair, and gives each way's error against a float64 evaluation of the unfolded layers.
Supporting evidence; whether the pipeline gets faster is `matchrt bench`'s to say.

    python scripts/roma_head_micro.py --json out.json [--only u1,u2] [--ways folded,reduction]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

from matchrt.plugins.roma_plus.refiner import fold_head, head_conv, pointwise_conv

# name -> (padded block width, side): the first pass at 560 (scales 16 .. 1), the upsampling pass at 864 (8 .. 1)
SHAPES: dict[str, tuple[int, int]] = {
    "r16": (1384, 35), "r8": (1144, 70), "r4": (576, 140), "r2": (144, 280), "r1": (24, 560),
    "u8": (1144, 108), "u4": (576, 216), "u2": (144, 432), "u1": (24, 864),
}


def broadcast_head(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The head as one sum over (pixel, output) pairs of broadcast products (``broadcast`` above)."""
    rows = x.permute(0, 2, 3, 1).float()
    out = (rows[..., None, :] * conv.weight[:, :, 0, 0].float()).sum(dim=-1) + conv.bias.float()
    return out.permute(0, 3, 1, 2)


class Tail(nn.Module):
    """The last block's 1 x 1 convolution (or its Identity, folded) and the head, as the refiner runs them."""

    def __init__(self, inner: nn.Module, head: nn.Conv2d, way: str) -> None:
        super().__init__()
        self.inner, self.head, self.way = inner, head, way

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, dtype=torch.float16):
            d = pointwise_conv(self.inner, h) if isinstance(self.inner, nn.Conv2d) else h
        with torch.autocast(h.device.type, enabled=False):
            if self.way == "reduction":
                return head_conv(self.head, d)
            if self.way == "broadcast":
                return broadcast_head(self.head, d)
            return pointwise_conv(self.head, d.float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--only", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--ways", default="before,folded,broadcast,reduction", help="comma-separated ways to time")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only checks the errors (no timing)")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("roma_head_micro: needs a CUDA GPU; run it on the GPU machine")
    if dev.type == "cuda":
        from triton.testing import do_bench_cudagraph

    names = [n for n in args.only.split(",") if n] or list(SHAPES)
    torch.manual_seed(0)
    chosen = [w for w in args.ways.split(",") if w]
    rows, totals = {}, dict.fromkeys(chosen, 0.0)
    for name in names:
        width, side = SHAPES[name]
        block = nn.Sequential(nn.Identity(), nn.Identity(), nn.ReLU(), nn.Conv2d(width, width, 1)).to(dev)
        head = nn.Conv2d(width, 3, 1).to(dev)
        refiner = nn.Module()  # what fold_head reads and replaces: the last block and the head (copies)
        refiner.block1 = block
        refiner.hidden_blocks = nn.Sequential(copy.deepcopy(block))
        refiner.out_conv = copy.deepcopy(head)
        assert fold_head(refiner)  # type: ignore[arg-type]
        h = torch.relu(torch.randn(2, width, side, side, device=dev)).half().to(memory_format=torch.channels_last)
        with torch.no_grad():
            w_l, w_o = block[3].weight[:, :, 0, 0].double(), head.weight[:, :, 0, 0].double()
            exact = torch.einsum("ok,bkhw->bohw", w_o @ w_l, h.double()) \
                + (w_o @ block[3].bias.double() + head.bias.double())[None, :, None, None]
        ways = {"before": Tail(block[3], head, "product"), "folded": Tail(nn.Identity(), refiner.out_conv, "product"),
                "broadcast": Tail(nn.Identity(), refiner.out_conv, "broadcast"),
                "reduction": Tail(nn.Identity(), refiner.out_conv, "reduction")}
        ways = {k: v for k, v in ways.items() if k in chosen}
        row = {"width": width, "side": side}
        for way, module in ways.items():
            torch._dynamo.reset()  # a fresh compile per way and shape (no recompile limit, no eager fallback)
            fn = torch.compile(module, dynamic=False)
            with torch.no_grad():
                out = fn(h)
                us = do_bench_cudagraph(lambda: fn(h), rep=50) * 1e3 if dev.type == "cuda" else float("nan")
            err = float((out.double() - exact).abs().max() / exact.abs().max())
            row[way] = {"us": us, "max_rel_vs_float64": err}
            totals[way] += us
            print(f"{name:4s} K={width:5d} {side:4d}^2  {way:9s} {us:8.1f} us  max rel err vs float64 {err:.2e}",
                  flush=True)
        rows[name] = row
    print("per pair (sum of the shapes): " + ", ".join(f"{k} {v:.1f} us" for k, v in totals.items()))
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "shapes": rows, "per_pair_us": totals}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
