"""RoMa's encoder: VGG19-BN pyramid (strides 1..8) + DINOv2 patch tokens (the coarse scale "16").

The DINOv2 tokens sit on a stride-14 grid; RoMa calls that scale 16 all the same, and so do the
keys here. Input normalisation: MatchAnything's RoMa runs in test mode with ``norm_img=False``
and its encoder normalises nothing, so both networks see RGB in [0, 1] as it is.
``normalize_images(x, imagenet=True)`` gives the ImageNet mean/std variant for completeness.
"""

from __future__ import annotations

import torch
from torch import nn

from matchrt.errors import MatchrtError

from .dinov2 import PATCH, DinoV2ViTL14
from .vgg import VGG19Pyramid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COARSE_SCALE = 16  # dictionary key of the DINOv2 level (its real stride is 14)


def normalize_images(x: torch.Tensor, imagenet: bool = False) -> torch.Tensor:
    """What the networks see: ``x`` (RGB in [0, 1]) as is, or ImageNet-standardised if asked."""
    if not imagenet:
        return x
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _nearest(value: int, multiple: int) -> tuple[int, int]:
    lo = max(multiple, (value // multiple) * multiple)
    hi = -(-value // multiple) * multiple
    if hi == lo:
        hi = lo + multiple
    return lo, hi


def check_input_size(height: int, width: int, multiple: int = PATCH, square: bool = True,
                     matcher: str = "roma_full") -> None:
    """Refuse sizes the encoder cannot take, naming the nearest valid ones.

    roma_full needs multiples of 14 (DINOv2 patches); a pipeline that also refines on the VGG
    pyramid passes ``multiple=56`` (14 and 8). MatchAnything's RoMa is square-only.
    """
    for side, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            lo, hi = _nearest(max(int(value), 1), multiple)
            raise MatchrtError(
                f"{matcher}: {side} {value} is not a multiple of {multiple} (DINOv2 patch 14"
                f"{', VGG stride 8' if multiple % 8 == 0 else ''}). Nearest valid {side}s: {lo} or {hi}."
            )
    if square and height != width:
        raise MatchrtError(f"{matcher} needs a square input (as MatchAnything's RoMa); got "
                           f"{height}x{width}. Use equal height and width, e.g. {max(height, width)}.")


class RomaEncoder(nn.Module):
    """``forward(x) -> {1, 2, 4, 8: VGG levels; 16: B x 1024 x H/14 x W/14 DINOv2 tokens}``."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn = VGG19Pyramid()
        self.dinov2 = DinoV2ViTL14()

    def forward(self, x: torch.Tensor, with_cnn: bool = True, with_coarse: bool = True) -> dict[int, torch.Tensor]:
        feats: dict[int, torch.Tensor] = self.cnn(x) if with_cnn else {}
        if with_coarse:
            feats[COARSE_SCALE] = self.dinov2(x)
        return feats
