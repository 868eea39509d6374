"""eloftr in fp16 finds fp32's matches: no fewer than fp32 finds on images with +-0.5/255 noise.

The deterministic weights on the MegaDepth pair at 320, at a threshold that keeps 300 matches (CPU
autocast; tests/test_eloftr_gpu.py does the same for the compiled graph on a GPU). With random
weights the fine confidences of a window are nearly flat: in fp16 their arg-max jumps between
cells, which moved 212 of 300 keypoint pairs by more than 0.5 px until the fine stage ran in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eloftr_helpers import agreement, export_plan_at, megadepth_pair, noisy, pipeline_at, valid_matches

CPU = {"device": "cpu"}


def test_fine_stage_computes_in_fp32_under_fp16_autocast() -> None:
    """The fine stage of an fp16 run gives what fp32 gives on the same (fp16) features."""
    graph = export_plan_at(320, 320, max_matches=300, threshold=1e-12).graphs[0].module
    image0, image1 = megadepth_pair(320)
    model = graph.model
    with torch.no_grad():
        feats, x2, x1 = model.extract(image0, image1)
        feat0, feat1 = model.transform(feats, (320, 320), (graph.rope_cos, graph.rope_sin), None)
        _, i_ids, j_ids, _ = graph.coarse_matching(feat0, feat1, None)
        fine0, fine1 = (f.half() for f in model.fine_maps(feat0, feat1, x2, x1))
        want = graph.fine_matching(fine0.float(), fine1.float(), i_ids, j_ids)
        with torch.autocast("cpu", dtype=torch.float16):
            got = graph.fine_matching(fine0, fine1, i_ids, j_ids)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.slow  # ~5 minutes: fp16 autocast is slow on a CPU
def test_fp16_keeps_fp32_s_matches_as_well_as_input_noise_does() -> None:
    image0, image1 = megadepth_pair(320)
    ranked = np.sort(valid_matches(pipeline_at(320, 1e-12, CPU), image0, image1)["conf"])[::-1]
    threshold = float((ranked[299] + ranked[300]) / 2)
    fp32 = valid_matches(pipeline_at(320, threshold, CPU), image0, image1)
    assert len(fp32["conf"]) == 300
    half = agreement(fp32, valid_matches(pipeline_at(320, threshold, {**CPU, "precision": "fp16"}), image0, image1))
    noise = agreement(fp32, valid_matches(pipeline_at(320, threshold, CPU), noisy(image0, 0), noisy(image1, 1)))
    assert half["one_to_one"] and half["max_px"] <= 0.5 and half["log_conf_rel"] <= 2e-2, half
    assert 300 - half["paired"] <= 300 - noise["paired"] + 15, (half, noise)
