"""ONNX export of RomaPlus: one graph with an in-graph GP solve, or the exact-GP graph sequence.

Graph inputs (float32, RGB in [0, 1], each image stretched to the input's size by the runner):
``image0``, ``image1`` (B x 3 x H x W, the coarse resolution) and, with the upsampling pass,
``image0_upsampled``, ``image1_upsampled`` (B x 3 x R x R, R = upsample_res).
Outputs: ``warp`` (B x H' x 2W' x 4) and ``certainty`` (B x H' x 2W') laid out as upstream's
symmetric inference match (H' x W' = R x R with upsampling, else H x W); ``symmetric=False``
gives B x H' x W' (x 4).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from matchrt.types import ExportOptions, ExportPlan, GraphSpec

from .model import DEFAULT_UPSAMPLE, RomaPlus

NAME = "roma_plus"
GP_SOLVES = ("exact", "iterative", "cg", "newton_schulz")
DEFAULTS: dict[str, Any] = {
    "upsample_res": DEFAULT_UPSAMPLE,
    "symmetric": True,
    "gp_solve": "iterative",
    "gp_iters": None,
}

# ONNX node-name globs TensorRT keeps in fp32 in fp16/bf16 engines (see fp16 notes in README.md)
FP32_LAYERS: list[str] = [
    "/coarse/gp/*",  # cosine kernel exp((cos - 1) / 0.2), the solve and K_xy alpha
    "/coarse/embedding_decoder/Softmax*",  # softmax over 4096 anchors (max subtracted)
    "/conv_refiner.*/GridSample*",  # sampling coordinates
    "/conv_refiner.*/Sub*",  # displacement = flow - grid
    "/conv_refiner.*/Mul*",  # correlation products and coordinate scaling
    "/conv_refiner.*/ReduceSum*",  # correlation sums over 512 channels
    "/conv_refiner.*/out_conv/*",  # flow/certainty head (fp32 in upstream too)
]


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def resolve_options(extra: dict[str, Any]) -> dict[str, Any]:
    """Export options with defaults filled in and types checked."""
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in extra.items() if k in DEFAULTS})
    opts["upsample_res"] = int(opts["upsample_res"] or 0)
    opts["symmetric"] = truthy(opts["symmetric"])
    if opts["gp_solve"] not in GP_SOLVES:
        raise ValueError(f"gp_solve must be one of {', '.join(GP_SOLVES)}, got {opts['gp_solve']!r}")
    if opts["gp_iters"] is not None:
        opts["gp_iters"] = int(opts["gp_iters"])
    return opts


def configured(model: RomaPlus, options: dict[str, Any]) -> RomaPlus:
    """A shallow copy of ``model`` (shared weights) with the export options applied."""
    view = copy.copy(model)
    view.upsample_res = options["upsample_res"]
    view.symmetric = options["symmetric"]
    view.gp_solve = options["gp_solve"]
    view.gp_iters = options["gp_iters"]
    return view


class SingleGraph(nn.Module):
    """image0, image1 [, image0_upsampled, image1_upsampled] -> warp, certainty (in-graph GP)."""

    def __init__(self, model: RomaPlus) -> None:
        super().__init__()
        self.model = model

    def forward(self, image0: torch.Tensor, image1: torch.Tensor,
                image0_upsampled: Optional[torch.Tensor] = None,
                image1_upsampled: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(image0, image1, image0_upsampled, image1_upsampled)


def build_plan(model: RomaPlus, options: ExportOptions) -> ExportPlan:
    """The export plan for ``options`` (sizes from height/width, extras from ``options.extra``)."""
    opts = resolve_options(dict(options.extra))
    view = configured(model, opts)
    b, h, w = options.batch, options.height, options.width
    inputs = [torch.rand(b, 3, h, w), torch.rand(b, 3, h, w)]
    names = ["image0", "image1"]
    r = opts["upsample_res"]
    if r:
        inputs += [torch.rand(b, 3, r, r), torch.rand(b, 3, r, r)]
        names += ["image0_upsampled", "image1_upsampled"]
    graph = GraphSpec(
        name="main", module=SingleGraph(view).eval(), example_inputs=tuple(inputs), input_names=names,
        output_names=["warp", "certainty"], fp32_layers=list(FP32_LAYERS),
    )
    return ExportPlan(matcher=NAME, graphs=[graph], options=opts, input_size=(h, w))
