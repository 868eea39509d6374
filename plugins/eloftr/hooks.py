"""matchrt hook implementations of the `eloftr` matcher (MatchAnything's EfficientLoFTR)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import matchrt
from matchrt.types import (
    ExportOptions, ExportPlan, InputContract, MappedWeights, Matches, MatcherInfo, PairContext,
    WeightSource,
)

from . import export as export_mod
from . import postprocess as post_mod
from . import weights as weights_mod
from .model import DEFAULT_THRESHOLD, SIDE_MULTIPLE, TRAIN_SIZE, ELoFTR

NAME = "eloftr"

INFO = MatcherInfo(
    name=NAME,
    description="MatchAnything EfficientLoFTR (RepVGG + RoPE aggregated attention, semi-dense)",
    contract=InputContract(
        channels=1,
        side_multiple=SIDE_MULTIPLE,
        default_height=TRAIN_SIZE,
        default_width=TRAIN_SIZE,
        # The MatchAnything web demo (match_dense.match_images, force_resize) stretches each
        # image to a fixed W x H with OpenCV INTER_AREA, floors the sides to multiples of 32
        # (dfactor) and converts to grayscale; its matcher pads to a square only to get one
        # size for both images, which this graph takes directly. So: stretch to the graph's
        # H x W with area interpolation, requested sides floored to multiples of 32. The export
        # option resize=pad gives a graph with content-mask inputs, which the core pads for.
        resize="stretch",
        rounding="floor",
        interpolation="area",
    ),
    weight_sources=(
        WeightSource(
            "checkpoint",
            "matchanything_eloftr.ckpt (Lightning state_dict, 447 tensors, keys `matcher.*`)",
            layout=weights_mod.LAYOUT,
        ),
    ),
    output="sparse",
    options=dict(export_mod.DEFAULTS),
    notes=(
        f"max_matches <= {export_mod.TOPK_LIMIT}: matches are selected with TopK, and TensorRT's "
        "TopK takes K <= 3840",
        f"threshold defaults to {DEFAULT_THRESHOLD} (configs/models/eloftr_model.py); the web demo "
        "passes 0.01",
        "no mutual-nearest step (as upstream): one cell may match several; postprocess option "
        "mutual=true keeps one per cell",
        "RoPE positions of rows and columns share one scale, 832 / max(H, W) (upstream's NPE "
        "[832, 832, s, s]), so non-square sizes match upstream; both images share the graph's size",
        "-O resize=pad keeps the aspect ratio as upstream's hloc matcher: long side to the graph, "
        "sides floored to 32, zero padding bottom-right, masked (graph inputs image0_mask, "
        "image1_mask); the default stretches as the MatchAnything demo",
        "the dense coarse confidence is (H/8 * W/8)^2 floats: 468 MB at 832x832; sides up to "
        "about 1700 px (INT32 pair indices)",
    ),
    version="1",
)


@matchrt.hookimpl
def register_matchers(register: Callable[..., None]) -> None:
    """Register the eloftr matcher."""
    register(INFO)


@matchrt.hookimpl
def map_weights(matcher: str, sources: dict[str, dict[str, Any]], paths: dict[str, str],
                options: dict[str, Any]) -> Optional[MappedWeights]:
    """Checkpoint keys minus `matcher.` onto the model's state dict."""
    if matcher != NAME:
        return None
    return weights_mod.map_weights(ELoFTR().state_dict(), sources, paths)


@matchrt.hookimpl
def create_model(matcher: str, options: dict[str, Any]) -> Optional[ELoFTR]:
    """The un-fused reference model (keys as in the checkpoint), eval mode."""
    if matcher != NAME:
        return None
    return ELoFTR(threshold=float(options.get("threshold", DEFAULT_THRESHOLD))).eval()


@matchrt.hookimpl
def export_plan(matcher: str, model: Any, options: ExportOptions) -> Optional[ExportPlan]:
    """One graph; RepVGG fused unless extra["fuse"] is false."""
    if matcher != NAME:
        return None
    return export_mod.build_plan(model, options)


@matchrt.hookimpl
def postprocess(matcher: str, outputs: dict[str, Any], pair: PairContext,
                options: dict[str, Any]) -> Optional[Matches]:
    """Drop invalid slots, apply threshold (and mutual), scale to original pixels."""
    if matcher != NAME:
        return None
    return post_mod.postprocess(outputs, pair, options)
