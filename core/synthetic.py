"""Image pairs with known geometry: random homographies and photometric changes of real images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np


@dataclass
class HomographyPair:
    """Image B is image A warped by `homography` (A pixels -> B pixels), then recoloured."""

    image0: np.ndarray
    image1: np.ndarray
    homography: np.ndarray
    name: str


def random_homography(width: int, height: int, rng: np.random.Generator, strength: float = 0.15,
                      max_angle: float = 20.0) -> np.ndarray:
    """A perspective warp moving each corner by up to `strength` of the size, plus a rotation."""
    import cv2

    src = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    jitter = rng.uniform(-strength, strength, (4, 2)) * np.float32([width, height])
    dst = src + jitter.astype(np.float32)
    angle = np.deg2rad(rng.uniform(-max_angle, max_angle))
    centre = np.float32([width / 2, height / 2])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    dst = (dst - centre) @ rot.T + centre
    return cv2.getPerspectiveTransform(src, dst.astype(np.float32)).astype(np.float64)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, gamma and noise changes, as lighting and sensors differ."""
    out = image * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)
    out = np.clip(out, 0, 1) ** rng.uniform(0.7, 1.4)
    out = out + rng.normal(0, 0.01, out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def homography_pairs(
    images: Sequence[np.ndarray], count: int, seed: int = 0, size: Optional[tuple[int, int]] = None,
    strength: float = 0.15, max_angle: float = 20.0, names: Optional[Sequence[str]] = None,
) -> Iterator[HomographyPair]:
    """`count` pairs cycling over `images`, each resized to `size` (h, w) first if given."""
    import cv2

    rng = np.random.default_rng(seed)
    for i in range(count):
        k = i % len(images)
        base = images[k]
        if size is not None:
            base = cv2.resize(base, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        h, w = base.shape[:2]
        hom = random_homography(w, h, rng, strength, max_angle)
        warped = cv2.warpPerspective(base, hom, (w, h), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT)
        label = names[k] if names else f"image{k}"
        yield HomographyPair(base, photometric(warped, rng), hom, f"{label}#h{i}")


def load_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """Read images with matchrt's reader."""
    from .images import read_image

    return [read_image(p) for p in paths]


def bundled_images() -> list[Path]:
    """The real images shipped with matchrt's tests (when run from a checkout), else none."""
    root = Path(__file__).resolve().parent.parent / "tests" / "data" / "images"
    return sorted(root.glob("*.jpg")) if root.exists() else []
