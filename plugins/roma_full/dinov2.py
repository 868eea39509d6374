"""DINOv2 ViT-L/14 (img_size 518, LayerScale, MLP FFN): RoMa's coarse encoder.

Parameter names equal the keys of ``dinov2_vitl14_pretrain.pth`` (``cls_token``, ``pos_embed``,
``mask_token``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``), so loading is a plain
prefix rename. Only the normalised patch tokens are used (as a B x 1024 x H/14 x W/14 map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import attention

EMBED_DIM = 1024
DEPTH = 24
HEADS = 16
PATCH = 14
TRAIN_GRID = 37  # 518 / 14: the position grid the weights were trained on
LN_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Non-overlapping 14 x 14 patches -> 1024 channels (a strided conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, EMBED_DIM, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # B x C x H/14 x W/14


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias on)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale (``gamma``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int = EMBED_DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resize_pos_grid(grid: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """1 x C x 37 x 37 position grid -> 1 x C x gh x gw (bilinear, half-pixel, no antialias).

    MatchAnything's DINOv2 resizes to an explicit size (not a scale factor), so the sampling
    positions depend only on 37 and the token grid; at 518 x 518 this is the identity exactly.
    Export: gh, gw come from the patch-embedding output's shape, so the ONNX Resize gets its
    size from the graph's own shapes (no scale baked in for another size).
    """
    return F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)


class DinoV2ViTL14(nn.Module):
    """Image (B x 3 x H x W, sides multiples of 14) -> normalised patch tokens B x 1024 x H/14 x W/14."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + TRAIN_GRID * TRAIN_GRID, EMBED_DIM))
        # used by DINOv2 only for masked training inputs; kept so the file maps 1:1
        self.mask_token = nn.Parameter(torch.zeros(1, EMBED_DIM))
        self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(EMBED_DIM, eps=LN_EPS)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Patch tokens with the class token prepended and positions added; also the grid size."""
        p = self.patch_embed(x)
        b, c, gh, gw = p.shape
        p = p.flatten(2).transpose(1, 2)  # B x gh*gw x C
        pos = self.pos_embed
        grid = pos[:, 1:].reshape(1, TRAIN_GRID, TRAIN_GRID, c).permute(0, 3, 1, 2)
        grid = resize_pos_grid(grid, gh, gw).permute(0, 2, 3, 1).reshape(1, -1, c)
        cls = self.cls_token.expand(b, -1, -1) + pos[:, :1]
        return torch.cat((cls, p + grid), dim=1), gh, gw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, gh, gw = self.tokens(x)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)[:, 1:]
        return t.transpose(1, 2).reshape(t.shape[0], EMBED_DIM, gh, gw)
