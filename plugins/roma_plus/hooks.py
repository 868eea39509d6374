"""matchrt hook implementations of the `roma_plus` matcher (MatchAnything RoMa, complete)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import matchrt
from matchrt.profiling import mark_methods, mark_stages
from matchrt.types import (
    ExportOptions, ExportPlan, InputContract, MappedWeights, Matches, MatcherInfo, PairContext, WeightSource,
)

from . import export as export_mod
from . import postprocess as post_mod
from . import weights as weights_mod
from .model import DEFAULT_COARSE, FINE_SCALES, RomaPlus
from .refiner import REFINER_SPECS

NAME = "roma_plus"

# stage names for `matchrt profile` (no effect outside it; see matchrt.profiling). Paths below
# RomaPlus; the two passes are methods, so a refiner's row says which pass ran it. Stale names
# never break loading or export (strict=False); tests/test_core_profile.py checks they resolve.
STAGES: dict[str, Any] = {
    "encoder.vgg": "coarse.encoder.cnn",
    "dinov2": "coarse.encoder.dinov2",
    "proj": ["coarse.proj16", *(f"proj.{s}" for s in FINE_SCALES)],
    "gp": ["coarse.gp", "gp_kernels", "gp_posterior"],
    "decoder": "coarse.embedding_decoder",
    "anchor soft-argmax": "cls_to_flow",
    **{f"refiner.{s}": f"conv_refiner.{s}" for s in REFINER_SPECS},
    "flow resize": "resize",
    "flow update": "update",
    "certainty + warp layout": "layout",
}
mark_methods(RomaPlus, {"first pass": "after_coarse", "upsample pass": "upsampling_pass"},
             strict=False)

INFO = MatcherInfo(
    name=NAME,
    description="MatchAnything RoMa, complete: DINOv2 + VGG19 encoder, GP, coordinate decoder, "
                "convolutional refiners at scales 16..1, upsampling pass (dense warp)",
    contract=InputContract(
        channels=3,
        side_multiple=14,
        default_height=DEFAULT_COARSE,
        default_width=DEFAULT_COARSE,
        # MatchAnything test mode stretches each image to S x S (resize_by_stretch) and feeds RGB
        # in [0, 1] (norm_img=False). Bilinear without antialiasing, as the reference copy does
        # (the original release: bicubic with antialiasing, see preprocess.resize_images).
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
    options={**export_mod.DEFAULTS, **post_mod.SAMPLE_DEFAULTS},
    notes=(
        "square inputs only (height = width, a multiple of 14); upstream default 560",
        "upsample_res (default 864, a multiple of 8; 0 = off) re-runs the fine scales on the images "
        "resized to R x R: extra graph inputs image0_upsampled/image1_upsampled, outputs at R x R",
        "coarse_precision (fp16/bf16 runs; fp32 runs keep the coarse stage IEEE fp32): bf16x2-flash "
        "(default) runs DINOv2's and the decoder's linear layers as products of two bf16 pieces of the "
        "activations against bf16 weights and their attention as split fp16 flash attention (1.59% coarse "
        "flips on an H200 against 1.75% from +-0.5/255 input noise; torch runs on Ampere or later), the rest "
        "of the coarse stage in IEEE fp32; exported graphs and CPUs run them as 'fp32' does; 'bf16x2' splits "
        "the linear layers only (1.12%); bf16x3-flash keeps the weights' fp32 precision too (0.22% on the "
        "H200, 3.4 ms a pair slower, 2.2 GB of split weights), 'bf16x3' (0.09% on an H100) its linear layers "
        "only, 'tf32x3' as split TF32 products (0.03%, 4.4 GB); 'fp32' keeps "
        "DINOv2, proj.16 and the coordinate decoder in IEEE fp32 (no TF32) in fp16/bf16 runs and engines, "
        "so the coarse matches equal fp32's; 'reduced' runs them in the run's precision as upstream's AMP "
        "(faster; near-tie arg-maxes may flip); 'tf32' keeps them in fp32 with TF32 matrix products; "
        "'reduced:dinov2' (a '+' list of dinov2, proj16, decoder) relaxes only those regions",
        "gp_solve=iterative (default): one graph, the GP solved in-graph (ONNX: roma_full's gp_method, "
        "gp_iters; torch runs: an in-graph Cholesky); gp_solve=exact: two graphs with roma_full's "
        "Cholesky solve between them",
        "gp_block=128 (default): torch runs on CUDA solve the GP's triangular systems in blocks of 128 rows "
        "(the diagonal blocks inverted in one batched solve, the rest as matrix products); 0: cuBLAS's "
        "triangular solves. Either way one cuSOLVER Cholesky factorisation per matrix",
        "fuse=true (default): BatchNorms folded into the convolutions before them, each refiner's last 1x1 "
        "convolution into its head (fuse=false keeps them)",
        "pad_channels=8 (default): the refiners' odd block widths (1377, 1137, 569) padded with zero "
        "channels to a multiple of 8 for aligned half-precision kernels, same outputs (0 keeps them)",
        "refiner_depthwise=rows-half (default): compiled GPU refiners run each block's 5 x 5 depth-wise "
        "convolution, bias and ReLU as one Triton pass that reads each input row once, its products and sums in "
        "fp16 in fp16 runs (fp32 in bf16 and fp32 runs): 36.9 against 38.1 ms a pair with 'rows' (fp32 sums), "
        "one process on an H200, session 28, the warp as far from strict fp32 as eager fp16's; 'cudnn': cuDNN's "
        "convolution and an Inductor bias + ReLU pass (45.8 against 43.7 ms with 'rows', session 19); exported "
        "graphs hold Conv + Relu either way",
        "coarse_graphs=true (default): torch runs on a GPU replay the split coarse regions (DINOv2; proj.16 + GP + decoder + anchor soft-argmax) "
        "as CUDA graphs after two calls of one input shape (same kernels, less CPU time); false keeps them eager",
        "outputs warp (B x H x 2W x 4) and certainty (B x H x 2W) as upstream's symmetric match; "
        "postprocess samples num_samples matches (sample_mode balanced|topk, seed)",
        "keypoints follow upstream: x = W / 2 * (x_norm + 1), pixel centres at i + 0.5",
    ),
    version="1",
)


@matchrt.hookimpl
def register_matchers(register: Callable[..., None]) -> None:
    """Register the roma_plus matcher."""
    register(INFO)


@matchrt.hookimpl
def map_weights(matcher: str, sources: dict[str, dict[str, Any]], paths: dict[str, str],
                options: dict[str, Any]) -> Optional[MappedWeights]:
    """Checkpoint (603) and DINOv2 (343) tensors onto RomaPlus: coarse half via roma_full's map."""
    if matcher != NAME:
        return None
    import torch

    with torch.device("meta"):  # keys, shapes and dtypes only: no 1.7 GB of initial weights
        target = RomaPlus().state_dict()
    return weights_mod.map_weights(target, sources, paths)


@matchrt.hookimpl
def create_model(matcher: str, options: dict[str, Any]) -> Optional[RomaPlus]:
    """RomaPlus in eval mode with the export options (upsample_res, symmetric, gp_solve, gp_iters)."""
    if matcher != NAME:
        return None
    opts = export_mod.resolve_options(dict(options))
    return RomaPlus(gp_solve=opts["gp_solve"], gp_method=opts["gp_method"], gp_iters=opts["gp_iters"],
                    upsample_res=opts["upsample_res"], symmetric=opts["symmetric"],
                    coarse_precision=opts["coarse_precision"], gp_block=opts["gp_block"]).eval()


@matchrt.hookimpl
def export_plan(matcher: str, model: Any, options: ExportOptions) -> Optional[ExportPlan]:
    """One graph (in-graph GP solve) or two (exact GP solved between them by bridge_stages)."""
    if matcher != NAME:
        return None
    plan = export_mod.build_plan(model, options)
    for graph in plan.graphs:  # every graph wraps the configured RomaPlus as `.model`
        mark_stages(graph.module.model, STAGES, strict=False)
    return plan


@matchrt.hookimpl
def bridge_stages(matcher: str, stage: str, tensors: dict[str, Any], options: dict[str, Any]
                  ) -> Optional[dict[str, Any]]:
    """After "encode": gp_alpha = (K_yy + sigma I)^-1 basis by Cholesky (roma_full's solve_exact)."""
    if matcher != NAME:
        return None
    return export_mod.bridge(stage, tensors)


@matchrt.hookimpl
def postprocess(matcher: str, outputs: dict[str, Any], pair: PairContext,
                options: dict[str, Any]) -> Optional[Matches]:
    """Sample matches from the dense warp and map them to original pixels."""
    if matcher != NAME:
        return None
    return post_mod.postprocess(outputs, pair, options)
