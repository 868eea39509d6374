"""The coarse pairs above the threshold, compacted on the GPU in one pass over the similarity.

The export graph's selection writes the whole dual-softmax confidence (B x L x S, 117 M entries
at 832 x 832) and runs TopK over it: on an H100 1.3 ms of eloftr's 6.6 ms of compiled fp16
kernels (the confidence pass 0.48 ms, the two radix-select TopKs 0.87 ms). Few entries can pass:
the confidence of pair (i, j) is at most its row softmax and its column softmax, both summing to
one, so a row (or column) holds fewer than 1 / threshold of them. This kernel reads each
similarity once, forms the confidence in registers, and appends only the pairs above the threshold
to a short list (at most min(L, S) * per_row_limit entries); TopK then runs on that list.

Each kept pair is written as one int64 key, (confidence's fp32 bits << 32) | (2^31 - 1 - flat
index): confidences are positive, so keys order as confidences do, and ties go to the lower
index, whatever order the blocks appended in. Empty slots hold -1. Used by CoarseSelect under
torch on CUDA tensors (eager, torch.compile and AOTInductor packages: a `torch.library.triton_op`,
so Inductor keeps it inside its graphs and CUDA graphs); ONNX exports and CPUs keep the
confidence + TopK graph.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: CoarseSelect keeps the TopK graph
    triton = None

OP_NAME = "matchrt_eloftr::threshold_candidates"
PARTIALS_OP = "matchrt_eloftr::normalizer_partials"
ROUNDING_MARGIN = 1.05  # rounded confidences may exceed exact ones (fp16 similarity ulps): room for 5% more
LOG_SLACK = 0.01  # the pre-test's margin in log space (fp16 rounding of the confidence: < 0.001)
SPARSE_ENOUGH = 8  # use the list only when it is at least this many times shorter than the matrix


def per_row_limit(threshold: float) -> int:
    """The most entries above `threshold` that one row (or column) of the confidence can hold."""
    return int(math.floor(ROUNDING_MARGIN / threshold))


def capacity(rows: int, cols: int, threshold: float, k: int) -> Optional[int]:
    """Length of the candidate list per pair (>= k), or None where the list would not pay
    (a threshold so low that nearly every pair may pass)."""
    if threshold <= 0.0:
        return None
    cap = min(rows, cols) * per_row_limit(threshold)
    if cap * SPARSE_ENOUGH > rows * cols:
        return None
    return max(cap, k)


def usable(sim: torch.Tensor) -> bool:
    """Can this kernel select from `sim`: a CUDA tensor, Triton importable, not an ONNX export?"""
    return triton is not None and sim.is_cuda and not torch.onnx.is_in_onnx_export()


def decode(top: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(confidence in `dtype`, INT32 flat index, valid) of sorted keys; empty slots give 0, 0, False."""
    valid = top >= 0
    bits = torch.bitwise_right_shift(top, 32).to(torch.int32)
    value = torch.where(valid, bits.view(torch.float32), torch.zeros((), device=top.device))
    flat = (2**31 - 1) - torch.bitwise_and(top, 0xFFFFFFFF)
    flat = torch.where(valid, flat, torch.zeros((), dtype=flat.dtype, device=top.device))
    return value.to(dtype), flat.to(torch.int32), valid


if triton is not None:

    @triton.jit
    def _candidates_kernel(sim_ptr, row_ptr, col_ptr, keys_ptr, count_ptr, L, S, cap, scale, threshold,
                           log_floor, ROUND_SIM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(2)
        i = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        j = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        inside = (i < L)[:, None] & (j < S)[None, :]
        flat = i[:, None] * S + j[None, :]  # < 2^31 (checked by the caller)
        pair = b.to(tl.int64)
        raw = tl.load(sim_ptr + pair * L * S + flat, mask=inside, other=0.0)
        x = raw.to(tl.float32) * scale
        if ROUND_SIM:  # the scaled similarity is a tensor of raw's dtype in the torch graph
            x = x.to(raw.dtype).to(tl.float32)
        r = tl.load(row_ptr + pair * L + i, mask=i < L, other=0.0)
        c = tl.load(col_ptr + pair * S + j, mask=j < S, other=0.0)
        z = 2.0 * x - r[:, None] - c[None, :]
        # log-space pre-test, looser than the threshold by more than any rounding: most blocks
        # hold no candidate and end here, without an exponent
        near = inside & (z > log_floor)
        if tl.max(tl.max(near.to(tl.int32), axis=1), axis=0) > 0:
            conf = tl.exp(z).to(raw.dtype).to(tl.float32)
            keep = near & (conf > threshold)
            kept = keep.to(tl.int32)
            n = tl.sum(tl.sum(kept, axis=1), axis=0)
            if n > 0:
                start = tl.atomic_add(count_ptr + b, n)
                slot = start + tl.cumsum(tl.reshape(kept, (BLOCK_L * BLOCK_S,)), axis=0) - 1
                key = (conf.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - flat).to(tl.int64)
                mask = tl.reshape(keep, (BLOCK_L * BLOCK_S,)) & (slot < cap)
                tl.store(keys_ptr + pair * cap + slot, tl.reshape(key, (BLOCK_L * BLOCK_S,)), mask=mask)

    @triton.jit
    def _partials_kernel(sim_ptr, rmax_ptr, rsum_ptr, cmax_ptr, csum_ptr, L, S, scale,
                         ROUND_SIM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr):
        tile_l = tl.program_id(0)
        tile_s = tl.program_id(1)
        b = tl.program_id(2)
        i = tile_l * BLOCK_L + tl.arange(0, BLOCK_L)
        j = tile_s * BLOCK_S + tl.arange(0, BLOCK_S)
        inside = (i < L)[:, None] & (j < S)[None, :]
        pair = b.to(tl.int64)
        raw = tl.load(sim_ptr + pair * L * S + i[:, None] * S + j[None, :], mask=inside, other=0.0)
        x = raw.to(tl.float32) * scale
        if ROUND_SIM:
            x = x.to(raw.dtype).to(tl.float32)
        x = tl.where(inside, x, -1e30)  # outside the matrix: no weight (finite: no inf - inf)
        # each row's and each column's (max, sum of exp(x - max)) over this tile
        row_max = tl.max(x, axis=1)
        row_sum = tl.sum(tl.exp(x - row_max[:, None]), axis=1)
        col_max = tl.max(x, axis=0)
        col_sum = tl.sum(tl.exp(x - col_max[None, :]), axis=0)
        tiles_s = tl.num_programs(1)
        tiles_l = tl.num_programs(0)
        r_at = (pair * L + i) * tiles_s + tile_s  # B x L x tiles_s
        tl.store(rmax_ptr + r_at, row_max, mask=i < L)
        tl.store(rsum_ptr + r_at, row_sum, mask=i < L)
        c_at = (pair * tiles_l + tile_l) * S + j  # B x tiles_l x S
        tl.store(cmax_ptr + c_at, col_max, mask=j < S)
        tl.store(csum_ptr + c_at, col_sum, mask=j < S)

    def _launch_partials(sim: torch.Tensor, scale: float, round_sim: bool, launcher: Any,
                         block_l: int = 64, block_s: int = 128, warps: int = 8
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, rows, cols = (int(n) for n in sim.shape)
        tiles_l, tiles_s = triton.cdiv(rows, block_l), triton.cdiv(cols, block_s)
        rmax = torch.empty((b, rows, tiles_s), dtype=torch.float32, device=sim.device)
        rsum = torch.empty_like(rmax)
        cmax = torch.empty((b, tiles_l, cols), dtype=torch.float32, device=sim.device)
        csum = torch.empty_like(cmax)
        launcher(_partials_kernel)[(tiles_l, tiles_s, b)](sim, rmax, rsum, cmax, csum, rows, cols, scale,
                                                          ROUND_SIM=round_sim, BLOCK_L=block_l,
                                                          BLOCK_S=block_s, num_warps=warps)
        return rmax, rsum, cmax, csum

    @torch.library.triton_op(PARTIALS_OP, mutates_args=())
    def normalizer_partials(sim: torch.Tensor, scale: float, round_sim: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-tile (max, sum of exponentials) of every row (B x L x tiles) and every column
        (B x tiles x S) of sim' = sim * scale: one read of the matrix for both log-sum-exps."""
        return _launch_partials(sim, scale, round_sim, torch.library.wrap_triton)

    def _launch(sim: torch.Tensor, scale: float, row: torch.Tensor, col: torch.Tensor, threshold: float,
                cap: int, round_sim: bool, launcher: Any, block_l: int = 8, block_s: int = 128,
                warps: int = 4) -> torch.Tensor:
        b, rows, cols = (int(n) for n in sim.shape)
        keys = torch.full((b, cap), -1, dtype=torch.int64, device=sim.device)
        count = torch.zeros(b, dtype=torch.int32, device=sim.device)
        grid = (triton.cdiv(rows, block_l), triton.cdiv(cols, block_s), b)
        log_floor = math.log(threshold) - LOG_SLACK
        launcher(_candidates_kernel)[grid](sim, row, col, keys, count, rows, cols, cap, scale, threshold,
                                           log_floor, ROUND_SIM=round_sim, BLOCK_L=block_l, BLOCK_S=block_s,
                                           num_warps=warps)
        return keys

    @torch.library.triton_op(OP_NAME, mutates_args=())
    def threshold_candidates(sim: torch.Tensor, scale: float, row: torch.Tensor, col: torch.Tensor,
                             threshold: float, cap: int, round_sim: bool) -> torch.Tensor:
        """Keys (B x cap int64, -1 = empty) of the pairs with exp(2 sim' - row - col) > threshold,
        sim' = sim * scale (rounded to sim's dtype when round_sim), rows B x L, cols B x S (fp32)."""
        return _launch(sim, scale, row, col, threshold, cap, round_sim, torch.library.wrap_triton)


def candidates(sim: torch.Tensor, scale: float, row: torch.Tensor, col: torch.Tensor, threshold: float,
               cap: int) -> torch.Tensor:
    """The candidate keys of `sim` (B x L x S, contiguous); see threshold_candidates."""
    b, rows, cols = (int(n) for n in sim.shape)
    if rows * cols >= 2**31:
        raise ValueError(f"the coarse matrix has {rows} x {cols} entries: more than INT32 indices address")
    # the scaled similarity is rounded to sim's dtype, as the eager graph's tensor is, in this
    # kernel and in `normalizers`: both see the same values
    round_sim = scale != 1.0
    return torch.ops.matchrt_eloftr.threshold_candidates(
        sim.contiguous(), float(scale), row.reshape(b, rows).float().contiguous(),
        col.reshape(b, cols).float().contiguous(), float(threshold), int(cap), round_sim)


def _combine(top: torch.Tensor, total: torch.Tensor, dim: int) -> torch.Tensor:
    """log-sum-exp from per-tile (max, sum of exp(x - max)) pairs along `dim`."""
    peak = top.amax(dim=dim, keepdim=True)
    return peak + torch.log((total * torch.exp(top - peak)).sum(dim=dim, keepdim=True))


def normalizers(sim: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exps of sim' = sim * scale over S (B x L x 1) and over L (B x 1 x S), fp32, from one
    pass over `sim` (B x L x S) and a small combination of the tiles' partials."""
    rmax, rsum, cmax, csum = torch.ops.matchrt_eloftr.normalizer_partials(sim.contiguous(), float(scale),
                                                                          scale != 1.0)
    return _combine(rmax, rsum, 2), _combine(cmax, csum, 1)


def interpreted_normalizers(sim: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`normalizers` with the partials kernel launched directly (Triton's CPU interpreter in tests)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    rmax, rsum, cmax, csum = _launch_partials(sim.contiguous(), float(scale), scale != 1.0, lambda kernel: kernel)
    return _combine(rmax, rsum, 2), _combine(cmax, csum, 1)


def interpreted(sim: torch.Tensor, scale: float, row: torch.Tensor, col: torch.Tensor, threshold: float,
                cap: int) -> torch.Tensor:
    """The same kernel launched directly (Triton's CPU interpreter in tests: TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    b, rows, cols = (int(n) for n in sim.shape)
    return _launch(sim.contiguous(), float(scale), row.reshape(b, rows).float().contiguous(),
                   col.reshape(b, cols).float().contiguous(), float(threshold), int(cap), scale != 1.0,
                   lambda kernel: kernel)


__all__ = ["OP_NAME", "PARTIALS_OP", "candidates", "capacity", "decode", "interpreted", "interpreted_normalizers",
           "normalizers", "per_row_limit", "usable"]
