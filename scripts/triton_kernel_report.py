"""matchrt's Triton kernels compiled for an H100/H200 (sm_90) without a GPU: registers, spill stack, and global
loads and stores by width, at the shapes the matchers run them.

What it catches: register spills (a stack of kilobytes: every spilled value goes through local memory) and
stores or loads split into 2-byte pieces where the compiler could not prove an alignment (``st.global.b16``
where ``st.global.v4.b32``, 16-byte vectors, were meant). Session 16 found both this way: matchrt.depthwise
spilled at roma_plus's refiner shapes (255 registers and a stack, or 32 registers and 3-5 KB of stack), and the
piece kernel stored every bf16 alone in rows of 3k + 8 elements. Timings still need a GPU: this is a first look.

    python scripts/triton_kernel_report.py [depthwise] [pieces] [other]   (default: all)
Needs Triton with its CUDA backend (the CUDA wheels ship ptxas and cuobjdump); no GPU, no network.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from matchrt import depthwise
from matchrt.plugins.eloftr import candidate_kernel, lse_kernel
from matchrt.plugins.roma_plus import attention_kernel, kde_kernel, piece_kernel
from matchrt.plugins.roma_plus.split_products import BIAS_PIECES, extra_columns

TARGET = GPUTarget("cuda", 90, 32)


def compiled(kernel: Any, args: dict[str, Any], constants: dict[str, Any], warps: int) -> Any:
    """Compile ``kernel`` as a launch with ``args`` would: pointers are given as "*fp16"-style type
    strings (assumed 16-byte aligned, as torch allocates), integers as values (marked divisible by 16
    when they are, specialised to a constant when 1, as Triton's launcher does), floats as floats."""
    names = kernel.arg_names
    signature: dict[str, str] = {}
    consts = dict(constants)
    marked = []
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            marked.append(names.index(name))
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                marked.append(names.index(name))
    attrs = {(i,): [["tt.divisibility", 16]] for i in marked}
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": warps})


def report(name: str, kernel: Any, args: dict[str, Any], constants: dict[str, Any], warps: int) -> str:
    """One line: registers, stack bytes, global loads and stores by PTX instruction."""
    c = compiled(kernel, args, constants, warps)
    ptx = c.asm["ptx"]
    loads = Counter(re.findall(r"ld\.global(?:\.\w+)*", ptx))
    stores = Counter(re.findall(r"st\.global(?:\.\w+)*", ptx))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return (f"{name}: {regs.group(1) if regs else '?'} registers, stack {stack.group(1) if stack else '?'} B, "
            f"loads {dict(loads)}, stores {dict(stores)}")


def depthwise_row(c: int, s: int, k: int, stride: int, pad: int, bias: bool, relu: bool, label: str) -> str:
    """matchrt.depthwise over a 2 x c x s x s fp16 channels-last input, with the tiles it picks."""
    out_size = depthwise.output_size(s, k, stride, pad)
    bc, bh, bw = depthwise.tiles(c, out_size)
    consts = dict(C=c, K=k, STRIDE=stride, PAD=pad, HAS_BIAS=bias, RELU=relu, ROUND_X=False, BLOCK_C=bc,
                  BLOCK_H=bh, BLOCK_W=bw)
    if "EVEN_C" in depthwise._depthwise_kernel.arg_names:
        consts["EVEN_C"] = c % bc == 0
    args = dict(x_ptr="*fp16", w_ptr="*fp32", b_ptr="*fp32", y_ptr="*fp16", H=s, W=s, HO=out_size, WO=out_size,
                tiles_w=-(-out_size // bw))
    return report(f"{label} {c} x {s}^2 {(bc, bh, bw)}", depthwise._depthwise_kernel, args, consts, 4)


def depthwise5_row(c: int, s: int) -> str:
    """matchrt.depthwise's 5 x 5 row kernel (four input rows a step, + bias, ReLU) over a 2 x c x s x s
    fp16 channels-last input, with the blocks and warps it picks."""
    bc, bw, band, warps = depthwise.row_tiles(c, s)
    consts = dict(C=c, C_PAD=-(-c // bc) * bc, HAS_BIAS=True, RELU=True, ROUND_X=False, BLOCK_C=bc, BLOCK_W=bw,
                  BAND=band, EVEN_C=c % bc == 0)
    args = dict(x_ptr="*fp16", w_ptr="*fp32", b_ptr="*fp32", y_ptr="*fp16", H=s, W=s, bands=-(-s // band))
    return report(f"depthwise 5x5 rows {c} x {s}^2 {(bc, bw, band)} {warps} warps", depthwise._depthwise5_rows_kernel,
                  args, consts, warps)


def depthwise_rows() -> list[str]:
    shapes = [(1384, 35), (1144, 70), (576, 140), (144, 280), (24, 560), (1144, 108), (576, 216), (144, 432),
              (24, 864)]
    # roma_plus's refiners: 5 x 5, stride 1, padding 2, + bias, ReLU (the row kernel); eloftr 832's query
    # pooling: 4 x 4, stride 4 (the tile kernel)
    return ([depthwise5_row(c, s) for c, s in shapes]
            + [depthwise_row(256, 104, 4, 4, 0, False, False, "depthwise 4x4/4 (eloftr)")])


def piece_rows() -> list[str]:
    out = []
    # heads: the proj input read from attention's fp16 output (B x N x 16 heads x 2 x 64, two halves summed)
    for name, k, ones, gelu, norm, heads in (("qkv / fc1 input, LayerNorm", 1024, BIAS_PIECES, False, True, 0),
                                             ("proj input from attention's halves", 64, BIAS_PIECES, False, False, 16),
                                             ("fc2 input, GELU", 4096, BIAS_PIECES, True, False, 0),
                                             ("attention operand", 64, 0, False, False, 0)):
        width = 3 * k * max(heads, 1)
        out_width = width + extra_columns(width, ones)
        block_k = triton.next_power_of_2(k) if norm else min(triton.next_power_of_2(k), 512)
        block_r = max(1, 4096 // block_k)
        consts = dict(SLOTS=3, TAIL0=False, TAIL1=False, TAIL2=True, ONES=ones, EXTRA=out_width - width,
                      EXTRA_BLOCK=triton.next_power_of_2(max(out_width - width, 1)), GELU=gelu, NORM=norm,
                      BLOCK_R=block_r, BLOCK_K=block_k)
        names = piece_kernel._pieces_kernel.arg_names
        if "ROW_ALIGN" in names:
            consts["ROW_ALIGN"] = piece_kernel.row_alignment(out_width)
        if "HEAD_COLUMNS" in names:
            consts.update(HALVES=2 if heads else 1, HEAD_COLUMNS=bool(heads))
        args = dict(x_ptr="*fp16" if heads else "*fp32", out_ptr="*bf16", norm_w_ptr="*fp32", norm_b_ptr="*fp32",
                    eps=1e-6, rows=3200 * max(heads, 1), k=k, d1=3200 if heads else 1, d2=heads or 3200,
                    s0=0, s1=heads * 2 * k if heads else 0, s2=2 * k if heads else k, s3=1, out_width=out_width)
        warps = 4 if block_k * block_r <= 4096 else 8
        out.append(report(f"pieces {name} (k={k}, row {out_width})", piece_kernel._pieces_kernel, args, consts, warps))
    return out


def other_rows() -> list[str]:
    out = []
    rows = cols = 10816  # eloftr 832: 104^2 coarse cells
    args = dict(sim_ptr="*fp16", row_max_ptr="*fp32", row_sum_ptr="*fp32", col_max_ptr="*fp32", col_sum_ptr="*fp32",
                L=rows, S=cols, chunk=rows // 4, n_chunks=4, scale=0.1)
    out.append(report("eloftr log-sum-exp partials", lse_kernel._lse_partials_kernel, args,
                      dict(ROUND_SIM=False, BLOCK_L=lse_kernel.BLOCK_L, BLOCK_S=lse_kernel.BLOCK_S), lse_kernel.WARPS))
    args = dict(sim_ptr="*fp16", row_ptr="*fp32", col_ptr="*fp32", keys_ptr="*i64", count_ptr="*i32", L=rows, S=cols,
                cap=65536, scale=0.1, threshold=0.2, log_floor=-2.0)
    out.append(report("eloftr candidates", candidate_kernel._candidates_kernel, args,
                      dict(ROUND_SIM=False, BLOCK_L=8, BLOCK_S=128), 4))
    config = attention_kernel.CONFIGS[0]
    args = dict(q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", o_ptr="*fp32", n=1600, scale_log2e=0.13)
    consts = dict(D=128, BLOCK_M=config.kwargs["BLOCK_M"], BLOCK_N=config.kwargs["BLOCK_N"])
    out.append(report(f"roma_plus decoder split attention {config.kwargs}", attention_kernel._split_attention_kernel,
                      args, consts, config.num_warps))
    args = dict(x_ptr="*fp32", out_ptr="*fp32", n=20000, dim=4, neg_scale_log2e=-0.5)
    out.append(report("roma_plus KDE", kde_kernel._kde_kernel, args, dict(DIM=4, BLOCK_M=64, BLOCK_N=128), 8))
    return out


def main() -> None:
    groups = {"depthwise": depthwise_rows, "pieces": piece_rows, "other": other_rows}
    chosen = sys.argv[1:] or list(groups)
    unknown = [g for g in chosen if g not in groups]
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}: choose from {', '.join(groups)}")
    for group in chosen:
        for line in groups[group]():
            print(line, flush=True)


if __name__ == "__main__":
    main()
