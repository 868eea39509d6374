"""The dual softmax's two log-sum-exps (over each row and each column of the similarity) in one read.

The candidate selection (candidate_kernel) needs, for B x L x S similarities, the log-sum-exp of
every row and every column. Two torch reductions read the 117 M entries at 832 x 832 twice, and
the column reduction runs across the memory layout: on an H100 they took 0.38 ms of eloftr's 4.86 ms
of compiled fp16 kernels (session 11 profile), against ~0.08 ms for one read of the fp16 matrix.

This kernel reads each entry once. A program takes BLOCK_S columns and one chunk of the rows and
walks down that chunk in BLOCK_L-row tiles. Rows: each tile's per-row (max, sum of exp(x - max))
over its BLOCK_S columns, reduced inside a warp and written out. Columns: a running (max, sum) per
element slot of the tile, updated with one exponent per entry and no reduction until the chunk
ends (a first version reduced both ways in every tile, across warps through shared memory: 0.40
ms on an H200, no faster than torch). torch then merges the partials (m = max m_k, lse = m + log
sum s_k exp(m_k - m)): B x S/BLOCK_S x L and B x chunks x S floats, small next to the matrix.
Registered as a ``torch.library.triton_op`` so Inductor keeps it inside its graphs and CUDA
graphs; elsewhere the torch reductions run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from matchrt.triton_ops import op_runs_on, tl, triton  # None without Triton or torch's triton_op: torch reductions

from .candidate_kernel import rounds_scaled

OP_NAME = "matchrt_eloftr::lse_partials"
BLOCK_L = 32
BLOCK_S = 128
WARPS = 8
PROGRAMS_PER_SM = 6  # enough programs to keep every SM busy while the tiles stream in


def torch_lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log(sum(exp(x))) over `dim` (kept), max-shifted, in fp32: ReduceMax/Exp/ReduceSum/Log.

    (ONNX's ReduceLogSumExp is not max-shifted in every runtime: exp overflows.)
    """
    x = x.float()
    top = x.amax(dim=dim, keepdim=True)
    return top + torch.log(torch.exp(x - top).sum(dim=dim, keepdim=True))


def merge(maxima: torch.Tensor, sums: torch.Tensor, dim: int) -> torch.Tensor:
    """The log-sum-exp over `dim` (kept) of parts given as (max m_k, sum of exp(x - m_k))."""
    top = maxima.amax(dim=dim, keepdim=True)
    return top + torch.log((sums * torch.exp(maxima - top)).sum(dim=dim, keepdim=True))


def row_chunks(batch: int, rows: int, cols: int, sms: int) -> int:
    """How many row chunks a column block is split into: about PROGRAMS_PER_SM programs per SM,
    each chunk at least one tile high."""
    col_blocks = -(-cols // BLOCK_S)
    want = max(1, -(-PROGRAMS_PER_SM * sms // (col_blocks * batch)))
    return max(1, min(want, -(-rows // BLOCK_L)))


if triton is not None:

    @triton.jit
    def _lse_partials_kernel(sim_ptr, row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr, L, S, chunk,
                             n_chunks, scale, ROUND_SIM: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_S: tl.constexpr):
        cb = tl.program_id(0)
        rc = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        n_col_blocks = tl.cdiv(S, BLOCK_S)
        j = cb * BLOCK_S + tl.arange(0, BLOCK_S)
        col_in = j < S
        base = sim_ptr + b * L * S
        m = tl.full([BLOCK_L, BLOCK_S], float("-inf"), tl.float32)  # per slot: running max, sum
        s = tl.zeros([BLOCK_L, BLOCK_S], tl.float32)
        start = rc * chunk
        stop = tl.minimum(start + chunk, L)
        for i0 in range(start, stop, BLOCK_L):
            i = i0 + tl.arange(0, BLOCK_L)
            row_in = i < stop
            inside = row_in[:, None] & col_in[None, :]
            raw = tl.load(base + i[:, None] * S + j[None, :], mask=inside, other=float("-inf"))
            x = (raw.to(tl.float32) * scale).to(tl.float32)  # Inductor passes `scale` as fp64
            if ROUND_SIM:  # eager torch holds the scaled similarity as a tensor of raw's dtype
                x = x.to(raw.dtype).to(tl.float32)
            x = tl.where(inside, x, float("-inf"))
            # rows, over this block's columns (every block has a column inside: finite maxima)
            top = tl.max(x, axis=1)
            part = (b * n_col_blocks + cb) * L + i
            tl.store(row_max_ptr + part, top, mask=row_in)
            tl.store(row_sum_ptr + part, tl.sum(tl.exp(x - top[:, None]), axis=1), mask=row_in)
            # columns, per slot: a new maximum rescales the sum, else the entry adds to it
            d = x - m
            e = tl.where(inside, tl.exp(-tl.abs(d)), 0.0)
            s = tl.where(d > 0, s * e + 1.0, s + e)
            m = tl.maximum(m, x)
        top = tl.max(m, axis=0)  # a column's slots over the chunk's rows (one has a row inside)
        part = (b * n_chunks + rc) * S + j
        tl.store(col_max_ptr + part, top, mask=col_in)
        tl.store(col_sum_ptr + part, tl.sum(s * tl.exp(m - top[None, :]), axis=0), mask=col_in)

    def _launch(sim: torch.Tensor, scale: float, round_sim: bool, n_chunks: int, launcher: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, rows, cols = (int(n) for n in sim.shape)
        col_blocks = triton.cdiv(cols, BLOCK_S)
        chunk = triton.cdiv(triton.cdiv(rows, n_chunks), BLOCK_L) * BLOCK_L
        n_chunks = triton.cdiv(rows, chunk)
        f32 = dict(dtype=torch.float32, device=sim.device)
        row_max, row_sum = torch.empty(b, col_blocks, rows, **f32), torch.empty(b, col_blocks, rows, **f32)
        col_max, col_sum = torch.empty(b, n_chunks, cols, **f32), torch.empty(b, n_chunks, cols, **f32)
        launcher(_lse_partials_kernel)[(col_blocks, n_chunks, b)](
            sim, row_max, row_sum, col_max, col_sum, rows, cols, chunk, n_chunks, scale, ROUND_SIM=round_sim,
            BLOCK_L=BLOCK_L, BLOCK_S=BLOCK_S, num_warps=WARPS)
        return row_max, row_sum, col_max, col_sum

    @torch.library.triton_op(OP_NAME, mutates_args=())
    def lse_partials(sim: torch.Tensor, scale: float, round_sim: bool, n_chunks: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row maxima, row sums) B x S/BLOCK_S x L and (column maxima, column sums) B x chunks x S of
        sim' = sim * scale (rounded to sim's dtype when round_sim), sums of exp(sim' - max)."""
        return _launch(sim, scale, round_sim, n_chunks, torch.library.wrap_triton)


def usable(sim: torch.Tensor) -> bool:
    """Can the kernel read `sim`: a CUDA tensor, Triton importable, not an ONNX export?"""
    return op_runs_on(sim)


def _merged(parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    row_max, row_sum, col_max, col_sum = parts
    return merge(row_max, row_sum, 1).transpose(1, 2), merge(col_max, col_sum, 1)


def _checked(sim: torch.Tensor) -> torch.Tensor:
    if sim.dim() != 3:
        raise ValueError(f"expected a B x L x S similarity, got shape {tuple(sim.shape)}")
    return sim.contiguous()


def log_sum_exps(sim: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-sum-exps of sim' = sim * scale over S (B x L x 1) and over L (B x 1 x S).

    On CUDA the kernel reads `sim` once; elsewhere (CPU, ONNX export) torch's two reductions run.
    As in the torch graph, eager runs round sim' to sim's dtype first and compiled ones do not
    (``candidate_kernel.rounds_scaled``, the rule the candidate pass follows too).
    """
    if not usable(sim):
        scaled = sim * scale if scale != 1.0 else sim
        return torch_lse(scaled, 2), torch_lse(scaled, 1)
    sim = _checked(sim)
    round_sim = rounds_scaled(scale)
    sms = torch.cuda.get_device_properties(sim.device).multi_processor_count
    n_chunks = row_chunks(int(sim.shape[0]), int(sim.shape[1]), int(sim.shape[2]), sms)
    return _merged(torch.ops.matchrt_eloftr.lse_partials(sim, float(scale), round_sim, n_chunks))


def interpreted(sim: torch.Tensor, scale: float = 1.0, n_chunks: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The same kernel launched directly (Triton's CPU interpreter in tests: TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    launcher: Callable[[Any], Any] = lambda kernel: kernel  # noqa: E731
    return _merged(_launch(_checked(sim), float(scale), rounds_scaled(scale), n_chunks, launcher))


__all__ = ["OP_NAME", "row_chunks", "interpreted", "log_sum_exps", "merge", "torch_lse", "usable"]
