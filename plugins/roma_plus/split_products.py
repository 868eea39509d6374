"""fp32 matrix products of the coarse stage as split products on tensor cores ("x3" and "x2" policies).

An fp32 operand is the sum of a head and a tail that a tensor core reads exactly, ``x = x_hi + x_lo``,
and ``x W^T`` = x_hi W_hi^T + x_lo W_hi^T + x_hi W_lo^T (x_lo W_lo^T, about 2^-16 of it or less,
dropped). The three products are one matrix product over threefold depth,
``[x_hi | x_lo | x_hi] @ [W_hi | W_hi | W_lo]^T``, accumulated in fp32, with the weight side built
once. Three kinds of pieces:

- ``tf32x3``: heads of TF32's 10 mantissa bits (bit mask), tails in fp32, TF32 tensor cores.
- ``bf16x3``: bf16 head and bf16 tail (16 mantissa bits together), bf16 tensor cores at twice the
  TF32 rate, fp32 output (``torch.mm(..., out_dtype=torch.float32)``); bf16 keeps fp32's range.
  The bias rides in the same product: three bf16 pieces of it as extra weight columns against
  columns of ones in the activations (no separate pass over the output to add it).
  Measured on an H100 for DINOv2's fc1 and fc2 at 560 (3202 tokens), against fp64: IEEE fp32
  0.72 / 0.59 ms, mean relative error 5.0e-7; tf32x3 0.32 / 0.45 ms, 1.1e-5 / 4.3e-5; bf16x3 0.20 /
  0.33 ms, 6.7e-6 / 2.1e-5 (splitting the activations included).
- ``bf16x2``: the activations as bf16 head and tail, the weights rounded to bf16 once:
  ``[x_hi | x_lo] @ [W_bf | W_bf]^T``, two thirds of bf16x3's depth. The error is the weights'
  rounding (2^-9 relative per weight): on the H200 at 560/864, rounding only the weights of these
  layers to bf16 flipped 0.53% of the coarse cells, rounding only their inputs to fp16 1.28%,
  +-0.5/255 input noise 1.75% (scripts/roma_fp16_check.py, sim-* variants). The bias rides in
  the product as for bf16x3.

``split_attention`` does the same for attention scores with fp16 pieces inside one fused
(flash) attention call: ``[q_hi | q_hi | q_lo] . [k_hi | k_lo | k_hi]`` over a threefold head
dimension gives the scores at about fp32's precision, and ``[v_hi | v_lo]`` the values; the kernel
still rounds the softmax weights to fp16 before multiplying them with the values (relative
error 2.2e-4 on an H100 for DINOv2's shapes, against 6.6e-4 for plain fp16 or TF32 attention and
9e-7 for IEEE fp32, at 0.31 ms a layer instead of 0.79).

Used by roma_plus's ``coarse_precision`` policies ``tf32x3``, ``bf16x3``, ``bf16x2`` (linear
layers of DINOv2 and the decoder) and ``bf16x3-flash``, ``bf16x2-flash`` (those and their
attention). On GPUs with the tensor cores for it (``split_pays``): torch runs, and AOTInductor
packages of the bf16 kinds (``traced_plain``, ``built_copy``); ONNX graphs, tf32x3 packages and CPUs
keep the plain fp32 layers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from matchrt.fold import fold_conv_bn, shallow_module_copy
from matchrt.plugins.roma_full.decoder import Block as DecoderBlock
from matchrt.plugins.roma_full.dinov2 import Attention, Block, Mlp, PatchEmbed
from matchrt.tf32 import tf32_switches

from . import attention_kernel, piece_kernel
from .refiner import is_pointwise

KINDS = ("tf32x3", "bf16x3", "bf16x3-flash", "bf16x2", "bf16x2-flash")
# the kinds an AOTInductor package keeps as split products (traced_plain): the bf16 ones. tf32x3's products
# need TF32, and a package has one TF32 setting, off where a coarse region must be IEEE fp32
PACKAGED_KINDS = tuple(kind for kind in KINDS if kind != "tf32x3")
BIAS_PIECES = 3  # bf16 pieces of an fp32 bias (8 + 8 + 8 bits of mantissa: all of fp32's 24)
OUT_ALIGN = 8  # output rows of bf16 split products: a multiple of 8 fp32 values (32 bytes)
_BLOCKS = (Block, DecoderBlock)  # the pre-norm transformer blocks split_linears turns into SplitBlocks
_TF32_MASK = -8192  # 0xFFFFE000 as int32: keeps sign, exponent and the 10 mantissa bits of TF32


def tf32_head(x: torch.Tensor) -> torch.Tensor:
    """x with the 13 mantissa bits TF32 does not hold cleared (exactly representable in TF32)."""
    return (x.float().contiguous().view(torch.int32) & _TF32_MASK).view(torch.float32)


def tf32_pieces(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(head, tail) of fp32 ``x`` for ``tf32x3``: the TF32 head and the fp32 rest (exact)."""
    x = x.float()
    head = tf32_head(x)
    return head, x - head


def extra_columns(width: int, ones: int) -> int:
    """Columns after ``width`` columns of pieces: ``ones`` columns of ones, then the zeros that
    make the row a multiple of 8 (16-byte rows for the tensor cores) when there are any ones."""
    return 0 if ones == 0 else ones + (-(width + ones)) % 8


def laid_out(x: torch.Tensor, dtype: torch.dtype, order: str, ones: int = 0, gelu: bool = False,
             norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
    """The half-precision pieces of fp32 ``x`` side by side on the last axis, in ``order`` ("h" the
    head ``dtype(x)``, "t" the tail ``dtype(x - head)``): e.g. "hht" -> [x_hi | x_hi | x_lo], then
    ``ones`` columns of ones and zero padding (``extra_columns``), which carry a split bias.

    Bit for bit what ``dtype(x)``, ``dtype(x - head)`` and ``torch.cat`` give: x - head is exact in
    fp32 and is rounded once, on the store. On a GPU one Triton pass writes everything
    (piece_kernel); elsewhere torch writes the slots in place into one buffer. ``gelu``: the pieces
    of GELU(x) (exact), applied in the same pass on a GPU; ``norm``: of that LayerNorm of x (last
    axis), likewise (a two-pass fp32 mean and variance: torch's own kernel rounds differently, by
    fp32 ulps).
    """
    k = int(x.shape[-1])
    width = len(order) * k
    if piece_kernel.usable(x) and (norm is None or k <= piece_kernel.NORM_MAX):
        params = None if norm is None else (norm.weight, norm.bias, float(norm.eps))
        return piece_kernel.pieces(x, width + extra_columns(width, ones), dtype, order, ones, gelu, params)
    out = torch.empty(*x.shape[:-1], width + extra_columns(width, ones), dtype=dtype, device=x.device)
    x = x.float() if norm is None else F.layer_norm(x.float(), (k,), norm.weight, norm.bias, norm.eps)
    x = F.gelu(x) if gelu else x
    slots = {"h": [], "t": []}  # type: dict[str, list[torch.Tensor]]
    for i, piece in enumerate(order):
        slots[piece].append(out[..., i * k:(i + 1) * k])
    head = slots["h"][0]
    head.copy_(x)
    for other in slots["h"][1:]:
        other.copy_(head)
    for tail in slots["t"]:
        torch.sub(x, head, out=tail)  # computed in fp32, rounded to dtype once
    if width < out.shape[-1]:
        out[..., width:width + ones] = 1
        out[..., width + ones:] = 0
    return out


def summed_halves(o: torch.Tensor, halves: int = 1) -> torch.Tensor:
    """``o`` in fp32; with ``halves=2`` each row is [a | b] and the result is a + b (split_attention's halves)."""
    t = o.float()
    if halves == 1:
        return t
    d = int(o.shape[-1]) // halves
    return t[..., :d] + t[..., d:]


def merged_heads(o: torch.Tensor, halves: int = 1) -> torch.Tensor:
    """Attention's output B x H x N x (halves * d) as the fp32 B x N x (H * d) rows the projection
    reads (the halves summed: ``summed_halves``)."""
    b, h, n, width = (int(s) for s in o.shape)
    return summed_halves(o, halves).transpose(1, 2).reshape(b, n, h * (width // halves))


def laid_out_heads(o: torch.Tensor, halves: int, dtype: torch.dtype, order: str, ones: int = 0) -> torch.Tensor:
    """``laid_out(merged_heads(o, halves), dtype, order, ones)``, bit for bit; on a GPU in one pass
    that reads attention's output where it lies (piece_kernel's ``head_columns``): no fp32 copy,
    no sum of the halves and no transposed copy of its own (three passes per DINOv2 layer)."""
    if not piece_kernel.usable(o) or o.dim() != 4:
        return laid_out(merged_heads(o, halves), dtype, order, ones)
    b, h, n, width = (int(s) for s in o.shape)
    k = h * (width // halves)
    return piece_kernel.pieces(o.transpose(1, 2), len(order) * k + extra_columns(len(order) * k, ones), dtype,
                               order, ones, halves=halves, head_columns=True)


def bias_pieces(bias: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An fp32 bias as BIAS_PIECES columns of ``dtype`` whose sum is the bias to fp32's precision
    (N x 3: head, middle, tail), so a matrix product against columns of ones adds it exactly."""
    rest = bias.detach().float()
    pieces = []
    for _ in range(BIAS_PIECES):
        pieces.append(rest.to(dtype))
        rest = rest - pieces[-1].float()
    return torch.stack(pieces, dim=-1)


def piece_orders(kind: str) -> tuple[str, str]:
    """(activation order, weight order) of a bf16 kind's pieces for ``laid_out``: bf16x3
    [x_hi | x_lo | x_hi] against [W_hi | W_hi | W_lo]; bf16x2 [x_hi | x_lo] against [W_bf | W_bf]."""
    return ("ht", "hh") if kind.startswith("bf16x2") else ("hth", "hht")


def split_operand(x: torch.Tensor, weight_side: bool, kind: str = "tf32x3",
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The activation (``weight_side`` False) or weight side of a split product along the last
    axis: [x_hi | x_lo | x_hi] or [W_hi | W_hi | W_lo]; bf16x2 [x_hi | x_lo] or [W_bf | W_bf].

    bf16 kinds with a ``bias`` (weight side) append its pieces (``bias_pieces``) and zero padding,
    to meet the activations' columns of ones (``laid_out(..., ones=BIAS_PIECES)``)."""
    if kind != "tf32x3":
        order = piece_orders(kind)[1 if weight_side else 0]
        if bias is None:
            return laid_out(x, torch.bfloat16, order)
        w = laid_out(x, torch.bfloat16, order, ones=BIAS_PIECES)  # room for the pieces, zeros after
        width = len(order) * int(x.shape[-1])
        w[..., width:width + BIAS_PIECES] = bias_pieces(bias)
        return w
    head, tail = tf32_pieces(x)
    return torch.cat((head, head, tail) if weight_side else (head, tail, head), dim=-1)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 matrices, accumulated in fp32, with an fp32 result (no rounding to bf16)."""
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # bf16 -> fp32 is exact, and so are the products of two bf16 values


def _addmm_fp32(residual: torch.Tensor, a: torch.Tensor, b: torch.Tensor, in_place: bool) -> torch.Tensor:
    """residual + a @ b (``_mm_fp32``'s product; residual fp32 M x N), the sum taken in the product's
    epilogue (cuBLAS's beta = 1), not in a pass of its own; ``in_place`` writes it into residual."""
    out = {"out": residual} if in_place else {}
    if a.device.type == "cuda" and torch.compiler.is_compiling():
        # traced (a package): AOTInductor has the fp32-output product (mm_dtype) but no addmm of it
        product = torch.mm(a, b, out_dtype=torch.float32)
        return residual.add_(product) if in_place else residual + product
    if a.device.type == "cuda":
        return torch.addmm(residual, a, b, out_dtype=torch.float32, **out)
    return torch.addmm(residual, a.float(), b.float(), **out)


def _with_residual(out: torch.Tensor, residual: Optional[torch.Tensor], in_place: bool) -> torch.Tensor:
    """out + residual (out alone without one), into residual with ``in_place``."""
    if residual is None:
        return out
    return residual.add_(out) if in_place else residual + out


class SplitLinear(nn.Module):
    """An ``nn.Linear`` computed as one split product (``kind``); shares the layer's weight and bias.

    ``out_scale`` (a per-output vector, DINOv2's LayerScale gamma) is folded into the split weights
    and bias (in float64): the product gives gamma * (W x + b) without a pass of its own.
    ``in_norm`` (the LayerNorm before the layer) is applied to x where the activations are split
    (bf16 kinds on a GPU: in the piece kernel's pass), not in a pass of its own.
    """

    def __init__(self, linear: nn.Linear, kind: str = "tf32x3", out_scale: Optional[nn.Parameter] = None,
                 in_norm: Optional[nn.LayerNorm] = None):
        super().__init__()
        self.linear = linear
        self.in_norm = in_norm
        self.kind = kind.removesuffix("-flash")  # tf32x3, bf16x3 or bf16x2
        self.out_scale = out_scale
        weight, scaled_bias = linear.weight.detach(), linear.bias
        if out_scale is not None:
            gamma = out_scale.detach().double()
            weight = (weight.double() * gamma[:, None]).to(weight.dtype)
            if scaled_bias is not None:
                scaled_bias = (scaled_bias.detach().double() * gamma).to(weight.dtype)
        self.register_buffer("bias_scaled", None if out_scale is None else scaled_bias, persistent=False)
        # built once, not a parameter (no checkpoint key): 3x the layer's weights (bf16x3: 1.5x, bf16x2: 1x);
        # bf16 kinds carry the bias in it too (three more columns, against columns of ones)
        bias = None if self.kind == "tf32x3" else scaled_bias
        self.ones = 0 if bias is None else BIAS_PIECES
        # bf16 kinds: outputs padded with zero rows to a multiple of OUT_ALIGN, so the fp32 result's
        # rows start 32-byte aligned (the decoder's head has 4097 outputs; at that width cuBLAS ran
        # an unaligned CUTLASS kernel, 0.91 ms a pair on an H200); forward returns the first ones
        self.out_features = int(weight.shape[0])
        pad = 0 if self.kind == "tf32x3" else (-self.out_features) % OUT_ALIGN
        if pad:
            weight = F.pad(weight, (0, 0, 0, pad))
            bias = F.pad(bias.detach(), (0, pad)) if bias is not None else None
        self.register_buffer("weight_split", split_operand(weight, True, self.kind, bias), persistent=False)

    def forward(self, x: torch.Tensor, gelu: bool = False, residual: Optional[torch.Tensor] = None,
                in_place: bool = False) -> torch.Tensor:
        """The layer's product of ``x`` (of GELU(x) with ``gelu``: see SplitMlp), plus ``residual``
        when given (a block's skip connection; written into it with ``in_place``)."""
        # traces that keep the plain layer (ONNX; tf32x3 under torch.export: a package has one TF32
        # setting, so its split products would run as three IEEE ones): see traced_plain
        if traced_plain(self.kind):
            x = x if self.in_norm is None else self.in_norm(x)
            out = self.linear(F.gelu(x) if gelu else x)
            return _with_residual(out if self.out_scale is None else out * self.out_scale, residual, in_place)
        if self.kind == "tf32x3":
            x = x if self.in_norm is None else self.in_norm(x)
            with tf32_switches(True):
                x = F.gelu(x) if gelu else x
                bias = self.linear.bias if self.out_scale is None else self.bias_scaled
                out = F.linear(split_operand(x, False, self.kind), self.weight_split, bias)
            return _with_residual(out, residual, in_place)
        xs = laid_out(x, torch.bfloat16, piece_orders(self.kind)[0], self.ones, gelu, self.in_norm)
        return self.product(xs, residual, in_place)

    def from_heads(self, o: torch.Tensor, halves: int, residual: Optional[torch.Tensor] = None,
                   in_place: bool = False) -> torch.Tensor:
        """``forward(merged_heads(o, halves), ...)``: the projection after attention, reading the
        attention's output B x H x N x (halves * d) where it lies (``laid_out_heads``)."""
        if self.kind == "tf32x3" or self.in_norm is not None:
            return self.forward(merged_heads(o, halves), residual=residual, in_place=in_place)
        xs = laid_out_heads(o, halves, torch.bfloat16, piece_orders(self.kind)[0], self.ones)
        return self.product(xs, residual, in_place)

    def product(self, xs: torch.Tensor, residual: Optional[torch.Tensor] = None, in_place: bool = False
                ) -> torch.Tensor:
        """The bf16 split product of activation pieces ``xs`` (... x width, ``laid_out``'s) with
        the split weights: ... x out_features fp32, plus ``residual`` (see forward)."""
        lead = xs.shape[:-1]
        xs = xs.reshape(-1, xs.shape[-1])
        if residual is not None and self.weight_split.shape[0] == self.out_features:
            if in_place and not residual.is_contiguous():
                raise ValueError("an in-place residual must be contiguous")
            out = _addmm_fp32(residual.reshape(-1, self.out_features), xs, self.weight_split.t(), in_place)
            return residual if in_place else out.reshape(*lead, self.out_features)
        out = _mm_fp32(xs, self.weight_split.t())[:, :self.out_features]
        return _with_residual(out.reshape(*lead, self.out_features), residual, in_place)


class SplitMlp(nn.Module):
    """roma_full's ``Mlp`` (fc1 -> exact GELU -> fc2) with split linears, the GELU applied where
    fc2 splits its input (one pass over the hidden activations instead of two: 29 GELU passes, 0.72
    ms a pair in the H200 profile of session 12); shares the module's weights."""

    def __init__(self, mlp: Mlp, kind: str, folded: Optional[dict[int, dict[str, Any]]] = None):
        super().__init__()
        self.fc1 = SplitLinear(mlp.fc1, kind, **_folded_into(mlp.fc1, folded))
        self.fc2 = SplitLinear(mlp.fc2, kind, **_folded_into(mlp.fc2, folded))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, in_place: bool = False
                ) -> torch.Tensor:
        """fc2(GELU(fc1(x))), plus ``residual`` when given (see SplitLinear.forward)."""
        return self.fc2(self.fc1(x), gelu=True, residual=residual, in_place=in_place)


def _linear_from_conv(conv: nn.Conv2d) -> nn.Linear:
    """A frozen ``nn.Linear`` whose rows are ``conv``'s filters flattened (in, kh, kw) and its bias:
    the convolution as a product over the patches (or pixels) it reads."""
    weight = conv.weight.detach()
    linear = nn.Linear(int(weight[0].numel()), int(weight.shape[0]), bias=conv.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.reshape(weight.shape[0], -1))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias.detach())
    return linear.requires_grad_(False)


class SplitPatchEmbed(nn.Module):
    """DINOv2's patch embedding (a 14 x 14 convolution of stride 14) as one split product over the
    image's patches (rows of 3 x 14 x 14 = 588), instead of cuDNN's IEEE fp32 convolution (0.25 ms
    a pair at 560 on an H200, an FFMA kernel). The bf16 kinds take bf16x3 here, whatever the
    policy's kind: the pieces of both sides, about fp32's precision (bf16x2 would round these
    weights to bf16, a rounding the precision rule's measurements did not include). Shares the
    convolution's weights; traced, the plain convolution runs."""

    def __init__(self, embed: PatchEmbed, kind: str):
        super().__init__()
        self.proj = embed.proj
        # the convolution's (out, c, kh, kw) weights are rows in the patches' order
        self.split = SplitLinear(_linear_from_conv(embed.proj), "tf32x3" if kind == "tf32x3" else "bf16x3")

    @staticmethod
    def splits(embed: nn.Module) -> bool:
        """Is ``embed`` a patch embedding this takes (non-overlapping patches, no padding or groups)?"""
        conv = getattr(embed, "proj", None)
        return (isinstance(embed, PatchEmbed) and isinstance(conv, nn.Conv2d) and conv.stride == conv.kernel_size
                and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x C x H/p x W/p, the convolution's output (a view of B x N x C)."""
        if traced_plain(self.split.kind):
            return self.proj(x)
        kh, kw = self.proj.kernel_size
        b, c, h, w = (int(s) for s in x.shape)
        gh, gw = h // kh, w // kw
        patches = x[:, :, :gh * kh, :gw * kw].reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
        out = self.split(patches.reshape(b, gh * gw, c * kh * kw))  # B x N x C
        return out.transpose(1, 2).reshape(b, -1, gh, gw)


class SplitPointwise(nn.Module):
    """A 1 x 1 convolution, with the eval-mode BatchNorm after it folded in (roma's proj.16:
    Conv2d(1024, 512, 1) + BatchNorm2d), as one split product over the pixels' channel rows,
    bf16x3 for every bf16 kind (about fp32's precision: the GP reads its output), instead of an
    IEEE fp32 FFMA convolution (0.30 ms a pair at 560 on an H200, session 21's profile). The input
    is read as tokens where it lies (B x C x H x W as B x HW x C, strided); the output is a
    B x C' x H x W view of B x HW x C' rows, the layout the GP's kernel products read. Shares
    nothing with the module at call time (the folded weights are built once, like every split
    weight); traced, the plain module runs."""

    def __init__(self, module: nn.Module, kind: str):
        super().__init__()
        self.module = module
        conv = module[0] if isinstance(module, nn.Sequential) else module
        if isinstance(module, nn.Sequential) and len(module) == 2:
            conv = fold_conv_bn(conv, module[1])
        self.split = SplitLinear(_linear_from_conv(conv), "tf32x3" if kind == "tf32x3" else "bf16x3")

    @staticmethod
    def splits(module: nn.Module) -> bool:
        """Is ``module`` a plain 1 x 1 convolution, alone or followed by a BatchNorm2d in a Sequential?"""
        layers = list(module) if isinstance(module, nn.Sequential) else [module]
        return bool(layers) and is_pointwise(layers[0]) and (
            len(layers) == 1 or (len(layers) == 2 and isinstance(layers[1], nn.BatchNorm2d) and not layers[1].training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if traced_plain(self.split.kind):
            return self.module(x)
        b, c, h, w = (int(s) for s in x.shape)
        out = self.split(x.flatten(2).transpose(1, 2))  # B x HW x C'
        return out.transpose(1, 2).reshape(b, -1, h, w)


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v (fp32 in and out) as one fused fp16 attention call over split operands.

    fp16 pieces (11 bits each) rather than bf16: the kernel rounds the softmax weights to the
    operands' type, and fp16 rounds them 4x finer. fp16 hazard: |q|, |k|, |v| above 65504 would
    overflow (DINOv2's and the decoder's are orders of magnitude below). Heads of 96 to 128 (the
    decoder's) run ``attention_kernel`` instead: the same arithmetic from two pieces per operand.
    """
    return summed_halves(*split_attention_halves(q, k, v, scale))


def split_attention_halves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                           ) -> tuple[torch.Tensor, int]:
    """``split_attention`` before its last step: (out, halves). ``halves`` 2: out is the fused
    call's fp16 B x H x N x 2d, [with v_hi | with v_lo], whose halves sum to the result; 1: out is
    the result (attention_kernel's fp32). The projection after it reads either where it lies
    (``SplitLinear.from_heads``)."""
    half = torch.float16
    if attention_kernel.usable(q):  # heads too wide for the fused kernels (the decoder's 128)
        return attention_kernel.split_attention(laid_out(q, half, "ht"), laid_out(k, half, "ht"),
                                                laid_out(v, half, "ht"), scale), 1
    return F.scaled_dot_product_attention(laid_out(q, half, "hht"), laid_out(k, half, "hth"),
                                          laid_out(v, half, "ht"), scale=scale), 2


class SplitAttention(nn.Module):
    """roma_full's ``Attention`` with split products: its linear layers (``SplitLinear``) and, for
    the ``-flash`` kinds, the attention itself (``split_attention``); shares the module's weights."""

    def __init__(self, attention: Attention, kind: str, folded: Optional[dict[int, dict[str, Any]]] = None):
        super().__init__()
        self.heads = attention.heads
        self.scale = attention.scale
        self.qkv = SplitLinear(attention.qkv, kind, **_folded_into(attention.qkv, folded))
        self.proj = SplitLinear(attention.proj, kind, **_folded_into(attention.proj, folded))
        self.flash = kind.endswith("-flash")

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, in_place: bool = False
                ) -> torch.Tensor:
        """The attention of ``x``, plus ``residual`` when given (see SplitLinear.forward)."""
        if not self.flash or traced_plain(self.qkv.kind):
            out = Attention.forward(self, x)  # type: ignore[arg-type]  # same attributes
            return _with_residual(out, residual, in_place)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out, halves = split_attention_halves(qkv[0], qkv[1], qkv[2], self.scale)
        return self.proj.from_heads(out, halves, residual, in_place)


def _folded_into(linear: nn.Module, folded: Optional[dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The ``SplitLinear`` arguments (``out_scale``, ``in_norm``) that ``folded`` holds for ``linear``."""
    return (folded or {}).get(id(linear), {})


def split_linears(module: nn.Module, kind: str = "tf32x3",
                  folded: Optional[dict[int, dict[str, Any]]] = None) -> nn.Module:
    """A copy of ``module`` sharing its parameters, every ``nn.Linear`` in it a ``SplitLinear``,
    every roma_full ``Mlp`` with an exact GELU a ``SplitMlp`` (and, for the ``-flash`` kinds, every
    roma_full ``Attention`` a ``SplitAttention``); DINOv2's and the decoder's blocks become
    ``SplitBlock``s, DINOv2's patch embedding a ``SplitPatchEmbed``, a 1 x 1 convolution (with its
    BatchNorm, as proj.16) a ``SplitPointwise``. ``folded`` maps ``id(linear)``
    to the ``SplitLinear`` arguments that fold a neighbour into that layer (blocks pass their
    LayerScales and LayerNorms)."""
    if kind not in KINDS:
        raise ValueError(f"split kind {kind!r}: one of {', '.join(KINDS)}")
    if isinstance(module, nn.Linear):
        return SplitLinear(module, kind, **_folded_into(module, folded))
    if isinstance(module, Attention) and kind.endswith("-flash"):
        return SplitAttention(module, kind, folded)
    if isinstance(module, Mlp) and isinstance(module.act, nn.GELU) and module.act.approximate == "none":
        return SplitMlp(module, kind, folded)
    if isinstance(module, _BLOCKS):
        return _split_block(module, kind, in_place=False)
    if SplitPatchEmbed.splits(module):
        return SplitPatchEmbed(module, kind)
    if SplitPointwise.splits(module):
        return SplitPointwise(module, kind)
    out = shallow_module_copy(module)
    chained = isinstance(module, (nn.ModuleList, nn.Sequential))  # each child takes the one before's output
    after_block = False
    for name, child in module.named_children():
        if isinstance(child, _BLOCKS):
            out._modules[name] = _split_block(child, kind, in_place=chained and after_block)
        else:
            out._modules[name] = split_linears(child, kind, folded)
        after_block = isinstance(child, _BLOCKS)
    return out


def _foldable_norm(norm: nn.Module) -> bool:
    """A LayerNorm over the last axis with weight and bias (what the piece kernel applies)."""
    return (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None
            and len(norm.normalized_shape) == 1)


class SplitBlock(nn.Module):
    """A pre-norm transformer block (DINOv2's, the decoder's) with split products, whose skip
    connections are added inside the products after the branches (attention's proj, the MLP's
    fc2: cuBLAS's beta = 1) instead of in passes of their own (48 a DINOv2 call, 3202 x 1024 fp32
    each at 560). ``in_place``: the block owns its input (it is the previous block's output, which
    nothing else reads) and writes the first sum into it; otherwise the first sum is a new tensor.
    The second sum always goes into the first one. Shares the block's weights."""

    def __init__(self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: nn.Module, in_place: bool):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _residual_branch(self.attn, self.norm1(x), x, self.in_place)
        return _residual_branch(self.mlp, self.norm2(x), x, True)


def _residual_branch(branch: nn.Module, h: torch.Tensor, x: torch.Tensor, in_place: bool) -> torch.Tensor:
    """x + branch(h), into x with ``in_place`` (a contiguous x), inside the branch's last product
    where it takes a residual."""
    in_place = in_place and x.is_contiguous()
    if isinstance(branch, (SplitAttention, SplitMlp)):
        return branch(h, residual=x, in_place=in_place)
    return _with_residual(branch(h), x, in_place)


def _split_block(block: nn.Module, kind: str, in_place: bool) -> SplitBlock:
    """A DINOv2 or decoder block as a ``SplitBlock``: each LayerScale (DINOv2's) folded into the
    product before it (attention's proj, the MLP's fc2: 48 elementwise passes less per DINOv2
    call) and each LayerNorm applied where the product after it (qkv, fc1) splits its input (48
    passes less). Each product's split weights are built once, with what is folded into them."""
    folded: dict[int, dict[str, Any]] = {}
    if isinstance(block, Block):  # DINOv2's LayerScales
        folded[id(block.attn.proj)] = {"out_scale": block.ls1.gamma}
        folded[id(block.mlp.fc2)] = {"out_scale": block.ls2.gamma}
    for norm, linear in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp.fc1)):
        if _foldable_norm(norm):
            folded[id(linear)] = {"in_norm": norm}
    attn = split_linears(block.attn, kind, folded)
    mlp = split_linears(block.mlp, kind, folded)
    parts = {"norm1": block.norm1, "norm2": block.norm2}
    # a LayerNorm the product after it took in becomes an Identity there
    for name, owner, layer in (("norm1", attn, "qkv"), ("norm2", mlp, "fc1")):
        product = getattr(owner, layer, None)
        if isinstance(product, SplitLinear) and product.in_norm is parts[name]:
            parts[name] = nn.Identity()
    if isinstance(block, Block):
        scales = ((attn, "proj", block.ls1), (mlp, "fc2", block.ls2))
        if not all(getattr(getattr(owner, layer, None), "out_scale", None) is ls.gamma for owner, layer, ls in scales):
            raise ValueError("a DINOv2 block whose LayerScales did not fold into its products")
    return SplitBlock(parts["norm1"], attn, parts["norm2"], mlp, in_place)


_COPY_ATTR = "_matchrt_split_products"  # where split_copy keeps a module's copies (a plain attribute)


def split_copy(module: nn.Module, kind: str = "tf32x3") -> nn.Module:
    """The split copy of ``module`` (``split_linears``), built once and kept on the module itself,
    outside its state dict and children, so every view of a model shares one copy (a bench's
    reference and timed pipelines held two, 4.4 GB each for DINOv2 and the decoder in tf32x3).
    One copy per module: asking for another kind, or after the weights moved or reloaded, drops
    the old copy before the new one is built."""
    first = next(module.parameters())
    key = (kind, str(first.device), first.data_ptr(), first._version)
    cached = module.__dict__.get(_COPY_ATTR)
    if cached is None or cached[0] != key:
        module.__dict__[_COPY_ATTR] = None
        module.__dict__[_COPY_ATTR] = (key, split_linears(module, kind))
    return module.__dict__[_COPY_ATTR][1]


def traced_plain(kind: str) -> bool:
    """Does the trace under way keep the plain fp32 layers instead of ``kind``'s split products? ONNX
    exports do (their runtimes have no bf16 product with an fp32 result), and so does torch.compile
    (the split copies run eagerly beside it: model.split_eager). torch.export, which builds
    AOTInductor packages, keeps the bf16 kinds' split products, ordinary torch ops (casts, bf16
    products with an fp32 result, SDPA), and the plain layers for tf32x3 only, whose products need
    TF32 inside a package built with TF32 off."""
    if torch.onnx.is_in_onnx_export():
        return True
    if torch.compiler.is_exporting():
        return kind not in PACKAGED_KINDS
    return torch.compiler.is_compiling()


def built_copy(module: nn.Module, kind: str, device: torch.device) -> Optional[nn.Module]:
    """The split copy of ``kind`` on ``device`` that an eager call built (``split_copy``), or None.

    For torch.export, whose parameters are fake tensors while it traces (no storage to build split
    weights from, or to check the copy's key against): the package builder calls the graph once
    eagerly first (``matchrt.package.export_program``), which builds the copies, and the export
    captures their split weights as constants."""
    cached = module.__dict__.get(_COPY_ATTR)
    if cached is None or cached[0][0] != kind or cached[0][1] != str(device):
        return None
    return cached[1]


def split_pays(device: torch.device) -> bool:
    """Does a split product beat an IEEE fp32 one here? Only on a GPU with TF32 and bf16 tensor
    cores (compute capability 8.0 and up); elsewhere the split would only triple the work."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


__all__ = ["KINDS", "PACKAGED_KINDS", "BIAS_PIECES", "tf32_head", "tf32_pieces", "extra_columns", "laid_out", "bias_pieces",
           "piece_orders", "split_operand", "SplitLinear", "SplitMlp", "split_attention", "split_attention_halves",
           "summed_halves", "merged_heads", "laid_out_heads", "SplitAttention", "SplitBlock", "SplitPatchEmbed",
           "SplitPointwise",
           "split_linears", "split_copy", "built_copy", "split_pays", "traced_plain"]
