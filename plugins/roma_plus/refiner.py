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

import torch
import torch.nn.functional as F
from torch import nn

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


def pixel_grid(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Normalised pixel-centre coordinates, B x 2 x H x W with channel 0 = x, 1 = y (fp32).

    Built with linspace like upstream so the values are bit-identical; a constant in traced graphs.
    """
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=device, dtype=torch.float32)
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=device, dtype=torch.float32)
    grid = torch.stack((xs[None, :].expand(height, width), ys[:, None].expand(height, width)))
    return grid[None].expand(batch, 2, height, width)


def window_offsets(radius: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The (2r+1)^2 offsets of the correlation window in normalised units, K x 2 (x, y), row-major.

    The step is 4/H (two pixels) as upstream: the window spans +-2r pixels of the level.
    """
    n = 2 * radius + 1
    dy = torch.linspace(-2 * radius / height, 2 * radius / height, n, device=device, dtype=torch.float32)
    dx = torch.linspace(-2 * radius / width, 2 * radius / width, n, device=device, dtype=torch.float32)
    return torch.stack((dx[None, :].expand(n, n), dy[:, None].expand(n, n)), dim=-1).reshape(n * n, 2)


def local_correlation(feat_a: torch.Tensor, feat_b: torch.Tensor, flow: torch.Tensor, radius: int) -> torch.Tensor:
    """Correlation of each A feature with B features in a window around its flow target.

    feat_a, feat_b: B x C x H x W; flow: B x 2 x H x W (normalised x, y). Returns B x K x H x W,
    K = (2r+1)^2, each entry <a, b(flow + offset_k)> / sqrt(C).

    One GridSample over an H x (W*K) grid samples all K window positions at once (no loop over
    offsets or pixels). Memory: B*C*H*W*K floats for the sampled window (at scale 8 of a 560
    input: 2*512*70*70*49*4 B = 0.98 GB), the same as upstream's per-image loop holds in total.
    fp16 hazard: the sum over C channels runs in fp32 (explicit casts survive autocast/export).
    """
    b, c, h, w = feat_a.shape
    offsets = window_offsets(radius, h, w, feat_a.device)  # K x 2
    k = offsets.shape[0]
    # coordinate arithmetic in fp32: in fp16 a normalised coordinate near 1 is off by up to 5e-4
    coords = flow.float().permute(0, 2, 3, 1)[:, :, :, None, :] + offsets[None, None, None]
    coords = coords.reshape(b, h, w * k, 2)
    # fp32 sampling: a fp16 grid would round the coordinates (autocast promotes to fp32 anyway)
    window = F.grid_sample(feat_b.float(), coords, mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # B x C x H x (W*K)
    window = window.reshape(b, c, h, w, k)
    # fp32 accumulation: the dot product sums C = 512 products
    scaled_a = feat_a.float() / (c ** 0.5)
    corr = (scaled_a[..., None] * window).sum(dim=1)  # B x H x W x K
    return corr.permute(0, 3, 1, 2)


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

    def __init__(self, feat_dim: int, emb_dim: int, radius: int):
        super().__init__()
        self.radius = radius
        in_dim = 2 * feat_dim + emb_dim + ((2 * radius + 1) ** 2 if radius else 0)
        self.block1 = _block(in_dim, in_dim)
        self.hidden_blocks = nn.Sequential(*[_block(in_dim, in_dim) for _ in range(HIDDEN_BLOCKS)])
        self.out_conv = nn.Conv2d(in_dim, 3, 1, 1, 0)
        self.disp_emb = nn.Conv2d(2, emb_dim, 1, 1, 0)

    def forward(self, feat_a: torch.Tensor, feat_b: torch.Tensor, flow: torch.Tensor,
                scale_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = feat_a.shape
        flow = flow.float()
        warped_b = F.grid_sample(feat_b.float(), flow.permute(0, 2, 3, 1), mode="bilinear",
                                 padding_mode="zeros", align_corners=False)
        displacement = flow - pixel_grid(b, h, w, flow.device)  # fp32 coordinate arithmetic
        emb = self.disp_emb((DISPLACEMENT_GAIN * scale_factor) * displacement)
        parts = [feat_a, warped_b.to(feat_a.dtype), emb.to(feat_a.dtype)]
        if self.radius:
            parts.append(local_correlation(feat_a, feat_b, flow, self.radius).to(feat_a.dtype))
        d = self.hidden_blocks(self.block1(torch.cat(parts, dim=1)))
        # the output head runs in fp32 as upstream (outside its autocast region)
        with torch.autocast(device_type=d.device.type, enabled=False):
            out = self.out_conv(d.float())
        return out[:, :2], out[:, 2:]


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=False (upstream's flow/certainty upsampling)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


__all__ = ["ConvRefiner", "REFINER_SPECS", "local_correlation", "pixel_grid",
           "window_offsets", "upsample"]

