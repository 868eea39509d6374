"""eloftr at a non-square size reproduces upstream: one RoPE position scale, 832 / max(H, W).

Reference: upstream `LoFTR.forward` (fp32, CPU, deterministic weights) on the MegaDepth pair at
320 x 448 (H x W), NPE [832, 832, 448, 448], coarse threshold 1e-5: 747 matches
(tests/data/eloftr/README.md). Scaling rows by 832/H and columns by 832/W instead moves the coarse
transformer output by 5e-3 relative and leaves 709 matches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eloftr_helpers import (
    export_plan_at, loaded_model, max_abs, max_rel, non_square_images, non_square_reference,
    pair_set, run_onnxruntime, run_wrapper,
)
from matchrt.export import export_plan
from matchrt.plugins.eloftr.model import COARSE_STRIDE, rope_tables

H, W = 320, 448
N_MATCHES = 747
KP_TOL = 1e-2  # px; measured 1.5e-5 (torch and onnxruntime)
# coarse transformer output, relative to its largest magnitude; measured 5e-7 (the per-axis
# scale gives 5e-3)
COARSE_TOL = 1e-5
CONF_TOL = 1e-3  # confidences amplify the features' ~1e-6 noise ~100x (see test_eloftr_numerics)
K = 1024  # graph slots: more than the 747 matches


@pytest.fixture(scope="module")
def ref():
    return non_square_reference()


@pytest.fixture(scope="module")
def ours():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    image0, image1 = non_square_images()
    with torch.no_grad():
        return loaded_model()(image0, image1, threshold=float(non_square_reference()["threshold"]))


@pytest.fixture(scope="module")
def graph_outputs(tmp_path_factory):
    """The export wrapper (torch) and its ONNX graph (onnxruntime) on the pair, fused, K = 1024."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    plan = export_plan_at(H, W, threshold=float(non_square_reference()["threshold"]), max_matches=K)
    path = tmp_path_factory.mktemp("eloftr-non-square") / "eloftr_320x448.onnx"
    export_plan(plan, path)
    image0, image1 = non_square_images()
    return {"torch": run_wrapper(plan, image0, image1), "onnxruntime": run_onnxruntime(path, image0, image1)}


def test_rope_tables_use_one_scale() -> None:
    # a 10 x 14 grid at 320 x 448 is the top-left corner of the 14 x 14 grid at 448 x 448: rows
    # and columns share the factor 832 / 448, as upstream's NPE [832, 832, s, s] table
    cos, sin = rope_tables(H // 32, W // 32, H, W)
    cos_sq, sin_sq = rope_tables(W // 32, W // 32, W, W)
    assert torch.equal(cos, cos_sq[: H // 32]) and torch.equal(sin, sin_sq[: H // 32])


def test_coarse_transformer(ref, ours) -> None:
    assert max_rel(ours["feat_c0"][:, ::16].numpy(), ref["coarse0_c16"]) <= COARSE_TOL
    assert max_rel(ours["feat_c1"][:, ::16].numpy(), ref["coarse1_c16"]) <= COARSE_TOL


def test_torch_match_set(ref, ours) -> None:
    assert len(ours["i_ids"]) == len(ref["i_ids"]) == N_MATCHES
    # same pairs in the same (row-major) order
    assert np.array_equal(ours["i_ids"].numpy(), ref["i_ids"])
    assert np.array_equal(ours["j_ids"].numpy(), ref["j_ids"])
    assert np.array_equal(ours["b_ids"].numpy(), ref["b_ids"])
    assert float(np.abs(ours["mconf"].numpy() / ref["mconf"] - 1).max()) <= CONF_TOL
    assert max_abs(ours["mkpts0_f"].numpy(), ref["mkpts0_f"]) <= KP_TOL
    assert max_abs(ours["mkpts1_f"].numpy(), ref["mkpts1_f"]) <= KP_TOL


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_graph_match_set(ref, graph_outputs, backend: str) -> None:
    out = graph_outputs[backend]
    valid = out["valid"][0]
    assert int(valid.sum()) == N_MATCHES
    kp0, kp1 = out["keypoints0"][0, valid], out["keypoints1"][0, valid]
    # an image-0 keypoint lies within 3.5 px of its cell's corner: its cell (i id) is exact
    wc = W // COARSE_STRIDE
    cells = np.rint(kp0 / COARSE_STRIDE).astype(np.int64)
    i_ids = cells[:, 1] * wc + cells[:, 0]
    assert sorted(i_ids.tolist()) == sorted(ref["i_ids"].tolist())
    # every upstream match (i, j) has exactly one graph match at its keypoints: same i/j pairs
    ours4 = np.concatenate([kp0, kp1], 1)
    ref4 = np.concatenate([ref["mkpts0_f"], ref["mkpts1_f"]], 1)
    dist = np.abs(ref4[:, None, :] - ours4[None, :, :]).max(-1)  # 747 x 747, L-inf
    nearest = dist.argmin(1)
    assert len(set(nearest.tolist())) == N_MATCHES, "not a one-to-one correspondence"
    assert float(dist.min(1).max()) <= KP_TOL
    assert pair_set(i_ids[nearest], ref["j_ids"]) == pair_set(ref["i_ids"], ref["j_ids"])
    conf = out["confidence"][0, valid][nearest]
    assert float(np.abs(conf / ref["mconf"] - 1).max()) <= CONF_TOL
