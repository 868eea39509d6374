"""Raw graph outputs -> `Matches` in original-image pixels.

Options: `threshold` (drop matches whose confidence is not above it; the export threshold by
default, so an engine built with a low threshold can be tightened at run time) and `mutual`
(keep a match only if it is the most confident one for its coarse cell in image 0 and for its
coarse cell in image 1: a one-to-one filter like LoFTR's mutual nearest neighbour, which
MatchAnything's EfficientLoFTR itself does not apply).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from matchrt.types import Matches, PairContext

from .model import COARSE_STRIDE, DEFAULT_THRESHOLD

NAME = "eloftr"


def _first(outputs: Mapping[str, Any], name: str, index: int) -> np.ndarray:
    value = outputs[name]
    array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    return array[index] if array.ndim >= (3 if name.startswith("keypoints") else 2) else array


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def one_to_one(kp0: np.ndarray, kp1: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Mask of matches that are the most confident for their coarse cell in both images.

    Cells are recovered from input-pixel keypoints: a keypoint lies within 4.5 px of its cell's
    anchor (a multiple of 8), so rounding kp / 8 gives the cell (exact for image 0).
    """
    n = len(conf)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    order = np.argsort(-conf, kind="stable")
    big = 1 << 20
    cells = []
    for kp in (kp0, kp1):
        c = np.rint(kp[order] / COARSE_STRIDE).astype(np.int64)
        cells.append(c[:, 1] * big + c[:, 0])
    _, first0 = np.unique(cells[0], return_index=True)
    _, first1 = np.unique(cells[1], return_index=True)
    best = np.zeros(n, dtype=bool)
    best[np.intersect1d(first0, first1)] = True
    keep[order] = best
    return keep


def postprocess(outputs: Mapping[str, Any], pair: PairContext, options: Mapping[str, Any],
                index: int = 0) -> Matches:
    """Valid matches of pair `index` above the threshold (optionally one-to-one), original pixels."""
    valid = _first(outputs, "valid", index).astype(bool)
    conf = _first(outputs, "confidence", index).astype(np.float32)
    kp0 = _first(outputs, "keypoints0", index).astype(np.float32)
    kp1 = _first(outputs, "keypoints1", index).astype(np.float32)
    threshold = float(options.get("threshold", DEFAULT_THRESHOLD))
    mutual = _truthy(options.get("mutual", False))
    keep = valid & (conf > threshold)
    if mutual:
        keep &= one_to_one(kp0, kp1, np.where(keep, conf, -1.0))
    # input pixel = original pixel * scale
    k0 = kp0[keep] / np.asarray(pair.scale0, dtype=np.float32)
    k1 = kp1[keep] / np.asarray(pair.scale1, dtype=np.float32)
    meta = {
        "matcher": NAME,
        "num_valid": int(valid.sum()),  # what the graph returned
        "num_matches": int(keep.sum()),  # after threshold (and mutual) filtering
        "threshold": threshold,
        "mutual": mutual,
    }
    return Matches(k0, k1, conf[keep], meta)
