"""RomaPlus: MatchAnything's RoMa as it runs at test time (``self_inference_time_match``).

Coarse half (reused from roma_full, never copied): VGG19-BN + DINOv2 encoder, proj.16, GP,
coordinate decoder -> coarse warp and certainty at the DINOv2 grid. This module adds the
refiners at scales 16, 8, 4, 2, 1, the optional upsampling pass (the fine scales 8..1 re-run on
the VGG pyramid of the images resized to ``upsample_res``), certainty attenuation and the
symmetric warp layout:

    warp       B x H x 2W x 4: left half (x_A, y_A, x_B, y_B) of A's pixel grid and its match
               in B; right half (x_A, y_A, x_B, y_B) of B's grid and its match in A; all in
               normalised [-1, 1] coordinates (pixel centres), clamped to [-1, 1]
    certainty  B x H x 2W: sigmoid(certainty logits - attenuation), 0 where the predicted
               match left the image

H x W is the coarse resolution, or R x R with the upsampling pass. ``symmetric=False`` gives
the A->B half only (B x H x W x 4, B x H x W).

Precision policy under fp16/bf16 (autocast here, fp32 layer constraints in TensorRT): the GP,
the anchor soft-argmax, correlation sums and all coordinate arithmetic always run in IEEE fp32.
``coarse_precision="fp32"`` also keeps DINOv2, proj.16 and the coordinate decoder in
IEEE fp32 (no TF32): the GP amplifies any rounding of its input features into flips of the
4096-way arg-max between near-tied anchors, which move a match by up to the whole image.
Measured on the H100 at 560/864 with the deterministic test weights (scripts/roma_fp16_check.py):
an fp16 coarse stage flips 2.75% of the coarse cells (warp max deviation 1.09, mean 3e-2), TF32
in it 1.3%, and so does +-0.5/255 noise on the images in strict fp32 (1.6%); the strict coarse
stage flips none and the fp16 warp stays within 5.8e-6 of fp32 (bf16: 5.1e-5).
``coarse_precision="bf16x3-flash"``, ``"bf16x3"`` and ``"tf32x3"`` compute the linear
layers of DINOv2 and the decoder as split products of about fp32's precision (split_products.py;
"bf16x3-flash" also their attention, as split fp16 flash attention) and the rest as "fp32": on
the H100 they flip 1.03%, 0.09% and 0.03% of the coarse cells, against 1.75% from the input noise.
``"bf16x2-flash"`` (default since session 17) and ``"bf16x2"`` round those layers' weights to bf16
and keep the activations' 16 bits (two thirds of the products' depth): on the H200 1.59% and
1.12% against the same 1.75% (bf16x3-flash 0.22% there), 3.4 ms a pair faster than bf16x3-flash.
Every split policy also runs proj.16 (the GP's input) as one bf16x3 split product, tf32x3 under "tf32x3"
(about fp32's precision): with it the default flipped 0.88% on an H200 (session 22; 1.00% on another H200
without it, noise 1.75% there), and saves its 0.30 ms of IEEE fp32 FFMA convolutions.
Exported graphs and devices without the tensor cores for them run those layers as "fp32" does.
``"reduced"`` runs the coarse stage in the run's
precision as upstream's AMP does; ``"reduced:dinov2"`` (a "+" list of dinov2, proj16, decoder)
only the named regions. On the H100 every relaxed policy flipped more coarse cells than the
input noise (DINOv2 alone in fp16: 3.09% against 1.75%).
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from matchrt.errors import MatchrtError
from matchrt.plugins.roma_full.decoder import classification_to_flow
from matchrt.plugins.roma_full.encoder import COARSE_SCALE, normalize_images
from matchrt.plugins.roma_full.gp import CHOLESKY_BLOCK
from matchrt.plugins.roma_full.model import RomaCoarse
from matchrt.plugins.roma_full.ops import strict_fp32, swap_halves

from .refiner import REFINER_SPECS, ConvRefiner, pixel_grid, upsample
from . import split_products
from .replay import replayed

FINE_SCALES: tuple[int, ...] = (8, 4, 2, 1)
# proj.16 belongs to the coarse half (the GP needs it); the finer projections live here
PROJ_IN: dict[int, int] = {8: 512, 4: 256, 2: 128, 1: 64}
REFINE_INIT = 4.0  # upstream divides refiner displacements by 4 * (finest width or height)
ATTENUATION = 0.5  # certainty -= 0.5 * min(coarse certainty logit, 0)
DEFAULT_COARSE = 560
DEFAULT_UPSAMPLE = 864
# "fp32": IEEE fp32; "tf32": fp32 tensors with TF32 matrix products (10-bit mantissa inputs,
# fp32 accumulation); "reduced": the run's precision (fp16/bf16 autocast), as upstream's AMP;
# "reduced:R1+R2": the named regions in the run's precision, the others IEEE fp32; "tf32x3" /
# "bf16x3" / "bf16x2": the linear layers of DINOv2 and the decoder as split TF32 / bf16 products
# (bf16x2: the weights rounded to bf16), and "bf16x3-flash" / "bf16x2-flash" their attention too
# (split_products.py), the rest IEEE fp32
COARSE_PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16x3", "bf16x3-flash", "bf16x2", "bf16x2-flash", "reduced",
                     "reduced:<regions>")
# the coarse stage's regions a policy can relax (the GP and the anchor soft-argmax stay IEEE fp32)
COARSE_REGIONS = ("dinov2", "proj16", "decoder")


def coarse_region_modes(policy: str) -> dict[str, str]:
    """Region -> "fp32" | "tf32" | a split kind (split_products.KINDS) | "reduced" for a
    ``coarse_precision`` value; MatchrtError if unknown."""
    if policy in ("fp32", "tf32", "reduced"):
        return dict.fromkeys(COARSE_REGIONS, policy)
    if policy in split_products.KINDS:  # proj.16 (the GP's input): a split product of about fp32's precision
        return {"dinov2": policy, "proj16": "tf32x3" if policy == "tf32x3" else "bf16x3", "decoder": policy}
    if policy.startswith("reduced:"):
        regions = [r.strip() for r in policy[len("reduced:"):].split("+") if r.strip()]
        unknown = [r for r in regions if r not in COARSE_REGIONS]
        if regions and not unknown:
            return {r: "reduced" if r in regions else "fp32" for r in COARSE_REGIONS}
        raise MatchrtError(f"roma_plus: coarse_precision={policy!r} names no region or an unknown one "
                           f"({', '.join(unknown) or 'none'}); regions: {', '.join(COARSE_REGIONS)}, "
                           "joined by '+', e.g. reduced:dinov2")
    raise MatchrtError(f"roma_plus: coarse_precision={policy!r} is not one of {', '.join(COARSE_PRECISIONS)}: "
                       "'fp32' keeps DINOv2, proj.16 and the decoder in IEEE fp32 under fp16/bf16 (exact "
                       "coarse matches), 'tf32' in fp32 with TF32 matrix products, 'tf32x3' / 'bf16x3' their "
                       "linear layers as three-way split TF32 / bf16 products (about fp32's precision), "
                       "'bf16x3-flash' those and their attention as split fp16 flash attention, 'bf16x2' / "
                       "'bf16x2-flash' as those with the weights rounded to bf16, 'reduced' runs them in the "
                       "run's precision (fastest, as upstream's AMP), 'reduced:dinov2' (or another '+' list "
                       f"of {', '.join(COARSE_REGIONS)}) only those")

Pyramid = dict[int, torch.Tensor]
Corresps = dict[int, tuple[torch.Tensor, torch.Tensor]]  # scale -> (flow B x 2 x h x w, certainty B x 1 x h x w)


@torch.compiler.disable
def strict_eager(fn: Callable[..., Any], *args: Any, tf32: bool = False) -> Any:
    """``fn(*args)`` in fp32 (float inputs cast up, autocast off; TF32 only if asked), never compiled.

    Outside torch.compile: TF32 switches flipped inside compiled code do not act as in eager
    mode. Measured on the H100 (560/864): compiled through this region, fp32 output strayed 0.48
    (relative, flipped coarse arg-maxes) from eager fp32; with the region left eager, 2.5e-4.
    """
    args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with strict_fp32(args[0].device.type, tf32=tf32):
        return fn(*args)


@torch.compiler.disable
def split_eager(module: nn.Module, kind: str, *args: Any, graphs: bool = False) -> Any:
    """``module(*args)`` in fp32 through its split copy of ``kind`` (split_products.split_copy), never compiled.

    The copy is looked up here, in eager code: found or built inside a compiled (CUDA-graph) region,
    its split weights would be graph outputs that the next replay overwrites. Traced for ONNX, or on
    a device without TF32 / bf16 tensor cores (CPU, pre-Ampere GPUs), the plain module runs (IEEE
    fp32 layers). torch.export (an AOTInductor package) traces the copy an eager call built before
    it (``split_products.built_copy``; the plain module when there is none). With ``graphs`` the
    copy's launches are captured and replayed as a CUDA graph (replay.replayed: the same kernels,
    less CPU time; eager runs only)."""
    if torch.onnx.is_in_onnx_export() or not split_products.split_pays(args[0].device):
        return strict_eager(module, *args)
    if torch.compiler.is_compiling():
        built = split_products.built_copy(module, kind, args[0].device) if torch.compiler.is_exporting() else None
        return strict_eager(module if built is None else built, *args)
    copy = split_products.split_copy(module, kind)
    return strict_eager(functools.partial(replayed, copy) if graphs else copy, *args)


class ClassificationToFlow(nn.Module):
    """roma_full's anchor softmax + arg-max neighbourhood mean, as a module (named fp32 region)."""

    def forward(self, gm_cls: torch.Tensor) -> torch.Tensor:
        with strict_fp32(gm_cls.device.type):
            return classification_to_flow(gm_cls.float())


class GPKernels(nn.Module):
    """K_xy, K_yy + sigma I and the support basis from roma_full's GP, autocast off (fp32).

    The GP module is passed in (not registered here) so its weights keep one home.
    """

    def forward(self, gp: nn.Module, feat_q: torch.Tensor, feat_s: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with strict_fp32(feat_q.device.type):
            return gp.kernel_matrices(feat_q.float(), feat_s.float())  # type: ignore[operator]


class GPPosterior(nn.Module):
    """K_xy alpha as a B x 512 x h x w map (roma_full's GP posterior), autocast off (fp32)."""

    def forward(self, gp: nn.Module, k_qs: torch.Tensor, alpha: torch.Tensor, h: int, w: int) -> torch.Tensor:
        with strict_fp32(k_qs.device.type):
            return gp.posterior(k_qs.float(), alpha.float(), h, w)  # type: ignore[operator]


class FlowResize(nn.Module):
    """Bilinear resize of flow or certainty (align_corners=False), in fp32."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return upsample(x.float(), size)


class FlowUpdate(nn.Module):
    """flow += scale * delta / (4 * (W, H) of the finest level); certainty += delta; in fp32.

    fp16 hazard: a refinement step of a fraction of a pixel at 864 px is ~1e-3 in normalised
    units, below fp16's resolution near |x| = 1 (4.9e-4 spacing): it would be rounded away.
    """

    def forward(self, scale: int, flow: torch.Tensor, certainty: torch.Tensor, delta: torch.Tensor,
                delta_cert: torch.Tensor, finest: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = finest
        step = torch.stack((delta[:, 0].float() / (REFINE_INIT * w),
                            delta[:, 1].float() / (REFINE_INIT * h)), dim=1)
        return flow.float() + scale * step, certainty.float() + delta_cert.float()


class WarpLayout(nn.Module):
    """Finest flow/certainty logits (decoder batch) -> (warp, certainty) as upstream returns them.

    Attenuation: logits -= 0.5 * min(coarse logits resized, 0); certainty = sigmoid(logits), set
    to 0 where the match leaves [-1, 1]; the match is clamped to [-1, 1]. Symmetric batches
    [A->B; B->A] become one H x 2W map per pair: (grid_A, A->B) | (B->A, grid_B).
    """

    def forward(self, flow: torch.Tensor, certainty: torch.Tensor, coarse_certainty: Optional[torch.Tensor],
                symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = flow.shape
        logits = certainty.float()
        if coarse_certainty is not None:
            low = upsample(coarse_certainty.float(), (h, w))
            # upstream: 0.5 * low * (low < 0); min(low, 0) is the same value, exportable as Min/Clip
            logits = logits - ATTENUATION * torch.clamp(low, max=0.0)
        prob = torch.sigmoid(logits)[:, 0]  # B x h x w
        target = flow.float().permute(0, 2, 3, 1)  # B x h x w x 2
        # a match outside the image: max(|x|, |y|) > 1 (ReduceMax on floats; no boolean reduction)
        outside = target.abs().amax(dim=-1) > 1
        prob = torch.where(outside, torch.zeros_like(prob), prob)
        target = target.clamp(-1.0, 1.0)
        grid = pixel_grid(b, h, w, flow.device).permute(0, 2, 3, 1)  # B x h x w x 2
        if not symmetric:
            return torch.cat((grid, target), dim=-1), prob
        n = b // 2
        q_warp = torch.cat((grid[:n], target[:n]), dim=-1)
        s_warp = torch.cat((target[n:], grid[n:]), dim=-1)
        return torch.cat((q_warp, s_warp), dim=2), torch.cat((prob[:n], prob[n:]), dim=2)


class CoarseRegion:
    """proj.16, the GP, the coordinate decoder and the anchor soft-argmax of one model view as one
    callable, for ``replay.replayed`` to capture whole (the graphs live on this object).

    Under a split policy this region runs eagerly between compiled graphs: the decoder's split
    copy was replayed alone, but the GP's and proj.16's kernels were still launched one by one
    from Python. ``signature`` names what the captured kernels read besides their inputs: the
    weights (storage and version of every parameter), the policy and the GP solve; a region
    whose signature changed is rebuilt, its old graphs dropped with it.
    """

    def __init__(self, model: "RomaPlus", modes: dict[str, str], signature: tuple[Any, ...]) -> None:
        self.model = weakref.ref(model)  # the model holds this object: no reference cycle
        self.modes = dict(modes)
        self.signature = signature

    def __call__(self, f_q16: torch.Tensor, f_s16: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model()
        assert model is not None, "the model of a coarse region is gone"
        return model._coarse_prediction(f_q16, f_s16, self.modes, graphs=False)


_REGION_ATTR = "_matchrt_coarse_region"  # a plain attribute of the view (outside state dict and children)


def region_signature(model: "RomaPlus", modes: dict[str, str]) -> tuple[Any, ...]:
    """What a captured coarse region depends on besides its inputs (see ``CoarseRegion``)."""
    parts = (model.coarse.proj16, model.coarse.gp, model.coarse.embedding_decoder)
    weights = tuple((p.data_ptr(), p._version) for part in parts for p in part.parameters())
    return (tuple(sorted(modes.items())), model.gp_solve, model.gp_method, model.gp_iters, model.gp_block, weights)


def coarse_region(model: "RomaPlus", modes: dict[str, str]) -> CoarseRegion:
    """The view's ``CoarseRegion`` for ``modes``, rebuilt when its signature changed (or when it
    belongs to another view: shallow copies of a model share their attributes)."""
    signature = region_signature(model, modes)
    region = model.__dict__.get(_REGION_ATTR)
    if region is None or region.model() is not model or region.signature != signature:
        region = CoarseRegion(model, modes, signature)
        model.__dict__[_REGION_ATTR] = region
    return region


class RomaPlus(nn.Module):
    """Full RoMa: ``forward(image0, image1[, image0_up, image1_up]) -> (warp, certainty)``.

    Submodules: ``coarse`` (roma_full's RomaCoarse: ``encoder.cnn``, ``encoder.dinov2``,
    ``proj16``, ``gp``, ``embedding_decoder``), ``proj`` (scales 8, 4, 2, 1) and
    ``conv_refiner`` (scales 16, 8, 4, 2, 1). ``upsample_res`` = 0 turns the second pass off;
    ``coarse_precision`` is one of COARSE_PRECISIONS (see the module docstring and
    ``coarse_region_modes``).
    """

    def __init__(self, gp_solve: str = "exact", gp_method: str = "newton_schulz",
                 gp_iters: Union[int, str, None] = None, upsample_res: int = DEFAULT_UPSAMPLE,
                 symmetric: bool = True, attenuate: bool = True, coarse_precision: str = "bf16x2-flash",
                 gp_block: int = CHOLESKY_BLOCK) -> None:
        super().__init__()
        self.coarse = RomaCoarse()
        self.proj = nn.ModuleDict({
            str(s): nn.Sequential(nn.Conv2d(PROJ_IN[s], REFINER_SPECS[s][0], 1, 1),
                                  nn.BatchNorm2d(REFINER_SPECS[s][0]))
            for s in FINE_SCALES
        })
        self.conv_refiner = nn.ModuleDict({str(s): ConvRefiner(*spec) for s, spec in REFINER_SPECS.items()})
        # parameter-free stages (fp32 regions with predictable ONNX node names)
        self.cls_to_flow = ClassificationToFlow()
        self.gp_kernels = GPKernels()
        self.gp_posterior = GPPosterior()
        self.resize = FlowResize()
        self.update = FlowUpdate()
        self.layout = WarpLayout()
        self.set_gp(gp_solve, gp_method, gp_iters, gp_block)
        self.upsample_res = int(upsample_res)
        self.symmetric = bool(symmetric)
        self.attenuate = bool(attenuate)
        coarse_region_modes(coarse_precision)  # checked here, read per call (a view may change it)
        self.coarse_precision = coarse_precision
        self.coarse_graphs = False  # replay the split regions as CUDA graphs (export option coarse_graphs)

    def region_modes(self, device_type: str) -> dict[str, str]:
        """Each coarse region's mode for a call on ``device_type``: the ``coarse_precision`` policy in
        fp16/bf16 runs (autocast on), IEEE fp32 everywhere in fp32 runs (what --precision fp32 promises;
        a split policy's flash attention rounds its softmax weights to fp16)."""
        if not torch.is_autocast_enabled(device_type):
            return dict.fromkeys(COARSE_REGIONS, "fp32")
        return coarse_region_modes(self.coarse_precision)

    def in_coarse_precision(self, region: str, fn: Callable[..., Any], *args: Any,
                            modes: Optional[dict[str, str]] = None, graphs: bool = True) -> Any:
        """``fn(*args)`` of a coarse ``region`` as the run goes ("reduced"), or in fp32 outside
        torch.compile: IEEE ("fp32"), with TF32 matrix products ("tf32"), or (a split kind, ``fn``
        a module) through the module's split copy, whose layers pick their own tensor-core precision.

        ``modes``: the run's region modes (``region_modes``) when the caller read them already. A
        region nested in a strict fp32 region must get them from outside: autocast is off in there,
        so reading them again would say "fp32" for every region (which, until session 11, ran
        proj.16 and the decoder in IEEE fp32 under every split policy). ``graphs=False``: no graph
        of this region alone (it runs inside a captured one)."""
        mode = (modes if modes is not None else self.region_modes(args[0].device.type))[region]
        if mode == "reduced":
            return fn(*args)
        if mode in split_products.KINDS:
            return split_eager(fn, mode, *args, graphs=self.coarse_graphs and graphs)
        return strict_eager(fn, *args, tf32=mode == "tf32")

    def set_gp(self, solve: str, method: str = "newton_schulz", iters: Union[int, str, None] = None,
               block: int = CHOLESKY_BLOCK) -> None:
        """GP solve: "exact" (Cholesky; not exportable in-graph) or "iterative" with roma_full's
        ``method`` ("newton_schulz" | "cg") and ``iters`` steps (None/"auto": roma_full's default).
        ``block``: rows per block of the torch runs' triangular solves on CUDA (0: cuBLAS's whole solves)."""
        self.gp_solve = solve
        self.gp_method = method
        self.gp_iters = None if iters in (None, "", "auto") else int(iters)  # type: ignore[arg-type]
        self.gp_block = int(block)

    def in_graph_solve(self) -> str:
        """The GP solve of this run: "exact" as asked; in an ONNX export the iterative
        ``gp_method`` (plain ops); under torch (eager, compile, torch.export) a Cholesky solve in
        the graph: same result (the iterative solve converges to it), 2 x 1600^3 flops instead
        of ~40 IEEE-fp32 matrix products of that size (15 ms per pair on an H200 at 560)."""
        if self.gp_solve == "exact":
            return "exact"
        return self.gp_method if torch.onnx.is_in_onnx_export() else "cholesky"

    # -- pieces -----------------------------------------------------------------------------
    def encode(self, image0: torch.Tensor, image1: torch.Tensor, with_coarse: bool = True) -> Pyramid:
        """VGG levels 1..8 (and DINOv2 tokens "16") of [image0; image1], one encoder batch."""
        x = normalize_images(torch.cat((image0, image1), dim=0), self.coarse.imagenet_norm)
        pyr = self.coarse.encoder(x, with_cnn=True, with_coarse=False)
        if with_coarse:
            pyr[COARSE_SCALE] = self.in_coarse_precision("dinov2", self.coarse.encoder.dinov2, x)
        return pyr

    def split(self, pyr: Pyramid) -> tuple[Pyramid, Pyramid]:
        """[A; B] encoder outputs -> (query, support) of the decoder's batch.

        Symmetric: query [A, B], support [B, A] (2B pairs). Otherwise query A, support B.
        """
        if self.symmetric:
            return pyr, {k: swap_halves(v) for k, v in pyr.items()}
        b = next(iter(pyr.values())).shape[0] // 2
        return {k: v[:b] for k, v in pyr.items()}, {k: v[b:] for k, v in pyr.items()}

    def pyramids(self, image0: torch.Tensor, image1: torch.Tensor, with_coarse: bool = True
                 ) -> tuple[Pyramid, Pyramid]:
        """(query, support) pyramids of a pair batch (see ``split``)."""
        return self.split(self.encode(image0, image1, with_coarse))

    def refine(self, scale: int, feat_q: torch.Tensor, feat_s: torch.Tensor, flow: torch.Tensor,
               certainty: torch.Tensor, finest: tuple[int, int], scale_factor: float = 1.0,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One refiner step on projected features; flow and certainty are kept in fp32."""
        delta, delta_cert = self.conv_refiner[str(scale)](feat_q, feat_s, flow, scale_factor)
        return self.update(scale, flow, certainty, delta, delta_cert, finest)

    def fine_scales(self, pyr_q: Pyramid, pyr_s: Pyramid, flow: torch.Tensor, certainty: torch.Tensor,
                    scale_factor: float = 1.0, out: Optional[Corresps] = None) -> Corresps:
        """Scales 8, 4, 2, 1 from a flow/certainty of any size (resized bilinearly to each level)."""
        out = {} if out is None else out
        finest = (int(pyr_q[1].shape[-2]), int(pyr_q[1].shape[-1]))
        for s in FINE_SCALES:
            size = (int(pyr_q[s].shape[-2]), int(pyr_q[s].shape[-1]))
            flow, certainty = self.resize(flow, size), self.resize(certainty, size)
            proj = self.proj[str(s)]
            flow, certainty = self.refine(s, proj(pyr_q[s]), proj(pyr_s[s]), flow, certainty, finest,
                                          scale_factor)
            out[s] = (flow, certainty)
        return out

    def after_coarse(self, coarse: dict[str, torch.Tensor], pyr_q: Pyramid, pyr_s: Pyramid) -> Corresps:
        """Refiner 16 on the coarse prediction, then scales 8..1 (the first pass)."""
        finest = (int(pyr_q[1].shape[-2]), int(pyr_q[1].shape[-1]))
        out: Corresps = {}
        out[16] = self.refine(16, coarse["feat_q16"], coarse["feat_s16"], coarse["flow"],
                              coarse["certainty"], finest)
        return self.fine_scales(pyr_q, pyr_s, out[16][0], out[16][1], 1.0, out)

    def upsampling_pass(self, first: Corresps, image0_up: torch.Tensor, image1_up: torch.Tensor,
                        coarse_size: tuple[int, int]) -> Corresps:
        """Re-run scales 8..1 on the VGG pyramid of the R x R images, from the first pass's s1."""
        pyr_q, pyr_s = self.pyramids(image0_up, image1_up, with_coarse=False)
        r_h, r_w = int(image0_up.shape[-2]), int(image0_up.shape[-1])
        # upstream: sqrt of the pixel-count ratio between the two passes
        scale_factor = math.sqrt(r_h * r_w / (coarse_size[0] * coarse_size[1]))
        flow, certainty = first[1]
        return self.fine_scales(pyr_q, pyr_s, flow, certainty, scale_factor)

    def assemble(self, flow: torch.Tensor, certainty: torch.Tensor, coarse_certainty: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Finest flow/certainty logits -> (warp, certainty) (see ``WarpLayout``)."""
        return self.layout(flow, certainty, coarse_certainty, self.symmetric)

    def coarse_prediction(self, f_q16: torch.Tensor, f_s16: torch.Tensor) -> dict[str, torch.Tensor]:
        """roma_full's coarse stage (proj.16, GP, coordinate decoder) with the GP pinned to fp32.

        fp16 hazard: the GP's kernel exp((cos - 1) / 0.2) of fp16 dot products and its linear
        solve lose several digits; autocast and TF32 are switched off around it, inputs cast up.
        """
        modes = self.region_modes(f_q16.device.type)
        if "reduced" not in (modes["proj16"], modes["decoder"]):  # one strict region around the GP too
            region: Callable[..., Any] = functools.partial(self._coarse_prediction, modes=modes)
            if self.replays_coarse_region(modes):
                region = functools.partial(replayed, coarse_region(self, modes))
            return strict_eager(region, f_q16, f_s16, tf32=modes["decoder"] == "tf32")
        return self._coarse_prediction(f_q16, f_s16, modes)

    def replays_coarse_region(self, modes: dict[str, str]) -> bool:
        """Is proj.16 + GP + decoder replayed as one CUDA graph (``coarse_region``)? With
        ``coarse_graphs``, a split decoder policy and an in-graph GP solve (the exact one reads the
        factorisation's status on the host, which a capture cannot); CPU inputs stay eager anyway,
        and torch.export traces the region (a package has no replays)."""
        return (self.coarse_graphs and modes["decoder"] in split_products.KINDS
                and self.in_graph_solve() != "exact" and not torch.compiler.is_exporting())

    def _coarse_prediction(self, f_q16: torch.Tensor, f_s16: torch.Tensor, modes: dict[str, str],
                           graphs: bool = True) -> dict[str, torch.Tensor]:
        """proj.16, GP, decoder and the anchor soft-argmax; ``graphs``: see ``in_coarse_precision``."""
        feat_q, feat_s = self.project16(f_q16, f_s16, modes, graphs)
        with strict_fp32(feat_q.device.type):
            solve = self.in_graph_solve()
            gp_feats = self.coarse.gp(feat_q.float(), feat_s.float(), solve, self.gp_iters, self.gp_block)
        return self.with_flow(self.decode_logits(gp_feats, feat_q, feat_s, modes, graphs))

    def project16(self, f_q16: torch.Tensor, f_s16: torch.Tensor, modes: Optional[dict[str, str]] = None,
                  graphs: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """proj.16 (1x1 conv + BatchNorm) of query and support tokens, in the coarse precision
        (``modes``, ``graphs``: see ``in_coarse_precision``; a split mode runs the module's split
        copy, ``SplitPointwise``, on each)."""
        proj = self.coarse.proj16
        modes = modes if modes is not None else self.region_modes(f_q16.device.type)
        if modes["proj16"] in split_products.KINDS:
            return tuple(self.in_coarse_precision("proj16", proj, f, modes=modes, graphs=graphs)  # type: ignore[return-value]
                         for f in (f_q16, f_s16))
        return self.in_coarse_precision("proj16", lambda q, s: (proj(q), proj(s)), f_q16, f_s16, modes=modes)

    def gp_system(self, f_q16: torch.Tensor, f_s16: torch.Tensor) -> dict[str, torch.Tensor]:
        """The GP's linear system for the exact split export: proj.16 features and kernel matrices.

        Returns feat_q16, feat_s16 (B x 512 x h x w), gp_kqs (B x hw x hw), gp_kss (K_yy + sigma I)
        and gp_basis (1 x hw x 512); ``gp_alpha = gp_kss^-1 gp_basis`` is solved outside the graph.
        """
        feat_q, feat_s = self.project16(f_q16, f_s16)
        k_qs, k_ss, basis = self.gp_kernels(self.coarse.gp, feat_q, feat_s)
        return {"feat_q16": feat_q, "feat_s16": feat_s, "gp_kqs": k_qs, "gp_kss": k_ss, "gp_basis": basis}

    def coarse_from_alpha(self, feat_q: torch.Tensor, feat_s: torch.Tensor, k_qs: torch.Tensor,
                          alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Coarse prediction from the solved GP system (the second half of ``coarse_prediction``)."""
        gp_feats = self.gp_posterior(self.coarse.gp, k_qs, alpha, int(feat_q.shape[-2]), int(feat_q.shape[-1]))
        return self.decode(gp_feats, feat_q, feat_s)

    def decode(self, gp_feats: torch.Tensor, feat_q: torch.Tensor, feat_s: torch.Tensor,
               modes: Optional[dict[str, str]] = None) -> dict[str, torch.Tensor]:
        """roma_full's coordinate decoder (coarse precision), the classification-to-flow step in fp32
        (``modes``: see ``in_coarse_precision``)."""
        return self.with_flow(self.decode_logits(gp_feats, feat_q, feat_s, modes))

    def decode_logits(self, gp_feats: torch.Tensor, feat_q: torch.Tensor, feat_s: torch.Tensor,
                      modes: Optional[dict[str, str]] = None, graphs: bool = True) -> dict[str, torch.Tensor]:
        """The decoder's outputs without the flow (``modes``, ``graphs``: see ``in_coarse_precision``)."""
        gm_cls, gm_certainty = self.in_coarse_precision("decoder", self.coarse.embedding_decoder, gp_feats, feat_q,
                                                        modes=modes, graphs=graphs)
        return {"gm_cls": gm_cls, "gm_certainty": gm_certainty, "certainty": gm_certainty,
                "feat_q16": feat_q, "feat_s16": feat_s}

    def with_flow(self, coarse: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``coarse`` with "flow": the anchor soft-argmax of its classification logits, in fp32."""
        return {**coarse, "flow": self.cls_to_flow(coarse["gm_cls"])}

    # -- whole model ------------------------------------------------------------------------
    def passes(self, coarse: dict[str, torch.Tensor], pyr_q: Pyramid, pyr_s: Pyramid,
               image0_up: Optional[torch.Tensor] = None, image1_up: Optional[torch.Tensor] = None,
               ) -> tuple[Corresps, Optional[Corresps]]:
        """First pass (refiners 16..1) and, given the R x R images, the upsampling pass."""
        first = self.after_coarse(coarse, pyr_q, pyr_s)
        second = None
        if image0_up is not None and image1_up is not None:
            size = (int(pyr_q[1].shape[-2]), int(pyr_q[1].shape[-1]))
            second = self.upsampling_pass(first, image0_up, image1_up, size)
        return first, second

    def finish(self, first: Corresps, second: Optional[Corresps]) -> tuple[torch.Tensor, torch.Tensor]:
        """(warp, certainty) from the last pass's scale 1, attenuated by the first pass's scale 16."""
        flow, certainty = (second if second is not None else first)[1]
        return self.assemble(flow, certainty, first[16][1] if self.attenuate else None)

    def correspondences(self, image0: torch.Tensor, image1: torch.Tensor,
                        image0_up: Optional[torch.Tensor] = None, image1_up: Optional[torch.Tensor] = None,
                        ) -> tuple[dict[str, torch.Tensor], Corresps, Optional[Corresps]]:
        """(coarse dict, first-pass corresps {16..1}, upsampled-pass corresps {8..1} or None)."""
        pyr_q, pyr_s = self.pyramids(image0, image1)
        coarse = self.coarse_prediction(pyr_q[COARSE_SCALE], pyr_s[COARSE_SCALE])
        first, second = self.passes(coarse, pyr_q, pyr_s, image0_up, image1_up)
        return coarse, first, second

    def forward(self, image0: torch.Tensor, image1: torch.Tensor,
                image0_up: Optional[torch.Tensor] = None, image1_up: Optional[torch.Tensor] = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at the coarse size (and at R x R for the upsampling pass) -> (warp, certainty).

        Without image0_up/image1_up the upsampling pass is skipped whatever ``upsample_res`` says
        (it needs the images resized from the originals, which only the caller has).
        """
        _, first, second = self.correspondences(image0, image1, image0_up, image1_up)
        return self.finish(first, second)

    def forward_from_gp(self, pyr: Pyramid, feat_q: torch.Tensor, feat_s: torch.Tensor, k_qs: torch.Tensor,
                        alpha: torch.Tensor, image0_up: Optional[torch.Tensor] = None,
                        image1_up: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of ``forward`` after the exact GP solve (the split export's second graph).

        ``pyr``: VGG levels 1..8 of [image0; image1] as ``encode`` returns them.
        """
        pyr_q, pyr_s = self.split(pyr)
        coarse = self.coarse_from_alpha(feat_q, feat_s, k_qs, alpha)
        first, second = self.passes(coarse, pyr_q, pyr_s, image0_up, image1_up)
        return self.finish(first, second)


__all__ = ["RomaPlus", "FINE_SCALES", "DEFAULT_COARSE", "DEFAULT_UPSAMPLE", "COARSE_PRECISIONS", "coarse_region_modes"]
