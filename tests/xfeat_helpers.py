"""Helpers for the XFeat example plugin's tests: a host that loads it, synthetic homographies."""

from __future__ import annotations

import numpy as np


def random_homography(rng: np.random.RandomState, width: int, height: int,
                      shift: float = 0.12, angle: float = 15.0, scale: float = 0.15) -> np.ndarray:
    """A moderate homography about the image centre: rotation up to `angle` degrees, zoom up to
    1 +- `scale`, then each corner pushed by up to `shift` of the image size (perspective)."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    a = np.deg2rad(rng.uniform(-angle, angle))
    s = 1 + rng.uniform(-scale, scale)
    similarity = np.array([[s * np.cos(a), -s * np.sin(a), 0], [s * np.sin(a), s * np.cos(a), 0],
                           [0, 0, 1]])
    centre = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]], dtype=np.float64)
    base = centre @ similarity @ np.linalg.inv(centre)
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
    moved = _apply(base, corners) + rng.uniform(-shift, shift, (4, 2)) * [width, height]
    import cv2

    return cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32))


def _apply(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.concatenate([points, np.ones((len(points), 1))], 1) @ h.T
    return p[:, :2] / p[:, 2:]


def warp(image: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The image seen through `h` (same size, black outside), float32 like `read_image`."""
    import cv2

    height, width = image.shape[:2]
    out = cv2.warpPerspective(image, h, (width, height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.ascontiguousarray(out.astype(np.float32))
