"""roma_full postprocess: coarse warp cells -> Matches in original pixels (synthetic outputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matchrt.errors import MatchrtError
from matchrt.plugins.roma_full import hooks
from matchrt.plugins.roma_full.export import ToWarp
from matchrt.types import PairContext


def pair(orig0=(280, 140), orig1=(70, 210), size=28) -> PairContext:
    (h0, w0), (h1, w1) = orig0, orig1
    return PairContext(orig0, orig1, (size, size), (size / w0, size / h0), (size / w1, size / h1))


def outputs_for_shift(shift: float = 0.25):
    """A 2 x 2 coarse grid: A->B shifts x by +shift, B->A by -shift; certainty per cell."""
    cls = torch.full((2, 4096, 2, 2), -20.0)
    # put each cell's mass on a single anchor: A->B row r, col c -> anchor near (x + shift, y)
    for b, s in ((0, shift), (1, -shift)):
        for r in range(2):
            for c in range(2):
                x, y = (2 * c + 1) / 2 - 1 + s, (2 * r + 1) / 2 - 1
                col, row = int((x + 1) * 32), int((y + 1) * 32)
                cls[b, row * 64 + col, r, c] = 20.0
    cert = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[-1.0, -2.0], [-3.0, 4.0]]]])
    with torch.no_grad():
        warp, prob = ToWarp()(cls, cert)
    return {"warp": warp, "certainty": prob}


def test_matches_are_cells_in_original_pixels_sorted_by_certainty() -> None:
    out = outputs_for_shift()
    ctx = pair()
    m = hooks.postprocess("roma_full", out, ctx, {})
    assert len(m) == 8
    assert np.all(np.diff(m.confidence) <= 0)
    assert np.isclose(m.confidence[0], 1 / (1 + np.exp(-4.0)))  # B->A cell (1, 1) logit 4
    warp = out["warp"][0].numpy()
    # A->B cell (0, 0): centre of A's top-left quarter in A's original pixels
    a = np.where(np.isclose(m.confidence, 0.5))[0][0]
    assert np.allclose(m.keypoints0[a], [140 / 4, 280 / 4])
    x_b, y_b = warp[0, 0, 2:]
    assert np.allclose(m.keypoints1[a], [(x_b + 1) / 2 * 210, (y_b + 1) / 2 * 70], atol=1e-4)
    assert m.warp.shape == (2, 4, 4) and m.certainty.shape == (2, 4)
    assert m.metadata["num_candidates"] == 8


def test_threshold_and_limit() -> None:
    out = outputs_for_shift()
    m = hooks.postprocess("roma_full", out, pair(), {"threshold": 0.6, "max_matches": 2})
    assert len(m) == 2 and (m.confidence > 0.6).all()
    probs = out["certainty"][0].numpy().ravel()
    assert np.allclose(m.confidence, np.sort(probs)[::-1][:2])
    assert len(hooks.postprocess("roma_full", out, pair(), {"threshold": 0.999})) == 0


def test_warp_leaving_the_image_is_clamped_with_zero_certainty() -> None:
    # A->B warp (0.5, 1.5) leaves image B; B->A warp (0, -0.2) stays inside image A
    flow = torch.tensor([[[[0.5]], [[1.5]]], [[[0.0]], [[-0.2]]]])
    cert = torch.full((2, 1, 1, 1), 3.0)
    warp, prob = ToWarp.layout(flow, cert)
    assert torch.allclose(warp[0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0]))  # clamped, A centre first
    assert torch.allclose(warp[0, 0, 1], torch.tensor([0.0, -0.2, 0.0, 0.0]))  # B->A: warp in A, B centre
    assert prob[0, 0, 0] == 0 and torch.isclose(prob[0, 0, 1], torch.sigmoid(torch.tensor(3.0)))


def test_other_matchers_and_bad_options() -> None:
    assert hooks.postprocess("eloftr", {}, pair(), {}) is None
    with pytest.raises(MatchrtError, match="max_matches"):
        hooks.postprocess("roma_full", outputs_for_shift(), pair(), {"max_matches": "many"})
