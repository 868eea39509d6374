"""The whole-pixel products of roma_plus's local correlation in one Triton pass.

``refiner.window_correlation`` needs, for every A pixel, the dot products of its C features with
B's features at the (2r+2)^2 whole pixels around its flow target. Written in torch, Inductor turns
the gather, product and channel sum into one reduction kernel that re-reads A's row for every
window pixel (1.18 ms a 560/864 pair at four of the five refiner shapes, H200, session 16's
micro-benchmark, against 0.62 ms here; scripts/roma_correlation_micro.py). Here each
program loads a block of A rows once, keeps them in registers, and walks the window: each step
reads one channels-contiguous B row per pixel (whole vectors; zero outside the image) and writes
one fp32 sum per pixel. Products and sums are fp32 (the features are read in their own dtype and
widened), as in the torch form.

A ``torch.library.triton_op``, so compiled graphs (Inductor, CUDA graphs) keep it as a kernel of
their own. CPUs, ONNX export and builds without Triton use the torch form.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from matchrt.triton_ops import op_runs_on, tl, triton  # None without Triton: window_correlation keeps its torch form

OP_NAME = "matchrt_roma_plus::pixel_dots"
MAX_CHANNELS = 1024  # one A row per pixel in registers


def usable(feat_a: torch.Tensor) -> bool:
    """Can the kernel take ``feat_a`` (B x C x H x W on CUDA, C <= MAX_CHANNELS, Triton usable, not an
    ONNX export)?"""
    return op_runs_on(feat_a) and feat_a.dim() == 4 and 1 <= feat_a.shape[1] <= MAX_CHANNELS


# channel values (A rows) per program, and warps per program: the fastest setting at all five refiner
# shapes of a 560/864 pair together (H200, session 16 micro-benchmark: 0.83 ms a pair against 1.91 ms
# for 8192 values and 4 warps, and 1.18 ms for Inductor's fused gather)
BLOCK_VALUES = 2048
WARPS = 2


def block_pixels(channels: int) -> int:
    """Pixels per program: BLOCK_VALUES channel values (4 rows of 512 channels, 8 of 256)."""
    return max(1, min(64, BLOCK_VALUES // triton.next_power_of_2(channels)))


if triton is not None:

    @triton.jit
    def _pixel_dots_kernel(a_ptr, b_ptr, x0_ptr, y0_ptr, out_ptr, H, W, scale,
                           C: tl.constexpr, M: tl.constexpr, RADIUS: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # a, b: B x H*W x C (channels-last rows); x0, y0: B x H*W int32 (the flow target's whole
        # pixel); out: B x H*W x M*M fp32, entry (jy, jx) = scale * <a(p), b(y0 + jy - R, x0 + jx - R)>
        hw = H * W
        batch = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < hw
        c = tl.arange(0, BLOCK_C)
        c_ok = c < C
        a = tl.load(a_ptr + (batch * hw + p)[:, None] * C + c[None, :], mask=p_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32) * scale
        x0 = tl.load(x0_ptr + batch * hw + p, mask=p_ok, other=0)
        y0 = tl.load(y0_ptr + batch * hw + p, mask=p_ok, other=0)
        out = out_ptr + (batch * hw + p) * (M * M)
        for jy in range(M):
            yy = y0 + (jy - RADIUS)
            y_ok = p_ok & (yy >= 0) & (yy < H)
            for jx in range(M):
                xx = x0 + (jx - RADIUS)
                ok = y_ok & (xx >= 0) & (xx < W)
                rows = batch * hw + yy * W + xx
                v = tl.load(b_ptr + rows[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
                tl.store(out + jy * M + jx, tl.sum(a * v.to(tl.float32), axis=1), mask=p_ok)

    def _launch(rows_a: torch.Tensor, rows_b: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, height: int,
                width: int, radius: int, launcher: Any, block: int = 0, warps: int = WARPS) -> torch.Tensor:
        b, hw, c = (int(v) for v in rows_a.shape)
        m = 2 * radius + 2
        out = torch.empty(b, hw, m * m, dtype=torch.float32, device=rows_a.device)
        block = block or block_pixels(c)
        grid = (triton.cdiv(hw, block), b)
        launcher(_pixel_dots_kernel)[grid](rows_a, rows_b, x0, y0, out, height, width, float(c) ** -0.5,
                                           C=c, M=m, RADIUS=radius, BLOCK_P=block,
                                           BLOCK_C=triton.next_power_of_2(c), num_warps=warps)
        return out

    @torch.library.triton_op(OP_NAME, mutates_args=())
    def pixel_dots_op(rows_a: torch.Tensor, rows_b: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor,
                      height: int, width: int, radius: int) -> torch.Tensor:
        """B x HW x (2r+2)^2 fp32 products <a(p), b(y0 + jy - r, x0 + jx - r)> / sqrt(C), 0 outside B."""
        return _launch(rows_a, rows_b, x0, y0, height, width, radius, torch.library.wrap_triton)


def pixel_dots(feat_a: torch.Tensor, feat_b: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor,
               radius: int) -> torch.Tensor:
    """For A and B features (B x C x H x W, one size) and each A pixel's whole target pixel (x0, y0:
    B x H x W integers), the (2r+2)^2 products <a, b> / sqrt(C) over the window from (x0 - r, y0 - r),
    B x H x W x (2r+2) x (2r+2) fp32, 0 where the window leaves B."""
    b, c, h, w = (int(v) for v in feat_a.shape)
    rows_a = feat_a.permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
    rows_b = feat_b.permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
    x0, y0 = (t.reshape(b, h * w).to(torch.int32).contiguous() for t in (x0, y0))
    m = 2 * radius + 2
    if os.environ.get("TRITON_INTERPRET") != "1":
        out = torch.ops.matchrt_roma_plus.pixel_dots(rows_a, rows_b, x0, y0, h, w, radius)
    else:
        out = _launch(rows_a, rows_b, x0, y0, h, w, radius, lambda kernel: kernel)
    return out.reshape(b, h, w, m, m)


__all__ = ["MAX_CHANNELS", "OP_NAME", "block_pixels", "pixel_dots", "usable"]
