"""Bringing an image to RoMa's input: stretch to a square side, RGB in [0, 1], no normalisation.

MatchAnything's RoMa (test mode, ``resize_by_stretch=True``, ``norm_img=False``) stretches each
image to S x S. The copy the reference fixtures were made from resizes bilinearly WITHOUT
antialiasing (``transforms.Resize(..., BILINEAR, antialias=False)``, i.e. ``F.interpolate`` with
``align_corners=False``): that is the default here and what the runner's "linear" resize (OpenCV
INTER_LINEAR) computes. The original MatchAnything release resizes with torchvision's BICUBIC
and its default antialiasing: ``resize_images(..., mode="bicubic", antialias=True)`` reproduces
that for callers who feed the model themselves.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Mode = Literal["bilinear", "bicubic"]


def resize_images(images: torch.Tensor, side: int, mode: Mode = "bilinear", antialias: bool = False) -> torch.Tensor:
    """B x 3 x H x W (or 3 x H x W) float in [0, 1] -> B x 3 x side x side, stretched.

    Bicubic overshoot outside [0, 1] is kept, as torchvision keeps it for float images.
    """
    batched = images.ndim == 4
    x = images if batched else images[None]
    out = F.interpolate(x.float(), size=(side, side), mode=mode, align_corners=False, antialias=antialias)
    return out if batched else out[0]


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 float RGB in [0, 1] (``matchrt.images.read_image``) -> 1 x 3 x H x W tensor."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))[None]
