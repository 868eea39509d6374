"""Depth-wise convolutions (optionally + ReLU) as one Triton pass over channels-last activations.

Why: eloftr pools its attention queries with a 4 x 4 stride-4 depth-wise convolution (16 calls a
pair), for which cuDNN runs a grouped kernel (0.385 ms of a pair's compiled fp16 time on an
H100); a direct pass over the channels-last activation does the same work near the memory's pace.
The kernel also handles stride 1 with padding, + bias and ReLU (a ReLU read and write saved).

5 x 5 stride-1 convolutions (roma_plus's refiner blocks, 24 to 1384 channels) run a second
kernel, the row kernel: a program walks down a band of output rows and loads each input row once,
adding it into the five output rows it touches (5 loads per output instead of 25). Its tap loads
bounded it (L1 traffic), so it takes four input rows a step, each tap load serving all four. On an
H200, summed over a roma_plus pair's 81 calls: 8.15 ms, against 10.30 with two rows a step and
14.80 for cuDNN + ReLU (sessions 18-19). roma_plus's compiled refiners run it by default
(``-O refiner_depthwise=cudnn`` keeps cuDNN). In fp16 runs roma_plus asks it for fp16 products and sums
(``half_sums``, ``refiner_depthwise=rows-half``, its default since session 28): packed fp16 multiply-adds
and no conversions, 5.9 against 7.9 ms over a pair's calls on an H200, errors about four times fp32 sums'.

`DepthwiseConv2d` is an ``nn.Conv2d`` (same parameters, same state-dict keys, same ONNX Conv node)
whose forward, on CUDA tensors under torch with Triton, calls ``matchrt::depthwise_conv2d``: a
``torch.library.triton_op``, so Inductor and AOTInductor keep it inside their graphs and CUDA
graphs. Each program computes a tile of output pixels x channels, reading the channel-contiguous
input tap by tap (the channel count is a compile-time constant, so the loads are aligned vectors)
and accumulating in fp32; bias and ReLU are applied in registers before the one store. Under
autocast it computes as autocast's convolution does: input, weight and bias rounded to the
autocast dtype, fp32 accumulation, output in that dtype. ONNX export and CPUs run the ordinary
convolution (and ReLU).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .triton_ops import op_runs_on, tl, triton  # None without Triton or torch's triton_op: the ordinary convolution

OP_NAME = "matchrt::depthwise_conv2d"
TILE_ELEMENTS = 4096  # output pixels x channels per program (4 warps: 32 fp32 accumulators per thread)
# columns x channels of the 5 x 5 row kernel's accumulators (8 of them; 4 warps: 32 fp32 a thread). Its
# blocks and warps were the fastest at roma_plus's refiner shapes on an H200 (session 19's micro-benchmark:
# four input rows a step, 8.15 ms a pair against 10.30 with two rows a step and 14.80 for cuDNN + ReLU)
ROW_ELEMENTS = 512
ROW_STEP = 4  # input rows a step: a band is a whole number of steps


def usable(x: torch.Tensor) -> bool:
    """Can the Triton kernel run on ``x``: a 4-D CUDA tensor of at most 2^31 elements per image (INT32
    offsets), Triton importable, not an ONNX export?"""
    return (op_runs_on(x) and x.dim() == 4 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x[:1].numel() < 2**31)


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of one spatial axis (dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def tiles(channels: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W) of one program's tile: the largest channel block (128 to 16) that
    pads the channels by at most 1/16 (else 32, or fewer for narrow inputs), pixels for the rest of
    TILE_ELEMENTS, rows of up to 16."""
    fitting = [b for b in (128, 64, 32, 16) if (-channels % b) * 16 <= channels]
    block_c = fitting[0] if fitting else min(32, triton.next_power_of_2(max(channels, 1)))
    pixels = max(16, TILE_ELEMENTS // block_c)
    block_w = min(16, triton.next_power_of_2(max(width, 1)))
    return block_c, max(1, pixels // block_w), block_w


def row_tiles(channels: int, width: int, half_sums: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_W, BAND, warps) of the 5 x 5 row kernel: 32 channels (fewer, a power of two, for
    narrower inputs; 16 where that divides the channels and 32 does not, as roma_plus's 144), columns
    for the rest of ROW_ELEMENTS (at least 16, at most the width's power of two), bands of 32 output
    rows, 4 warps (2 for 16-channel blocks): the blocks measured fastest at roma_plus's nine refiner
    shapes (session 19, one H200). With ``half_sums`` (packed fp16 arithmetic, half the registers) the
    same blocks on 4 warps, and 2 for inputs of at most 32 channels (session 28's sweep, one H200)."""
    block_c = min(32, 1 << (max(channels, 1) - 1).bit_length())
    warps = 4
    if channels % 32 and channels % 16 == 0:
        block_c, warps = 16, 2
    if half_sums:
        warps = 2 if channels <= 32 else 4
    block_w = max(16, ROW_ELEMENTS // block_c)
    block_w = min(block_w, max(16, 1 << (max(width, 1) - 1).bit_length()))
    return block_c, block_w, 32, warps


def takes_rows(kernel: int, stride: int, padding: int) -> bool:
    """Is this convolution the row kernel's (5 x 5, stride 1, padding 2: roma_plus's refiner blocks)?"""
    return kernel == 5 and stride == 1 and padding == 2


if triton is not None:

    @triton.jit
    def _store_row(y_img, oh, keep, H, W, ow, c, c_ok, acc, shift, C: tl.constexpr, HAS_BIAS: tl.constexpr,
                   RELU: tl.constexpr, EVEN_C: tl.constexpr):
        # output row oh (+ bias, ReLU) stored when `keep` and inside the image
        if HAS_BIAS:
            acc += shift[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        limit = tl.where(keep & (oh < H), W, 0)
        dst = y_img + oh * W * C + (ow * C)[:, None] + c[None, :]
        if EVEN_C:
            tl.store(dst, acc.to(dst.dtype.element_ty), mask=(ow < limit)[:, None])
        else:
            tl.store(dst, acc.to(dst.dtype.element_ty), mask=(ow < limit)[:, None] & c_ok[None, :])

    @triton.jit
    def _quad_column(a0, a1, a2, a3, n4, n5, n6, n7, x0, x1, x2, x3, w_ptr, kx: tl.constexpr, c,
                     C_PAD: tl.constexpr, dtype: tl.constexpr, ROUND_X: tl.constexpr, ACC: tl.constexpr):
        # kernel column kx against four input rows ih .. ih+3 (shifted by kx - 2): row ih+r adds into
        # the outputs ih+r-2 .. ih+r+2, held as a0..a3 (ih-2 .. ih+1) and n4..n7 (ih+2 .. ih+5); each
        # tap is loaded once for the four rows
        if ROUND_X:  # autocast's cast of the input, done in registers
            x0, x1, x2, x3 = x0.to(dtype), x1.to(dtype), x2.to(dtype), x3.to(dtype)
        x0 = x0.to(ACC)
        x1 = x1.to(ACC)
        x2 = x2.to(ACC)
        x3 = x3.to(ACC)
        w = tl.load(w_ptr + (20 + kx) * C_PAD + c)[None, :]  # kernel row 4
        a0 += x0 * w
        a1 += x1 * w
        a2 += x2 * w
        a3 += x3 * w
        w = tl.load(w_ptr + (15 + kx) * C_PAD + c)[None, :]  # kernel row 3
        a1 += x0 * w
        a2 += x1 * w
        a3 += x2 * w
        n4 += x3 * w
        w = tl.load(w_ptr + (10 + kx) * C_PAD + c)[None, :]  # kernel row 2
        a2 += x0 * w
        a3 += x1 * w
        n4 += x2 * w
        n5 += x3 * w
        w = tl.load(w_ptr + (5 + kx) * C_PAD + c)[None, :]  # kernel row 1
        a3 += x0 * w
        n4 += x1 * w
        n5 += x2 * w
        n6 += x3 * w
        w = tl.load(w_ptr + kx * C_PAD + c)[None, :]  # kernel row 0
        n4 += x0 * w
        n5 += x1 * w
        n6 += x2 * w
        n7 += x3 * w
        return a0, a1, a2, a3, n4, n5, n6, n7

    @triton.jit
    def _input_at(x_img, ih, H, W, iw, c, c_ok, C: tl.constexpr, EVEN_C: tl.constexpr):
        # input row ih at columns iw, channels c; zeros outside the image. The column limit is W inside
        # the image and 0 outside (every load masked off): a scalar limit rather than a scalar
        # condition, as Triton's interpreter refuses a bool scalar & a vector
        limit = tl.where((ih >= 0) & (ih < H), W, 0)
        ok = (iw >= 0) & (iw < limit)
        ptrs = x_img + ih * W * C + (iw * C)[:, None] + c[None, :]
        if EVEN_C:  # the channels fill the blocks: no channel mask that would split the vector loads
            x = tl.load(ptrs, mask=ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0)
        return x

    @triton.jit
    def _depthwise5_rows_kernel(x_ptr, w_ptr, b_ptr, y_ptr, H, W, bands, C: tl.constexpr, C_PAD: tl.constexpr,
                                HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ROUND_X: tl.constexpr,
                                BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BAND: tl.constexpr,
                                EVEN_C: tl.constexpr, HALF_SUMS: tl.constexpr):
        # A 5 x 5, stride-1, zero-padding-2 depth-wise convolution walking down a band of BAND output
        # rows (a multiple of 4), four input rows a step. Each input row is loaded once at each of the
        # five column shifts (mostly L1 hits) and added into the five output rows it touches, held as
        # eight rotating fp32 accumulators: a0..a3 the outputs ih-2 .. ih+1, complete after the step,
        # n4..n7 the four begun in it. A tap's load serves four rows: tap loads, not DRAM, bounded the
        # kernel with one row a step (half the speed) and two (a fifth slower; sessions 18-19).
        pid = tl.program_id(0)
        band = pid % bands
        col = pid // bands
        b = tl.program_id(2).to(tl.int64)
        ow = col * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        x_img = x_ptr + b * H * W * C
        y_img = y_ptr + b * H * W * C
        dtype = y_ptr.dtype.element_ty
        ACC: tl.constexpr = tl.float16 if HALF_SUMS else tl.float32  # products and sums: fp16 pairs or fp32
        row0 = band * BAND
        shift = tl.load(b_ptr + c)  # (the taps when there is no bias: not used)
        a0 = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
        a1 = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
        a2 = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
        a3 = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
        for i in range(0, BAND + 4, 4):
            ih = row0 - 2 + i
            n4 = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
            n5 = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
            n6 = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
            n7 = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC)
            for kx in tl.static_range(5):
                iw = ow + (kx - 2)
                x0 = _input_at(x_img, ih, H, W, iw, c, c_ok, C, EVEN_C)
                x1 = _input_at(x_img, ih + 1, H, W, iw, c, c_ok, C, EVEN_C)
                x2 = _input_at(x_img, ih + 2, H, W, iw, c, c_ok, C, EVEN_C)
                x3 = _input_at(x_img, ih + 3, H, W, iw, c, c_ok, C, EVEN_C)
                a0, a1, a2, a3, n4, n5, n6, n7 = _quad_column(a0, a1, a2, a3, n4, n5, n6, n7, x0, x1, x2, x3,
                                                              w_ptr, kx, c, C_PAD, dtype, ROUND_X, ACC)
            # rows ih - 2 .. ih + 1 are complete: stored where they are the band's rows
            _store_row(y_img, ih - 2, i >= 4, H, W, ow, c, c_ok, a0, shift, C, HAS_BIAS, RELU, EVEN_C)
            _store_row(y_img, ih - 1, i >= 4, H, W, ow, c, c_ok, a1, shift, C, HAS_BIAS, RELU, EVEN_C)
            _store_row(y_img, ih, i >= 4, H, W, ow, c, c_ok, a2, shift, C, HAS_BIAS, RELU, EVEN_C)
            _store_row(y_img, ih + 1, i >= 4, H, W, ow, c, c_ok, a3, shift, C, HAS_BIAS, RELU, EVEN_C)
            a0, a1, a2, a3 = n4, n5, n6, n7

    def _launch_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool,
                     dtype: torch.dtype, launcher: Any, block: Optional[tuple[int, int, int]] = None,
                     warps: Optional[int] = None, maxnreg: Optional[int] = None,
                     half_sums: bool = False) -> torch.Tensor:
        """The row kernel over x; ``block`` (BLOCK_C, BLOCK_W, BAND), ``warps`` and ``maxnreg`` (a register
        cap per thread) override ``row_tiles``'s choice, for the micro-benchmark's sweeps. ``half_sums``
        with ``dtype`` fp16: products and sums in fp16 (see ``depthwise_conv2d``)."""
        half_sums = half_sums and dtype == torch.float16
        n, c, h, w = (int(v) for v in x.shape)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.empty_strided((n, c, h, w), (c * h * w, 1, w * c, c), dtype=dtype, device=x.device)
        block_c, block_w, band, default_warps = row_tiles(c, w, half_sums)
        if block is not None:
            block_c, block_w, band = block
        if band % ROW_STEP:
            raise ValueError(f"the row kernel's bands must be a multiple of its {ROW_STEP} rows a step, not {band}")
        # taps 25 x C_PAD: rounded as autocast rounds them, held in fp32 (a tap's load then needs no
        # conversion: converting fp16 taps took as many instructions as the multiply-adds), and
        # padded with zeros to whole channel blocks, so that the kernel loads them without masks
        c_pad = triton.cdiv(c, block_c) * block_c
        acc = dtype if half_sums else torch.float32
        taps = F.pad(weight.reshape(c, 25).to(dtype).to(acc), (0, 0, 0, c_pad - c)).t().contiguous()
        shift = F.pad(bias.to(dtype).to(acc), (0, c_pad - c)) if bias is not None else taps
        bands = triton.cdiv(h, band)
        grid = (bands * triton.cdiv(w, block_w), triton.cdiv(c, block_c), n)
        launcher(_depthwise5_rows_kernel)[grid](
            x, taps, shift, y, h, w, bands, C=c, C_PAD=c_pad, HAS_BIAS=bias is not None, RELU=relu,
            ROUND_X=x.dtype != dtype, BLOCK_C=block_c, BLOCK_W=block_w, BAND=band, EVEN_C=c % block_c == 0,
            HALF_SUMS=half_sums,
            num_warps=warps or default_warps, **({"maxnreg": maxnreg} if maxnreg else {}))
        return y

    @triton.jit
    def _depthwise_kernel(x_ptr, w_ptr, b_ptr, y_ptr, H, W, HO, WO, tiles_w, C: tl.constexpr, K: tl.constexpr,
                          STRIDE: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                          ROUND_X: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_W: tl.constexpr, EVEN_C: tl.constexpr):
        # channels-last input and output: a pixel's C channels are contiguous, and C is a
        # compile-time constant, so the compiler knows each pixel's alignment and loads whole vectors
        # (EVEN_C: the channels fill the blocks, no channel mask that would split them). The kernel
        # rows are a loop, not unrolled: unrolled, the 25 taps' loads were hoisted together and took
        # all 255 registers with spills (ptxas, sm_90, 576 channels); as a loop about 106.
        tile = tl.program_id(0)
        b = tl.program_id(2).to(tl.int64)
        p = tl.arange(0, BLOCK_H * BLOCK_W)
        oh = (tile // tiles_w) * BLOCK_H + p // BLOCK_W
        ow = (tile % tiles_w) * BLOCK_W + p % BLOCK_W
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ih0 = oh * STRIDE - PAD
        iw0 = ow * STRIDE - PAD
        src0 = x_ptr + b * H * W * C + c[None, :] + ((ih0 * W + iw0) * C)[:, None]  # each tap: + one scalar
        acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
        for ky in range(K):
            ih = ih0 + ky
            h_ok = (ih >= 0) & (ih < H)
            for kx in tl.static_range(K):
                iw = iw0 + kx
                ok = h_ok & (iw >= 0) & (iw < W)
                src = src0 + (ky * W + kx) * C
                if EVEN_C:
                    x = tl.load(src, mask=ok[:, None], other=0.0)
                else:
                    x = tl.load(src, mask=ok[:, None] & c_ok[None, :], other=0.0)
                if ROUND_X:  # autocast's cast of the input, done in registers
                    x = x.to(y_ptr.dtype.element_ty)
                w = tl.load(w_ptr + (ky * K + kx) * C + c, mask=c_ok, other=0.0)  # taps stored K*K x C
                acc += x.to(tl.float32) * w[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=c_ok, other=0.0)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        out = y_ptr + b * HO * WO * C + ((oh * WO + ow) * C)[:, None] + c[None, :]
        if EVEN_C:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=((oh < HO) & (ow < WO))[:, None])
        else:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=((oh < HO) & (ow < WO))[:, None] & c_ok[None, :])

    def _launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
                relu: bool, dtype: torch.dtype, launcher: Any, block: Optional[tuple[int, int, int]] = None,
                warps: int = 4) -> torch.Tensor:
        n, c, h, w = (int(v) for v in x.shape)
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op for the module's inputs
        k = int(weight.shape[-1])
        ho, wo = output_size(h, k, stride, padding), output_size(w, k, stride, padding)
        y = torch.empty_strided((n, c, ho, wo), (c * ho * wo, 1, wo * c, c), dtype=dtype, device=x.device)
        # weights and bias rounded to the compute dtype as autocast casts them, then read in fp32
        taps = weight.reshape(c, k * k).to(dtype).float().t().contiguous()  # K*K x C: a tap's channels in a row
        shift = bias.to(dtype).float().contiguous() if bias is not None else taps
        block_c, block_h, block_w = block or tiles(c, wo)
        tiles_w = triton.cdiv(wo, block_w)
        grid = (triton.cdiv(ho, block_h) * tiles_w, triton.cdiv(c, block_c), n)
        launcher(_depthwise_kernel)[grid](
            x, taps, shift, y, h, w, ho, wo, tiles_w, C=c, K=k, STRIDE=stride, PAD=padding,
            HAS_BIAS=bias is not None, RELU=relu, ROUND_X=x.dtype != dtype, BLOCK_C=block_c, BLOCK_H=block_h,
            BLOCK_W=block_w, EVEN_C=c % block_c == 0, num_warps=warps)
        return y

    def _launch_for(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
                    relu: bool, dtype: torch.dtype, launcher: Any, half_sums: bool = False) -> torch.Tensor:
        """The row kernel for 5 x 5 stride-1 padding-2 convolutions, the tile kernel for the others
        (``half_sums`` only acts on the row kernel)."""
        if takes_rows(int(weight.shape[-1]), stride, padding):
            return _launch_rows(x, weight, bias, relu, dtype, launcher, half_sums=half_sums)
        return _launch(x, weight, bias, stride, padding, relu, dtype, launcher)

    @torch.library.triton_op(OP_NAME, mutates_args=())
    def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                         padding: int, relu: bool, dtype: torch.dtype, half_sums: bool = False) -> torch.Tensor:
        """Depth-wise convolution of x (N x C x H x W) by weight (C x 1 x K x K), square kernel and
        stride, zero padding, + bias, then ReLU when `relu`; computed from operands rounded to
        `dtype`, accumulated in fp32, returned in `dtype`, channels-last. 5 x 5 stride-1 padding-2
        convolutions run the row kernel; with `half_sums` and `dtype` fp16 it multiplies and sums in
        fp16 (packed pairs, no conversions: 5.9 against 7.9 ms over roma_plus's 81 calls a pair in
        session 28's micro-benchmark on an H200; errors about 4x fp32 sums', 3e-3 of the largest
        output there)."""
        return _launch_for(x, weight, bias, stride, padding, relu, dtype, torch.library.wrap_triton, half_sums)


def _kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
            relu: bool, dtype: torch.dtype, half_sums: bool = False) -> torch.Tensor:
    """The registered op on a channels-last copy of x (no copy when x is channels-last already):
    channels-last in and out, the channel-contiguous reads the kernel is fast on."""
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.matchrt.depthwise_conv2d(x, weight, bias, stride, padding, relu, dtype, half_sums)


def _forward(conv: nn.Conv2d, x: torch.Tensor, relu: bool, half_sums: bool = False) -> torch.Tensor:
    """``conv(x)`` (then ReLU) for a depth-wise convolution: the Triton kernel on CUDA where no
    gradient is wanted (it has no backward), else the convolution itself. Under autocast the kernel
    computes as autocast's convolution does (operands rounded to the autocast dtype, output in it)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters()))
    if needs_grad or not usable(x):
        y = nn.Conv2d.forward(conv, x)
        return F.relu(y) if relu else y
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return _kernel(x, conv.weight, conv.bias, int(conv.stride[0]), int(conv.padding[0]), relu, dtype, half_sums)


def _checked(conv: nn.Conv2d) -> None:
    """Refuse convolutions the kernel does not compute (the module then cannot be built)."""
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if not (conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1):
        raise ValueError(f"not a depth-wise convolution: {conv}")
    if k[0] != k[1] or s[0] != s[1] or isinstance(p, str) or p[0] != p[1] or conv.dilation != (1, 1) \
            or conv.padding_mode != "zeros":
        raise ValueError(f"only square kernels, strides and zero paddings, dilation 1: {conv}")


class DepthwiseConv2d(nn.Conv2d):
    """A depth-wise ``nn.Conv2d`` (optionally followed by ReLU) that runs the Triton kernel on CUDA.

    Parameters and state-dict keys are the convolution's; on CPUs and in ONNX exports the forward is
    ``relu(conv(x))`` (or ``conv(x)``), so exported graphs hold the ordinary Conv (+ Relu) nodes.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True,
                 relu: bool = False, device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(channels, channels, kernel_size, stride, padding, groups=channels, bias=bias,
                         device=device, dtype=dtype)
        self.relu = relu

    @classmethod
    def like(cls, conv: nn.Conv2d, relu: bool = False) -> "DepthwiseConv2d":
        """The same convolution (sharing its parameters) as a DepthwiseConv2d, with ReLU if asked."""
        _checked(conv)
        out = cls(conv.in_channels, conv.kernel_size[0], conv.stride[0], int(conv.padding[0]),
                  bias=conv.bias is not None, relu=relu, device="meta")
        out.weight = conv.weight
        out.bias = conv.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self, x, self.relu)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


def conv_relu(conv: nn.Conv2d, x: torch.Tensor, half_sums: bool = False) -> torch.Tensor:
    """``relu(conv(x))`` for a depth-wise ``conv`` in inference: the Triton kernel (convolution, bias
    and ReLU in one pass) where it runs, else the convolution and ReLU. Under autocast it computes
    as autocast's convolution does (operands rounded to the autocast dtype, output in that dtype);
    ``half_sums``: in fp16 runs, the row kernel's products and sums in fp16."""
    _checked(conv)
    return _forward(conv, x, True, half_sums)


def interpreted(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
                relu: bool = False, dtype: Optional[torch.dtype] = None, half_sums: bool = False) -> torch.Tensor:
    """The kernel launched directly (Triton's CPU interpreter in tests: TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("Triton (with torch >= 2.6) is not installed")
    return _launch_for(x, weight, bias, stride, padding, relu, dtype or x.dtype, lambda kernel: kernel, half_sums)


__all__ = ["DepthwiseConv2d", "OP_NAME", "conv_relu", "interpreted", "output_size", "row_tiles", "takes_rows", "tiles",
           "usable"]
