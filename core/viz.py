"""Pictures a person looks at: matches side by side, and a dense matcher's warp and certainty."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .types import Matches

GREEN = (40, 200, 40)
RED = (40, 40, 230)


def _to_bgr8(image: np.ndarray) -> np.ndarray:
    img = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    else:
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


def draw_matches(
    image0: np.ndarray,
    image1: np.ndarray,
    matches: Matches,
    inliers: Optional[np.ndarray] = None,
    mode: str = "lines",
    max_draw: int = 2000,
    title: str = "",
) -> np.ndarray:
    """Side-by-side BGR picture; inliers green, outliers red, as lines or points."""
    import cv2

    a, b = _to_bgr8(image0), _to_bgr8(image1)
    h = max(a.shape[0], b.shape[0])
    canvas = np.full((h, a.shape[1] + b.shape[1], 3), 255, np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1]:] = b
    n = len(matches)
    if inliers is None:
        inliers = np.ones(n, dtype=bool)
    order = np.argsort(~inliers, kind="stable")  # outliers first, inliers drawn on top
    if n > max_draw:
        order = np.sort(np.random.default_rng(0).choice(n, max_draw, replace=False))
        order = order[np.argsort(inliers[order], kind="stable")]
    radius = max(2, int(round(h / 400)))
    thickness = max(1, int(round(h / 800)))
    off = a.shape[1]
    for i in order:
        color = GREEN if inliers[i] else RED
        p = (int(round(matches.keypoints0[i, 0])), int(round(matches.keypoints0[i, 1])))
        q = (int(round(matches.keypoints1[i, 0])) + off, int(round(matches.keypoints1[i, 1])))
        if mode == "lines":
            cv2.line(canvas, p, q, color, thickness, cv2.LINE_AA)
        cv2.circle(canvas, p, radius, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, q, radius, color, -1, cv2.LINE_AA)
    text = title or f"{int(inliers.sum())}/{n} inliers"
    scale = max(0.6, h / 900)
    for color, width in (((0, 0, 0), 4), ((255, 255, 255), 1)):
        cv2.putText(canvas, text, (10, int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, color,
                    width + int(scale), cv2.LINE_AA)
    return canvas


def draw_warp(image0: np.ndarray, image1: np.ndarray, warp: np.ndarray, certainty: np.ndarray) -> np.ndarray:
    """Image B sampled through the A->B warp beside A, and the certainty as a heat map.

    `warp` is upstream's layout (H x 2W x 4, normalised [-1, 1]); its left half maps A to B.
    """
    import cv2

    hh, ww2 = warp.shape[:2]
    ww = ww2 // 2
    a = cv2.resize(_to_bgr8(image0), (ww, hh), interpolation=cv2.INTER_AREA)
    b = _to_bgr8(image1)
    grid = warp[:, :ww, 2:4]
    map_x = ((grid[..., 0] + 1) * b.shape[1] - 1) / 2
    map_y = ((grid[..., 1] + 1) * b.shape[0] - 1) / 2
    warped = cv2.remap(b, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT)
    cert = np.clip(certainty[:, :ww], 0, 1)
    shaded = (warped.astype(np.float32) * cert[..., None]).astype(np.uint8)
    heat = cv2.applyColorMap((cert * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    return np.concatenate([a, shaded, heat], axis=1)


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write a BGR picture as PNG, under a temporary name renamed into place (a reader never sees half)."""
    import cv2

    from .atomic import atomic_write

    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    return atomic_write(path, lambda f: f.write(data.tobytes()))
