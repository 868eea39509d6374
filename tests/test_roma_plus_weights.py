"""roma_plus weight mapping: both real layouts map 100% (603 + 343), partial or foreign files are refused."""

from __future__ import annotations

import pytest
import torch

from matchrt.plugins.roma_plus import hooks
from matchrt.plugins.roma_plus.weights import LAYOUT_DINOV2, LAYOUT_ROMA, rename
from matchrt.weights import Reserved, WeightMappingError, deterministic_state_dict, enforce, read_layout
from roma_plus_helpers import checkpoint_paths, loaded_model, mapping_report, meta_sources

ROMA_ROWS = read_layout(LAYOUT_ROMA)
DINO_ROWS = read_layout(LAYOUT_DINOV2)


def test_layouts_are_the_real_files() -> None:
    assert len(ROMA_ROWS) == 603 and all(k.startswith("matcher.model.") for k, _, _ in ROMA_ROWS)
    assert len(DINO_ROWS) == 343 and any(k == "mask_token" for k, _, _ in DINO_ROWS)


def test_both_files_map_completely() -> None:
    report = mapping_report()
    assert report.ok, report.summary()
    by_name = {s.source: s for s in report.sources}
    assert (by_name["checkpoint"].total, by_name["checkpoint"].mapped) == (603, 603)
    assert (by_name["dinov2"].total, by_name["dinov2"].mapped) == (343, 343)
    assert not any(s.reserved for s in report.sources)  # roma_plus uses everything itself
    assert report.target_total == 946
    assert not report.missing and not report.unexpected and not report.shape_mismatches
    enforce(report)
    assert str(checkpoint_paths()["checkpoint"]) in report.summary()


def test_refiner_and_encoder_tensors_arrive() -> None:
    model = loaded_model()
    want = deterministic_state_dict([r for r in ROMA_ROWS if r[0] in (
        "matcher.model.decoder.conv_refiner.16.hidden_blocks.7.1.running_var",
        "matcher.model.decoder.proj.1.0.weight",
        "matcher.model.encoder.cnn.layers.37.running_mean",
    )] + [r for r in DINO_ROWS if r[0] == "blocks.23.ls2.gamma"])
    assert torch.equal(model.conv_refiner["16"].hidden_blocks[7][1].running_var,
                       want["matcher.model.decoder.conv_refiner.16.hidden_blocks.7.1.running_var"])
    assert torch.equal(model.proj["1"][0].weight, want["matcher.model.decoder.proj.1.0.weight"])
    assert torch.equal(model.coarse.encoder.cnn.layers[37].running_mean,
                       want["matcher.model.encoder.cnn.layers.37.running_mean"])
    assert torch.equal(model.coarse.encoder.dinov2.blocks[23].ls2.gamma, want["blocks.23.ls2.gamma"])


def test_rename_keeps_refiners_and_defers_coarse_keys_to_roma_full() -> None:
    assert rename("checkpoint", "matcher.model.decoder.conv_refiner.8.disp_emb.weight") == "conv_refiner.8.disp_emb.weight"
    assert rename("checkpoint", "matcher.model.decoder.proj.4.1.running_var") == "proj.4.1.running_var"
    assert rename("checkpoint", "matcher.model.decoder.proj.16.0.weight") == "coarse.proj16.0.weight"
    assert rename("dinov2", "pos_embed") == "coarse.encoder.dinov2.pos_embed"
    assert rename("checkpoint", "matcher.something.else") is None
    assert not isinstance(rename("checkpoint", "matcher.model.decoder.conv_refiner.1.out_conv.bias"), Reserved)


def _map(roma: dict, dino: dict):
    return hooks.map_weights("roma_plus", {"checkpoint": roma, "dinov2": dino}, {}, {})


def test_missing_dinov2_tensors_are_refused_with_counts() -> None:
    roma = meta_sources()["checkpoint"]
    dino = meta_sources()["dinov2"]
    for key in [k for k, _, _ in DINO_ROWS[-3:]]:
        del dino[key]
    report = _map(roma, dino).report
    assert not report.ok and len(report.missing) == 3
    with pytest.raises(WeightMappingError, match="943/946 tensors filled"):
        enforce(report)


def test_swapped_files_are_refused() -> None:
    roma, dino = meta_sources()["checkpoint"], meta_sources()["dinov2"]
    report = hooks.map_weights("roma_plus", {"checkpoint": dino, "dinov2": roma}, {}, {}).report
    assert not report.ok
    assert len(report.unexpected) >= 343  # no DINOv2 key means anything as a checkpoint key
    assert len(report.missing) > 0
