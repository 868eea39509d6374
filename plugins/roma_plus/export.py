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

from matchrt.errors import MatchrtError
from matchrt.fold import folded_copy, shallow_module_copy
from matchrt.plugins.roma_full import export as coarse_export
from matchrt.plugins.roma_full.encoder import COARSE_SCALE, check_input_size
from matchrt.plugins.roma_full.gp import CHOLESKY_BLOCK
from matchrt.types import ExportOptions, ExportPlan, GraphSpec

from . import split_products
from .model import DEFAULT_UPSAMPLE, RomaPlus, coarse_region_modes
from .refiner import fold_head, pad_channels

NAME = "roma_plus"
# gp_solve ("iterative" | "exact"), gp_method, gp_iters: as roma_full defines and validates them
DEFAULTS: dict[str, Any] = {
    "upsample_res": DEFAULT_UPSAMPLE,
    "symmetric": True,
    "coarse_precision": "bf16x2-flash",
    "fuse": True,
    "pad_channels": 8,
    "coarse_graphs": True,
    "refiner_depthwise": "rows-half",
    "gp_block": CHOLESKY_BLOCK,
    **coarse_export.DEFAULTS,
}

REFINER_DEPTHWISE = ("rows", "rows-half", "cudnn")

# ONNX node-name globs TensorRT keeps in fp32 in fp16/bf16 engines (module scopes of the graph;
# the coordinate paths and the reductions that lose precision or overflow in half precision)
FP32_LAYERS: list[str] = [
    # a module called again (the upsampling pass) gets scope "<name>_1": hence the trailing "*"
    "*/gp*/*",  # GP (gp, gp_kernels, gp_posterior): exp((cos - 1) / 0.2), the in-graph solve, K_xy alpha
    "*/cls_to_flow*/*",  # softmax over 4096 anchors, arg-max neighbourhood mean of coordinates
    "*/corr*/*",  # local correlation: window coordinates, GridSample, sum over 512 channels
    "*/warp_features*/*",  # GridSample of B's features at the flow (coordinates)
    "*/displacement*/*",  # flow - pixel grid
    "*/out_conv*/*",  # refiner heads (fp32 upstream as well)
    "*/update*/*",  # flow += scale * delta / (4 W); certainty += delta
    "*/resize*/*",  # bilinear upsampling of flow and certainty between scales
    "*/layout*/*",  # attenuation, sigmoid, clamp and the warp's coordinate grid
]
# the coarse stage's regions that coarse_precision keeps in fp32 (by default all: TF32 off in the engine)
COARSE_FP32_LAYERS: dict[str, str] = {"dinov2": "*/dinov2/*", "proj16": "*/proj16/*",
                                      "decoder": "*/embedding_decoder/*"}


def fp32_layers(options: dict[str, Any]) -> list[str]:
    """The fp32 node patterns of a graph exported with ``options``."""
    modes = coarse_region_modes(options["coarse_precision"])
    return FP32_LAYERS + [glob for region, glob in COARSE_FP32_LAYERS.items() if modes[region] != "reduced"]


def graph_tf32(options: dict[str, Any]) -> Optional[bool]:
    """TF32 of the build: off while a coarse region must be IEEE fp32, on with "tf32", else the default.
    A split mode counts as IEEE fp32: ONNX graphs (and tf32x3 packages) run those regions as plain fp32
    layers, and the bf16 kinds' packages run their split products, which need no TF32, beside fp32 ones."""
    modes = set(coarse_region_modes(options["coarse_precision"]).values())
    if "tf32" in modes:
        return True
    return False if modes & {"fp32", *split_products.KINDS} else None


def package_configs(options: dict[str, Any]) -> dict[str, Any]:
    """Inductor settings of an AOTInductor package: with a bf16 split policy, casts rounded where the
    graph writes them (``emulate_precision_casts``). A split product's pieces are x_hi = bf16(x) and
    x_lo = bf16(x - x_hi). Inductor computes fused low-precision values in fp32 and rounds them only
    where it stores them, so x - x_hi may be taken from the unrounded x_hi, which makes x_lo zero
    and the product plain bf16. Measured on an H200 (session 26, scripts/roma_package_check.py,
    560/864): without the setting 22.5% of the package's warp moved by more than 1e-2 from strict
    fp32; with it 2.9%, against 4.1% for torch's fp16 run and 4.3% for +-0.5/255 input noise."""
    modes = set(coarse_region_modes(options["coarse_precision"]).values())
    return {"emulate_precision_casts": True} if modes & set(split_products.PACKAGED_KINDS) else {}


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def whole_number(value: Any, key: str, extra: dict[str, Any], high: int, why: str) -> int:
    """``value`` as a whole number from 0 to ``high``, else a MatchrtError naming the option as given
    (``extra[key]``), the range and ``why``."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if not 0 <= number <= high:
        raise MatchrtError(f"roma_plus: {key}={extra.get(key)!r} must be a whole number from 0 to {high}: {why}")
    return number


def resolve_options(extra: dict[str, Any]) -> dict[str, Any]:
    """Export options with defaults filled in and checked (the GP's by roma_full's resolver)."""
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in extra.items() if k in DEFAULTS})
    opts.update({k: v for k, v in coarse_export.resolve_options(opts).items() if k in DEFAULTS})
    opts["upsample_res"] = int(opts["upsample_res"] or 0)
    r = opts["upsample_res"]
    if r < 0 or r % 8:
        lo, hi = max(8, r // 8 * 8), (r // 8 + 1) * 8
        raise MatchrtError(f"roma_plus: upsample_res {r} must be 0 (no upsampling pass) or a positive multiple "
                           f"of 8 (the VGG pyramid's stride); nearest: {lo} or {hi}")
    opts["symmetric"] = truthy(opts["symmetric"])
    opts["fuse"] = truthy(opts["fuse"])
    opts["coarse_graphs"] = truthy(opts["coarse_graphs"])
    opts["pad_channels"] = whole_number(opts["pad_channels"] or 0, "pad_channels", extra, 256,
                                        "the refiners' block width is padded to a multiple of it (8, the default, "
                                        "aligns half-precision matrix products; 0 or 1 leaves the widths as they are)")
    opts["refiner_depthwise"] = str(opts["refiner_depthwise"]).strip().lower()
    if opts["refiner_depthwise"] not in REFINER_DEPTHWISE:
        raise MatchrtError(f"roma_plus: refiner_depthwise={extra.get('refiner_depthwise')!r} must be one of "
                           f"{', '.join(REFINER_DEPTHWISE)}: 'rows' runs the compiled refiners' 5 x 5 depth-wise "
                           "convolution, bias and ReLU as one Triton pass, 'rows-half' the same pass with fp16 "
                           "products and sums in fp16 runs, 'cudnn' as cuDNN's convolution and a ReLU")
    opts["gp_block"] = whole_number(opts["gp_block"], "gp_block", extra, 4096,
                                    f"the rows per block of the GP's triangular solves on CUDA ({CHOLESKY_BLOCK}, "
                                    "the default; 0 runs cuBLAS's triangular solves)")
    opts["coarse_precision"] = str(opts["coarse_precision"]).strip().lower().replace(" ", "")
    coarse_region_modes(opts["coarse_precision"])  # MatchrtError naming the values
    return opts


def configured(model: RomaPlus, options: dict[str, Any]) -> RomaPlus:
    """A shallow copy of ``model`` (shared weights) with the export options applied.

    With ``fuse`` (default) the BatchNorms of the VGG encoder, the projections and the refiners
    are folded into their convolutions and each refiner's last 1 x 1 convolution into its head
    (``refiner.fold_head``), and with ``pad_channels`` > 1 (default 8) the refiners'
    block widths are padded with zero channels to a multiple of it (``refiner.pad_channels``), in
    copies of those parts (the model keeps its keys and shapes). ``coarse_graphs`` (default on)
    replays the split coarse regions as CUDA graphs (``replay.replayed``); ``refiner_depthwise``
    picks the compiled refiners' depth-wise kernel (``refiner.run_block``).
    """
    view = shallow_module_copy(model)
    refiners = folded_copy(model.conv_refiner) if options["fuse"] else None
    if options["pad_channels"] > 1:
        refiners = refiners if refiners is not None else copy.deepcopy(model.conv_refiner)
        for refiner in refiners.values():
            pad_channels(refiner, options["pad_channels"])
    if refiners is not None:
        view.conv_refiner = refiners
        for refiner in refiners.values():  # copies: the model's own refiners keep the class default
            refiner.depthwise_rows = options["refiner_depthwise"] in ("rows", "rows-half")
            refiner.depthwise_half = options["refiner_depthwise"] == "rows-half"
            if options["fuse"]:  # after the padding, which widens the last convolution too
                fold_head(refiner)
    if options["fuse"]:
        view.proj = folded_copy(model.proj)
        coarse = shallow_module_copy(model.coarse)
        coarse.encoder = shallow_module_copy(model.coarse.encoder)
        coarse.encoder.cnn = folded_copy(model.coarse.encoder.cnn)
        view.coarse = coarse
    view.upsample_res = options["upsample_res"]
    view.symmetric = options["symmetric"]
    view.coarse_precision = options["coarse_precision"]
    view.coarse_graphs = options["coarse_graphs"]
    view.set_gp(options["gp_solve"], options["gp_method"], options["gp_iters"], options["gp_block"])
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


PYRAMID_NAMES = ("pyr1", "pyr2", "pyr4", "pyr8")
ENCODE_OUTPUTS = [*PYRAMID_NAMES, "feat_q16", "feat_s16", "gp_kqs", "gp_kss", "gp_basis"]
REFINE_INPUTS = [*PYRAMID_NAMES, "feat_q16", "feat_s16", "gp_kqs", "gp_alpha"]


class EncodeGraph(nn.Module):
    """Exact-GP split, graph 1: image0, image1 -> VGG pyramid of [A; B], proj.16 features, GP system."""

    def __init__(self, model: RomaPlus) -> None:
        super().__init__()
        self.model = model

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pyr = self.model.encode(image0, image1)
        pyr_q, pyr_s = self.model.split(pyr)
        system = self.model.gp_system(pyr_q[COARSE_SCALE], pyr_s[COARSE_SCALE])
        return (pyr[1], pyr[2], pyr[4], pyr[8], system["feat_q16"], system["feat_s16"], system["gp_kqs"],
                system["gp_kss"], system["gp_basis"])


class RefineGraph(nn.Module):
    """Exact-GP split, graph 2: the solved GP (gp_alpha) and graph 1's tensors -> warp, certainty."""

    def __init__(self, model: RomaPlus) -> None:
        super().__init__()
        self.model = model

    def forward(self, pyr1: torch.Tensor, pyr2: torch.Tensor, pyr4: torch.Tensor, pyr8: torch.Tensor,
                feat_q16: torch.Tensor, feat_s16: torch.Tensor, gp_kqs: torch.Tensor, gp_alpha: torch.Tensor,
                image0_upsampled: Optional[torch.Tensor] = None,
                image1_upsampled: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        pyr = {1: pyr1, 2: pyr2, 4: pyr4, 8: pyr8}
        return self.model.forward_from_gp(pyr, feat_q16, feat_s16, gp_kqs, gp_alpha, image0_upsampled,
                                          image1_upsampled)


def bridge(stage: str, tensors: dict[str, Any]) -> Optional[dict[str, Any]]:
    """After "encode": roma_full's exact solve, gp_alpha = gp_kss^-1 gp_basis (Cholesky, tensors' device)."""
    if stage != "encode":
        return None
    return coarse_export.bridge(tensors)


def build_plan(model: RomaPlus, options: ExportOptions) -> ExportPlan:
    """The export plan for ``options`` (sizes from height/width, extras from ``options.extra``).

    gp_solve "exact": two graphs (encode -> bridge solves the GP -> refine); otherwise one graph.
    """
    opts = resolve_options(dict(options.extra))
    b, h, w = int(options.batch), int(options.height), int(options.width)
    check_input_size(h, w, matcher=NAME)
    if options.dynamic:
        raise MatchrtError("roma_plus exports static shapes only (GP grid, correlation windows and both passes "
                           "are sized from the input); drop --dynamic and pass --batch, --height and --width")
    if b < 1:
        raise MatchrtError(f"roma_plus: batch must be >= 1, got {b}")
    view = configured(model, opts).eval()
    pinned = fp32_layers(opts)
    # strict coarse stage: IEEE fp32 in TensorRT; "tf32": fp32 layers with TF32 allowed
    tf32 = graph_tf32(opts)
    configs = package_configs(opts)  # read, never changed, by the package builder
    images = [torch.rand(b, 3, h, w), torch.rand(b, 3, h, w)]
    r = opts["upsample_res"]
    upsampled = [torch.rand(b, 3, r, r), torch.rand(b, 3, r, r)] if r else []
    up_names = ["image0_upsampled", "image1_upsampled"] if r else []
    if opts["gp_solve"] == "iterative":
        graph = GraphSpec(
            name="main", module=SingleGraph(view).eval(), example_inputs=tuple(images + upsampled),
            input_names=["image0", "image1", *up_names], output_names=["warp", "certainty"],
            fp32_layers=pinned, tf32=tf32, inductor_configs=configs,
        )
        return ExportPlan(matcher=NAME, graphs=[graph], options=opts, input_size=(h, w))
    encode = EncodeGraph(view).eval()
    with torch.no_grad():
        mids = encode(*images)
    mid = dict(zip(ENCODE_OUTPUTS, mids))
    mid.update(bridge("encode", mid) or {})
    graphs = [
        GraphSpec(name="encode", module=encode, example_inputs=tuple(images), input_names=["image0", "image1"],
                  output_names=list(ENCODE_OUTPUTS), fp32_layers=pinned, tf32=tf32,
                  inductor_configs=configs),
        GraphSpec(name="refine", module=RefineGraph(view).eval(),
                  example_inputs=tuple([mid[n] for n in REFINE_INPUTS] + upsampled),
                  input_names=[*REFINE_INPUTS, *up_names], output_names=["warp", "certainty"],
                  fp32_layers=pinned, tf32=tf32, inductor_configs=configs),
    ]
    return ExportPlan(matcher=NAME, graphs=graphs, options=opts, input_size=(h, w))
