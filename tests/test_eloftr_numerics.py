"""eloftr computes upstream's function: stage by stage against MatchAnything's own outputs.

Reference: upstream `LoFTR.forward` (fp32, CPU) with the deterministic weights on the MegaDepth
pair at 320 x 320, coarse threshold 2e-5 (tests/data/eloftr/README.md).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from eloftr_helpers import (
    loaded_model, max_abs, max_rel, pair_set, reference, reference_images, reference_run,
)
from matchrt.plugins.eloftr.model import RepVGGBlock


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def ours():
    return reference_run()


def test_backbone_features(ref, ours) -> None:
    # every 8th channel of the 1/8 features of both images
    assert max_rel(ours["feats_c"][:, ::8].numpy(), ref["backbone_c8"]) <= 1e-5


def test_coarse_transformer(ref, ours) -> None:
    assert max_rel(ours["feat_c0"][:, ::4].numpy(), ref["coarse0_c4"]) <= 1e-5
    assert max_rel(ours["feat_c1"][:, ::4].numpy(), ref["coarse1_c4"]) <= 1e-5


# Confidences are exp(sim) with sim = <f0, f1> / 256 / 0.1 and |f| ~ 13, so the ~1e-6 relative
# noise of the coarse features (BLAS summation order; upstream's own code re-run differs from its
# fixture by as much) becomes ~1e-4 relative in the confidences: tolerance 1e-3.
CONF_TOL = 1e-3


def test_coarse_confidence(ref, ours) -> None:
    conf = ours["conf_matrix"][0].numpy()
    assert max_rel(conf[::8, ::8], ref["conf_s8"]) <= CONF_TOL
    assert max_rel(conf[ref["i_ids"]], ref["conf_rows"]) <= CONF_TOL
    # the threshold splits the matrix exactly as upstream's (2676 pairs above it)
    assert int((conf > float(ref["threshold"])).sum()) == int(ref["conf_above"])


def test_coarse_match_set(ref, ours) -> None:
    # all pairs above threshold off the 2-cell border, no mutual-nearest step: 43 pairs
    assert len(ours["i_ids"]) == len(ref["i_ids"]) == 43
    assert pair_set(ours["i_ids"], ours["j_ids"]) == pair_set(ref["i_ids"], ref["j_ids"])
    assert np.array_equal(ours["b_ids"].numpy(), ref["b_ids"])
    # several cells match more than one partner: there really is no one-to-one filter
    assert len(set(ref["i_ids"].tolist())) < 43 or len(set(ref["j_ids"].tolist())) < 43
    assert float(np.abs(ours["mconf"].numpy() / ref["mconf"] - 1).max()) <= CONF_TOL


def test_fine_stage(ref, ours) -> None:
    assert max_rel(ours["fine0"].numpy(), ref["fine0"]) <= 1e-5
    assert max_rel(ours["fine1"][:, :, ::2].numpy(), ref["fine1"]) <= 1e-5
    assert max_rel(ours["conf_matrix_f"][:, ::4].numpy(), ref["conf_matrix_f"]) <= CONF_TOL


def test_fine_keypoints(ref, ours) -> None:
    assert max_abs(ours["mkpts0_f"].numpy(), ref["mkpts0_f"]) <= 1e-3
    assert max_abs(ours["mkpts1_f"].numpy(), ref["mkpts1_f"]) <= 1e-3
    # the sub-pixel step moved image-1 keypoints off the half-pixel grid (by far more than the
    # 1e-5 px we differ from upstream; near-uniform heatmaps of random weights keep it small)
    frac = np.abs(ours["mkpts1_f"].numpy() - np.round(ours["mkpts1_f"].numpy() - 0.5) - 0.5)
    assert frac.max() > 1e-3


def test_repvgg_fusion_matches_branches(ref) -> None:
    model = loaded_model()
    fused = copy.deepcopy(model).fuse()
    blocks = [m for m in fused.modules() if isinstance(m, RepVGGBlock)]
    assert len(blocks) == 21 and all(b.rbr_reparam is not None and b.rbr_dense is None for b in blocks)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert len(fused.state_dict()) < len(model.state_dict())
    image0, image1 = reference_images()
    with torch.no_grad():
        a = reference_run()
        b = fused(image0, image1, threshold=float(ref["threshold"]))
    assert max_rel(b["feats_c"].numpy(), a["feats_c"].numpy()) <= 1e-4
    assert max_rel(b["conf_matrix"].numpy(), a["conf_matrix"].numpy()) <= 1e-3
    assert pair_set(b["i_ids"], b["j_ids"]) == pair_set(a["i_ids"], a["j_ids"])
    assert max_abs(b["mkpts0_f"].numpy(), a["mkpts0_f"].numpy()) <= 1e-3
    assert max_abs(b["mkpts1_f"].numpy(), a["mkpts1_f"].numpy()) <= 1e-3


@pytest.mark.parametrize("padded", [False, True])
def test_attention_deploy_form_is_the_same_function(padded) -> None:
    """`fuse` multiplies the message before upsampling it (W [x; up(M m)] = W_x x + up(W_m M m)):
    the layer's output stays upstream's to fp32 rounding, padded or not, with the keys unchanged."""
    from matchrt.plugins.eloftr.model import AggregatedAttentionLayer, rope_tables
    from matchrt.plugins.eloftr.padding import Extent

    torch.manual_seed(0)
    layer = AggregatedAttentionLayer(rope=True).eval()
    for p in layer.parameters():  # trained-like scales: LayerNorms off their defaults
        p.data.normal_(0.0, 0.2 if p.ndim == 1 else 0.08)
    x, source = torch.randn(2, 256, 16, 24), torch.randn(2, 256, 16, 24)
    rope = rope_tables(4, 6, 128, 192, 256, x.device)
    extent = Extent(torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]]),
                    torch.tensor([[1.0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])) if padded else None
    keys = set(layer.state_dict())
    with torch.no_grad():
        upstream = layer(x, source, rope, extent, extent)
        deployed = copy.deepcopy(layer)
        deployed.fuse()
        ours = deployed(x, source, rope, extent, extent)
    assert set(deployed.state_dict()) == keys
    assert deployed.mlp_message_weight.shape == (512, 256)
    change = (ours - upstream).abs().max() / (upstream - x).abs().max()
    assert 0 < change <= 1e-5  # reassociated, not skipped
