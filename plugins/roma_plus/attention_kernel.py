"""Split-operand attention in one Triton pass, for heads too wide for torch's fused kernels.

``split_products.split_attention`` computes the scores to about fp32's precision by feeding a fused
attention call threefold operands, ``[q_hi | q_hi | q_lo] . [k_hi | k_lo | k_hi]``. For DINOv2's
64-wide heads that is a 192-wide product, which cuDNN's flash kernel takes. The coordinate
decoder's heads are 128 wide: 384 for the scores and 256 for the values, above what the flash and
cuDNN kernels accept, so torch falls back to its memory-efficient kernel with the output kept in
global memory (1.84 ms of a pair's 56 over five calls, H200 profile of session 14).

This kernel computes the same thing from the two pieces of each operand: per block of keys the
scores are three fp16 products accumulated in fp32 (q_hi k_hi + q_hi k_lo + q_lo k_hi), the
softmax runs online in fp32, the weights are rounded to fp16 before the value products (as the
fused kernels do), and the products with v_hi and v_lo are summed into one fp32 output. No
duplicated pieces are written (two per operand, not three). CUDA with Triton only; elsewhere, and
for head widths torch's kernels take, ``split_attention`` keeps its SDPA call.

Registered as a ``torch.library.triton_op``, so torch.export keeps the kernel inside AOTInductor
packages too (before, a package traced the SDPA call, which ran torch's memory-efficient kernel).
Eager calls time the block shapes at the first call per (n, D); a trace launches the shape the
last eager call of that size chose (the package builder calls the graph eagerly before exporting
it), or the first shape when none ran.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from matchrt.triton_ops import op_runs_on, tl, triton  # None without Triton or triton_op: split_attention keeps SDPA

OP_NAME = "matchrt_roma::split_attention"
# head widths this kernel takes (a power of two: one tile); below 96 the threefold product fits
# the fused kernels (3 x 64 = 192 for DINOv2), which are faster there
MIN_HEAD, MAX_HEAD = 96, 128


def usable(q: torch.Tensor) -> bool:
    """Should split attention over ``q`` (B x H x N x D, fp32) run here: a CUDA tensor, Triton
    importable, D a power of two in [MIN_HEAD, MAX_HEAD] (a threefold width the fused kernels
    do not take), no ONNX export?"""
    d = int(q.shape[-1])
    return op_runs_on(q) and q.dim() == 4 and MIN_HEAD <= d <= MAX_HEAD and d & (d - 1) == 0


if triton is not None:

    @triton.jit
    def _split_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, n, scale_log2e,
                                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # q, k, v: (B*H) x n x 2D fp16, [hi | lo] per row; o: (B*H) x n x D fp32. Inductor passes a
        # Python float as fp64 (a package's launch), which would turn the softmax fp64: cast it
        scale_log2e = tl.cast(scale_log2e, tl.float32)
        bh = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        d = tl.arange(0, D)
        q_rows = q_ptr + bh * n * 2 * D + rows[:, None] * (2 * D) + d[None, :]
        q_hi = tl.load(q_rows, mask=row_ok[:, None], other=0.0)
        q_lo = tl.load(q_rows + D, mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            k_cols = k_ptr + bh * n * 2 * D + cols[None, :] * (2 * D) + d[:, None]  # D x BLOCK_N
            k_hi = tl.load(k_cols, mask=col_ok[None, :], other=0.0)
            k_lo = tl.load(k_cols + D, mask=col_ok[None, :], other=0.0)
            s = tl.dot(q_hi, k_hi)
            s = tl.dot(q_hi, k_lo, s)
            s = tl.dot(q_lo, k_hi, s)
            s = tl.where(col_ok[None, :], s * scale_log2e, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_rows = v_ptr + bh * n * 2 * D + cols[:, None] * (2 * D) + d[None, :]
            v_hi = tl.load(v_rows, mask=col_ok[:, None], other=0.0)
            v_lo = tl.load(v_rows + D, mask=col_ok[:, None], other=0.0)
            weights = p.to(tl.float16)
            acc = acc * alpha[:, None]
            acc = tl.dot(weights, v_hi, acc)
            acc = tl.dot(weights, v_lo, acc)
            m_i = m_new
        out = acc / l_i[:, None]
        o_rows = o_ptr + bh * n * D + rows[:, None] * D + d[None, :]
        tl.store(o_rows, out, mask=row_ok[:, None])

    # block shapes timed on the GPU at the first call per (n, D); the interpreter (tests on a CPU)
    # cannot time, and runs the plain kernel with the first of them
    CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in ((64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3))]
    _tuned_kernel = triton.autotune(configs=CONFIGS, key=["n", "D"])(_split_attention_kernel)
    _chosen: dict[tuple[int, int], Any] = {}  # (n, D) -> the config the last eager call of that size ran

    def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, launcher: Any) -> torch.Tensor:
        b, h, n, width = (int(s) for s in q.shape)
        d = width // 2
        out = torch.empty(b, h, n, d, dtype=torch.float32, device=q.device)
        scale_log2e = float(scale) * 1.4426950408889634
        tracing = torch.compiler.is_compiling()
        if os.environ.get("TRITON_INTERPRET") == "1" or tracing:
            config = CONFIGS[0] if not tracing else _chosen.get((n, d), CONFIGS[0])
            grid = (triton.cdiv(n, config.kwargs["BLOCK_M"]), b * h)
            launcher(_split_attention_kernel)[grid](q, k, v, out, n, scale_log2e, D=d, num_warps=config.num_warps,
                                                    num_stages=config.num_stages, **config.kwargs)
            return out
        tuned: Any = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
        launcher(_tuned_kernel)[tuned](q, k, v, out, n, scale_log2e, D=d)
        if getattr(_tuned_kernel, "best_config", None) is not None:
            _chosen[(n, d)] = _tuned_kernel.best_config
        return out

    @torch.library.triton_op(OP_NAME, mutates_args=())
    def split_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """softmax(q k^T * scale) v from contiguous fp16 pieces B x H x N x 2D -> B x H x N x D fp32."""
        return _launch(q, k, v, scale, torch.library.wrap_triton)


def split_attention(q_pieces: torch.Tensor, k_pieces: torch.Tensor, v_pieces: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v from fp16 pieces B x H x N x 2D (``[x_hi | x_lo]`` per row, as
    ``split_products.laid_out(x, float16, "ht")`` writes them) -> B x H x N x D fp32. Eager calls,
    torch.compile and torch.export all run the registered op."""
    q, k, v = (t.contiguous() for t in (q_pieces, k_pieces, v_pieces))
    return torch.ops.matchrt_roma.split_attention(q, k, v, float(scale))


__all__ = ["MAX_HEAD", "MIN_HEAD", "OP_NAME", "split_attention", "usable"]


