"""roma_full weight map: both real layouts map 100%, refiner tensors are reserved for roma_plus."""

from __future__ import annotations

import pytest
import torch

from matchrt.plugins.roma_full import hooks
from matchrt.plugins.roma_full.model import RomaCoarse
from matchrt.plugins.roma_full.weights import (
    LAYOUT_DINOV2, LAYOUT_ROMA, REFINER_OWNER, coarse_rename, rename,
)
from matchrt.weights import Reserved, WeightMappingError, enforce, read_layout


def meta_sources() -> dict[str, dict[str, torch.Tensor]]:
    """Both files' key layouts as shape-only tensors (no memory, no RNG)."""
    out = {}
    for name, layout in (("checkpoint", LAYOUT_ROMA), ("dinov2", LAYOUT_DINOV2)):
        out[name] = {k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, s, d in read_layout(layout)}
    return out


def meta_target() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return RomaCoarse().state_dict()


def test_layouts_have_the_real_tensor_counts() -> None:
    assert len(read_layout(LAYOUT_ROMA)) == 603
    assert len(read_layout(LAYOUT_DINOV2)) == 343


def test_both_files_map_completely_with_refiners_reserved() -> None:
    report = hooks.map_weights("roma_full", meta_sources(), {}, {}).report
    assert report.ok, report.summary()
    by_name = {s.source: s for s in report.sources}
    ckpt, dino = by_name["checkpoint"], by_name["dinov2"]
    assert (dino.total, dino.mapped, dino.unused) == (343, 343, [])
    reserved = ckpt.reserved[REFINER_OWNER]
    assert ckpt.total == 603 and ckpt.unused == []
    assert ckpt.mapped + len(reserved) == 603
    # exactly the refiners and the finer projections are left to roma_plus
    assert all(".conv_refiner." in k or any(f".proj.{s}." in k for s in (8, 4, 2, 1)) for k in reserved)
    assert not any(".proj.16." in k or ".gps." in k or ".embedding_decoder." in k or ".encoder." in k
                   for k in reserved)
    assert report.missing == [] and report.target_total == ckpt.mapped + dino.mapped
    assert f"{len(reserved)} used by roma_plus" in report.summary()


def test_coarse_keys_rename_by_prefix_only() -> None:
    assert coarse_rename("checkpoint", "matcher.model.encoder.cnn.layers.40.weight") == "encoder.cnn.layers.40.weight"
    assert coarse_rename("checkpoint", "matcher.model.decoder.proj.16.1.running_var") == "proj16.1.running_var"
    assert coarse_rename("checkpoint", "matcher.model.decoder.gps.16.pos_conv.weight") == "gp.pos_conv.weight"
    assert coarse_rename("dinov2", "blocks.23.ls2.gamma") == "encoder.dinov2.blocks.23.ls2.gamma"
    assert coarse_rename("checkpoint", "matcher.model.decoder.proj.8.0.weight") is None
    owner = rename("checkpoint", "matcher.model.decoder.conv_refiner.1.out_conv.bias")
    assert isinstance(owner, Reserved) and owner.owner == "roma_plus"
    # a DINOv2 key inside the RoMa checkpoint is not silently accepted
    assert rename("checkpoint", "blocks.0.attn.qkv.weight") is None


def test_missing_and_foreign_tensors_are_errors() -> None:
    sources = meta_sources()
    del sources["dinov2"]["mask_token"]
    sources["checkpoint"]["matcher.model.decoder.extra.weight"] = torch.empty(3, device="meta")
    report = hooks.map_weights("roma_full", sources, {}, {}).report
    assert report.missing == ["encoder.dinov2.mask_token"]
    assert report.unexpected == ["matcher.model.decoder.extra.weight"]
    with pytest.raises(WeightMappingError, match="mask_token"):
        enforce(report)


def test_swapped_files_do_not_map() -> None:
    sources = meta_sources()
    swapped = {"checkpoint": sources["dinov2"], "dinov2": sources["checkpoint"]}
    report = hooks.map_weights("roma_full", swapped, {}, {}).report
    assert not report.ok and report.missing
