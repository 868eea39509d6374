"""RoMa's coordinate decoder (checkpoint ``embedding_decoder``): classification over anchors.

The GP posterior (512) and the projected DINOv2 features (512) of image A form 1024-d tokens;
five plain transformer blocks and a linear head give, per coarse cell, 4096 logits over a
64 x 64 grid of anchor positions in image B plus one certainty logit. The coarse warp is the
probability-weighted mean of the most likely anchor and its four grid neighbours.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .dinov2 import Attention, Mlp
from .ops import stable_softmax

DIM = 1024
HEADS = 8
DEPTH = 5
ANCHORS = 64  # the anchor grid is ANCHORS x ANCHORS over image B
LN_EPS = 1e-5  # torch's default: these blocks use nn.LayerNorm unchanged


class Block(nn.Module):
    """Pre-norm block without LayerScale."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, qkv_bias=False)  # the decoder's qkv has no bias
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CoordinateDecoder(nn.Module):
    """``forward(gp_feats, feats) -> (gm_cls B x 4096 x h x w, gm_certainty B x 1 x h x w)``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(DEPTH)])
        self.to_out = nn.Linear(DIM, ANCHORS * ANCHORS + 1)

    def forward(self, gp_feats: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat((gp_feats, feats), dim=1)
        b, c, h, w = x.shape
        out = self.to_out(self.blocks(x.flatten(2).transpose(1, 2)))  # B x hw x 4097
        out = out.transpose(1, 2).reshape(b, out.shape[-1], h, w)
        return out[:, :-1], out[:, -1:]


def anchor_xy(index: torch.Tensor, res: int = ANCHORS) -> torch.Tensor:
    """Normalised (x, y) of anchor indices (row-major over a res x res grid), ... x 2.

    TensorRT hazard: the index is split into column/row with integer ops (INT32), and only the
    small results (< 64) are converted to float.
    """
    row = torch.div(index, res, rounding_mode="trunc")  # index >= 0: trunc == floor, a plain Div
    col = index - row * res
    x = (2.0 * col.to(torch.float32) + 1.0) / res - 1.0
    y = (2.0 * row.to(torch.float32) + 1.0) / res - 1.0
    return torch.stack((x, y), dim=-1)


def classification_to_flow(gm_cls: torch.Tensor) -> torch.Tensor:
    """B x 4096 x h x w logits -> B x 2 x h x w warp in [-1, 1] (x, y of image B).

    Softmax over anchors; around the arg-max anchor m take m-1, m, m+1, m-64, m+64 (indices
    clamped to [0, 4095], so at a row's end m+1 continues on the next row, as upstream) and
    average their coordinates weighted by their probabilities.
    """
    c = int(gm_cls.shape[1])  # static: the head's width
    res = math.isqrt(c)
    # anchors on the last axis: the decoder's head writes them innermost, so this permute is a view,
    # and the softmax / arg-max / gather run along contiguous rows (softmax over axis 1 of the
    # B x 4096 x h x w view took torch's strided kernel: 4.6 ms per roma_plus pair on an H100)
    logits = gm_cls.float().permute(0, 2, 3, 1)  # B x h x w x 4096
    prob = stable_softmax(logits, -1)
    mode = prob.argmax(dim=-1, keepdim=True).to(torch.int32)  # B x h x w x 1, INT32 indices
    # offsets [-1, 0, 1, -res, res] from a ramp on the device: a table copied from the host would
    # synchronise the stream in eager runs and cannot be captured in a CUDA graph
    ramp = torch.arange(5, dtype=torch.int32, device=gm_cls.device)
    offsets = torch.where(ramp < 3, ramp - 1, (2 * ramp - 7) * res).view(1, 1, 1, 5)
    index = mode + offsets  # B x h x w x 5
    # clamp to [0, c-1] with Max/Min (TensorRT's Clip takes no INT32)
    index = torch.minimum(torch.maximum(index, torch.zeros_like(offsets[..., :1])),
                          torch.full_like(offsets[..., :1], c - 1))
    weight = torch.gather(prob, -1, index.to(torch.int64))  # B x h x w x 5
    xy = anchor_xy(index, res)  # B x h x w x 5 x 2
    flow = (weight[..., None] * xy).sum(dim=-2) / weight.sum(dim=-1)[..., None]  # B x h x w x 2
    return flow.permute(0, 3, 1, 2)
