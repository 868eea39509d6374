"""Reading images and bringing them to a matcher's input contract, remembering the scale."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .errors import MatchrtError
from .transfer import host_buffer
from .types import InputContract, PairContext


def decode_image(path: Union[str, Path]) -> np.ndarray:
    """Decode an image file as stored: H x W x C (C = 1, 3 RGB or 4 RGBA), uint8, uint16 or float.

    The expensive half of `read_image` (what a reading stage does before the pixels travel on).
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise MatchrtError(f"image not found: {path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise MatchrtError(
            f"cannot read {path} as an image: OpenCV does not recognise its contents. "
            "Pass a PNG, JPEG, TIFF or another format OpenCV reads."
        )
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise MatchrtError(f"{path}: unsupported pixel type {image.dtype}; use 8- or 16-bit images.")
    if image.dtype == np.float64:
        image = image.astype(np.float32)  # OpenCV's colour conversions take 8U, 16U and 32F
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] not in (1, 3, 4):
        raise MatchrtError(f"{path}: {image.shape[2]} channels; expected 1, 3 or 4.")
    if image.shape[2] >= 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return image


def unit_float(image: np.ndarray) -> np.ndarray:
    """A decoded image as float32 in [0, 1]: RGB (H x W x 3, alpha dropped) or gray (H x W)."""
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(image.dtype, 1.0)
    if image.ndim == 3:
        image = image[:, :, :3] if image.shape[2] >= 3 else image[:, :, 0]
    return np.clip(image.astype(np.float32) / np.float32(scale), 0.0, 1.0)


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Read an image as RGB (H x W x 3) or gray (H x W), float32 in [0, 1].

    8- and 16-bit files, gray, BGR and BGRA (alpha dropped) are accepted.
    """
    return unit_float(decode_image(path))


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert an RGB or gray float image to `channels` (1 or 3), channel-last."""
    if channels == 1:
        if image.ndim == 3:
            # ITU-R BT.601 luma, as OpenCV's RGB2GRAY computes it
            image = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return image[:, :, None]
    if channels == 3:
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return image
    raise MatchrtError(f"unsupported channel count {channels}")


MASK_SUFFIX = "_mask"  # a graph input `<image input>_mask` takes that image's padding mask


def fit_size(h: int, w: int, height: int, width: int, multiple: int = 1) -> tuple[int, int]:
    """(nh, nw) an h x w image takes inside height x width when padded: scaled to fit, sides
    rounded, then floored to multiples of `multiple` (at least one), as upstream's `dfactor`, so
    the padding covers whole cells of the matcher's grid."""
    s = min(width / w, height / h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    if multiple > 1:
        nw, nh = max(multiple, nw // multiple * multiple), max(multiple, nh // multiple * multiple)
    return min(nh, height), min(nw, width)


def resize(
    image: np.ndarray, height: int, width: int, mode: str, interpolation: str = "area",
    multiple: int = 1,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize to (height, width) by stretching, or by scaling to fit and padding bottom/right.

    `multiple` (pad only): content sides are floored to multiples of it (see `fit_size`).
    Returns the image and the scale (sx, sy) with input_pixel = original_pixel * scale.
    """
    import cv2

    h, w = image.shape[:2]

    def flag(shrinking: bool) -> int:
        return cv2.INTER_AREA if shrinking and interpolation == "area" else cv2.INTER_LINEAR

    if mode == "stretch":
        sx, sy = width / w, height / h
        out = cv2.resize(image, (width, height), interpolation=flag(sx < 1 and sy < 1))
    elif mode == "pad":
        nh, nw = fit_size(h, w, height, width, multiple)
        small = cv2.resize(image, (nw, nh), interpolation=flag(nw < w and nh < h))
        if small.ndim == 2:
            small = small[:, :, None]
        out = np.zeros((height, width, image.shape[2]), dtype=image.dtype)
        out[:nh, :nw] = small
        sx, sy = nw / w, nh / h
    else:
        raise MatchrtError(f"unknown resize mode {mode!r}; use 'stretch' or 'pad'")
    if out.ndim == 2:
        out = out[:, :, None]
    return out, (sx, sy)


def to_tensor(image: np.ndarray):  # -> torch.Tensor
    """Channel-last float image -> 1 x C x H x W torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


def round_side(value: int, multiple: int, rounding: str) -> int:
    """Round a side length to a multiple of the matcher's divisor as the matcher declares."""
    if rounding == "floor":
        return max(multiple, (value // multiple) * multiple)
    if rounding == "ceil":
        return -(-value // multiple) * multiple
    return max(multiple, int(round(value / multiple)) * multiple)


def check_size(height: int, width: int, contract: InputContract, matcher: str) -> None:
    """Refuse a graph size the matcher cannot take, naming the nearest valid sizes."""
    m = contract.side_multiple
    for side, value in (("height", height), ("width", width)):
        if value <= 0 or value % m:
            lo = max(m, (value // m) * m)
            hi = lo + m if lo >= value else lo
            hi = max(hi, -(-value // m) * m)
            raise MatchrtError(
                f"--{side} {value} is not a multiple of {m}, which {matcher} needs "
                f"(its patch/stride size). Nearest valid {side}s: {lo} or {hi}."
            )
    if contract.square and height != width:
        raise MatchrtError(f"{matcher} needs a square input; got {height}x{width}. Use --height = --width.")


def prepare_pair(
    image0: np.ndarray, image1: np.ndarray, contract: InputContract, sizes: dict[str, tuple[int, int]],
    pinned: bool = False,
) -> tuple[dict[str, np.ndarray], PairContext]:
    """Resize both images to every graph input they feed.

    `sizes` maps input names to (height, width); names starting with `image0`/`image1` get the
    respective image. The first `image0` entry defines the PairContext scale.
    A graph that takes padding masks (inputs `image0_mask`, `image1_mask`) was exported for
    padded images: both images are then padded (content sides floored to the contract's side
    multiple) whatever the contract's default, and each mask input gets 1 x 1 x H x W float32,
    1 where the image's content lies and 0 on the padding.
    With ``pinned`` (for a graph on a GPU) the image inputs are written into page-locked memory
    (`transfer.host_buffer`), from where they reach the GPU in a direct transfer.
    """
    originals = (image0, image1)
    masked = any(n.endswith(MASK_SUFFIX) and n.startswith(("image0", "image1")) for n in sizes)
    mode = "pad" if masked else contract.resize
    multiple = contract.side_multiple if mode == "pad" else 1
    inputs: dict[str, np.ndarray] = {}
    scales: dict[int, tuple[float, float]] = {}
    main_size = None
    for name, (h, w) in sizes.items():
        index = 0 if name.startswith("image0") else 1 if name.startswith("image1") else None
        if index is None:
            continue
        if name.endswith(MASK_SUFFIX):
            nh, nw = fit_size(*originals[index].shape[:2], h, w, multiple)
            mask = np.zeros((1, 1, h, w), dtype=np.float32)
            mask[..., :nh, :nw] = 1.0
            inputs[name] = mask
            continue
        src = to_channels(originals[index], contract.channels)
        resized, scale = resize(src, h, w, mode, contract.interpolation, multiple)
        chw = resized.transpose(2, 0, 1)
        buffer = host_buffer((1, *chw.shape), np.float32, pinned)
        buffer[0] = chw  # the one copy: channels first, cast to float32
        inputs[name] = buffer
        if index not in scales:
            scales[index] = scale
            if index == 0:
                main_size = (h, w)
    if 0 not in scales or 1 not in scales:
        raise MatchrtError(f"the graph has no image0/image1 inputs (inputs: {', '.join(sizes)})")
    ctx = PairContext(
        original_size0=tuple(image0.shape[:2]),  # type: ignore[arg-type]
        original_size1=tuple(image1.shape[:2]),  # type: ignore[arg-type]
        input_size=main_size or (0, 0),
        scale0=scales[0],
        scale1=scales[1],
        image0=image0,
        image1=image1,
    )
    return inputs, ctx
