"""eloftr postprocess: invalid slots dropped, threshold/mutual filters, original-pixel keypoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eloftr_helpers import loaded_model, reference
from matchrt.host import create_host
from matchrt.images import read_image
from matchrt.plugins.eloftr import hooks
from matchrt.runner import torch_pipeline
from matchrt.types import ExportOptions, PairContext


def _outputs(kp0, kp1, conf, valid) -> dict[str, torch.Tensor]:
    return {
        "keypoints0": torch.tensor([kp0], dtype=torch.float32),
        "keypoints1": torch.tensor([kp1], dtype=torch.float32),
        "confidence": torch.tensor([conf], dtype=torch.float32),
        "valid": torch.tensor([valid], dtype=torch.bool),
    }


def _pair(scale0=(0.5, 0.25), scale1=(2.0, 4.0)) -> PairContext:
    return PairContext((1280, 640), (80, 160), (320, 320), scale0, scale1)


def test_scales_back_to_original_pixels_and_drops_invalid() -> None:
    out = _outputs([[16.5, 40.0], [100.0, 200.0], [0.0, 0.0]],
                   [[8.0, 12.0], [60.0, 20.0], [0.0, 0.0]],
                   [0.9, 0.4, 0.0], [True, True, False])
    m = hooks.postprocess("eloftr", out, _pair(), {"threshold": 0.1})
    assert len(m) == 2
    # input pixel = original pixel * scale  ->  original = input / scale
    np.testing.assert_allclose(m.keypoints0, [[33.0, 160.0], [200.0, 800.0]])
    np.testing.assert_allclose(m.keypoints1, [[4.0, 3.0], [30.0, 5.0]])
    np.testing.assert_allclose(m.confidence, [0.9, 0.4])
    assert m.metadata["matcher"] == "eloftr"
    assert m.metadata["num_valid"] == 2 and m.metadata["num_matches"] == 2


def test_threshold_is_applied_again() -> None:
    out = _outputs([[16.0, 16.0], [48.0, 48.0], [80.0, 80.0]], [[16.0, 16.0], [48.0, 48.0], [80.0, 80.0]],
                   [0.5, 0.2, 0.05], [True, True, True])
    tight = hooks.postprocess("eloftr", out, _pair((1, 1), (1, 1)), {"threshold": 0.3})
    assert tight.confidence.tolist() == [0.5]
    assert tight.metadata["num_valid"] == 3 and tight.metadata["num_matches"] == 1
    # without a threshold option the matcher's default (0.1) applies
    default = hooks.postprocess("eloftr", out, _pair((1, 1), (1, 1)), {})
    assert len(default) == 2


def test_mutual_keeps_the_best_match_per_cell() -> None:
    # matches 0 and 1 share their image-0 cell (x, y within 3.5 px of (40, 40)); 2 and 3 share
    # their image-1 cell; match 4 is alone
    kp0 = [[40.0, 40.0], [42.5, 37.5], [80.0, 80.0], [120.0, 120.0], [200.0, 200.0]]
    kp1 = [[16.0, 16.0], [160.0, 160.0], [64.0, 64.0], [66.0, 61.0], [240.0, 240.0]]
    conf = [0.3, 0.6, 0.5, 0.7, 0.2]
    out = _outputs(kp0, kp1, conf, [True] * 5)
    plain = hooks.postprocess("eloftr", out, _pair((1, 1), (1, 1)), {"threshold": 0.0})
    assert len(plain) == 5
    m = hooks.postprocess("eloftr", out, _pair((1, 1), (1, 1)), {"threshold": 0.0, "mutual": True})
    assert sorted(m.confidence.tolist()) == pytest.approx([0.2, 0.6, 0.7])
    assert m.metadata["mutual"] is True and m.metadata["num_matches"] == 3


def test_other_matchers_are_not_answered() -> None:
    assert hooks.postprocess("roma_full", {}, _pair(), {}) is None


def test_pipeline_end_to_end(image_pair) -> None:
    """The torch pipeline on the real pair: matches come back inside the original images."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    host = create_host()
    options = ExportOptions(320, 320, extra={"threshold": float(reference()["threshold"]), "max_matches": 64})
    pipeline = torch_pipeline(host, "eloftr", loaded_model(), options, {})
    image0, image1 = (read_image(p) for p in image_pair)
    inputs, ctx = pipeline.prepare(image0, image1)
    assert inputs["image0"].shape == (1, 1, 320, 320)
    assert ctx.scale0 == pytest.approx((320 / image0.shape[1], 320 / image0.shape[0]))
    raw = pipeline.run(inputs)
    matches = pipeline.postprocess(raw, ctx)
    assert matches.metadata["matcher"] == "eloftr"
    valid = raw["valid"][0].numpy()
    assert 0 < len(matches) == valid.sum() <= 64
    for kp, scale, name in ((matches.keypoints0, ctx.scale0, "keypoints0"),
                            (matches.keypoints1, ctx.scale1, "keypoints1")):
        np.testing.assert_allclose(kp * np.float32(scale), raw[name][0].numpy()[valid],
                                   rtol=1e-6, atol=1e-4)
    for kp, image in ((matches.keypoints0, image0), (matches.keypoints1, image1)):
        h, w = image.shape[:2]
        assert kp[:, 0].min() > 0 and kp[:, 1].min() > 0
        assert kp[:, 0].max() < w and kp[:, 1].max() < h
    assert np.all(np.diff(matches.confidence) <= 0)
