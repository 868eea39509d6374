"""Padded inputs: where each image's content lies on the coarse grids, and what the coarse stages
do with it (upstream's `mask0`/`mask1`, single-pair path).

In the aspect-preserving mode an image is resized so its long side fits the graph, its sides
floored to multiples of 32, and zero-padded bottom-right; a pixel mask (1 = content) comes with
it. Upstream (hloc's MatchAnything wrapper, batch of one) then
- runs the backbone on the padded image;
- crops the coarse features to the content (rows/columns of the mask sampled at every 8th
  pixel, floored to whole 4 x 4 pooled cells), runs the coarse transformer on the crop only and
  pads its output back with zeros;
- sets the similarity of every pair that involves a padded coarse cell to -1e9 before the dual
  softmax, and drops pairs within 2 cells of the CONTENT's borders (not the padded grid's).

A static graph cannot crop to a data-dependent size, so the same function is computed on the
full grid: keys outside the content get a -1e4 attention bias (their softmax weight underflows to
exactly 0), the pooled messages outside the content repeat the content's last row/column before
the 4x bilinear upsampling (what upsampling the crop sees at its edge), and the transformer output
is zeroed outside the content. Content is a top-left rectangle, so each image is described by two
0/1 vectors: which coarse rows and which coarse columns hold content.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

KEY_BIAS = -1.0e4  # exp(-1e4 + s - max) is exactly 0 in fp32 and fp16, and -1e4 fits fp16


class Extent(NamedTuple):
    """Content rows (B x h) and columns (B x w) of one image on a grid: 1.0 content, 0.0 padding."""

    rows: torch.Tensor
    cols: torch.Tensor

    def cells(self) -> torch.Tensor:
        """B x (h*w) 0/1 content mask of the grid, row-major."""
        b = int(self.rows.shape[0])
        return (self.rows[:, :, None] * self.cols[:, None, :]).reshape(b, -1)


def coarse_extent(mask: torch.Tensor, stride: int) -> Extent:
    """The coarse-grid extent of a B x 1 x H x W pixel mask (nearest sampling at every stride-th pixel).

    Upstream samples the mask with nearest interpolation at scale 1/stride: cell i takes pixel
    stride * i. Content is a top-left rectangle, so column 0 gives the rows and row 0 the columns.
    """
    return Extent(mask[:, 0, ::stride, 0], mask[:, 0, 0, ::stride])


def pooled_extent(extent: Extent, pool: int) -> Extent:
    """The extent on the pool x pool pooled grid: a pooled cell counts only if all its cells do."""
    b = int(extent.rows.shape[0])
    rows = extent.rows.reshape(b, -1, pool).amin(-1)
    cols = extent.cols.reshape(b, -1, pool).amin(-1)
    return Extent(rows, cols)


def unpooled(extent: Extent, pool: int) -> Extent:
    """A pooled extent back on the coarse grid (every pooled row/column repeated `pool` times)."""
    b = int(extent.rows.shape[0])
    ones = torch.ones(1, 1, pool, dtype=extent.rows.dtype, device=extent.rows.device)  # no Expand
    return Extent((extent.rows[:, :, None] * ones).reshape(b, -1), (extent.cols[:, :, None] * ones).reshape(b, -1))


def key_bias(extent: Extent) -> torch.Tensor:
    """Additive attention bias (B x 1 x 1 x S) that takes keys outside the content out of the softmax."""
    b = int(extent.rows.shape[0])
    return ((1.0 - extent.cells()) * KEY_BIAS).reshape(b, 1, 1, -1)


def _edge_repeat(valid: torch.Tensor) -> torch.Tensor:
    """B x n x n matrix that keeps content entries and maps every padded one to the last content one."""
    n = int(valid.shape[1])
    after = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], 1)
    last = valid * (1.0 - after)  # one-hot: the last content entry
    eye = torch.eye(n, dtype=valid.dtype, device=valid.device)
    return eye[None] * valid[:, :, None] + (1.0 - valid)[:, :, None] * last[:, None, :]


def repeat_edges(message: torch.Tensor, extent: Extent) -> torch.Tensor:
    """B x C x h x w map with its padded rows/columns replaced by the content's last row/column.

    Two small matrix products (no data-dependent gather): the bilinear upsampling of the result
    gives content cells exactly what upsampling the cropped map gives them.
    """
    rows = _edge_repeat(extent.rows)[:, None]  # B x 1 x h x h
    cols = _edge_repeat(extent.cols)[:, None]  # B x 1 x w x w
    return rows @ message @ cols.transpose(-1, -2)


def similarity_bias(extent0: Extent, extent1: Extent) -> tuple[torch.Tensor, torch.Tensor]:
    """Biases (B x L x 1, B x 1 x S) that take every pair with a padded cell out of the dual softmax.

    Two broadcasts, not an L x S mask (which would be 468 MB at 832 x 832).
    """
    bias0 = (1.0 - extent0.cells()) * KEY_BIAS
    bias1 = (1.0 - extent1.cells()) * KEY_BIAS
    return bias0[:, :, None], bias1[:, None, :]


def border_keep(extent: Extent, border: int) -> torch.Tensor:
    """B x (h*w) 0/1: cells at least `border` cells inside the content's borders (upstream's
    border removal with padding)."""
    b = int(extent.rows.shape[0])

    def inside(valid: torch.Tensor) -> torch.Tensor:
        n = int(valid.shape[1])
        ahead = torch.cat([valid[:, border:], torch.zeros_like(valid[:, :border])], 1)  # valid[i + border]
        start = (torch.arange(n, device=valid.device) >= border).to(valid.dtype)
        return ahead * start[None, :]

    return (inside(extent.rows)[:, :, None] * inside(extent.cols)[:, None, :]).reshape(b, -1)


def grid_mask(extent: Extent) -> torch.Tensor:
    """B x 1 x h x w 0/1 content map of the grid."""
    return extent.rows[:, None, :, None] * extent.cols[:, None, None, :]
