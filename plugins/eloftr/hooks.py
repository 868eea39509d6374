"""matchrt hook implementations of the `eloftr` matcher (MatchAnything's EfficientLoFTR)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import matchrt
from matchrt.profiling import mark_methods, mark_stages
from matchrt.types import (
    ExportOptions, ExportPlan, InputContract, MappedWeights, Matches, MatcherInfo, PairContext,
    WeightSource,
)

from . import export as export_mod
from . import postprocess as post_mod
from . import weights as weights_mod
from .model import DEFAULT_THRESHOLD, SIDE_MULTIPLE, TRAIN_SIZE, AggregatedAttentionLayer, ELoFTR

NAME = "eloftr"

# stage names for `matchrt profile` (no effect outside it; see matchrt.profiling). Stale names
# never break loading or export (strict=False); tests/test_core_profile.py checks they resolve.
mark_methods(ELoFTR, {"dual softmax": "confidence"}, strict=False)
# the batched path runs a cross layer on both images through this method, not the module's forward
mark_methods(AggregatedAttentionLayer, {"cross-attention": "both_ways"}, strict=False)
LAYERS = "model.loftr_coarse.layers."


def mark_graph_stages(graph: Any) -> Any:
    """Name the stages of an ELoFTRGraph: backbone, coarse transformer (self/cross layers),
    coarse matching (dual softmax + border + threshold + top-K), fine preprocess, fine matching."""
    layers = [n for n, _ in graph.named_modules() if n.startswith(LAYERS) and n[len(LAYERS):].isdigit()]
    return mark_stages(graph, {
        "backbone": "model.backbone",
        "coarse transformer": "model.loftr_coarse",
        "self-attention": [n for n in layers if int(n[len(LAYERS):]) % 2 == 0],
        "cross-attention": [n for n in layers if int(n[len(LAYERS):]) % 2 == 1],
        "coarse matching": "coarse_matching",
        "fine preprocess": "model.fine_preprocess",
        "fine matching": "fine_matching",
    }, strict=False)

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
    plan = export_mod.build_plan(model, options)
    for graph in plan.graphs:
        mark_graph_stages(graph.module)
    return plan


@matchrt.hookimpl
def postprocess(matcher: str, outputs: dict[str, Any], pair: PairContext,
                options: dict[str, Any]) -> Optional[Matches]:
    """Drop invalid slots, apply threshold (and mutual), scale to original pixels."""
    if matcher != NAME:
        return None
    return post_mod.postprocess(outputs, pair, options)
