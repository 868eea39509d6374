"""RoMa's convolutional refiners: local correlation, displacement embedding, depth-wise conv blocks.

One `ConvRefiner` per scale (16, 8, 4, 2, 1) predicts a flow update and a certainty update from
the features of image A, the features of image B sampled at the current flow, an embedding of the
current displacement and, at scales 16/8/4, a local correlation volume around the flow target.
Attribute names follow the checkpoint (`block1`, `hidden_blocks`, `out_conv`, `disp_emb`) so the
weight map is a prefix change.

Everything here exports to plain ONNX (GridSample bilinear, zeros padding, align_corners=False as
upstream; Conv, BatchNormalization, Relu, Mul, ReduceSum) with static shapes.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matchrt import depthwise

# scale -> (feature channels after projection, displacement-embedding channels, correlation radius)
REFINER_SPECS: dict[int, tuple[int, int, int]] = {
    16: (512, 128, 7),
    8: (512, 64, 3),
    4: (256, 32, 2),
    2: (64, 16, 0),
    1: (9, 6, 0),
}
HIDDEN_BLOCKS = 8
KERNEL_SIZE = 5
# upstream multiplies the displacement by 40/32 (times the upsampling scale factor) before embedding
DISPLACEMENT_GAIN = 40.0 / 32.0


def _linspace(start: float, end: float, steps: int) -> np.ndarray:
    """Evenly spaced float32 values computed in float64 (a constant when traced for export)."""
    return np.linspace(start, end, steps, dtype=np.float64).astype(np.float32)


def _axis(start: float, end: float, steps: int, device: torch.device) -> torch.Tensor:
    """``_linspace`` as a tensor on ``device``. Under torch.compile computed there, in float64 (equal
    to numpy's values, or one float32 rounding step away where a fused multiply-add rounds once): numpy
    inside a compiled graph would run on the CPU and be copied to the GPU on every call (1.4 ms per
    roma_plus pair on an H100, and no CUDA graph over a copy from pageable memory)."""
    if torch.compiler.is_dynamo_compiling() and not torch.onnx.is_in_onnx_export():
        if steps == 1:
            return torch.full((1,), start, dtype=torch.float32, device=device)
        index = torch.arange(steps, dtype=torch.float64, device=device)
        values = index * ((end - start) / (steps - 1)) + start  # numpy's formula, and its exact end
        return torch.where(index == steps - 1, end, values).float()
    return torch.from_numpy(_linspace(start, end, steps)).to(device)


def pixel_grid(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Normalised pixel-centre coordinates, B x 2 x H x W with channel 0 = x, 1 = y (fp32).

    Upstream's linspace(-1 + 1/n, 1 - 1/n, n) grid. Built in numpy, so an exported graph holds
    it as a constant (no in-graph coordinate arithmetic that reduced precision could round);
    torch.compile builds it on the device (``_axis``).
    """
    batch, height, width = int(batch), int(height), int(width)  # traced shapes -> constants
    ys = _axis(-1 + 1 / height, 1 - 1 / height, height, device)
    xs = _axis(-1 + 1 / width, 1 - 1 / width, width, device)
    grid = torch.stack((xs[None, :].expand(height, width), ys[:, None].expand(height, width)))  # 2 x H x W
    return grid[None].expand(batch, 2, height, width)


def window_offsets(radius: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The (2r+1)^2 offsets of the correlation window in normalised units, K x 2 (x, y), row-major.

    The span is +-2r/H (normalised) as upstream, in steps of 2/H: one pixel of the level, so the
    window covers +-r pixels around the flow target.
    """
    height, width = int(height), int(width)  # traced shapes -> constants
    n = 2 * radius + 1
    dy = _axis(-2 * radius / height, 2 * radius / height, n, device)
    dx = _axis(-2 * radius / width, 2 * radius / width, n, device)
    return torch.stack((dx[None, :].expand(n, n), dy[:, None].expand(n, n)), dim=-1).reshape(n * n, 2)


# the largest sampled window (and product) one GridSample of the local correlation may produce.
# Measured with `matchrt bench` on one H100 (roma_plus 560/864, eager, batch 1), against sampling
# all offsets at once (fp32 219.7 ms, fp16 198.2 ms, peak 8846 / 7825 MB): 256 MB chunks took
# 223.7 / 202.3 ms and 5011 / 3725 MB; 1 GB chunks 219.7 / 200.2 ms and 5931 / 5002 MB
WINDOW_CHUNK_BYTES = 1 << 30


def offset_chunks(count: int, bytes_per_offset: int, limit: Optional[int] = None) -> list[tuple[int, int]]:
    """[start, end) ranges over `count` window offsets, each sampling at most `limit` bytes
    (`WINDOW_CHUNK_BYTES` by default; at least one offset per chunk), of near-equal length."""
    limit = WINDOW_CHUNK_BYTES if limit is None else limit
    per = max(1, limit // max(1, bytes_per_offset))
    pieces = -(-count // per)
    size = -(-count // pieces)
    return [(s, min(count, s + size)) for s in range(0, count, size)]


class LocalCorrelation(nn.Module):
    """Correlation of each A feature with B features in a window around its flow target.

    ``forward(feat_a, feat_b, flow)``: feat_* B x C x H x W, flow B x 2 x H x W (normalised x, y)
    -> B x K x H x W, K = (2r+1)^2, entry k = <a, b(flow + offset_k)> / sqrt(C).

    The window positions are sampled in chunks of offsets, one GridSample over an H x (W*k) grid
    per chunk, each chunk reduced over C before the next is sampled: the sampled window and its
    products never exceed `WINDOW_CHUNK_BYTES` each, whatever the batch and size (all K at once
    they were B*C*H*W*K floats: 2.3 GB each at scale 8 of the 864 upsampling pass for one pair,
    9.2 GB at batch 4). Each (pixel, offset) entry is the same sum as without chunks.
    fp16 hazards, kept in fp32 by explicit casts (and listed in the graph's fp32 layers):
    the window coordinates (a fp16 coordinate near 1 is off by up to 5e-4, a third of a pixel
    at 864) and the sum over C = 512 products.
    """

    def __init__(self, radius: int):
        super().__init__()
        self.radius = radius

    def forward(self, feat_a: torch.Tensor, feat_b: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        b, c, h, w = (int(v) for v in feat_a.shape)  # traced sizes -> constants (static export)
        offsets = window_offsets(self.radius, h, w, feat_a.device)  # K x 2
        k = offsets.shape[0]
        coords = flow.float().permute(0, 2, 3, 1)[:, :, :, None, :] + offsets[None, None, None]
        feat_b32 = feat_b.float()
        scaled_a = feat_a.float()[..., None] / (c ** 0.5)
        parts = []
        for start, end in offset_chunks(k, b * c * h * w * 4):
            kc = end - start
            # GridSample as upstream: bilinear, zeros padding, align_corners=False
            window = F.grid_sample(feat_b32, coords[:, :, :, start:end].reshape(b, h, w * kc, 2),
                                   mode="bilinear", padding_mode="zeros", align_corners=False)
            parts.append((scaled_a * window.reshape(b, c, h, w, kc)).sum(dim=1))  # B x H x W x kc
        corr = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return corr.permute(0, 3, 1, 2)


def window_correlation(feat_a: torch.Tensor, feat_b: torch.Tensor, flow: torch.Tensor, radius: int) -> torch.Tensor:
    """``LocalCorrelation(radius)``'s output from the (2r+2)^2 whole pixels around each flow target.

    Why: the window's offsets are whole pixels, so all (2r+1)^2 bilinear samples of one A pixel
    share the same fractional weights and their 4 (2r+1)^2 corner reads overlap. This form takes
    one product per distinct pixel (2r+2)^2 (256 instead of 900 reads of B's C channels at
    radius 7, 64 instead of 196 at 3, 36 instead of 100 at 2), then combines the window's
    products with the bilinear weights. Out-of-image pixels contribute 0, as GridSample's zeros
    padding. The window positions come from one coordinate per pixel rather than one per offset,
    so results differ from GridSample's by float rounding only (fp32 products and sums, as there).
    Used by compiled refiners, where Inductor fuses the gather, product and sum over channels into
    one pass (the gathered features are never written); eager runs and ONNX keep GridSample.
    A and B must have the same size (the window's step is one pixel of A's grid).
    """
    b, c, h, w = (int(v) for v in feat_a.shape)
    hb, wb = (int(v) for v in feat_b.shape[-2:])
    if (hb, wb) != (h, w):
        raise ValueError(f"window_correlation needs A and B features of one size, got {h}x{w} and {hb}x{wb}: "
                         "use LocalCorrelation, whose window steps follow A's grid")
    m = 2 * radius + 2  # whole pixels per window axis
    f = flow.float()
    # GridSample's unnormalisation (align_corners=False) of the window centre
    ix = ((f[:, 0] + 1) * wb - 1) / 2
    iy = ((f[:, 1] + 1) * hb - 1) / 2
    x0, y0 = torch.floor(ix), torch.floor(iy)
    tx, ty = ix - x0, iy - y0  # B x H x W, shared by every offset
    steps = torch.arange(m, device=flow.device) - radius
    xs = x0.long()[..., None] + steps  # B x H x W x m
    ys = y0.long()[..., None] + steps
    inside = ((xs >= 0) & (xs < wb))[..., None, :] & ((ys >= 0) & (ys < hb))[..., :, None]  # B x H x W x m x m
    index = (ys.clamp(0, hb - 1) * wb)[..., :, None] + xs.clamp(0, wb - 1)[..., None, :]
    rows = feat_b.permute(0, 2, 3, 1).reshape(b, hb * wb, c)  # B x HW x C
    picked = rows[torch.arange(b, device=flow.device)[:, None], index.reshape(b, -1)]  # B x (H W m m) x C
    scaled_a = feat_a.float().permute(0, 2, 3, 1).reshape(b, h * w, 1, c) / (c ** 0.5)
    dots = (scaled_a * picked.reshape(b, h * w, m * m, c).float()).sum(dim=-1)  # B x HW x m m
    dots = torch.where(inside.reshape(b, h * w, m * m), dots, 0.0).reshape(b, h, w, m, m)
    tx, ty = tx[..., None, None], ty[..., None, None]
    n = m - 1
    corr = ((1 - ty) * ((1 - tx) * dots[..., :n, :n] + tx * dots[..., :n, 1:])
            + ty * ((1 - tx) * dots[..., 1:, :n] + tx * dots[..., 1:, 1:]))  # B x H x W x n x n
    return corr.reshape(b, h, w, n * n).permute(0, 3, 1, 2)


def local_correlation(feat_a: torch.Tensor, feat_b: torch.Tensor, flow: torch.Tensor, radius: int) -> torch.Tensor:
    """Functional form of ``LocalCorrelation(radius)``."""
    return LocalCorrelation(radius)(feat_a, feat_b, flow)


class WarpFeatures(nn.Module):
    """B's features sampled at the flow (GridSample bilinear, zeros, align_corners=False), fp32."""

    def forward(self, feat_b: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(feat_b.float(), flow.float().permute(0, 2, 3, 1), mode="bilinear",
                             padding_mode="zeros", align_corners=False)


class Displacement(nn.Module):
    """(flow - pixel grid) * 40/32 * scale_factor: the embedding's input, in fp32."""

    def forward(self, flow: torch.Tensor, scale_factor: float) -> torch.Tensor:
        b, _, h, w = flow.shape
        return (DISPLACEMENT_GAIN * scale_factor) * (flow.float() - pixel_grid(b, h, w, flow.device))


def _block(in_dim: int, out_dim: int, bias: bool = True) -> nn.Sequential:
    """Depth-wise 5x5 conv, BatchNorm (eval statistics), ReLU, point-wise conv (keys .0 .1 .3)."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, KERNEL_SIZE, 1, KERNEL_SIZE // 2, groups=in_dim, bias=bias),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(inplace=False),
        nn.Conv2d(out_dim, out_dim, 1, 1, 0),
    )


class ConvRefiner(nn.Module):
    """One scale's refiner: (A features, B features, flow) -> (flow delta in pixels/4, certainty delta)."""

    depthwise_rows = False  # True: compiled on a GPU with BatchNorms folded, blocks through the 5 x 5 row kernel
    depthwise_half = False  # True: that kernel's products and sums in fp16 (fp16 runs)

    def __init__(self, feat_dim: int, emb_dim: int, radius: int):
        super().__init__()
        self.radius = radius
        in_dim = 2 * feat_dim + emb_dim + ((2 * radius + 1) ** 2 if radius else 0)
        self.block1 = _block(in_dim, in_dim)
        self.hidden_blocks = nn.Sequential(*[_block(in_dim, in_dim) for _ in range(HIDDEN_BLOCKS)])
        self.out_conv = nn.Conv2d(in_dim, 3, 1, 1, 0)
        self.disp_emb = nn.Conv2d(2, emb_dim, 1, 1, 0)
        # parameter-free pieces as modules: their ONNX nodes get predictable names (fp32 layers)
        self.warp_features = WarpFeatures()
        self.displacement = Displacement()
        self.corr = LocalCorrelation(radius) if radius else None

    def forward(self, feat_a: torch.Tensor, feat_b: torch.Tensor, flow: torch.Tensor,
                scale_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = feat_a.dtype
        warped_b = self.warp_features(feat_b, flow)
        emb = embed_displacement(self.disp_emb, self.displacement(flow, scale_factor))
        parts = [feat_a, warped_b.to(dtype), emb.to(dtype)]
        if self.corr is not None:
            compiled = torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export() \
                and feat_a.shape[-2:] == feat_b.shape[-2:]
            corr = window_correlation(feat_a, feat_b, flow, self.radius) if compiled else self.corr(feat_a, feat_b, flow)
            parts.append(corr.to(dtype))
        extra = self.block1[0].in_channels - sum(int(p.shape[1]) for p in parts)
        if extra > 0:  # channels padded by `pad_channels`: zeros, which every layer keeps at zero
            b, _, h, w = (int(v) for v in feat_a.shape)
            parts.append(feat_a.new_zeros(b, extra, h, w))
        d = torch.cat(parts, dim=1)
        for block in (self.block1, *self.hidden_blocks):
            d = run_block(block, d, self.depthwise_rows, self.depthwise_half)
        # the output head runs in fp32 as upstream (outside its autocast region)
        with torch.autocast(device_type=d.device.type, enabled=False):
            out = head_conv(self.out_conv, d)
        return out[:, :2], out[:, 2:]


def embed_displacement(conv: nn.Conv2d, disp: torch.Tensor) -> torch.Tensor:
    """The displacement embedding (a 1x1 convolution from 2 channels) as two multiply-adds per
    output in fp32, outside ONNX export (whose graph keeps the Conv node).

    Why: as a convolution it is a matrix product with K = 2, an extern call per refiner in
    compiled graphs; written out, Inductor fuses it into the concatenation that consumes it. In
    fp32 it is at least as precise as autocast's fp16 convolution (which rounds the displacement
    and weights first).
    """
    if torch.onnx.is_in_onnx_export():
        return conv(disp)
    weight = conv.weight.float()[:, :, 0, 0]  # E x 2
    x = disp.float()
    out = x[:, 0:1] * weight[None, :, 0, None, None] + x[:, 1:2] * weight[None, :, 1, None, None]
    return out if conv.bias is None else out + conv.bias.float()[None, :, None, None]


def is_pointwise(layer: nn.Module) -> bool:
    """A dense 1 x 1 convolution with stride 1 and no padding (a matrix product over pixels)?"""
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding == (0, 0) and layer.groups == 1 and layer.padding_mode == "zeros")


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1 x 1 convolution; under torch.compile (not ONNX export) as a matrix product of the
    channels-last pixels with the C_out x C_in weight, which Inductor hands to cuBLAS.

    Why: as convolutions, Inductor peels their bias off into a pass of its own (cuDNN is slower
    with it), and cuDNN's kernels for the narrow widths of scale 2 were slow (0.77 ms / 9 calls in
    session 14's H200 profile); as products cuBLAS adds the bias in its epilogue. Compiled
    refiners + VGG went from 27.3 to 26.0 ms a pair (H200 profile, session 15). Autocast rounds
    the operands as it does for the convolution; the products accumulate in fp32 either way.
    The exported graph keeps the Conv.
    """
    if torch.onnx.is_in_onnx_export() or not torch.compiler.is_compiling():
        return conv(x)
    out = F.linear(x.permute(0, 2, 3, 1), conv.weight[:, :, 0, 0], conv.bias)
    return out.permute(0, 3, 1, 2)


def head_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The refiner's 3-channel 1 x 1 head in IEEE fp32 on the (half-precision) activations ``x``.
    Under torch.compile (not ONNX export) written as one sum of products per output channel over
    each pixel's channels, which Inductor turns into one reduction kernel over the pixels that reads
    each pixel's channels once for all three sums.

    Why: as a matrix product, cuBLAS needs ``x`` as an fp32 copy in memory (written, then read) and
    runs an FFMA kernel whose tiles are mostly empty for 3 output columns; the head reads up to
    1.5 M pixels x 24 channels (scale 1 at 864, both images) per refiner. The arithmetic is the
    same IEEE fp32 (products of the exact fp32 values, fp32 sums), in another order.
    """
    if torch.onnx.is_in_onnx_export() or not torch.compiler.is_compiling():
        return conv(x.float())
    weight = conv.weight[:, :, 0, 0].float()  # O x K
    rows = x.permute(0, 2, 3, 1).float()  # B x h x w x K
    out = torch.stack([(rows * weight[o]).sum(dim=-1) for o in range(int(weight.shape[0]))], dim=1)
    if conv.bias is not None:
        out = out + conv.bias.float()[None, :, None, None]
    return out  # B x O x h x w


def run_block(block: nn.Sequential, x: torch.Tensor, rows: bool = False, half_sums: bool = False) -> torch.Tensor:
    """One refiner block (depth-wise conv, BatchNorm or its folded Identity, ReLU, 1 x 1 conv),
    its 1 x 1 convolution through ``pointwise_conv``.

    With ``rows``, compiled on a GPU with the BatchNorm folded, the depth-wise convolution, its bias and the ReLU
    run as one pass of ``matchrt.depthwise``'s 5 x 5 row kernel (each input row read once), where
    cuDNN's depth-wise kernel and Inductor's ReLU pass read and wrote the activation twice;
    ``half_sums``: its products and sums in fp16 in fp16 runs (``refiner_depthwise=rows-half``).
    """
    conv = block[0]
    if (rows and torch.compiler.is_compiling() and isinstance(block[1], nn.Identity) and isinstance(block[2], nn.ReLU)
            and depthwise.takes_rows(conv.kernel_size[0], conv.stride[0], conv.padding[0])
            and conv.groups == conv.in_channels == conv.out_channels):
        x = depthwise.conv_relu(conv, x, half_sums)  # the convolution and ReLU where the kernel cannot run
        layers = list(block)[3:]
    else:
        layers = list(block)
    for layer in layers:
        x = pointwise_conv(layer, x) if is_pointwise(layer) else layer(x)
    return x


@torch.no_grad()
def _padded_conv(conv: nn.Conv2d, extra: int, pad_out: bool = True) -> nn.Conv2d:
    """``conv`` with ``extra`` more input channels (zero weights) and, with ``pad_out``, as many more
    output channels (zero weights and bias): the original outputs are unchanged, the new ones 0."""
    depthwise = conv.groups == conv.in_channels and conv.groups > 1
    if conv.groups > 1 and not depthwise:
        raise ValueError("only dense and depth-wise convolutions can be padded")
    c_in, c_out = conv.in_channels + extra, conv.out_channels + (extra if pad_out else 0)
    out = nn.Conv2d(c_in, c_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    groups=c_in if depthwise else 1, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    out.weight.zero_()
    out.weight[:conv.out_channels, :conv.weight.shape[1]] = conv.weight
    if conv.bias is not None:
        out.bias.zero_()
        out.bias[:conv.out_channels] = conv.bias
    return out


@torch.no_grad()
def _padded_batchnorm(bn: nn.BatchNorm2d, extra: int) -> nn.BatchNorm2d:
    """``bn`` with ``extra`` more channels that map 0 to 0 (weight 0, bias 0, mean 0, variance 1)."""
    out = nn.BatchNorm2d(bn.num_features + extra, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.running_mean.device, dtype=bn.running_mean.dtype).eval()
    n = bn.num_features
    if bn.affine:
        out.weight.zero_()
        out.weight[:n] = bn.weight
        out.bias.zero_()
        out.bias[:n] = bn.bias
    out.running_mean.zero_()
    out.running_mean[:n] = bn.running_mean
    out.running_var.fill_(1.0)
    out.running_var[:n] = bn.running_var
    return out


def pad_channels(refiner: ConvRefiner, multiple: int) -> int:
    """Pad, in place, the refiner's block width to a multiple of ``multiple`` with zero channels.

    Why: the widths at scales 16, 8 and 4 (1377, 1137, 569: features, embedding and a (2r+1)^2
    correlation window) are odd, and half-precision matrix products on misaligned widths fall back
    to slow kernels (on an H100: 23.8 of the 47.6 ms of roma_plus's compiled refiners, in the
    point-wise and depth-wise convolutions of those three scales). The added channels enter as zeros
    (``ConvRefiner.forward`` appends them), have zero weights in every layer and zero weights into
    the head: the outputs are those of the unpadded refiner. Returns the channels added.
    Call it on a copy (the checkpoint keys keep their shapes on the original).
    """
    width = refiner.block1[0].in_channels
    extra = -width % max(1, int(multiple))
    if not extra:
        return 0
    for block in (refiner.block1, *refiner.hidden_blocks):
        block[0] = _padded_conv(block[0], extra)
        if isinstance(block[1], nn.BatchNorm2d):
            block[1] = _padded_batchnorm(block[1], extra)
        block[3] = _padded_conv(block[3], extra)
    refiner.out_conv = _padded_conv(refiner.out_conv, extra, pad_out=False)
    return extra


@torch.no_grad()
def fold_head(refiner: ConvRefiner) -> bool:
    """Fold, in place, the last block's 1 x 1 convolution into the head after it: two affine maps
    in a row, ``W_o (W_l h + b_l) + b_o``, are one, ``(W_o W_l) h + (W_o b_l + b_o)`` (composed in
    float64, stored in fp32). The last block then ends at its ReLU, and the head reads that.

    Why: the last convolution is a K x K product over every pixel (K up to 1384) whose output only
    the 3-channel head reads; folded, each refiner skips that product and the K-channel activation
    it writes. Under fp16/bf16 the head also reads the ReLU's output directly (exact in fp32) where
    it read the convolution's half-precision rounding: the result is closer to exact, by that
    rounding. Returns whether it folded (False: the last layer is not a plain 1 x 1 convolution).
    Call it on a copy, after ``pad_channels`` (the checkpoint keys keep their shapes on the original).
    """
    last = refiner.hidden_blocks[-1] if len(refiner.hidden_blocks) else refiner.block1
    inner, head = last[-1], refiner.out_conv
    if not (is_pointwise(inner) and is_pointwise(head)):
        return False
    w_in, w_head = inner.weight[:, :, 0, 0].double(), head.weight[:, :, 0, 0].double()
    bias = torch.zeros(w_head.shape[0], dtype=torch.float64, device=w_head.device)
    if inner.bias is not None:
        bias += w_head @ inner.bias.double()
    if head.bias is not None:
        bias += head.bias.double()
    folded = nn.Conv2d(inner.in_channels, head.out_channels, 1, 1, 0, bias=True,
                       device=head.weight.device, dtype=head.weight.dtype)
    folded.weight.copy_((w_head @ w_in)[:, :, None, None])
    folded.bias.copy_(bias)
    last[len(last) - 1] = nn.Identity()
    refiner.out_conv = folded
    return True


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=False (upstream's flow/certainty upsampling)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


__all__ = ["ConvRefiner", "REFINER_SPECS", "embed_displacement", "fold_head", "head_conv", "local_correlation",
           "pad_channels", "pointwise_conv", "pixel_grid", "window_correlation", "window_offsets", "upsample"]

