"""eloftr on a CUDA GPU: the graph the bench times (torch.compile + CUDA graphs) finds the matches
eager torch finds, and upstream's at 320 x 320.

The bench's agreement column is empty for eloftr with random weights (no pair passes the default
threshold 0.1), so these tests are where the compiled graph's outputs are checked on a GPU: the
deterministic weights on the MegaDepth pair, at thresholds that keep tens to hundreds of matches.

- fp32 (TF32 off): the compiled graph computes eager's function, so the match set is the same, one
  to one, keypoints within 1e-3 px, log-confidences within 1e-4 relative (the fp32 rule;
  eloftr_helpers.assert_same_matches says why the log). The 832 threshold lies in the widest
  relative gap of eager's confidences between places 200 and 600, so fp32 noise cannot move a match
  across it.
- fp16: with random weights the coarse confidences are nearly flat (the 1000th of 10816^2 pairs
  within 1.5x of the best), and fp16 rounding reorders such near-ties: on the CPU, fp16 autocast kept
  23-30% of eager fp32's matches at 100 to 1000 matches, bf16 under 1%, +-0.5/255 input noise 94%.
  So the fp16 test asserts what fp16 must keep (the matches both find at the same keypoints, within
  0.5 px, confidences within fp16's 1e-2 relative on the log) and prints how many it keeps against
  the input noise; a graph that pairs the wrong images or cells keeps none.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from eloftr_helpers import checkpoint_path, gap_threshold, reference
from matchrt.runner import Pipeline, open_pipeline
from matchrt.tf32 import tf32_switches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

IMAGES = ("02928139_3448003521.jpg", "17295357_9106075285.jpg")
EAGER = {"device": "cuda"}
COMPILED = {"device": "cuda", "compile": True, "cuda_graph": True}
FP16 = {"precision": "fp16"}


def _pipeline(size: int, threshold: float, options: dict) -> Pipeline:
    return open_pipeline("eloftr", "torch", {"checkpoint": checkpoint_path()}, height=size, width=size,
                         extra={"threshold": threshold, "max_matches": 2048}, backend_options=options)


@functools.lru_cache(maxsize=None)
def _megadepth(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MegaDepth pair as 1 x 1 x size x size grayscale in [0, 1] (INTER_AREA, as the reference)."""
    folder = Path(__file__).parent / "data" / "images"
    out = []
    for name in IMAGES:
        gray = cv2.imread(str(folder / name), cv2.IMREAD_GRAYSCALE)
        resized = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
        out.append(torch.from_numpy(resized.astype(np.float32) / 255.0)[None, None])
    return out[0], out[1]


def _noisy(image: torch.Tensor, seed: int) -> torch.Tensor:
    """``image`` plus uniform noise of +-0.5/255 (its 8-bit quantisation), clipped to [0, 1]."""
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed)) - 0.5
    return (image + noise / 255.0).clamp(0.0, 1.0)


def _matches(pipe: Pipeline, image0: torch.Tensor, image1: torch.Tensor, calls: int = 1) -> dict[str, np.ndarray]:
    """Valid matches of the last of ``calls`` calls (a CUDA-graph session replays from its later calls)."""
    for _ in range(calls):
        out = pipe.run({"image0": image0.clone(), "image1": image1.clone()})
    valid = out["valid"][0].cpu().numpy().astype(bool)
    return {"kp0": out["keypoints0"][0].cpu().numpy()[valid], "kp1": out["keypoints1"][0].cpu().numpy()[valid],
            "conf": out["confidence"][0].cpu().numpy()[valid]}


def _agreement(ref: dict[str, np.ndarray], test: dict[str, np.ndarray], pixels: float = 0.5) -> dict[str, float]:
    """How ``test`` matches ``ref``: each reference match paired with its nearest test match (largest
    coordinate difference over both keypoints) when that lies within ``pixels``."""
    a = np.concatenate([ref["kp0"], ref["kp1"]], 1).astype(np.float64)
    b = np.concatenate([test["kp0"], test["kp1"]], 1).astype(np.float64)
    if not len(a) or not len(b):
        return {"reference": len(a), "test": len(b), "paired": 0, "one_to_one": True, "max_px": 0.0,
                "log_conf_rel": 0.0}
    dist = np.abs(a[:, None, :] - b[None, :, :]).max(-1)
    nearest, gap = dist.argmin(1), dist.min(1)
    paired = gap <= pixels
    log_ref = np.log(ref["conf"][paired].astype(np.float64))
    log_test = np.log(test["conf"][nearest[paired]].astype(np.float64))
    return {
        "reference": len(a), "test": len(b), "paired": int(paired.sum()),
        "one_to_one": len(set(nearest[paired].tolist())) == int(paired.sum()),
        "max_px": float(gap[paired].max()) if paired.any() else 0.0,
        "log_conf_rel": float((np.abs(log_test - log_ref) / np.abs(log_ref)).max()) if paired.any() else 0.0,
    }


def _assert_same(ref: dict[str, np.ndarray], test: dict[str, np.ndarray], label: str) -> None:
    stats = _agreement(ref, test, pixels=1e-3)
    print(f"{label}: {stats}")
    assert stats["reference"] == stats["test"] == stats["paired"] > 0 and stats["one_to_one"], stats
    assert stats["log_conf_rel"] <= 1e-4, stats


@pytest.fixture
def strict_fp32():
    """TF32 off (torch's default lets cuDNN's convolutions use it): fp32 runs compute in fp32."""
    with tf32_switches(False):
        yield


def test_compiled_graph_finds_upstream_matches_at_320(strict_fp32) -> None:
    ref = reference()
    image0, image1 = (torch.from_numpy(ref[k].astype(np.float32)) / 255.0 for k in ("image0_u8", "image1_u8"))
    threshold = float(ref["threshold"])
    upstream = {"kp0": ref["mkpts0_f"], "kp1": ref["mkpts1_f"], "conf": ref["mconf"]}
    eager = _matches(_pipeline(320, threshold, EAGER), image0, image1)
    _assert_same(upstream, eager, "eager fp32 vs upstream")
    compiled = _matches(_pipeline(320, threshold, COMPILED), image0, image1, calls=3)
    _assert_same(upstream, compiled, "compiled fp32 + CUDA graphs vs upstream")


def test_compiled_graph_finds_eager_matches_at_832(strict_fp32) -> None:
    """The bench's size, fp32 then fp16 (see the module's docstring for what each must keep)."""
    image0, image1 = _megadepth(832)
    ranked = _matches(_pipeline(832, 1e-12, EAGER), image0, image1)["conf"]
    assert len(ranked) == 2048, "the probe threshold should fill every slot"
    threshold, count = gap_threshold(np.sort(ranked)[::-1], 200, 600)
    eager = _matches(_pipeline(832, threshold, EAGER), image0, image1)
    assert len(eager["conf"]) == count
    _assert_same(eager, _matches(_pipeline(832, threshold, COMPILED), image0, image1, calls=3),
                 f"compiled fp32 + CUDA graphs vs eager fp32, threshold {threshold:.4g}")

    half = _agreement(eager, _matches(_pipeline(832, threshold, {**COMPILED, **FP16}), image0, image1, calls=3))
    noise = _agreement(eager, _matches(_pipeline(832, threshold, EAGER), _noisy(image0, 0), _noisy(image1, 1)))
    print(f"compiled fp16 + CUDA graphs vs eager fp32: {half}\n+-0.5/255 input noise vs eager fp32: {noise}")
    assert half["one_to_one"] and half["max_px"] <= 0.5 and half["log_conf_rel"] <= 1e-2, half
    assert half["paired"] >= 0.1 * count, "fp16 keeps too few of fp32's matches for rounding alone"
    assert abs(half["test"] - count) <= 0.5 * count, half
