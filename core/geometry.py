"""Robust two-view geometry and the match filters every plugin shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import MatchrtError
from .types import Matches

METHODS = {"magsac": "USAC_MAGSAC", "accurate": "USAC_ACCURATE", "default": "USAC_DEFAULT",
           "prosac": "USAC_PROSAC", "ransac": "RANSAC"}


@dataclass
class GeometryResult:
    """An estimated two-view model and which matches agree with it."""

    model: Optional[np.ndarray]  # 3 x 3 (H, F or E), None when estimation failed
    kind: str  # "H", "F" or "E"
    inliers: np.ndarray  # bool, one per match

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())


def estimate(
    matches: Matches,
    model: str = "H",
    threshold: float = 3.0,
    method: str = "magsac",
    confidence: float = 0.9999,
    max_iters: int = 10000,
    camera0: Optional[np.ndarray] = None,
    camera1: Optional[np.ndarray] = None,
    seed: int = 0,
) -> GeometryResult:
    """Fit a homography (H), fundamental (F) or essential (E) matrix with OpenCV's USAC.

    E needs the intrinsics; pixels are normalised with them and the threshold scaled accordingly.
    """
    import cv2

    model = model.upper()
    n = len(matches)
    empty = GeometryResult(None, model, np.zeros(n, dtype=bool))
    minimum = {"H": 4, "F": 8, "E": 5}.get(model)
    if minimum is None:
        raise MatchrtError(f"unknown model {model!r}; use H, F or E")
    if method not in METHODS:
        raise MatchrtError(f"unknown robust method {method!r}; choose from {', '.join(METHODS)}")
    if n < minimum:
        return empty
    flag = getattr(cv2, METHODS[method])
    p0 = matches.keypoints0.astype(np.float64)
    p1 = matches.keypoints1.astype(np.float64)
    cv2.setRNGSeed(seed)
    if model == "H":
        m, mask = cv2.findHomography(p0, p1, flag, threshold, maxIters=max_iters, confidence=confidence)
    elif model == "F":
        m, mask = cv2.findFundamentalMat(p0, p1, flag, threshold, confidence, max_iters)
    else:
        if camera0 is None or camera1 is None:
            raise MatchrtError("--model E needs the camera intrinsics of both images")
        n0 = cv2.undistortPoints(p0[:, None], camera0, None)[:, 0]
        n1 = cv2.undistortPoints(p1[:, None], camera1, None)[:, 0]
        focal = np.mean([camera0[0, 0], camera0[1, 1], camera1[0, 0], camera1[1, 1]])
        m, mask = cv2.findEssentialMat(n0, n1, np.eye(3), flag, confidence, threshold / focal,
                                       max_iters)
    if m is None or mask is None or m.shape[0] < 3:
        return empty
    return GeometryResult(np.asarray(m[:3], dtype=np.float64), model, mask.reshape(-1).astype(bool))


def mutual_nearest(similarity: np.ndarray, threshold: float = -np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) that are each other's best match and score above `threshold`."""
    if similarity.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    j_of_i = similarity.argmax(axis=1)
    i_of_j = similarity.argmax(axis=0)
    i = np.arange(similarity.shape[0])
    keep = (i_of_j[j_of_i] == i) & (similarity[i, j_of_i] > threshold)
    return i[keep], j_of_i[keep]


def filter_matches(
    matches: Matches, min_confidence: Optional[float] = None, top_k: Optional[int] = None,
) -> Matches:
    """Keep matches above a confidence and at most the `top_k` most confident, best first."""
    keep = np.ones(len(matches), dtype=bool)
    if min_confidence is not None:
        keep &= matches.confidence >= min_confidence
    out = matches.select(keep)
    order = np.argsort(-out.confidence, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    return out.select(order)


def mutual_check(matches: Matches, radius: float = 0.5) -> Matches:
    """Drop one-to-many correspondences: each keypoint of either image keeps its best match only."""
    if len(matches) == 0:
        return matches
    order = np.argsort(-matches.confidence, kind="stable")
    seen0: set[tuple[int, int]] = set()
    seen1: set[tuple[int, int]] = set()
    keep = []
    q = 1.0 / max(radius, 1e-6)
    for idx in order:
        a = tuple(np.round(matches.keypoints0[idx] * q).astype(int))
        b = tuple(np.round(matches.keypoints1[idx] * q).astype(int))
        if a in seen0 or b in seen1:
            continue
        seen0.add(a)
        seen1.add(b)
        keep.append(idx)
    return matches.select(np.asarray(keep, dtype=np.int64))


def project(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a homography to N x 2 points."""
    p = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ h.T
    return p[:, :2] / p[:, 2:3]


def corner_error(h_est: Optional[np.ndarray], h_true: np.ndarray, width: int, height: int) -> float:
    """Mean distance of the image corners mapped by the estimated vs the true homography."""
    if h_est is None:
        return float("inf")
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], float)
    return float(np.linalg.norm(project(h_est, corners) - project(h_true, corners), axis=1).mean())


def auc(errors: np.ndarray, thresholds: tuple[float, ...] = (3.0, 5.0, 10.0)) -> dict[str, float]:
    """Area under the cumulative error curve up to each threshold (as in homography benchmarks)."""
    errors = np.sort(np.asarray(errors, dtype=np.float64))
    recall = (np.arange(len(errors)) + 1) / max(len(errors), 1)
    errors = np.concatenate([[0.0], errors])
    recall = np.concatenate([[0.0], recall])
    out = {}
    for t in thresholds:
        last = np.searchsorted(errors, t)
        r = np.concatenate([recall[:last], [recall[last - 1]]])
        e = np.concatenate([errors[:last], [t]])
        out[f"auc@{t:g}px"] = float(np.trapezoid(r, x=e) / t) if len(errors) > 1 else 0.0
    return out
