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
- fp16: with random weights the confidences are nearly flat, and rounding reorders near-ties, so
  fp16 may find other matches near the threshold; it must not lose more of fp32's matches than
  fp32 itself loses to +-0.5/255 noise on the images (their 8-bit rounding), plus 5% of the matches,
  and the matches both find agree within 0.5 px and fp16's 1e-2 on the log-confidence. Before the
  fine stage ran in fp32 (export.FineRefine), an H200 kept 62 of 215 matches, the noise 196.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from eloftr_helpers import (
    agreement, gap_threshold, megadepth_pair, noisy, pipeline_at, reference, valid_matches,
)
from matchrt.tf32 import tf32_switches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EAGER = {"device": "cuda"}
COMPILED = {"device": "cuda", "compile": True, "cuda_graph": True}
FP16 = {"precision": "fp16"}


def _assert_same(ref: dict[str, np.ndarray], test: dict[str, np.ndarray], label: str) -> None:
    stats = agreement(ref, test, pixels=1e-3)
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
    eager = valid_matches(pipeline_at(320, threshold, EAGER), image0, image1)
    _assert_same(upstream, eager, "eager fp32 vs upstream")
    compiled = valid_matches(pipeline_at(320, threshold, COMPILED), image0, image1, calls=3)
    _assert_same(upstream, compiled, "compiled fp32 + CUDA graphs vs upstream")


def test_compiled_graph_finds_eager_matches_at_832(strict_fp32) -> None:
    """The bench's size, fp32 then fp16 (see the module's docstring for what each must keep)."""
    image0, image1 = megadepth_pair(832)
    ranked = valid_matches(pipeline_at(832, 1e-12, EAGER), image0, image1)["conf"]
    assert len(ranked) == 2048, "the probe threshold should fill every slot"
    threshold, count = gap_threshold(np.sort(ranked)[::-1], 200, 600)
    eager = valid_matches(pipeline_at(832, threshold, EAGER), image0, image1)
    assert len(eager["conf"]) == count
    _assert_same(eager, valid_matches(pipeline_at(832, threshold, COMPILED), image0, image1, calls=3),
                 f"compiled fp32 + CUDA graphs vs eager fp32, threshold {threshold:.4g}")

    half = agreement(eager, valid_matches(pipeline_at(832, threshold, {**COMPILED, **FP16}), image0, image1, calls=3))
    noise = agreement(eager, valid_matches(pipeline_at(832, threshold, EAGER), noisy(image0, 0), noisy(image1, 1)))
    print(f"compiled fp16 + CUDA graphs vs eager fp32: {half}\n+-0.5/255 input noise vs eager fp32: {noise}")
    assert half["one_to_one"] and half["max_px"] <= 0.5 and half["log_conf_rel"] <= 1e-2, half
    assert count - half["paired"] <= count - noise["paired"] + 0.05 * count, (half, noise)
