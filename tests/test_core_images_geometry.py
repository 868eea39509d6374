"""Images in every common bit depth and layout; geometry and filters every plugin shares."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from matchrt.errors import MatchrtError
from matchrt.geometry import auc, corner_error, estimate, filter_matches, mutual_check, mutual_nearest, project
from matchrt.images import check_size, fit_size, prepare_pair, read_image, resize, round_side
from matchrt.types import InputContract, Matches


def test_read_8bit_16bit_gray_and_alpha_agree(tmp_path, image_pair):
    bgr = cv2.imread(str(image_pair[0]))[:200, :300]
    cv2.imwrite(str(tmp_path / "a8.png"), bgr)
    cv2.imwrite(str(tmp_path / "a16.png"), bgr.astype(np.uint16) * 257)
    bgra = np.concatenate([bgr, np.full(bgr.shape[:2] + (1,), 7, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "a4.png"), bgra)
    cv2.imwrite(str(tmp_path / "g.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    a8 = read_image(tmp_path / "a8.png")
    assert a8.shape == (200, 300, 3) and a8.dtype == np.float32
    np.testing.assert_allclose(a8[..., 0], bgr[..., 2] / 255.0, atol=1e-6)  # RGB order
    np.testing.assert_allclose(read_image(tmp_path / "a16.png"), a8, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "a4.png"), a8, atol=1e-6)  # alpha dropped
    assert read_image(tmp_path / "g.png").shape == (200, 300)


def test_unreadable_image_message(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(MatchrtError, match="cannot read .*x.png as an image"):
        read_image(bad)


def test_pad_resize_keeps_aspect_and_scale():
    img = np.random.default_rng(0).random((100, 200, 3), dtype=np.float32)
    out, (sx, sy) = resize(img, 64, 64, "pad")
    assert out.shape == (64, 64, 3)
    assert sx == pytest.approx(0.32) and sy == pytest.approx(0.32)
    assert np.all(out[33:] == 0)  # padded rows
    out, (sx, sy) = resize(img, 64, 64, "stretch")
    assert (sx, sy) == (64 / 200, 64 / 100)


def test_prepare_pair_feeds_every_image_input():
    contract = InputContract(channels=1, side_multiple=8, default_height=32, default_width=32)
    a = np.random.default_rng(0).random((50, 70, 3), dtype=np.float32)
    b = np.random.default_rng(1).random((40, 30), dtype=np.float32)
    inputs, ctx = prepare_pair(a, b, contract, {"image0": (32, 48), "image1": (32, 48),
                                                 "image1_upsampled": (64, 96), "other": (1, 1)})
    assert inputs["image0"].shape == (1, 1, 32, 48) and inputs["image1_upsampled"].shape == (1, 1, 64, 96)
    assert "other" not in inputs
    assert ctx.original_size0 == (50, 70) and ctx.scale1 == (48 / 30, 32 / 40)


def test_graph_with_masks_gets_padded_images_and_their_masks():
    """Inputs `<image>_mask` mean a graph exported for padded images: pad, floor the content
    sides to the side multiple (whole cells), and say where the content is."""
    contract = InputContract(channels=1, side_multiple=32, default_height=192, default_width=192)
    portrait = np.random.default_rng(0).random((1063, 780, 3), dtype=np.float32)
    landscape = np.random.default_rng(1).random((673, 1013), dtype=np.float32) + 0.5
    sizes = {n: (192, 192) for n in ("image0", "image1", "image0_mask", "image1_mask")}
    inputs, ctx = prepare_pair(portrait, landscape, contract, sizes)
    # 780 * 192/1063 = 140.9 -> 141 -> 128; 673 * 192/1013 = 127.6 -> 128
    assert fit_size(1063, 780, 192, 192, 32) == (192, 128) and fit_size(673, 1013, 192, 192, 32) == (128, 192)
    for k, (nh, nw) in enumerate([(192, 128), (128, 192)]):
        mask, image = inputs[f"image{k}_mask"], inputs[f"image{k}"]
        assert mask.shape == image.shape == (1, 1, 192, 192) and mask.dtype == np.float32
        assert mask[..., :nh, :nw].all() and not mask[..., nh:, :].any() and not mask[..., nw:].any()
        assert not image[mask == 0].any() and image[..., :nh, :nw].min() > 0.4 * k
    # per-axis scales (the floor stretches one axis a little), as the keypoints map back
    assert ctx.scale0 == (128 / 780, 192 / 1063) and ctx.scale1 == (192 / 1013, 128 / 673)
    # without mask inputs the contract's rule (stretch) holds
    inputs, ctx = prepare_pair(portrait, landscape, contract, {"image0": (192, 192), "image1": (192, 192)})
    assert ctx.scale0 == (192 / 780, 192 / 1063)


def test_size_rules():
    contract = InputContract(channels=3, side_multiple=14, default_height=560, default_width=560,
                             square=True)
    with pytest.raises(MatchrtError, match="490 or 504"):
        check_size(500, 500, contract, "roma")
    with pytest.raises(MatchrtError, match="square"):
        check_size(560, 574, contract, "roma")
    check_size(224, 224, contract, "roma")
    assert round_side(500, 14, "nearest") == 504 and round_side(500, 14, "floor") == 490
    assert round_side(500, 32, "ceil") == 512


def _synthetic_matches(h_true, n=300, outliers=60, seed=0):
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(0, 500, (n, 2))
    p1 = project(h_true, p0) + rng.normal(0, 0.3, (n, 2))
    p1[:outliers] = rng.uniform(0, 500, (outliers, 2))
    return Matches(p0, p1, rng.random(n))


def test_homography_with_outliers_is_recovered():
    h_true = np.array([[1.05, 0.02, 10], [-0.03, 0.97, -5], [1e-5, 2e-5, 1]])
    m = _synthetic_matches(h_true)
    res = estimate(m, "H", threshold=2.0)
    assert res.kind == "H" and res.model.shape == (3, 3)
    assert corner_error(res.model, h_true, 500, 500) < 1.0
    assert res.inliers[:60].sum() < 6 and res.inliers[60:].mean() > 0.95
    assert estimate(m, "F", threshold=2.0).num_inliers > 200


def test_too_few_matches_give_no_model():
    m = Matches(np.zeros((3, 2)), np.zeros((3, 2)), np.ones(3))
    res = estimate(m, "H")
    assert res.model is None and res.inliers.shape == (3,) and not res.inliers.any()


def test_filters():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.7]])
    i, j = mutual_nearest(sim)
    assert list(zip(i, j)) == [(0, 0), (2, 2)]
    i, j = mutual_nearest(sim, threshold=0.75)
    assert list(zip(i, j)) == [(0, 0)]
    m = Matches([[0, 0], [0, 0], [5, 5]], [[1, 1], [2, 2], [6, 6]], [0.5, 0.9, 0.1])
    assert mutual_check(m).confidence.tolist() == pytest.approx([0.9, 0.1])
    top = filter_matches(m, min_confidence=0.2, top_k=1)
    assert top.confidence.tolist() == pytest.approx([0.9])


def test_auc_thresholds():
    res = auc(np.array([0.0, 0.0, 100.0, 100.0]))
    assert res["auc@3px"] == pytest.approx(0.5, abs=1e-6)
    assert auc(np.array([1.0, 2.0]))["auc@10px"] > auc(np.array([4.0, 8.0]))["auc@10px"]


def test_matches_json_round_trip(tmp_path):
    import json

    m = Matches(np.ones((2, 2)), np.zeros((2, 2)), [0.5, 0.25], {"matcher": "x"})
    m.to_json(tmp_path / "m.json", inliers=[True, False], model=np.eye(3))
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["inliers"] == [True, False] and data["model"][0] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        Matches(np.ones((2, 2)), np.ones((3, 2)), [1, 1])
