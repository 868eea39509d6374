"""Raw roma_full outputs (coarse warp, certainty) -> `Matches` in original-image pixels.

Every coarse cell of both directions is a candidate: A->B cells pair their centre in A with
their warp in B, B->A cells pair their warp in A with their centre in B (as upstream samples
from the whole symmetric warp). Candidates are ranked by certainty; those above ``threshold``
(default 0.0, MatchAnything's ROMA.MATCH_THRESH) whose keypoints lie inside both images are
kept, at most ``max_matches`` (default 5000, ROMA.SAMPLE.N_SAMPLE). Unlike upstream's random
balanced sampling this is deterministic. The warp and certainty of the pair are attached to the
Matches for pictures.

Normalised -> pixels: x_px = (x + 1) / 2 * W (W the graph's input width), then / scale to the
original image (with the stretch resize this equals upstream's W_orig / 2 * (x + 1)).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from matchrt.errors import MatchrtError
from matchrt.transfer import host_array
from matchrt.types import Matches, PairContext

NAME = "roma_full"
DEFAULT_MAX_MATCHES = 5000
DEFAULT_THRESHOLD = 0.0


def to_pixels(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """N x 2 normalised [-1, 1] coordinates -> pixel coordinates of an H x W image."""
    return np.stack(((xy[:, 0] + 1.0) * (width / 2.0), (xy[:, 1] + 1.0) * (height / 2.0)), axis=1)


def postprocess(outputs: Mapping[str, Any], pair: PairContext, options: Mapping[str, Any],
                index: int = 0) -> Matches:
    """Matches of pair ``index`` (top certainties above the threshold), original pixels."""
    warp, cert = (v if hasattr(v, "ndim") else np.asarray(v) for v in (outputs["warp"], outputs["certainty"]))
    if warp.ndim == 4:  # a batch: this pair's maps only leave the device
        warp, cert = warp[index], cert[index]
    warp = host_array(warp).astype(np.float32, copy=False)  # h x 2w x 4
    cert = host_array(cert).astype(np.float32, copy=False)  # h x 2w
    try:
        limit = int(options.get("max_matches", DEFAULT_MAX_MATCHES))
        threshold = float(options.get("threshold", DEFAULT_THRESHOLD))
    except (TypeError, ValueError) as exc:
        raise MatchrtError(f"roma_full: max_matches must be an integer and threshold a number ({exc})") from None
    h_in, w_in = pair.input_size
    if not h_in or not w_in:
        raise MatchrtError("roma_full postprocess needs the graph's input size in the PairContext")
    flat = warp.reshape(-1, 4)
    conf = cert.reshape(-1)
    # input pixel = original pixel * scale
    kp0 = to_pixels(flat[:, :2], h_in, w_in) / np.asarray(pair.scale0, dtype=np.float32)
    kp1 = to_pixels(flat[:, 2:], h_in, w_in) / np.asarray(pair.scale1, dtype=np.float32)
    (h0, w0), (h1, w1) = pair.original_size0, pair.original_size1
    inside = ((kp0[:, 0] >= 0) & (kp0[:, 0] <= w0 - 1) & (kp0[:, 1] >= 0) & (kp0[:, 1] <= h0 - 1)
              & (kp1[:, 0] >= 0) & (kp1[:, 0] <= w1 - 1) & (kp1[:, 1] >= 0) & (kp1[:, 1] <= h1 - 1))
    keep = np.flatnonzero(inside & (conf > threshold))
    order = keep[np.argsort(-conf[keep], kind="stable")][: max(limit, 0)]
    meta = {
        "matcher": NAME,
        "num_candidates": int(conf.size),
        "num_matches": int(order.size),
        "threshold": threshold,
        "max_matches": limit,
        "coarse_grid": [int(warp.shape[0]), int(warp.shape[1] // 2)],
    }
    return Matches(kp0[order], kp1[order], conf[order], meta, warp=warp, certainty=cert)
