"""The Gaussian KDE of roma_plus's balanced sampling in one GPU pass, without an N x N matrix.

``sampling.kde`` in torch writes the N x N exponents block by block (a matrix product), then
exponentiates and sums them: at N = 20000 (5000 matches drawn from 4 x as many candidates) that is
1.6 GB written and read three times, in about a hundred kernel launches. Here each program holds a
block of rows, walks every column block, forms the squared distances in registers (4-d points: a
few FMAs each), exponentiates and adds: nothing but the N densities is written.

Each distance is the sum of squared coordinate differences (not the product expansion the torch
path uses, whose exponents of size ~200 lose their low bits to cancellation), so this pass is at
least as close to float64 as the torch one. Used only on CUDA tensors, and only where Triton
imports (torch's CUDA wheels ship it); anywhere else ``sampling.kde`` keeps its torch path.
"""

from __future__ import annotations

from typing import Any

import torch

from matchrt.triton_ops import launch_runs_on, tl, triton  # None without Triton: sampling.kde keeps its torch path

# points of at most this many coordinates (RoMa's matches have 4: x_A, y_A, x_B, y_B)
MAX_DIM = 8


def usable(x: torch.Tensor) -> bool:
    """Can this kernel take x (a CUDA N x D tensor, D <= MAX_DIM, Triton importable)?"""
    return launch_runs_on(x) and x.dim() == 2 and 1 <= x.shape[1] <= MAX_DIM and x.shape[0] > 0


if triton is not None:

    @triton.jit
    def _kde_kernel(x_ptr, out_ptr, n, dim, neg_scale_log2e,
                    DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # reduced once, after the last column block
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            sq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for d in tl.static_range(DIM):  # coordinate by coordinate: 2-d tiles only, no reduction
                xi = tl.load(x_ptr + rows * dim + d, mask=row_ok, other=0.0)
                xj = tl.load(x_ptr + cols * dim + d, mask=col_ok, other=0.0)
                diff = xi[:, None] - xj[None, :]
                sq += diff * diff
            # exp(-sq / (2 std^2)) as exp2 (one multiply folded into the constant)
            e = tl.exp2(sq * neg_scale_log2e)
            acc += tl.where(col_ok[None, :], e, 0.0)
        tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


def kde(x: torch.Tensor, std: float) -> torch.Tensor:
    """sum_j exp(-|x_i - x_j|^2 / (2 std^2)) for each row of x (N x D, D <= MAX_DIM), in fp32."""
    x = x.float().contiguous()
    n, dim = int(x.shape[0]), int(x.shape[1])
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    neg_scale_log2e = -1.4426950408889634 / (2.0 * std * std)
    block_m, block_n = 64, 128
    grid: Any = (triton.cdiv(n, block_m),)
    _kde_kernel[grid](x, out, n, dim, neg_scale_log2e, DIM=dim,
                      BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8)
    return out


__all__ = ["MAX_DIM", "kde", "usable"]
