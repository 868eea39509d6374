"""eloftr's aspect-preserving mode (`-O resize=pad`): upstream's padded single-pair path.

Upstream (hloc's MatchAnything wrapper) resizes the long side, pads bottom-right to a square and
passes content masks; with one pair it crops the coarse features to the content, transforms the
crop alone, pads the result with zeros, leaves padded cells out of the dual softmax and removes
the border of the content. The reference here is that crop path run with our own stages (a
192 x 288 part of the 320 x 448 reference pair padded into 288 x 288), so only the masking is
under test.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from eloftr_helpers import (
    assert_same_matches, checkpoint_path, export_plan_at, gap_threshold, loaded_model, max_rel,
    non_square_images, pair_set, run_onnxruntime, run_wrapper,
)
from matchrt.errors import MatchrtError
from matchrt.export import export_plan
from matchrt.images import prepare_pair, read_image
from matchrt.plugins.eloftr import export as export_mod
from matchrt.plugins.eloftr import hooks
from matchrt.plugins.eloftr.model import BORDER_CELLS, COARSE_STRIDE, border_mask, content_extents

SIDE, CONTENT = 288, 192  # a CONTENT x SIDE part of the reference pair padded into SIDE x SIDE
GRAPH = 192  # graph side for the real pair (content 192 x 128 and 128 x 192)
THRESHOLD = 1e-5
CONF_TOL = 1e-3  # as test_eloftr_numerics: confidences amplify ~1e-7 feature noise


def _padded_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image0, image1 = (im[..., :CONTENT, :SIDE] for im in non_square_images())
    pad = torch.zeros(1, 1, SIDE - CONTENT, SIDE)
    mask = torch.zeros(1, 1, SIDE, SIDE)
    mask[..., :CONTENT, :] = 1.0
    return torch.cat([image0, pad], 2), torch.cat([image1, pad], 2), mask


@pytest.fixture(scope="module")
def crop_run():
    """Masked forward on the padded pair, and upstream's crop path on the same backbone features."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = loaded_model()
    image0, image1, mask = _padded_pair()
    rows = int(mask[0, 0, :, 0].sum()) // COARSE_STRIDE  # 24 content rows of 36
    with torch.no_grad():
        masked = model(image0, image1, threshold=THRESHOLD, masks=(mask, mask))
        feats, _, _ = model.extract(image0, image1)
        crop0, crop1 = model.transform(feats[:, :, :rows], (SIDE, SIDE), fused=False)  # RoPE of the square
        conf = model.confidence(crop0, crop1)[0]
    w = SIDE // COARSE_STRIDE
    keep = border_mask(rows, w) > 0
    i_ids, j_ids = torch.where((conf > THRESHOLD) & keep[:, None] & keep[None, :])
    return {"masked": masked, "rows": rows, "crop0": crop0, "crop1": crop1, "conf": conf,
            "pairs": pair_set(i_ids, j_ids)}


def test_transformer_equals_upstream_crop(crop_run) -> None:
    masked, rows = crop_run["masked"], crop_run["rows"]
    assert max_rel(masked["feat_c0"][:, :, :rows].numpy(), crop_run["crop0"].numpy()) <= 1e-5
    assert max_rel(masked["feat_c1"][:, :, :rows].numpy(), crop_run["crop1"].numpy()) <= 1e-5
    # upstream pads the transformed crop with zeros
    assert not masked["feat_c0"][:, :, rows:].any() and not masked["feat_c1"][:, :, rows:].any()


def test_matches_equal_upstream_crop(crop_run) -> None:
    masked, rows = crop_run["masked"], crop_run["rows"]
    w = SIDE // COARSE_STRIDE
    conf = masked["conf_matrix"][0].reshape(SIDE // COARSE_STRIDE, w, SIDE // COARSE_STRIDE, w)
    content = conf[:rows, :, :rows, :].reshape(rows * w, rows * w)
    assert max_rel(content.numpy(), crop_run["conf"].numpy()) <= CONF_TOL
    # a pair with a padded cell is out of both softmaxes
    assert not conf[rows:].any() and not conf[:, :, rows:].any()
    # the crop's ids are the full grid's (same width): same pairs, border of the content removed
    assert len(crop_run["pairs"]) > 100
    assert pair_set(masked["i_ids"], masked["j_ids"]) == crop_run["pairs"]
    last_row = max(int(masked["i_ids"].max()), int(masked["j_ids"].max())) // w
    assert last_row <= rows - 1 - BORDER_CELLS


@pytest.fixture(scope="module")
def real_pair(image_pair):
    """The MegaDepth pair (portrait 1063 x 780, landscape 673 x 1013) read as the CLI reads it."""
    return read_image(image_pair[0]), read_image(image_pair[1])


def _prepared(real_pair, side: int) -> dict[str, torch.Tensor]:
    sizes = {n: (side, side) for n in export_mod.INPUTS + export_mod.MASK_INPUTS}
    arrays, _ = prepare_pair(*real_pair, hooks.INFO.contract, sizes)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def test_padding_never_leaks_into_content(real_pair) -> None:
    """Different extents per image: whatever the padded cells hold, the content's output is the same."""
    model = loaded_model()
    inputs = _prepared(real_pair, GRAPH)
    padding = content_extents((inputs["image0_mask"], inputs["image1_mask"]))
    n = GRAPH // COARSE_STRIDE
    cells = [e.cells()[0].reshape(n, n).bool() for e in padding]
    assert not cells[0][:, 16:].any() and cells[0][:, :16].all()  # portrait: 128 of 192 columns
    assert not cells[1][16:].any() and cells[1][:16].all()  # landscape: 128 of 192 rows
    with torch.no_grad():
        feats, _, _ = model.extract(inputs["image0"], inputs["image1"])
        outside = torch.stack([~cells[0], ~cells[1]])[:, None].expand_as(feats)  # image 0, image 1
        noisy = feats.clone()
        noisy[outside] = 100.0 * torch.randn(int(outside.sum()), generator=torch.Generator().manual_seed(0))
        clean_out = model.transform(feats, (GRAPH, GRAPH), padding=padding)
        noisy_out = model.transform(noisy, (GRAPH, GRAPH), padding=padding)
        conf = model.confidence(*noisy_out, padding)[0]
    for a, b in zip(clean_out, noisy_out):
        assert torch.equal(a, b) or max_rel(b.numpy(), a.numpy()) <= 1e-6
    valid0, valid1 = cells[0].reshape(-1), cells[1].reshape(-1)
    assert not conf[~valid0].any() and not conf[:, ~valid1].any()


def test_layers_batched_over_both_images_equal_one_image_at_a_time(real_pair) -> None:
    """The deploy path runs what depends on one image only for both images as one batch (their extents
    stacked): the same features as one image at a time, with different paddings per image."""
    model = loaded_model()
    inputs = _prepared(real_pair, GRAPH)
    padding = content_extents((inputs["image0_mask"], inputs["image1_mask"]))
    with torch.no_grad():
        feats, _, _ = model.extract(inputs["image0"], inputs["image1"])
        for form in (model, copy.deepcopy(model).fuse()):  # the checkpoint's layers and the deploy form
            for pad in (padding, None):
                batched = form.transform(feats, (GRAPH, GRAPH), padding=pad)
                form.loftr_coarse.batched = False
                single = form.transform(feats, (GRAPH, GRAPH), padding=pad)
                form.loftr_coarse.batched = True
                for a, b in zip(batched, single):
                    assert max_rel(a.numpy(), b.numpy()) <= 1e-5


def test_pad_pipeline_maps_keypoints_to_original_pixels(real_pair) -> None:
    """Image 1 at twice the resolution: the same matches at twice the coordinates; per-axis scales."""
    from matchrt.runner import open_pipeline

    torch.set_num_threads(min(2, torch.get_num_threads()))
    a, b = real_pair
    b2 = np.repeat(np.repeat(b, 2, 0), 2, 1)  # INTER_AREA of a 2x nearest upscale = of the original
    pipe = open_pipeline("eloftr", weights={"checkpoint": checkpoint_path()}, height=GRAPH, width=GRAPH,
                         extra={"resize": "pad", "threshold": 1e-5, "max_matches": 128})
    assert set(pipe.input_sizes) == {"image0", "image1", "image0_mask", "image1_mask"}
    inputs, ctx = pipe.prepare(a, b)
    raw = pipe.run(inputs)
    # a run-time threshold far from every confidence and from the K-th place: a stable match set
    threshold, count = gap_threshold(raw["confidence"][0].numpy(), 40, 90)
    matches = pipe.postprocess(raw, ctx, {"threshold": threshold})
    valid = (raw["confidence"][0] > threshold).numpy()
    assert len(matches.keypoints0) == valid.sum() == count
    for k, (image, kp) in enumerate(((a, matches.keypoints0), (b, matches.keypoints1))):
        mask = inputs[f"image{k}_mask"][0, 0].numpy()
        nh, nw = int(mask[:, 0].sum()), int(mask[0].sum())  # content extent, multiples of 32
        assert nh % 32 == 0 and nw % 32 == 0 and max(nh, nw) == GRAPH
        assert not inputs[f"image{k}"][0, 0].numpy()[mask == 0].any()  # zero padding
        h, w = image.shape[:2]
        kp_in = raw[f"keypoints{k}"][0].numpy()[valid]
        # original pixel = input pixel * original side / content side, per axis
        np.testing.assert_allclose(kp, kp_in * np.array([w / nw, h / nh]), rtol=1e-5)
        # matched cells keep 2 cells inside the content
        margin = COARSE_STRIDE * BORDER_CELLS - 4.5
        assert kp_in.min() >= margin and (kp_in < np.array([nw, nh]) - margin).all()
    # near-equal confidences may swap places: compare the matches as sorted rows
    doubled = pipe.match(a, b2, {"threshold": threshold})
    expected = np.concatenate([matches.keypoints0, 2.0 * matches.keypoints1], 1)
    got = np.concatenate([doubled.keypoints0, doubled.keypoints1], 1)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got[np.lexsort(got.T)], expected[np.lexsort(expected.T)], atol=2e-3)


def test_pad_graph_onnxruntime_parity(real_pair, tmp_path) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    inputs = _prepared(real_pair, GRAPH)
    plan = export_plan_at(GRAPH, GRAPH, threshold=1e-5, max_matches=128, resize="pad")
    graph = plan.graphs[0]
    assert graph.input_names == ["image0", "image1", "image0_mask", "image1_mask"]
    assert plan.options["resize"] == "pad"
    path = tmp_path / "eloftr_pad.onnx"
    export_plan(plan, path)
    from matchrt.lint import format_problems, lint_onnx

    problems = lint_onnx(path)
    assert not problems, format_problems(problems)
    feed = [inputs[n] for n in graph.input_names]
    ours = run_wrapper(plan, *feed)
    runtime = run_onnxruntime(path, *feed, names=graph.input_names)
    # compare above a threshold far from every confidence and from the K-th place
    threshold, count = gap_threshold(ours["confidence"][0], 40, 90)
    for out in (ours, runtime):
        out["valid"] = out["valid"] & (out["confidence"] > threshold)
    assert int(ours["valid"][0].sum()) == count
    assert_same_matches(ours, runtime)


def test_resize_option() -> None:
    assert hooks.INFO.options["resize"] == "stretch" and hooks.INFO.contract.resize == "stretch"
    assert export_plan_at(64, 64).graphs[0].input_names == ["image0", "image1"]
    with pytest.raises(MatchrtError, match="stretch.*pad"):
        export_mod.resolve_options({"resize": "crop"})
