"""XFeat's sparse pipeline with fixed-size tensors: detect the top-K keypoints, sample their
descriptors, match them by mutual nearest neighbour. Every step is TensorRT-clean (no NonZero,
no data-dependent shape, TopK K <= 3840, no GridSample); each hazard is noted where it is handled.

Sampling positions follow XFeat exactly, including one quirk: keypoints (integer pixels of the
H x W input) are normalised by W - 1 and H - 1 and then sampled with align_corners=False, so pixel
x lands on feature column x * w / (W - 1) - 0.5 (w = W / 8), not on (x + 0.5) / 8 - 0.5. The
weights of every sampled position are tabulated per pixel row/column at export time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import CELL

TOPK_LIMIT = 3840  # TensorRT's largest TopK K
CUBIC_A = -0.75  # the bicubic kernel constant of PyTorch's grid_sample


def _feature_positions(full: int, feat: int) -> np.ndarray:
    """Where each pixel 0..full-1 lands on a feature axis of length `feat`, computed in float32 the
    way XFeat does it (normalise by full - 1 into [-1, 1], unnormalise with align_corners=False)."""
    x = np.arange(full, dtype=np.float32)
    g = np.float32(2) * (x / np.float32(full - 1)) - np.float32(1)
    return ((g + np.float32(1)) * np.float32(feat) - np.float32(1)) / np.float32(2)


def bilinear_matrix(full: int, feat: int) -> torch.Tensor:
    """full x feat matrix R with R @ v = v bilinearly sampled at every pixel (zeros outside)."""
    pos = _feature_positions(full, feat).astype(np.float64)
    left = np.floor(pos).astype(np.int64)
    t = pos - left
    mat = np.zeros((full, feat), dtype=np.float64)
    for offset, weight in ((0, 1 - t), (1, t)):
        col = left + offset
        inside = (col >= 0) & (col < feat)
        mat[np.nonzero(inside)[0], col[inside]] += weight[inside]
    return torch.from_numpy(mat.astype(np.float32))


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution weights of the taps at -1, 0, +1, +2 for a fraction t (n x 4)."""
    a = CUBIC_A

    def near(d: np.ndarray) -> np.ndarray:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: np.ndarray) -> np.ndarray:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_taps(full: int, feat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel 0..full-1: the 4 feature indices (int32, clamped) and weights (0 where the tap
    falls outside, i.e. grid_sample's zero padding) of bicubic sampling."""
    pos = _feature_positions(full, feat).astype(np.float64)
    left = np.floor(pos)
    weights = _cubic_weights(pos - left)
    taps = left[:, None].astype(np.int64) + np.arange(-1, 3)[None, :]
    inside = (taps >= 0) & (taps < feat)
    weights = np.where(inside, weights, 0.0)
    return (torch.from_numpy(np.clip(taps, 0, feat - 1).astype(np.int32)),
            torch.from_numpy(weights.astype(np.float32)))


def exact_topk(scores: torch.Tensor, k: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row, best first, with TopK calls of at most 3840.

    TensorRT hazard: TopK accepts K <= 3840, and XFeat keeps 4096 keypoints. Taking the top 3840,
    overwriting them (ScatterElements) with `floor` (below every real score) and taking the top
    k - 3840 of the rest gives exactly the top k: every value of the second call is <= every value
    of the first. Needs k <= row length, which the caller ensures.
    """
    values, indices = [], []
    remaining = k
    while True:
        step = min(remaining, TOPK_LIMIT)
        v, i = scores.topk(step, dim=1)
        values.append(v)
        indices.append(i)
        remaining -= step
        if remaining == 0:
            break
        scores = scores.scatter(1, i, floor)
    if len(values) == 1:
        return values[0], indices[0]
    return torch.cat(values, 1), torch.cat(indices, 1)


def l2_normalise(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x / max(||x||, 1e-12) with plain ops (as F.normalize, without ReduceL2)."""
    return x / torch.sqrt((x * x).sum(dim=dim, keepdim=True)).clamp_min(1e-12)


class SparseDetector(nn.Module):
    """Top-K keypoints, scores and descriptors of a batch of images of one fixed size."""

    rows_y: torch.Tensor
    cols_x_t: torch.Tensor
    tap_x: torch.Tensor
    tap_wx: torch.Tensor
    tap_y: torch.Tensor
    tap_wy: torch.Tensor
    keep: torch.Tensor

    def __init__(self, height: int, width: int, top_k: int = 4096,
                 detection_threshold: float = 0.05, nms_size: int = 5) -> None:
        super().__init__()
        if top_k > height * width:
            raise ValueError(f"top_k {top_k} exceeds the {height}x{width} pixels of the input")
        self.height, self.width = height, width
        self.top_k, self.threshold, self.nms_size = top_k, detection_threshold, nms_size
        h, w = height // CELL, width // CELL
        # reliability (1/8 resolution) bilinearly sampled at every pixel: rows_y @ map @ cols_x^T
        self.register_buffer("rows_y", bilinear_matrix(height, h), persistent=False)
        self.register_buffer("cols_x_t", bilinear_matrix(width, w).t().contiguous(), persistent=False)
        tx, wx = bicubic_taps(width, w)
        ty, wy = bicubic_taps(height, h)
        for name, value in (("tap_x", tx), ("tap_wx", wx), ("tap_y", ty), ("tap_wy", wy)):
            self.register_buffer(name, value, persistent=False)
        # XFeat samples the keypoint probability with nearest-neighbour at the same quirky
        # positions: the last row and column round outside the map (half-to-even) and read 0, so
        # keypoints there get score 0 and are dropped; pixel (0, 0) is XFeat's padding marker and
        # dropped too. A 0/1 mask reproduces both.
        mask = torch.ones(height, width)
        mask[-1, :] = 0
        mask[:, -1] = 0
        mask[0, 0] = 0
        self.register_buffer("keep", mask, persistent=False)

    def forward(self, feats: torch.Tensor, logits: torch.Tensor, reliability: torch.Tensor):
        """-> keypoints (N x K x 2 float, x y input pixels), scores (N x K), descriptors (N x K x 64).

        Rows with score <= 0 are not keypoints (fewer than K local maxima above the threshold).
        """
        n = logits.shape[0]
        # softmax over the 65 bins (the ONNX Softmax op subtracts the max), the 64 cell positions
        # back to pixels: N x 1 x H x W keypoint probability
        heat = F.pixel_shuffle(torch.softmax(logits, dim=1)[:, : CELL * CELL], CELL)
        local_max = F.max_pool2d(heat, self.nms_size, stride=1, padding=self.nms_size // 2)
        candidate = (heat == local_max) & (heat > self.threshold)
        rel = torch.matmul(torch.matmul(self.rows_y, reliability[:, 0]), self.cols_x_t)
        score = heat[:, 0] * rel * self.keep
        # non-candidates get -1 (below any candidate, as XFeat's padding), so a fixed-size TopK over
        # all pixels replaces NonZero + a data-dependent candidate list
        score = torch.where(candidate[:, 0], score, torch.full_like(score, -1.0))
        scores, flat = exact_topk(score.reshape(n, -1), self.top_k, floor=-2.0)
        # index arithmetic in int32, never through floating point; indices are >= 0, so truncating
        # division is floor division and exports as a single integer Div
        flat = flat.to(torch.int32)
        y = torch.div(flat, self.width, rounding_mode="trunc")
        x = flat - y * self.width
        keypoints = torch.stack([x, y], dim=-1).to(feats.dtype)
        descriptors = self.describe(l2_normalise(feats, 1), x, y)
        return keypoints, scores, descriptors

    def describe(self, dense: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bicubic samples of dense (N x C x h x w) at the keypoints, L2-normalised: N x K x C.

        TensorRT hazard avoided: no GridSample in bicubic mode. The 4 x 4 taps come from the
        per-pixel tables and are read with one GatherElements.
        """
        n, c, h, w = dense.shape
        k = x.shape[1]
        ix, wx = self.tap_x[x], self.tap_wx[x]  # N x K x 4
        iy, wy = self.tap_y[y], self.tap_wy[y]
        index = (iy[..., :, None] * w + ix[..., None, :]).reshape(n, 1, k * 16).to(torch.int64)
        weight = (wy[..., :, None] * wx[..., None, :]).reshape(n, 1, k, 16)
        taps = torch.gather(dense.reshape(n, c, h * w), 2, index.expand(n, c, k * 16))
        desc = (taps.reshape(n, c, k, 16) * weight).sum(-1).transpose(1, 2)
        return l2_normalise(desc, 2)


class MutualNearest(nn.Module):
    """Mutual nearest neighbours by cosine similarity, one candidate per keypoint of image 0."""

    rows: torch.Tensor

    def __init__(self, top_k: int, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.register_buffer("rows", torch.arange(top_k, dtype=torch.int32), persistent=False)

    def forward(self, kpts0, desc0, valid0, kpts1, desc1, valid1):
        """-> keypoints0, keypoints1 (B x K x 2), confidence (B x K), valid (B x K bool)."""
        sim = torch.matmul(desc0, desc1.transpose(1, 2))
        # keypoint slots that are not keypoints take part in neither direction: -2 is below any
        # cosine similarity
        both = valid0[:, :, None] & valid1[:, None, :]
        sim = torch.where(both, sim, torch.full_like(sim, -2.0))
        best, j = sim.max(dim=2)
        i_of_j = sim.argmax(dim=1).to(torch.int32)
        mutual = torch.gather(i_of_j, 1, j) == self.rows
        valid = mutual & valid0 & torch.gather(valid1, 1, j) & (best > self.threshold)
        kpts1 = torch.gather(kpts1, 1, j[..., None].expand(-1, -1, 2))
        return kpts0, kpts1, best, valid
