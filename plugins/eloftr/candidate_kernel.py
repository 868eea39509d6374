"""The coarse pairs above the threshold, compacted on the GPU in one pass over the similarity.

The export graph's selection writes the whole dual-softmax confidence (B x L x S, 117 M entries
at 832 x 832) and runs TopK over it: on an H100 1.3 ms of eloftr's 6.6 ms of compiled fp16
kernels (the confidence pass 0.48 ms, the two radix-select TopKs 0.87 ms). Few entries can pass:
the confidence of pair (i, j) is at most its row softmax and its column softmax, both summing to
one, so a row (or column) holds fewer than 1 / threshold of them. This kernel reads each
similarity once, forms the confidence in registers, and appends only the pairs above the threshold
to a short list (at most min(L, S) * per_row_limit entries); TopK then runs on that list. In
the compiled fp16 graph on an H100 this pass takes 0.14 ms.

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

from matchrt.triton_ops import op_runs_on, tl, triton  # None without Triton or torch's triton_op: the TopK graph

OP_NAME = "matchrt_eloftr::threshold_candidates"
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
    return op_runs_on(sim)


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


def rounds_scaled(scale: float) -> bool:
    """Does this run round the scaled similarity (sim * scale) to sim's dtype? Eager torch does, as
    it holds the scaled matrix as a tensor; Inductor keeps it in fp32 registers. The kernels that
    read the similarity (this one, lse_kernel's) do as the graph around them, so they agree."""
    return scale != 1.0 and not torch.compiler.is_compiling()


def _operands(sim: torch.Tensor, row: torch.Tensor, col: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sim (B x L x S), row (B x L) and col (B x S) as the kernel reads them: contiguous, fp32 sums."""
    b, rows, cols = (int(n) for n in sim.shape)
    if rows * cols >= 2**31:
        raise ValueError(f"the coarse matrix has {rows} x {cols} entries: more than INT32 indices address")
    return sim.contiguous(), row.reshape(b, rows).float().contiguous(), col.reshape(b, cols).float().contiguous()


def candidates(sim: torch.Tensor, scale: float, row: torch.Tensor, col: torch.Tensor, threshold: float,
               cap: int) -> torch.Tensor:
    """The candidate keys of `sim` (B x L x S); see threshold_candidates."""
    sim, row, col = _operands(sim, row, col)
    return torch.ops.matchrt_eloftr.threshold_candidates(sim, float(scale), row, col, float(threshold), int(cap),
                                                         rounds_scaled(scale))


def interpreted(sim: torch.Tensor, scale: float, row: torch.Tensor, col: torch.Tensor, threshold: float,
                cap: int) -> torch.Tensor:
    """The same kernel launched directly (Triton's CPU interpreter in tests: TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    sim, row, col = _operands(sim, row, col)
    return _launch(sim, float(scale), row, col, float(threshold), int(cap), rounds_scaled(scale),
                   lambda kernel: kernel)


__all__ = ["OP_NAME", "candidates", "capacity", "decode", "interpreted", "per_row_limit", "rounds_scaled",
           "usable"]
