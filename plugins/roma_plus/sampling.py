"""Drawing sparse matches from RoMa's dense warp: threshold-balanced sampling or top-k.

"balanced" (upstream ``RegressionMatcher.sample`` with ``sample_mode="threshold_balanced"``):
 1. weights = certainty, set to 1 where certainty > ``threshold`` (0.05);
 2. draw 4 * num matches without replacement with probability proportional to the weights;
 3. estimate each drawn match's density with a Gaussian KDE (std 0.1) over the 4-d match
    vectors (x_A, y_A, x_B, y_B in [-1, 1]), weight it 1 / (1 + density), or 1e-7 where the
    density is below 10 (isolated matches are almost never kept);
 4. draw num of them without replacement with those weights.
Weighted draws without replacement use exponential races (Efraimidis-Spirakis: the k smallest
-log(U) / w), which has the same distribution as torch.multinomial(replacement=False) and runs
on the tensors' device (GPU when the warp is on CUDA) with a seeded generator.

"topk": the num most certain pixels (ties broken by index), no randomness at all.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from matchrt.tf32 import tf32_switches

from . import kde_kernel

SampleMode = Literal["balanced", "topk"]
KDE_STD = 0.1
MIN_DENSITY = 10.0  # matches with fewer "neighbours" than this are weighted ISOLATED_WEIGHT
ISOLATED_WEIGHT = 1e-7
EXPANSION = 4  # balanced mode first draws EXPANSION * num candidates
KDE_CHUNK_BYTES = 64 * 1024 * 1024


def kde(x: torch.Tensor, std: float = KDE_STD, chunk_bytes: int = KDE_CHUNK_BYTES) -> torch.Tensor:
    """Gaussian kernel density sum_j exp(-|x_i - x_j|^2 / (2 std^2)) for each row of x (N x D).

    The exponents come out of one IEEE fp32 matrix product of augmented rows,
    [x_i / std^2, -|x_i|^2 / (2 std^2), 1] . [x_j, 1, -|x_j|^2 / (2 std^2)] (the expansion cdist
    uses too), then exp in place and a row sum: three passes over each block instead of cdist's
    three plus square, scale, exp and sum (on an H100, 5.5 -> 3.6 ms a roma_plus pair with a clamp
    pass this version drops). Memory: one block of rows x N exponents at a time,
    rows = max(1, chunk_bytes / (4 N)), never the N x N matrix (N = 20000: 1.6 GB) at once; 64 MB
    blocks by default. fp32 throughout (the exponentials of squared distances underflow early in fp16).
    On CUDA one Triton pass computes it instead (``kde_kernel``: no exponent matrix, one launch
    instead of four per block); ``chunk_bytes`` applies to the torch path only.
    """
    if kde_kernel.usable(x):
        return kde_kernel.kde(x, std)
    x = x.float()
    n = x.shape[0]
    rows = max(1, int(chunk_bytes // (4 * max(n, 1))))
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    scale = 1.0 / (2.0 * std * std)
    half_sq = (x * x).sum(dim=1, keepdim=True) * scale
    ones = torch.ones_like(half_sq)
    left = torch.cat((x * (2.0 * scale), -half_sq, ones), dim=1)
    right = torch.cat((x, ones, -half_sq), dim=1)
    with tf32_switches(False):  # TF32's 10-bit inputs would move the exponents (~200 in size) by ~0.1
        for start in range(0, n, rows):
            block = left[start:start + rows] @ right.T
            # exponents are <= 0 up to rounding (a row with itself: +-1e-5), harmless in exp
            out[start:start + rows] = block.exp_().sum(dim=1)
    return out


def _generator(device: torch.device, seed: Optional[int]) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def draw_without_replacement(weights: torch.Tensor, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Indices of min(k, #positive weights) draws without replacement, P proportional to weights."""
    weights = weights.float()
    positive = weights > 0
    k = min(int(k), int(positive.sum()))
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=weights.device)
    u = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=torch.float32)
    # key = -log(U) / w; the k smallest keys are the draw (inf for w = 0: never drawn)
    keys = -torch.log(u.clamp_min(1e-38)) / weights.clamp_min(1e-38)
    keys = torch.where(positive, keys, torch.full_like(keys, float("inf")))
    return torch.topk(keys, k, largest=False, sorted=True).indices


def sample_balanced(matches: torch.Tensor, certainty: torch.Tensor, num: int, threshold: float,
                    seed: Optional[int] = None) -> torch.Tensor:
    """Indices into the flattened warp of the threshold-balanced sample (see module docstring)."""
    g = _generator(certainty.device, seed)
    weights = torch.where(certainty > threshold, torch.ones_like(certainty), certainty.float())
    candidates = draw_without_replacement(weights, EXPANSION * num, g)
    if candidates.numel() == 0:
        return candidates
    density = kde(matches[candidates])
    p = 1.0 / (density + 1.0)
    p = torch.where(density < MIN_DENSITY, torch.full_like(p, ISOLATED_WEIGHT), p)
    return candidates[draw_without_replacement(p, num, g)]


def sample_topk(certainty: torch.Tensor, num: int) -> torch.Tensor:
    """Indices of the num most certain entries with positive certainty (stable order on ties)."""
    order = torch.sort(certainty.float(), descending=True, stable=True).indices
    keep = int(min(num, int((certainty > 0).sum())))
    return order[:keep]


def sample_matches(warp: torch.Tensor, certainty: torch.Tensor, num: int = 5000, threshold: float = 0.05,
                   mode: SampleMode = "balanced", seed: Optional[int] = 0,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(matches K x 4 normalised, certainty K) drawn from one pair's warp (H x W' x 4) and certainty.

    Runs on the tensors' device. The certainty returned is the dense certainty (not the
    thresholded sampling weight upstream returns; thresholding with 0 selects the same matches).
    """
    flat_m = warp.reshape(-1, 4)
    flat_c = certainty.reshape(-1)
    if mode == "balanced":
        idx = sample_balanced(flat_m, flat_c, num, threshold, seed)
    elif mode == "topk":
        idx = sample_topk(flat_c, num)
    else:
        raise ValueError(f"unknown sample_mode {mode!r}: use 'balanced' or 'topk'")
    return flat_m[idx], flat_c[idx]


def to_pixels(matches: torch.Tensor, size0: tuple[int, int], size1: tuple[int, int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (x_A, y_A, x_B, y_B) -> pixel coordinates of images of (height, width) size0/size1.

    As upstream's ``to_pixel_coordinates``: x_pix = W / 2 * (x + 1), so -1 is the left edge of
    pixel 0 and the centre of pixel i is i + 0.5.
    """
    h0, w0 = size0
    h1, w1 = size1
    m = matches.float()
    kp0 = torch.stack((w0 / 2 * (m[:, 0] + 1), h0 / 2 * (m[:, 1] + 1)), dim=-1)
    kp1 = torch.stack((w1 / 2 * (m[:, 2] + 1), h1 / 2 * (m[:, 3] + 1)), dim=-1)
    return kp0, kp1
