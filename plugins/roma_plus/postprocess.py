"""Raw outputs (dense ``warp`` and ``certainty``) -> sampled ``Matches`` in original-image pixels.

As MatchAnything's ``forward_inference``: sample (``sample_mode`` "balanced" as upstream, or
"topk"), convert to pixels of the ORIGINAL images (RoMa stretches, so x = W_orig / 2 * (x_n + 1)),
keep matches whose certainty is above ``match_threshold`` (0.0, upstream's MATCH_THRESH) and
whose keypoints lie at most at W-1 / H-1 (upstream's border mask). Sampling runs where the
tensors are (CUDA with the torch/TensorRT backends, CPU otherwise).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from matchrt.transfer import host_array
from matchrt.types import Matches, PairContext

from .sampling import sample_matches, to_pixels

NAME = "roma_plus"
SAMPLE_DEFAULTS: dict[str, Any] = {
    "num_samples": 5000,
    "sample_threshold": 0.05,
    "sample_mode": "balanced",
    "seed": 0,
    "match_threshold": 0.0,
}


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def _seed(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "random")):
        return None
    return int(value)


def postprocess(outputs: Mapping[str, Any], pair: PairContext, options: Mapping[str, Any], index: int = 0) -> Matches:
    """Matches of pair ``index`` of the batch, with its warp and certainty attached (numpy)."""
    opts = dict(SAMPLE_DEFAULTS)
    opts.update({k: v for k, v in options.items() if k in SAMPLE_DEFAULTS})
    warp = _tensor(outputs["warp"])
    certainty = _tensor(outputs["certainty"])
    if warp.ndim == 4:
        warp, certainty = warp[index], certainty[index]
    num = int(opts["num_samples"])
    mode = str(opts["sample_mode"])
    matches, conf = sample_matches(warp.float(), certainty.float(), num, float(opts["sample_threshold"]),
                                   mode, _seed(opts["seed"]))  # type: ignore[arg-type]
    kp0, kp1 = to_pixels(matches, pair.original_size0, pair.original_size1)
    (h0, w0), (h1, w1) = pair.original_size0, pair.original_size1
    keep = conf > float(opts["match_threshold"])
    keep &= (kp0[:, 0] <= w0 - 1) & (kp0[:, 1] <= h0 - 1) & (kp1[:, 0] <= w1 - 1) & (kp1[:, 1] <= h1 - 1)
    meta = {
        "matcher": NAME,
        "sample_mode": mode,
        "num_samples": num,
        "num_drawn": int(matches.shape[0]),
        "num_matches": int(keep.sum()),
        "sample_threshold": float(opts["sample_threshold"]),
        "match_threshold": float(opts["match_threshold"]),
        "seed": _seed(opts["seed"]),
        "warp_size": [int(warp.shape[0]), int(warp.shape[1])],
    }
    return Matches(
        kp0[keep].cpu().numpy(), kp1[keep].cpu().numpy(), conf[keep].cpu().numpy(), meta,
        warp=host_array(warp), certainty=host_array(certainty),  # fp32 maps (host_array widens halves)
    )
