"""matchrt hook implementations of the `roma_full` matcher (MatchAnything RoMa, coarse half)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import matchrt
from matchrt.profiling import mark_stages
from matchrt.types import (
    ExportOptions, ExportPlan, InputContract, MappedWeights, Matches, MatcherInfo, PairContext,
    WeightSource,
)

from . import export as export_mod
from . import postprocess as post_mod
from . import weights as weights_mod
from .dinov2 import PATCH
from .model import RomaCoarse

NAME = "roma_full"

# stage names for `matchrt profile` (no effect outside it; see matchrt.profiling); paths of the
# one-graph plan and of the exact split's "encode" and "decode" graphs (absent ones skipped)
STAGES = {
    "dinov2": "features.dinov2",
    "proj": "features.proj16",
    "gp": ["gp_support", "gp_solver", "head.gp_posterior"],
    "decoder": "head.embedding_decoder",
    "anchor soft-argmax + warp layout": "head.to_warp",
}
DEFAULT_SIZE = 560  # MatchAnything ROMA.TEST_TIME.COARSE_RES

INFO = MatcherInfo(
    name=NAME,
    description="MatchAnything RoMa, coarse: DINOv2 ViT-L/14 + GP matcher + coordinate decoder (dense, 1/14 grid)",
    contract=InputContract(
        channels=3,
        side_multiple=PATCH,
        default_height=DEFAULT_SIZE,
        default_width=DEFAULT_SIZE,
        # MatchAnything test mode: resize_by_stretch=True, torchvision Resize bilinear, antialias off
        resize="stretch",
        rounding="nearest",
        square=True,
        interpolation="linear",
    ),
    weight_sources=(
        WeightSource("checkpoint", "matchanything_roma.ckpt (Lightning state_dict, 603 tensors, keys "
                     "`matcher.model.*`)", layout=weights_mod.LAYOUT_ROMA),
        WeightSource("dinov2", "dinov2_vitl14_pretrain.pth (DINOv2 ViT-L/14, 343 tensors)",
                     layout=weights_mod.LAYOUT_DINOV2),
    ),
    output="dense",
    options={**export_mod.DEFAULTS, "max_matches": post_mod.DEFAULT_MAX_MATCHES,
             "threshold": post_mod.DEFAULT_THRESHOLD},
    notes=(
        "outputs the coarse warp (grid H/14 x W/14, both directions) before any refinement; "
        "roma_plus adds the refiners",
        "gp_solve=iterative (default): one graph, Newton-Schulz solve of K_yy + 0.1 I in fp32; "
        "TensorRT builds must keep /gp_* in fp32 with TF32 off; gp_solve=exact: two graphs with a "
        "Cholesky solve between them",
        "square inputs only (as MatchAnything's RoMa); images are not ImageNet-normalised "
        "(norm_img=False)",
        "the refiners' tensors in the checkpoint (conv_refiner.*, proj.8/4/2/1) are reported as used "
        "by roma_plus",
    ),
    version="1",
)


@matchrt.hookimpl
def register_matchers(register: Callable[..., None]) -> None:
    """Register the roma_full matcher."""
    register(INFO)


@matchrt.hookimpl
def map_weights(matcher: str, sources: dict[str, dict[str, Any]], paths: dict[str, str],
                options: dict[str, Any]) -> Optional[MappedWeights]:
    """Checkpoint + DINOv2 file onto RomaCoarse; refiner tensors reserved for roma_plus."""
    if matcher != NAME:
        return None
    return weights_mod.map_weights(RomaCoarse().state_dict(), sources, paths)


@matchrt.hookimpl
def create_model(matcher: str, options: dict[str, Any]) -> Optional[RomaCoarse]:
    """The torch reference model (exact GP solve), eval mode."""
    if matcher != NAME:
        return None
    return RomaCoarse().eval()


@matchrt.hookimpl
def export_plan(matcher: str, model: Any, options: ExportOptions) -> Optional[ExportPlan]:
    """One graph (gp_solve=iterative) or encode -> bridge -> decode (gp_solve=exact)."""
    if matcher != NAME:
        return None
    plan = export_mod.build_plan(model, options)
    for graph in plan.graphs:
        mark_stages(graph.module, STAGES, strict=False)
    return plan


@matchrt.hookimpl
def bridge_stages(matcher: str, stage: str, tensors: dict[str, Any],
                  options: dict[str, Any]) -> Optional[dict[str, Any]]:
    """After "encode": the exact GP solve (Cholesky on the tensors' device)."""
    if matcher != NAME:
        return None
    return export_mod.bridge(tensors)


@matchrt.hookimpl
def postprocess(matcher: str, outputs: dict[str, Any], pair: PairContext,
                options: dict[str, Any]) -> Optional[Matches]:
    """Top coarse cells by certainty -> Matches in original pixels, with warp and certainty."""
    if matcher != NAME:
        return None
    return post_mod.postprocess(outputs, pair, options)
