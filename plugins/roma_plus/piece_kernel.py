"""One GPU pass that writes the half-precision pieces of an fp32 tensor side by side (split_products).

``split_products.laid_out`` in torch needs three kernels over strided slices (a cast, a copy, a
subtraction), 16 bytes of traffic per element, and torch's non-vectorised strided copy: 10 ms of
roma_plus's 38 ms coarse stage on an H100 went to writing pieces. This Triton kernel reads each
element once, rounds it to the head and the tail in registers and writes every slot and the
columns of ones and zeros that follow (10 bytes per element for three bf16 slots).

Bit for bit what the torch version writes: both round to nearest even on the store, and
``x - head`` is exact in fp32. Used only on CUDA tensors, and only where Triton imports (torch's
CUDA wheels ship it); anywhere else ``laid_out`` writes the pieces with torch.

Registered as a ``torch.library.triton_op`` (``pieces`` uses it when traced), so torch.export keeps
it inside AOTInductor packages: they traced ``laid_out``'s torch ops instead, which Inductor fused
into kernels that took 7.3 ms where this pass takes 2.6 (roma_plus, H200, session 27). Eager calls
launch the kernel directly (``write_pieces``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from matchrt.triton_ops import op_runs_on, tl, triton  # None without Triton or triton_op: laid_out keeps torch

OP_NAME = "matchrt_roma::pieces"


def usable(x: torch.Tensor) -> bool:
    """Can this kernel write x's pieces (a CUDA tensor, Triton importable, not an ONNX export, at
    most 4 dimensions)?"""
    return op_runs_on(x) and 1 <= x.dim() <= 4 and x.numel() > 0


if triton is not None:

    @triton.jit
    def _pieces_kernel(x_ptr, out_ptr, norm_w_ptr, norm_b_ptr, eps, rows, k, d1, d2, s0, s1, s2, s3, out_width,
                       SLOTS: tl.constexpr, TAIL0: tl.constexpr, TAIL1: tl.constexpr, TAIL2: tl.constexpr,
                       ONES: tl.constexpr, EXTRA: tl.constexpr, EXTRA_BLOCK: tl.constexpr,
                       GELU: tl.constexpr, NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       ROW_ALIGN: tl.constexpr, HALVES: tl.constexpr, HEAD_COLUMNS: tl.constexpr):
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        c = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        i2 = r % d2
        i1 = (r // d2) % d1
        i0 = r // d2 // d1
        row_ok = r < rows
        mask = row_ok[:, None] & (c < k)[None, :]
        src = x_ptr + (i0 * s0 + i1 * s1 + i2 * s2)[:, None] + c[None, :].to(tl.int64) * s3
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        if HALVES == 2:  # the row is [a | b] (2k wide): the value is a + b in fp32 (attention's two halves)
            x = x + tl.load(src + k * s3, mask=mask, other=0.0).to(tl.float32)
        if HEAD_COLUMNS:  # rows (i0, i1, head i2) land side by side in one output row (i0, i1), head-major
            out_row = r // d2
            column0 = i2 * k
            slot = d2 * k
        else:
            out_row = r
            column0 = i2 * 0
            slot = k
        if NORM:  # LayerNorm over the whole row (BLOCK_K >= k: one program holds it), two passes in fp32
            mean = tl.sum(x, axis=1) / k
            centred = tl.where(mask, x - mean[:, None], 0.0)
            # eps in fp32: Inductor passes a Python float to a user kernel as fp64 (a package's launch)
            inv = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / k + tl.cast(eps, tl.float32))
            x = centred * inv[:, None] * tl.load(norm_w_ptr + c, mask=c < k, other=0.0)[None, :] \
                + tl.load(norm_b_ptr + c, mask=c < k, other=0.0)[None, :]
        if GELU:  # torch's exact GELU as its CUDA kernel computes it in fp32: 0.5 x (1 + erf(x / sqrt 2))
            x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        piece = out_ptr.dtype.element_ty
        head = x.to(piece)
        tail = (x - head.to(tl.float32)).to(piece)  # exact difference, rounded once on the store
        # ROW_ALIGN: what out_width is a multiple of, told to the compiler: Triton only infers
        # multiples of 16 from an integer argument, and rows of 3k + 8m elements (pieces, bias
        # ones, padding) would otherwise be stored one 2-byte element at a time
        dst = out_ptr + tl.multiple_of(out_row * out_width, ROW_ALIGN)[:, None] + column0[:, None] + c[None, :]
        tl.store(dst, tail if TAIL0 else head, mask=mask)
        if SLOTS > 1:
            tl.store(dst + slot, tail if TAIL1 else head, mask=mask)
        if SLOTS > 2:
            tl.store(dst + 2 * slot, tail if TAIL2 else head, mask=mask)
        if EXTRA > 0:
            if tl.program_id(1) == 0:
                e = tl.arange(0, EXTRA_BLOCK)
                ones = tl.where(e < ONES, 1.0, 0.0).to(piece)
                values = tl.broadcast_to(ones[None, :], (BLOCK_R, EXTRA_BLOCK))
                first = (i2 == 0) if HEAD_COLUMNS else row_ok  # one writer per output row
                tl.store(out_ptr + out_row[:, None] * out_width + SLOTS * slot + e[None, :], values,
                         mask=(row_ok & first)[:, None] & (e < EXTRA)[None, :])


# rows of at most this many elements can be layer-normalised in the pass (one program per row block)
NORM_MAX = 8192


def row_alignment(width: int) -> int:
    """The largest power of two up to 16 that divides ``width``: what the kernel may assume of its
    output rows' starts (in elements), so that it stores whole 16-byte vectors."""
    return width & -width if width % 16 else 16


def _launch(x: torch.Tensor, out: torch.Tensor, order: str, ones: int, gelu: bool,
            norm: Optional[tuple[torch.Tensor, torch.Tensor, float]], halves: int, head_columns: bool,
            launcher: Any) -> torch.Tensor:
    k = int(x.shape[-1]) // halves
    sizes = [1] * (4 - x.dim()) + list(x.shape)
    strides = [0] * (4 - x.dim()) + list(x.stride())
    rows = sizes[0] * sizes[1] * sizes[2]
    slots = len(order)
    row_width = k * (sizes[2] if head_columns else 1)
    extra = int(out.shape[-1]) - slots * row_width
    if halves not in (1, 2) or (head_columns and (x.dim() != 4 or norm is not None or gelu)):
        raise ValueError("write_pieces: halves is 1 or 2; head_columns takes a 4-D x, without norm or gelu")
    tails = [piece == "t" for piece in order] + [False] * (3 - slots)
    if norm is not None and k > NORM_MAX:
        raise ValueError(f"rows of {k} elements: the fused LayerNorm takes at most {NORM_MAX}")
    block_k = triton.next_power_of_2(k) if norm is not None else min(triton.next_power_of_2(k), 512)
    block_r = max(1, 4096 // block_k)
    norm_w, norm_b, eps = norm if norm is not None else (x, x, 0.0)
    grid: Any = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
    launcher(_pieces_kernel)[grid](
        x, out, norm_w, norm_b, float(eps), rows, k, sizes[1], sizes[2], strides[0], strides[1], strides[2],
        strides[3], int(out.shape[-1]), SLOTS=slots, TAIL0=tails[0], TAIL1=tails[1], TAIL2=tails[2], ONES=ones,
        EXTRA=extra, EXTRA_BLOCK=triton.next_power_of_2(max(extra, 1)), GELU=gelu, NORM=norm is not None,
        BLOCK_R=block_r, BLOCK_K=block_k, ROW_ALIGN=row_alignment(int(out.shape[-1])), HALVES=halves,
        HEAD_COLUMNS=head_columns, num_warps=4 if block_k * block_r <= 4096 else 8)
    return out


def write_pieces(x: torch.Tensor, out: torch.Tensor, order: str, ones: int, gelu: bool = False,
                 norm: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None, halves: int = 1,
                 head_columns: bool = False) -> torch.Tensor:
    """Fill ``out`` (contiguous, x's leading shape, last axis len(order) * k + extra) with the
    pieces of ``x`` (of GELU(x) with ``gelu``: the MLP's activation, without a pass of its own; of
    LayerNorm(x) with ``norm`` = (weight, bias, eps), fp32, rows of at most NORM_MAX) in ``order``
    ("h" head, "t" tail), then ``ones`` columns of 1 and zeros.

    ``halves=2``: x's rows are [a | b] and the value is a + b in fp32 (k = half the row).
    ``head_columns``: x is B x N x H x k (attention's output with its heads axis second to last,
    a strided view) and ``out`` B x N x (slots * H * k + extra): each row's heads side by side,
    what ``x.reshape(B, N, H * k)`` would give, without that copy."""
    return _launch(x, out, order, ones, gelu, norm, halves, head_columns, lambda kernel: kernel)


def pieces(x: torch.Tensor, width: int, dtype: torch.dtype, order: str, ones: int, gelu: bool = False,
           norm: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None, halves: int = 1,
           head_columns: bool = False) -> torch.Tensor:
    """``write_pieces`` into a new ``dtype`` buffer whose rows are ``width`` wide (x's leading shape;
    B x N with ``head_columns``). Traced (torch.export, torch.compile): the registered op, which the
    graph keeps; eager: the same kernel launched directly, without the dispatcher's few microseconds
    per call (roma_plus's split copies write pieces ~200 times a pair)."""
    if not torch.compiler.is_compiling():
        out = torch.empty(*_leading(x, head_columns), width, dtype=dtype, device=x.device)
        return write_pieces(x, out, order, ones, gelu, norm, halves, head_columns)
    weight, bias, eps = norm if norm is not None else (None, None, 0.0)
    return torch.ops.matchrt_roma.pieces(x, int(width), dtype, order, int(ones), bool(gelu), weight, bias,
                                         float(eps), int(halves), bool(head_columns))


def _leading(x: torch.Tensor, head_columns: bool) -> list[int]:
    """The leading shape of x's pieces: x's but the last axis (B x N with ``head_columns``)."""
    return [int(n) for n in (x.shape[:2] if head_columns else x.shape[:-1])]


if triton is not None:

    @torch.library.triton_op(OP_NAME, mutates_args=())
    def _pieces_op(x: torch.Tensor, width: int, dtype: torch.dtype, order: str, ones: int, gelu: bool,
                   norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], eps: float, halves: int,
                   head_columns: bool) -> torch.Tensor:
        """The pieces of x in a new buffer (see ``pieces``)."""
        out = torch.empty(*_leading(x, head_columns), width, dtype=dtype, device=x.device)
        norm = None if norm_weight is None or norm_bias is None else (norm_weight, norm_bias, eps)
        return _launch(x, out, order, ones, gelu, norm, halves, head_columns, torch.library.wrap_triton)


__all__ = ["NORM_MAX", "OP_NAME", "pieces", "row_alignment", "usable", "write_pieces"]
