"""eloftr weight mapping: the real checkpoint layout maps 100%, anything else is refused."""

from __future__ import annotations

import pytest
import torch

from matchrt.plugins.eloftr import hooks
from matchrt.plugins.eloftr.model import ELoFTR
from matchrt.plugins.eloftr.weights import LAYOUT
from matchrt.weights import WeightMappingError, deterministic_state_dict, enforce, read_layout

LAYOUT_ROWS = read_layout(LAYOUT)


def _map(tensors: dict[str, torch.Tensor]):
    return hooks.map_weights("eloftr", {"checkpoint": tensors}, {"checkpoint": "test.ckpt"}, {})


def test_layout_is_the_real_checkpoint() -> None:
    keys = [k for k, _, _ in LAYOUT_ROWS]
    assert len(keys) == 447
    assert all(k.startswith("matcher.") for k in keys)
    assert sum(k.endswith("num_batches_tracked") for k in keys) == 62


def test_real_layout_maps_completely() -> None:
    mapped = _map(deterministic_state_dict(LAYOUT_ROWS))
    report = mapped.report
    assert report.ok, report.summary()
    assert report.sources[0].total == 447 and report.sources[0].mapped == 447
    assert report.target_total == 447
    assert not report.missing and not report.unexpected and not report.shape_mismatches
    enforce(report)  # does not raise
    model = ELoFTR()
    model.load_state_dict(mapped.state_dict, strict=True)
    # BatchNorm running statistics are data, not defaults: they must have arrived
    bn = model.backbone.layer1[0].rbr_identity
    expected = deterministic_state_dict(
        [r for r in LAYOUT_ROWS if r[0] == "matcher.backbone.layer1.0.rbr_identity.running_var"]
    )["matcher.backbone.layer1.0.rbr_identity.running_var"]
    assert torch.equal(bn.running_var, expected)


def test_partial_checkpoint_is_refused_with_counts() -> None:
    tensors = deterministic_state_dict(LAYOUT_ROWS)
    for key in list(tensors)[:5]:
        del tensors[key]
    report = _map(tensors).report
    assert not report.ok
    assert len(report.missing) == 5
    with pytest.raises(WeightMappingError) as err:
        enforce(report)
    message = str(err.value)
    assert "442/442 tensors mapped" in message
    assert "442/447 tensors filled" in message
    assert "missing: 5" in message


def test_wrong_checkpoint_is_refused() -> None:
    tensors = deterministic_state_dict(LAYOUT_ROWS)
    # a foreign tensor, an unprefixed key and a wrong shape
    tensors["matcher.model.decoder.proj.weight"] = torch.zeros(3, 3)
    conv0 = "backbone.layer0.rbr_dense.conv.weight"
    q0 = "loftr_coarse.layers.0.q_proj.weight"
    tensors[conv0] = tensors.pop("matcher." + conv0)
    tensors["matcher." + q0] = torch.zeros(128, 256)
    report = _map(tensors).report
    assert not report.ok
    assert set(report.unexpected) == {"matcher.model.decoder.proj.weight", conv0}
    assert [m[0] for m in report.shape_mismatches] == ["matcher." + q0]
    assert set(report.missing) == {conv0, q0}
    with pytest.raises(WeightMappingError, match="unexpected: 2, shape mismatches: 1"):
        enforce(report)


def test_other_matchers_are_not_answered() -> None:
    assert hooks.map_weights("roma_full", {"checkpoint": {}}, {}, {}) is None
    assert hooks.create_model("roma_full", {}) is None
