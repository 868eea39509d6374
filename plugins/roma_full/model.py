"""RomaCoarse: MatchAnything's RoMa up to its coarse prediction (before the scale-16 refiner).

image0, image1 (B x 3 x H x W, RGB in [0, 1]) -> symmetric batch (A->B for pairs, then B->A):
DINOv2 tokens -> proj.16 (1x1 conv + BatchNorm, 1024 -> 512) -> GP posterior -> coordinate
decoder -> gm_cls, gm_certainty -> coarse warp (flow) and certainty (logits).

Submodule names follow the checkpoint (see weights.py): ``encoder.cnn`` (VGG, unused here but
kept for roma_plus), ``encoder.dinov2``, ``proj16``, ``gp``, ``embedding_decoder``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .decoder import CoordinateDecoder, classification_to_flow
from .encoder import COARSE_SCALE, RomaEncoder, check_input_size, normalize_images
from .gp import GaussianProcess
from .ops import swap_halves

FEAT_DIM = 512


def make_proj(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv + BatchNorm, the per-scale projection (``decoder.proj.<s>``)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, 1), nn.BatchNorm2d(cout))


class RomaCoarse(nn.Module):
    """Encoder + proj.16 + GP + coordinate decoder; ``forward`` returns the coarse-scale dict."""

    def __init__(self, gp_solve: str = "exact", gp_iters: Optional[int] = None,
                 imagenet_norm: bool = False) -> None:
        super().__init__()
        self.encoder = RomaEncoder()
        self.proj16 = make_proj(1024, FEAT_DIM)
        self.gp = GaussianProcess()
        self.embedding_decoder = CoordinateDecoder()
        self.gp_solve = gp_solve
        self.gp_iters = gp_iters
        self.imagenet_norm = imagenet_norm

    def pyramids(self, image0: torch.Tensor, image1: torch.Tensor, with_cnn: bool = True
                 ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Encode [image0; image1] once; return (query [A, B], support [B, A]) pyramids."""
        x = normalize_images(torch.cat((image0, image1), dim=0), self.imagenet_norm)
        pyr = self.encoder(x, with_cnn=with_cnn)
        return pyr, {k: swap_halves(v) for k, v in pyr.items()}

    def coarse(self, f_q16: torch.Tensor, f_s16: torch.Tensor, solve: Optional[str] = None
               ) -> dict[str, torch.Tensor]:
        """Coarse prediction from raw DINOv2 tokens of query and support (B x 1024 x h x w each)."""
        feat_q, feat_s = self.proj16(f_q16), self.proj16(f_s16)
        gp_feats = self.gp(feat_q, feat_s, solve or self.gp_solve, self.gp_iters)
        return self.decode(gp_feats, feat_q, feat_s)

    def decode(self, gp_feats: torch.Tensor, feat_q: torch.Tensor, feat_s: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Coordinate decoder on the GP posterior -> gm_cls, gm_certainty, flow, certainty."""
        gm_cls, gm_certainty = self.embedding_decoder(gp_feats, feat_q)
        return {
            "gm_cls": gm_cls,
            "gm_certainty": gm_certainty,
            "flow": classification_to_flow(gm_cls),
            "certainty": gm_certainty,
            "feat_q16": feat_q,
            "feat_s16": feat_s,
        }

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> dict[str, torch.Tensor]:
        check_input_size(int(image0.shape[-2]), int(image0.shape[-1]))
        pyr_q, pyr_s = self.pyramids(image0, image1, with_cnn=False)
        return self.coarse(pyr_q[COARSE_SCALE], pyr_s[COARSE_SCALE])
