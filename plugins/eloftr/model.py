"""MatchAnything's EfficientLoFTR as torch modules (the variant of `matchanything_eloftr.ckpt`).

Pipeline, for a pair of grayscale images of the same size H x W (sides multiples of 32):

1. RepVGG-A1 backbone (shared weights, both images in one batch): features at 1/2 (64 ch),
   1/4 (128 ch) and 1/8 (256 ch, the "coarse" grid of h x w = H/8 x W/8 cells).
2. Coarse transformer: 4 x (self, cross) aggregated-attention layers. Queries are pooled 4 x 4
   with a depth-wise strided conv, keys/values with max pooling, so attention runs on an
   H/32 x W/32 grid. Self layers rotate queries and keys with a 2-D rotary position encoding
   (RoPE) whose positions are rescaled by 832 / max(H, W) on both axes ("NPE", the training
   resolution 832 over the one test size upstream passes for rows and columns).
3. Coarse matching: dual softmax of the feature correlation (temperature 0.1). MatchAnything
   keeps every pair above the threshold that is not within 2 cells of a border (no
   mutual-nearest check).
4. Fine refinement: an FPN upsamples the coarse features through the 1/4 and 1/2 backbone
   maps to full resolution (64 ch). Each coarse pair takes an 8 x 8 window in image 0 and a
   10 x 10 window in image 1; a dual softmax over 56 channels picks the best pixel pair, and a
   3 x 3 soft-argmax over the last 8 channels adds a sub-pixel offset in image 1.

The state-dict keys equal the checkpoint keys without their leading `matcher.`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from matchrt.depthwise import DepthwiseConv2d

from . import lse_kernel
from .padding import (
    Extent, border_keep, coarse_extent, grid_mask, key_bias, pooled_extent, repeat_edges,
    similarity_bias, unpooled,
)

Padding = tuple[Extent, Extent]  # content extents of image 0 and image 1 (padded inputs)

COARSE_STRIDE = 8  # backbone output stride of the coarse grid
POOL = 4  # attention pooling of the coarse grid
SIDE_MULTIPLE = COARSE_STRIDE * POOL  # 32: every input side must divide into pooled cells
BORDER_CELLS = 2  # coarse pairs this close to a border are dropped
TRAIN_SIZE = 832  # RoPE positions are normalised to it: NPE [832, 832, s, s], s = max(H, W)
D_COARSE = 256
N_HEADS = 8
SLICE = 8  # last channels of the fine features used for the sub-pixel step
WINDOW = 8  # fine window in image 0 (WINDOW x WINDOW); image 1 gets WINDOW + 2
DUAL_SOFTMAX_TEMPERATURE = 0.1
SUBPIXEL_TEMPERATURE = 10.0
DEFAULT_THRESHOLD = 0.1  # LOFTR.MATCH_COARSE.THR of configs/models/eloftr_model.py


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              bias: Optional[torch.Tensor] = None, fused: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over the last two dims (bias: additive, broadcast).

    Under torch: one fused kernel (flash / memory-efficient attention), no L x L matrix in
    memory. In an ONNX export, or with fused=False (the reference model, upstream's own
    arithmetic): MatMul, max-shifted Softmax, MatMul (fp16-safe in any runtime).
    """
    if not fused or torch.onnx.is_in_onnx_export():
        scores = (q @ k.transpose(-1, -2)) * scale
        return stable_softmax(scores if bias is None else scores + bias, -1) @ v
    if bias is not None:
        bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def stable_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax with the maximum subtracted first.

    TensorRT hazard: in fp16 an un-shifted exp overflows above 11; subtracting the max keeps
    every exponent <= 0 whatever precision the engine picks.
    """
    return torch.softmax(x - x.amax(dim=dim, keepdim=True), dim=dim)


class _IntDiv(torch.autograd.Function):
    """Division of non-negative integer tensors by a constant, exported as one INT32 `Div`.

    (torch's exporter turns `div(..., rounding_mode="trunc")` into Div + Cast(INT64) + Cast.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, divisor: int) -> torch.Tensor:  # noqa: D102
        return torch.div(x, divisor, rounding_mode="trunc")

    @staticmethod
    def symbolic(g: Any, x: Any, divisor: int) -> Any:  # noqa: D102
        return g.op("Div", x, g.op("Constant", value_t=torch.tensor(divisor, dtype=torch.int32)))


def int_div(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """x // divisor for non-negative int32 x (TensorRT hazard: index arithmetic stays INT32)."""
    if x.dtype != torch.int32:
        return torch.div(x, divisor, rounding_mode="trunc")
    return _IntDiv.apply(x, int(divisor))


def like(x: torch.Tensor, value: int) -> torch.Tensor:
    """`value` as a 0-d tensor of x's dtype: comparisons with it export without an INT64 Cast."""
    return torch.tensor(value, dtype=x.dtype, device=x.device)


def int_max(x: torch.Tensor, value: int) -> torch.Tensor:
    """max(x, value) for integer x as an elementwise Max (TensorRT's Clip takes no INT32)."""
    return torch.maximum(x, like(x, value))


def int_min(x: torch.Tensor, value: int) -> torch.Tensor:
    """min(x, value) for integer x as an elementwise Min (TensorRT's Clip takes no INT32)."""
    return torch.minimum(x, like(x, value))


# --------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map an eval-mode BatchNorm applies: y = x * scale + shift."""
    mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return scale, bn.bias - mean * scale


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of conv (no bias) followed by an eval-mode BatchNorm."""
    scale, shift = _bn_scale_shift(bn)
    return conv.weight * scale[:, None, None, None], shift


def _biased_conv(like: nn.Conv2d, kernel: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A 3x3 conv with `like`'s channels and stride, holding the given kernel and bias."""
    conv = nn.Conv2d(like.in_channels, like.out_channels, 3, like.stride[0], 1, bias=True)
    conv.weight.copy_(kernel)
    cast(torch.Tensor, conv.bias).copy_(bias)
    return conv


class RepVGGBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN (+ BN identity when shapes allow), summed, then ReLU.

    `fuse()` re-parameterises the branches into one biased 3x3 conv (the deploy form).
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.rbr_identity: Optional[nn.BatchNorm2d] = (
            nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        )
        self.rbr_dense: Optional[nn.Sequential] = _conv_bn(cin, cout, 3, stride)
        self.rbr_1x1: Optional[nn.Sequential] = _conv_bn(cin, cout, 1, stride)
        self.rbr_reparam: Optional[nn.Conv2d] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return F.relu(self.rbr_reparam(x))
        assert self.rbr_dense is not None and self.rbr_1x1 is not None
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return F.relu(y)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the three branches and their BatchNorms into `rbr_reparam` (one 3x3 conv)."""
        if self.rbr_reparam is not None:
            return
        assert self.rbr_dense is not None and self.rbr_1x1 is not None
        dense = cast(nn.Conv2d, self.rbr_dense.conv)
        kernel, bias = _fold(dense, cast(nn.BatchNorm2d, self.rbr_dense.bn))
        k1, b1 = _fold(cast(nn.Conv2d, self.rbr_1x1.conv), cast(nn.BatchNorm2d, self.rbr_1x1.bn))
        kernel = kernel + F.pad(k1, [1, 1, 1, 1])  # the 1x1 kernel sits at the 3x3 centre
        bias = bias + b1
        if self.rbr_identity is not None:  # identity = a 3x3 kernel with 1 at (c, c, centre)
            scale, shift = _bn_scale_shift(self.rbr_identity)
            eye = torch.zeros_like(kernel)
            idx = torch.arange(kernel.shape[0])
            eye[idx, idx, 1, 1] = scale
            kernel = kernel + eye
            bias = bias + shift
        conv = _biased_conv(dense, kernel, bias)
        self.rbr_reparam = conv
        self.rbr_dense = self.rbr_1x1 = self.rbr_identity = None


class RepVGGBackbone(nn.Module):
    """RepVGG-A1 stages 0-3: returns the 1/8, 1/4 and 1/2 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.layer0 = RepVGGBlock(1, 64, 2)
        self.layer1 = self._stage(64, 64, 2, 1)
        self.layer2 = self._stage(64, 128, 4, 2)
        self.layer3 = self._stage(128, 256, 14, 2)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.ModuleList:
        return nn.ModuleList(
            RepVGGBlock(cin if k == 0 else cout, cout, stride if k == 0 else 1) for k in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer0(x)
        for block in self.layer1:
            x = block(x)
        x1 = x
        for block in self.layer2:
            x = block(x)
        x2 = x
        for block in self.layer3:
            x = block(x)
        return x, x2, x1

    def fuse(self) -> None:
        for m in self.modules():
            if isinstance(m, RepVGGBlock):
                m.fuse()


# --------------------------------------------------------------------------------------------
# coarse transformer
# --------------------------------------------------------------------------------------------


def rope_tables(
    rows: int, cols: int, height: int, width: int, dim: int = D_COARSE, device: Optional[torch.device] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (rows x cols x dim) of the 2-D rotary encoding on the pooled coarse grid.

    Channel pair 2k+0/2k+1 of every group of four rotates by the row position, the next pair by
    the column position, frequency 10000^(-f/(dim/4)). Positions are 1-based and both axes are
    scaled by TRAIN_SIZE / max(height, width): upstream's callers set the NPE to [832, 832, s, s],
    one size s for rows and columns, and s = the long side reproduces its reference runs. The
    tables are rounded to fp16 like upstream's half-precision buffers, so fp32 results match its
    numbers.
    TensorRT hazard: built from Range/Sin/Cos for a static size (no 256 x 256 lookup table
    sliced by data-dependent shapes); the export wrapper keeps them as two initializers.
    """
    quarter = dim // 4
    freq = torch.exp(
        torch.arange(quarter, dtype=torch.float32, device=device) * (-math.log(10000.0) / quarter)
    )
    side = max(height, width)  # one size for both axes (not 832/H and 832/W); upstream's order
    pos_r = torch.arange(1, rows + 1, dtype=torch.float32, device=device) * TRAIN_SIZE / side
    pos_c = torch.arange(1, cols + 1, dtype=torch.float32, device=device) * TRAIN_SIZE / side
    zeros = torch.zeros(rows, cols, 1, dtype=torch.float32, device=device)
    ang_r = pos_r[:, None, None] * freq[None, None, :] + zeros  # rows x cols x quarter (+0: exact)
    ang_c = pos_c[None, :, None] * freq[None, None, :] + zeros
    # channel order r0 r0 c0 c0 r1 r1 c1 c1 ...: each angle rotates one (even, odd) pair
    ang = torch.stack([ang_r, ang_r, ang_c, ang_c], dim=-1).reshape(rows, cols, dim)
    cos = torch.cos(ang).to(torch.float16).to(torch.float32)
    sin = torch.sin(ang).to(torch.float16).to(torch.float32)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2k], x[2k+1]) of x (N x h x w x C) by the tabled angles."""
    h, w, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(-1, h, w, c)
    return x * cos + rotated * sin


class AggregatedAttentionLayer(nn.Module):
    """One self- or cross-attention layer on a 4x4-pooled grid, upsampled back, plus an MLP."""

    def __init__(self, rope: bool, d_model: int = D_COARSE, nhead: int = N_HEADS):
        super().__init__()
        self.rope = rope
        self.nhead = nhead
        # depth-wise 4 x 4 pooling of the queries: one Triton pass on GPUs (matchrt.depthwise),
        # an ordinary grouped Conv2d in exports and on CPUs (same parameters and keys)
        self.aggregate = DepthwiseConv2d(d_model, POOL, stride=POOL, bias=False)
        self.max_pool = nn.MaxPool2d(POOL, POOL)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.merge = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_model, 2 * d_model, bias=False),
            nn.LeakyReLU(0.01),
            nn.Linear(2 * d_model, d_model, bias=False),
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        # the deploy form's weights (`fuse`): not in the state dict, absent until fused
        self.register_buffer("mlp_x_weight", None, persistent=False)
        self.register_buffer("mlp_message_weight", None, persistent=False)

    def fuse(self) -> None:
        """Deploy form: the MLP's first layer split by its two inputs, `merge` folded into the
        message half. The MLP reads cat([x, up(merge(m))]), and its first layer is linear per pixel,
        as is the 4x bilinear upsampling (and the edge copy of padded inputs) per channel, so
        W [x; up(M m)] = W_x x + up((W_m M) m): the message is multiplied at the pooled resolution
        and upsampled afterwards. At full resolution that leaves no concatenation and half the
        depth in the product; `merge`'s own product disappears into W_m M (folded in float64)."""
        c = self.merge.in_features
        w = self.mlp[0].weight.detach()
        folded = (w[:, c:].double() @ self.merge.weight.detach().double()).to(w.dtype)
        self.mlp_x_weight = w[:, :c].contiguous()
        self.mlp_message_weight = folded

    def forward(
        self, x: torch.Tensor, source: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        x_extent: Optional[Extent] = None, source_extent: Optional[Extent] = None,
        fused: bool = True,
    ) -> torch.Tensor:
        """Extents (pooled grid) are given for padded inputs: attention stays inside the content."""
        k, v = self.keys_values(source, rope)
        return self.update(x, self.queries(x, rope), k, v, x_extent, source_extent, fused)

    # the layer in parts, so that CoarseTransformer can run what depends on one image only for both at once
    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """N x hq x wq x C -> N x heads x (hq wq) x C/heads (static sizes but the batch: no shape arithmetic)."""
        hq, wq, c = int(t.shape[1]), int(t.shape[2]), int(t.shape[3])
        return t.reshape(-1, hq * wq, self.nhead, c // self.nhead).transpose(1, 2)

    def queries(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """The attention queries of x (N x C x h x w): pooled, normalised, projected (N x heads x L x d)."""
        q = self.q_proj(self.norm1(self.aggregate(x).permute(0, 2, 3, 1)))  # N x h/4 x w/4 x C
        if self.rope:
            assert rope is not None
            q = apply_rope(q, *rope)
        return self._heads(q)

    def keys_values(self, source: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `source` (N x C x h x w): max-pooled, normalised, projected."""
        src = self.norm1(self.max_pool(source).permute(0, 2, 3, 1))
        k, v = self.k_proj(src), self.v_proj(src)
        if self.rope:
            assert rope is not None
            k = apply_rope(k, *rope)
        return self._heads(k), self._heads(v)

    def x_product(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The deploy form's W_x x (N x h x w x 2C, see `fuse`); None before fusing."""
        if self.mlp_x_weight is None:
            return None
        return F.linear(x.permute(0, 2, 3, 1), self.mlp_x_weight)

    def update(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               x_extent: Optional[Extent] = None, source_extent: Optional[Extent] = None, fused: bool = True,
               x_product: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x plus the MLP of x and its attention message; `x_product`: `x_product(x)` if computed already."""
        c, h, w = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
        hq, wq = h // POOL, w // POOL
        # keys in the source's padding get no weight (an additive bias of -1e4)
        bias = key_bias(source_extent) if source_extent is not None else None
        message = attention(q, k, v, 1.0 / math.sqrt(c // self.nhead), bias, fused)
        message = message.transpose(1, 2).reshape(-1, hq * wq, c)
        if self.mlp_message_weight is None:  # upstream's order: merge, upsample, concatenate, MLP
            message = self._upsampled(self.merge(message), hq, wq, x_extent)
            hidden = self.mlp[0](torch.cat([x, message], dim=1).permute(0, 2, 3, 1))
        else:  # the deploy form (`fuse`): the same function, the message's product before upsampling
            message = self._upsampled(F.linear(message, self.mlp_message_weight), hq, wq, x_extent)
            mixed = self.x_product(x) if x_product is None else x_product
            hidden = mixed + message.permute(0, 2, 3, 1)
        message = self.mlp[2](self.mlp[1](hidden))
        return x + self.norm2(message).permute(0, 3, 1, 2)

    def both_ways(self, both: torch.Tensor, b: int, p0: Optional[Extent] = None, p1: Optional[Extent] = None
                  ) -> torch.Tensor:
        """This cross layer on a batch of both images (image 0's B, then image 1's): image 0 attends to
        image 1, then image 1 to the updated image 0, as `forward` twice; the queries and the MLP's
        products of both images run as one batch. `p0`, `p1`: their extents (padded inputs)."""
        q, mixed = self.queries(both), self.x_product(both)
        feat0, feat1 = both[:b], both[b:]
        feat0 = self.update(feat0, q[:b], *self.keys_values(feat1), p0, p1, True, None if mixed is None else mixed[:b])
        feat1 = self.update(feat1, q[b:], *self.keys_values(feat0), p1, p0, True, None if mixed is None else mixed[b:])
        return torch.cat([feat0, feat1], 0)

    @staticmethod
    def _upsampled(message: torch.Tensor, hq: int, wq: int, x_extent: Optional[Extent]) -> torch.Tensor:
        """N x (hq wq) x C' pooled-grid vectors -> N x C' x 4hq x 4wq, bilinearly upsampled."""
        message = message.transpose(1, 2).reshape(-1, int(message.shape[-1]), hq, wq)
        if x_extent is not None:  # upsampling sees the content's edge, as on upstream's crop
            message = repeat_edges(message, x_extent)
        return F.interpolate(message, scale_factor=float(POOL), mode="bilinear", align_corners=False)


class CoarseTransformer(nn.Module):
    """4 x (self, cross); self layers carry the RoPE, cross layers update image 0 first."""

    def __init__(self, n_pairs: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            AggregatedAttentionLayer(rope=(k % 2 == 0)) for k in range(2 * n_pairs)
        )
        # the fused path runs what depends on one image only for both images as one batch (False: one
        # image at a time, the same function; kept for comparisons)
        self.batched = True

    def forward(
        self, feats: torch.Tensor, image_size: tuple[int, int],
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None, padding: Optional[Padding] = None,
        fused: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's batch (2B x C x h x w: image 0's B, then image 1's) -> the two images' features.

        `rope`: precomputed (cos, sin) tables, else built here for the pooled grid.
        `fused`: the deploy form: attention through the fused kernel, and what depends on one image
        only run for both images as one batch (`batched`): every self layer, and in each cross layer
        the queries and the MLP's product of both images (their keys wait for the other image's
        update). Fewer launches, twice the rows per kernel. Else upstream's arithmetic and order (see
        `attention`), one image at a time.

        `padding`: coarse content extents of padded inputs. As upstream (which crops to the
        content's whole pooled cells and pads the result with zeros), the content is transformed
        as if alone and the output is zero outside it.
        """
        if rope is None:
            h, w = int(feats.shape[-2]) // POOL, int(feats.shape[-1]) // POOL
            rope = rope_tables(h, w, image_size[0], image_size[1], int(feats.shape[1]), feats.device)
        p0 = p1 = None
        if padding is not None:
            p0, p1 = (pooled_extent(e, POOL) for e in padding)
        b = int(feats.shape[0]) // 2
        if fused and self.batched:
            feat0, feat1 = self._batched(feats, b, rope, p0, p1)
        else:
            feat0, feat1 = feats[:b], feats[b:]
            for k, layer in enumerate(self.layers):
                if k % 2 == 0:
                    feat0 = layer(feat0, feat0, rope, p0, p0, fused)
                    feat1 = layer(feat1, feat1, rope, p1, p1, fused)
                else:
                    feat0 = layer(feat0, feat1, None, p0, p1, fused)
                    feat1 = layer(feat1, feat0, None, p1, p0, fused)
        if p0 is not None and p1 is not None:
            feat0 = feat0 * grid_mask(unpooled(p0, POOL))
            feat1 = feat1 * grid_mask(unpooled(p1, POOL))
        return feat0, feat1

    def _batched(self, both: torch.Tensor, b: int, rope: tuple[torch.Tensor, torch.Tensor],
                 p0: Optional[Extent], p1: Optional[Extent]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers on the batch of both images (`b` each) wherever one image's work does not wait for the
        other's."""
        extent = None if p0 is None or p1 is None else Extent(
            torch.cat([p0.rows, p1.rows], 0), torch.cat([p0.cols, p1.cols], 0))
        for k in range(0, len(self.layers), 2):
            own = cast(AggregatedAttentionLayer, self.layers[k])
            cross = cast(AggregatedAttentionLayer, self.layers[k + 1])
            both = cross.both_ways(own(both, both, rope, extent, extent), b, p0, p1)
        return both[:b], both[b:]


# --------------------------------------------------------------------------------------------
# fine level
# --------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False)


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class FineFPN(nn.Module):
    """Upsamples transformed coarse features through the 1/4 map to the 1/2 map (64 ch).

    The last 2x bilinear upsampling to full resolution is not done here: only the fine windows
    of the selected matches need it (`sample_up2`), a few percent of the pixels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layer3_outconv = _conv(256, 256, 1)
        self.layer2_outconv = _conv(128, 256, 1)
        self.layer2_outconv2 = nn.Sequential(
            _conv(256, 256, 3), nn.BatchNorm2d(256), nn.LeakyReLU(0.01), _conv(256, 128, 3)
        )
        self.layer1_outconv = _conv(64, 128, 1)
        self.layer1_outconv2 = nn.Sequential(
            _conv(128, 128, 3), nn.BatchNorm2d(128), nn.LeakyReLU(0.01), _conv(128, 64, 3)
        )

    def forward(self, feat_c: torch.Tensor, x2: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        y = self.layer2_outconv2(self.layer2_outconv(x2) + _up2(self.layer3_outconv(feat_c)))
        return self.layer1_outconv2(self.layer1_outconv(x1) + _up2(y))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold each BatchNorm into the 3x3 conv before it (conv gains a bias)."""
        for seq in (self.layer2_outconv2, self.layer1_outconv2):
            conv, bn = seq[0], seq[1]
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            assert isinstance(conv, nn.Conv2d)
            seq[0] = _biased_conv(conv, *_fold(conv, bn))
            seq[1] = nn.Identity()


def _up2_taps(pos: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source taps of a 2x bilinear upsampling (align_corners=False) at full-resolution `pos`.

    pos: non-negative integer positions (< 2 * half). Returns the two source indices and the
    weight of the second: x2 = 2m -> (m - 1, m, 0.75), 2m + 1 -> (m, m + 1, 0.25), clamped to
    the map as torch's upsampling clamps (position 0 takes source 0 alone). INT32 arithmetic.
    """
    lo = int_max(int_div(pos + 1, 2) - 1, 0)
    hi = int_min(lo + 1, half - 1)
    odd = (pos - int_div(pos, 2) * 2).to(torch.float32)
    weight = (0.75 - 0.5 * odd) * (pos > like(pos, 0)).to(torch.float32)
    return lo, hi, weight


def _full_resolution_pixels(maps: torch.Tensor, b_ids: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                            size: tuple[int, int]) -> torch.Tensor:
    """Pixels (ys, xs) of a full-resolution B x C x H x W map, zeros outside it (M x P x C, fp32)."""
    c, m, p = int(maps.shape[1]), int(ys.shape[0]), int(ys.shape[1])
    inside = ((ys >= like(ys, 0)) & (ys < like(ys, size[0])) & (xs >= like(xs, 0))
              & (xs < like(xs, size[1]))).to(torch.float32)
    y, x = int_min(int_max(ys, 0), size[0] - 1), int_min(int_max(xs, 0), size[1] - 1)
    flat = (b_ids * (size[0] * size[1]))[:, None] + y * size[1] + x
    pixels = maps.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, flat.reshape(m * p))
    return pixels.reshape(m, p, c).float() * inside[..., None]


def sample_up2(maps: torch.Tensor, b_ids: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
               size: tuple[int, int]) -> torch.Tensor:
    """Pixels of the 2x bilinear upsampling of `maps` at full-resolution (ys, xs), in fp32.

    maps: B x C x h x w (half resolution); b_ids: M; ys, xs: M x P integer positions of the
    full-resolution H x W map, where positions outside it give zeros (the zero padding of
    image 1's windows). Returns M x P x C, equal to `F.interpolate(maps, scale_factor=2)` read
    at those pixels, without building the full-resolution map (memory-bound: 4x the pixels).
    A map that is already H x W is read directly (the reference model's path, as upstream).
    """
    c, h, w = int(maps.shape[1]), int(maps.shape[2]), int(maps.shape[3])
    m, p = int(ys.shape[0]), int(ys.shape[1])
    if (h, w) == tuple(size):  # already full resolution: read the pixels themselves
        return _full_resolution_pixels(maps, b_ids, ys, xs, size)
    inside = ((ys >= like(ys, 0)) & (ys < like(ys, size[0])) & (xs >= like(xs, 0))
              & (xs < like(xs, size[1]))).to(torch.float32)
    y0, y1, wy = _up2_taps(int_min(int_max(ys, 0), size[0] - 1), h)
    x0, x1, wx = _up2_taps(int_min(int_max(xs, 0), size[1] - 1), w)
    flat = maps.permute(0, 2, 3, 1).reshape(-1, c)
    base = (b_ids * (h * w))[:, None]

    def tap(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return flat.index_select(0, (base + y * w + x).reshape(m * p)).reshape(m, p, c).float()

    wy, wx = wy[..., None], wx[..., None]
    top = tap(y0, x0) * (1 - wx) + tap(y0, x1) * wx
    bottom = tap(y1, x0) * (1 - wx) + tap(y1, x1) * wx
    return (top * (1 - wy) + bottom * wy) * inside[..., None]


def refine(win0: torch.Tensor, win1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fine matching of M window pairs.

    win0: M x 64 x C (8 x 8 window of image 0), win1: M x 100 x C (10 x 10 window of image 1).
    Returns the offsets (x, y) in pixels to add to the coarse keypoints of image 0 and image 1,
    and the fine confidence matrix (M x 64 x 64, for tests).
    """
    m, ww, c = int(win0.shape[0]), int(win0.shape[1]), int(win0.shape[2])
    w1 = WINDOW + 2
    # sub-pixel similarity on the last SLICE channels, matching similarity on the others
    sim_sub = win0[..., -SLICE:] @ (win1[..., -SLICE:] / math.sqrt(SLICE)).transpose(1, 2)  # M x 64 x 100
    f0 = win0[..., :-SLICE] / math.sqrt(c)
    f1 = win1[..., :-SLICE] / math.sqrt(c)
    sim = f0 @ f1.transpose(1, 2)
    # fp16-safe dual softmax (max subtracted), restricted to the inner 8 x 8 of the 10 x 10 window
    conf = stable_softmax(sim, 1) * stable_softmax(sim, 2)
    conf = conf.reshape(m, ww, w1, w1)[:, :, 1:-1, 1:-1].reshape(m, ww, ww)
    best = conf.reshape(m, ww * ww).argmax(dim=-1).to(torch.int32)
    # TensorRT hazard: integer index arithmetic in INT32 (never through floats)
    il = int_div(best, ww)
    ir = best - il * ww
    yl = int_div(il, WINDOW)
    xl = il - yl * WINDOW
    yr = int_div(ir, WINDOW)
    xr = ir - yr * WINDOW
    half = WINDOW / 2 - 0.5
    d0 = torch.stack([xl, yl], -1).to(win0.dtype) - half
    d1 = torch.stack([xr, yr], -1).to(win0.dtype) - half
    # 3 x 3 neighbourhood in the 10 x 10 sub-pixel similarity row of the chosen window-0 pixel.
    # Upstream indexes the 10 x 10 map with inner (8 x 8) coordinates, so the neighbourhood is
    # centred one pixel up-left of the match, and -1 wraps to the last row/column; kept as is.
    delta = torch.arange(-1, 2, dtype=torch.int32, device=win0.device)
    ys = yr[:, None] + delta[None, :]  # M x 3, in -1 .. 8
    xs = xr[:, None] + delta[None, :]
    # -1 wraps to the last row/column like python indexing: (v + w1) mod w1, in INT32 ops only
    ys = ys + w1 - int_div(ys + w1, w1) * w1
    xs = xs + w1 - int_div(xs + w1, w1) * w1
    start = (torch.arange(m, dtype=torch.int32, device=win0.device) * ww + il) * (w1 * w1)
    flat = (start[:, None, None] + ys[:, :, None] * w1 + xs[:, None, :]).reshape(m * 9)
    patch = sim_sub.reshape(m * ww * w1 * w1).index_select(0, flat).reshape(m, 9)
    heat = stable_softmax(patch / SUBPIXEL_TEMPERATURE, -1)
    grid = torch.tensor([-1.0, 0.0, 1.0], dtype=win0.dtype, device=win0.device)
    gx = grid.repeat(3)  # x of the 3 x 3 cells, row-major
    gy = grid.repeat_interleave(3)
    sub = torch.stack([(heat * gx).sum(-1), (heat * gy).sum(-1)], -1)
    return d0, d1 + sub, conf


# --------------------------------------------------------------------------------------------
# the matcher
# --------------------------------------------------------------------------------------------


def border_mask(h: int, w: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """1.0 for coarse cells at least BORDER_CELLS away from every border, else 0.0 (h*w)."""
    r = torch.arange(h, device=device)
    c = torch.arange(w, device=device)
    keep_r = (r >= BORDER_CELLS) & (r < h - BORDER_CELLS)
    keep_c = (c >= BORDER_CELLS) & (c < w - BORDER_CELLS)
    return (keep_r[:, None] & keep_c[None, :]).reshape(h * w).to(torch.float32)


def content_extents(masks: Optional[tuple[torch.Tensor, torch.Tensor]]) -> Optional[Padding]:
    """Coarse content extents of two B x 1 x H x W pixel masks (None: inputs not padded)."""
    if masks is None:
        return None
    return coarse_extent(masks[0], COARSE_STRIDE), coarse_extent(masks[1], COARSE_STRIDE)


def keep_masks(h: int, w: int, padding: Optional[Padding] = None,
               device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells of image 0 and image 1 that may match (1 x h*w, or B x h*w with padding).

    Upstream drops cells within BORDER_CELLS of a border; with padding, of the content's border.
    """
    if padding is None:
        keep = border_mask(h, w, device)[None]
        return keep, keep
    return border_keep(padding[0], BORDER_CELLS), border_keep(padding[1], BORDER_CELLS)


class ELoFTR(nn.Module):
    """The full matcher; `forward` returns every match above `threshold` (variable length).

    The stage methods take static sizes from their inputs (Python ints), so a traced graph
    carries no shape arithmetic.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        super().__init__()
        self.threshold = threshold
        self.backbone = RepVGGBackbone()
        self.loftr_coarse = CoarseTransformer()
        self.fine_preprocess = FineFPN()

    # -- stages, shared by the reference forward and the export wrapper ----------------------
    def extract(self, image0: torch.Tensor, image1: torch.Tensor):
        """Backbone on both images in one batch: (coarse 2B x 256 x h x w, 1/4 map, 1/2 map)."""
        if image0.shape != image1.shape:
            raise ValueError(
                f"both images need the same shape, got {tuple(image0.shape)} and {tuple(image1.shape)}"
            )
        return self.backbone(torch.cat([image0, image1], 0))

    def transform(
        self, feat_c: torch.Tensor, image_size: tuple[int, int],
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None, padding: Optional[Padding] = None,
        fused: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse transformer on the backbone batch (image 0's half, then image 1's)."""
        return self.loftr_coarse(feat_c, image_size, rope, padding, fused)

    @staticmethod
    def similarity(feat0: torch.Tensor, feat1: torch.Tensor, padding: Optional[Padding] = None,
                   scaled: bool = True) -> torch.Tensor:
        """Coarse similarity (B x L x S) of the transformed features (B x C x h x w): f0 . f1 / C.

        `scaled`: divided by the dual-softmax temperature (as a product with its reciprocal, the
        arithmetic torch's CUDA kernels use), with `padding`'s biases added; unscaled, the bare
        product (no padding allowed), which CoarseSelect's GPU selection scales itself.
        """
        c, n = int(feat0.shape[1]), int(feat0.shape[2]) * int(feat0.shape[3])
        f0 = feat0.reshape(-1, c, n).transpose(1, 2) / math.sqrt(c)
        f1 = feat1.reshape(-1, c, n).transpose(1, 2) / math.sqrt(c)
        product = f0 @ f1.transpose(1, 2)
        if not scaled:
            if padding is not None:
                raise ValueError("an unscaled similarity takes no padding biases")
            return product
        sim = product * (1.0 / DUAL_SOFTMAX_TEMPERATURE)
        if padding is not None:
            bias0, bias1 = similarity_bias(*padding)
            sim = sim + bias0 + bias1
        return sim

    @staticmethod
    def normalizers(sim: torch.Tensor, keep: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-sum-exps of `sim` over S (B x L x 1) and over L (B x 1 x S), fp32; `keep` (see
        `confidence`) adds 1e4 to those of dropped cells, so their confidences vanish."""
        return ELoFTR.drop_cells(lse_kernel.torch_lse(sim, 2), lse_kernel.torch_lse(sim, 1), keep)

    @staticmethod
    def drop_cells(row: torch.Tensor, col: torch.Tensor, keep: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row (B x L x 1) and column (B x 1 x S) log-sum-exps with 1e4 added for the cells `keep`
        drops (see `normalizers`)."""
        if keep is not None:  # exp(-1e4) == 0: a dropped cell's row and column vanish
            row = row + ((1.0 - keep[0]) * 1e4)[:, :, None]
            col = col + ((1.0 - keep[1]) * 1e4)[:, None, :]
        return row, col

    @staticmethod
    def confidence(feat0: torch.Tensor, feat1: torch.Tensor, padding: Optional[Padding] = None,
                   keep: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Dual-softmax confidence (B x L x S) of the transformed coarse features (B x C x h x w).

        softmax over L times softmax over S is computed as one exponent,
        exp(2 sim - logsumexp_S(sim) - logsumexp_L(sim)): two reductions of `sim` and one
        elementwise pass, instead of two softmaxes and a product (memory-bound at 832: the
        matrix holds 117 M entries), and no softmax over a non-last dimension (torch's slow
        strided kernel). The result has `sim`'s dtype (fp16 under autocast).
        With `padding`, pairs that involve a padded cell are left out of both softmaxes (conf 0).
        `keep` (cells of image 0, 1 x L or B x L; of image 1, 1 x S or B x S; 1 = keep) zeroes
        the rows and columns of dropped cells after the softmaxes (upstream's border removal),
        inside the same pass.
        """
        sim = ELoFTR.similarity(feat0, feat1, padding)
        row, col = ELoFTR.normalizers(sim, keep)
        # every exponent is <= 0 (sim <= both log-sum-exps): no overflow in any precision
        return torch.exp(2.0 * sim.float() - row - col).to(sim.dtype)

    def fine_maps(self, feat0: torch.Tensor, feat1: torch.Tensor, x2: torch.Tensor, x1: torch.Tensor):
        """Half-resolution fine features of both images (B x 64 x H/2 x W/2 each).

        The full-resolution map is their 2x bilinear upsampling, read per window by `windows`.
        """
        b, c = int(feat0.shape[0]), int(feat0.shape[1])
        feat_c = torch.cat([feat0, feat1], 0) / math.sqrt(c)
        fine = self.fine_preprocess(feat_c, x2, x1)
        return fine[:b], fine[b:]

    @staticmethod
    def windows(fine0: torch.Tensor, fine1: torch.Tensor, b_ids: torch.Tensor, i_ids: torch.Tensor,
                j_ids: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """8 x 8 windows of image 0 at cells i, 10 x 10 (1 px zero margin) of image 1 at cells j.

        fine0/fine1 are the half-resolution maps of `fine_maps` (or their full-resolution
        upsampling); size is the (H, W) input. The
        window pixels are sampled from the 2x upsampling (`sample_up2`). Indices may be int32
        (export) or int64; INT32 arithmetic suffices (the largest flat index is B*H*W/4).
        """
        wc = size[1] // COARSE_STRIDE
        row0 = int_div(i_ids, wc)
        col0 = i_ids - row0 * wc
        row1 = int_div(j_ids, wc)
        col1 = j_ids - row1 * wc

        def grid(row: torch.Tensor, col: torch.Tensor, n: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
            m, r = int(row.shape[0]), torch.arange(n, dtype=row.dtype, device=row.device) - shift
            zero = torch.zeros(n, dtype=row.dtype, device=row.device)  # broadcast, no INT64 Expand
            ys = ((row * COARSE_STRIDE)[:, None] + r[None, :])[:, :, None] + zero[None, None, :]
            xs = ((col * COARSE_STRIDE)[:, None] + r[None, :])[:, None, :] + zero[None, :, None]
            return ys.reshape(m, n * n), xs.reshape(m, n * n)  # row-major window pixels

        ys0, xs0 = grid(row0, col0, WINDOW, 0)
        ys1, xs1 = grid(row1, col1, WINDOW + 2, 1)
        return sample_up2(fine0, b_ids, ys0, xs0, size), sample_up2(fine1, b_ids, ys1, xs1, size)

    @staticmethod
    def coarse_corner(ids: torch.Tensor, wc: int) -> torch.Tensor:
        """Pixel position (x, y) upstream gives a coarse cell: its top-left corner (stride 8).

        The int -> float cast happens on values < image side, exact in fp16 and fp32.
        """
        row = int_div(ids, wc)
        col = ids - row * wc
        return torch.stack([col, row], -1).to(torch.float32) * COARSE_STRIDE

    # -- reference forward -------------------------------------------------------------------
    def forward(self, image0: torch.Tensor, image1: torch.Tensor, threshold: Optional[float] = None,
                masks: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """All matches above the threshold, as upstream returns them (row-major pair order).

        `masks`: B x 1 x H x W content masks (1 = image, 0 = padding) of padded inputs.
        Keys: feats_c (backbone), feat_c0, feat_c1 (transformer outputs), conf_matrix, b_ids,
        i_ids, j_ids, mconf, mkpts0_f, mkpts1_f (pixels of the input), fine0, fine1 (window
        features entering fine matching), conf_matrix_f.
        """
        thr = self.threshold if threshold is None else threshold
        size = (int(image0.shape[-2]), int(image0.shape[-1]))
        padding = content_extents(masks)
        feats_c, x2, x1 = self.extract(image0, image1)
        # upstream's attention arithmetic: the reference stays bit-comparable with upstream (the
        # fused kernel rounds differently, which flips fp32-level ties of random weights)
        feat0, feat1 = self.transform(feats_c, size, padding=padding, fused=False)
        conf = self.confidence(feat0, feat1, padding)
        h, w = int(feat0.shape[-2]), int(feat0.shape[-1])
        keep0, keep1 = (k > 0 for k in keep_masks(h, w, padding, conf.device))
        mask = (conf > thr) & keep0[:, :, None] & keep1[:, None, :]
        b_ids, i_ids, j_ids = torch.where(mask)
        out = {"feats_c": feats_c, "feat_c0": feat0, "feat_c1": feat1, "conf_matrix": conf,
               "b_ids": b_ids, "i_ids": i_ids, "j_ids": j_ids, "mconf": conf[b_ids, i_ids, j_ids]}
        # the reference cuts the windows from the full-resolution maps, as upstream does (the
        # export graph samples them from the half-resolution maps: equal up to rounding)
        fine0, fine1 = (_up2(f) for f in self.fine_maps(feat0, feat1, x2, x1))
        win0, win1 = self.windows(fine0, fine1, b_ids, i_ids, j_ids, size)
        d0, d1, conf_f = refine(win0, win1)
        out.update(fine0=win0, fine1=win1, conf_matrix_f=conf_f,
                   mkpts0_f=self.coarse_corner(i_ids, w) + d0,
                   mkpts1_f=self.coarse_corner(j_ids, w) + d1)
        return out

    def fuse(self) -> "ELoFTR":
        """RepVGG re-parameterisation, BatchNorm folding and the attention layers' deploy form
        (`AggregatedAttentionLayer.fuse`), in place (for export)."""
        self.backbone.fuse()
        self.fine_preprocess.fuse()
        for layer in self.loftr_coarse.layers:
            cast(AggregatedAttentionLayer, layer).fuse()
        return self
