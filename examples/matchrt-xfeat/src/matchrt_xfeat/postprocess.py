"""Raw graph outputs -> `Matches` in original-image pixels."""

from __future__ import annotations

from typing import Any

import numpy as np

from matchrt.types import Matches, PairContext


def to_matches(outputs: dict[str, Any], pair: PairContext, batch_index: int = 0) -> Matches:
    """Keep the valid slots and undo the resize (input pixel = original pixel * scale)."""
    valid = _np(outputs["valid"])[batch_index].astype(bool)
    k0 = _np(outputs["keypoints0"])[batch_index][valid] / np.asarray(pair.scale0, np.float32)
    k1 = _np(outputs["keypoints1"])[batch_index][valid] / np.asarray(pair.scale1, np.float32)
    conf = _np(outputs["confidence"])[batch_index][valid]
    return Matches(k0, k1, conf, {"num_matches": int(valid.sum()), "slots": int(valid.size)})


def _np(value: Any) -> np.ndarray:
    """torch tensors (any device) and arrays alike."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
