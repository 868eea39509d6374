"""Export wrappers of roma_full: the coarse warp and certainty as one graph or a two-graph sequence.

Inputs ``image0``, ``image1``: B x 3 x H x W float32 RGB in [0, 1] (H = W, multiples of 14;
MatchAnything's RoMa feeds them un-normalised, see encoder.py). Outputs (symmetric, as
upstream's ``self_inference_time_match``, on the coarse h x w = H/14 x W/14 grid):

- ``warp``: B x h x 2w x 4. Columns 0..w-1 are A->B: (x_A, y_A, x_B, y_B) with (x_A, y_A) the
  cell centre in A and (x_B, y_B) where it lands in B; columns w..2w-1 are B->A:
  (x_A, y_A, x_B, y_B) with (x_B, y_B) the cell centre in B. Coordinates are normalised to
  [-1, 1] over the image (x = -1 the left edge of the first pixel, +1 the right edge of the last;
  grid_sample(align_corners=False) convention).
- ``certainty``: B x h x 2w, sigmoid of the coarse certainty logit (0 where the warp left [-1, 1]).

GP solve (``extra["gp_solve"]``):
- "iterative" (default): one graph "main"; K_yy + sigma I is solved in the graph by Newton-Schulz
  (a data-independent step count, see gp.newton_schulz_iters) plus one refinement step.
- "exact": graph "encode" (images -> projected DINOv2 features, K_yy + sigma I, the GP basis),
  then ``bridge_stages`` solves by Cholesky on the tensors' device, then graph "decode"
  (features + solution -> warp, certainty).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from matchrt.errors import MatchrtError
from matchrt.types import ExportOptions, ExportPlan, GraphSpec

from .decoder import classification_to_flow
from .encoder import COARSE_SCALE, check_input_size, normalize_images
from .gp import METHODS, GaussianProcess, at_least_fp32, cosine_kernel, flat_tokens, solve_exact, solve_iterative
from .model import RomaCoarse
from .ops import coarse_grid, strict_fp32, swap_halves

NAME = "roma_full"
GP_SOLVES = ("iterative", "exact")
DEFAULTS: dict[str, Any] = {"gp_solve": "iterative", "gp_method": "newton_schulz", "gp_iters": "auto"}
INPUTS = ["image0", "image1"]
OUTPUTS = ["warp", "certainty"]
# names of the tensors between the two graphs of the "exact" sequence
FEATS, KSS, BASIS, ALPHA = "feat16", "gp_kss", "gp_basis", "gp_alpha"
# nodes TensorRT must keep in fp32 for reduced-precision builds (ONNX names carry module scopes):
# the GP (kernel, solve, posterior: cond(K_yy + sigma I) reaches ~1e4) and the anchor
# soft-argmax that turns logits into coordinates. TF32 must be off for the solve as well. Under
# torch (fp16/bf16 autocast) the same modules run with autocast and TF32 off.
FP32_LAYERS = ["/gp_*", "*/gp_*", "*/to_warp/*"]


def resolve_options(extra: dict[str, Any]) -> dict[str, Any]:
    """Export options with defaults filled in; refuses unknown solver settings."""
    out = dict(extra)
    solve = str(extra.get("gp_solve", DEFAULTS["gp_solve"])).strip().lower()
    if solve not in GP_SOLVES:
        raise MatchrtError(f"roma_full: gp_solve={solve!r} is not one of {', '.join(GP_SOLVES)}. "
                           "'iterative' keeps the GP solve in one graph; 'exact' splits the graph "
                           "and solves by Cholesky between the two parts.")
    method = str(extra.get("gp_method", DEFAULTS["gp_method"])).strip().lower()
    if method not in METHODS:
        raise MatchrtError(f"roma_full: gp_method={method!r} is not one of {', '.join(METHODS)}")
    iters = extra.get("gp_iters", "auto")
    if iters in (None, "", "auto"):
        iters = "auto"
    else:
        try:
            iters = int(iters)
        except (TypeError, ValueError):
            raise MatchrtError(f"roma_full: gp_iters must be 'auto' or a positive integer, got {iters!r}") from None
        if iters < 1:
            raise MatchrtError(f"roma_full: gp_iters must be >= 1, got {iters}")
    out.update(gp_solve=solve, gp_method=method, gp_iters=iters)
    return out


class ToWarp(nn.Module):
    """Coarse logits of the symmetric batch -> upstream's warp / certainty layout (per pair)."""

    def forward(self, gm_cls: torch.Tensor, gm_certainty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with strict_fp32(gm_cls.device.type):
            return self.layout(classification_to_flow(gm_cls.float()), gm_certainty.float())

    @staticmethod
    def layout(flow: torch.Tensor, gm_certainty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flow 2B x 2 x h x w, certainty logits 2B x 1 x h x w -> warp B x h x 2w x 4, B x h x 2w."""
        b2, _, h, w = flow.shape
        prob = torch.sigmoid(gm_certainty[:, 0])  # 2B x h x w
        # as upstream: a warp leaving the image gets certainty 0 and is clamped
        outside = (flow.abs() > 1).any(dim=1)
        prob = torch.where(outside, torch.zeros_like(prob), prob)
        flow = flow.clamp(-1.0, 1.0).permute(0, 2, 3, 1)  # 2B x h x w x 2
        grid = coarse_grid(1, h, w, flow).permute(0, 2, 3, 1).expand(b2 // 2, h, w, 2)
        a_to_b, b_to_a = flow.chunk(2, dim=0)
        warp = torch.cat((torch.cat((grid, a_to_b), dim=-1), torch.cat((b_to_a, grid), dim=-1)), dim=2)
        c_ab, c_ba = prob.chunk(2, dim=0)
        return warp, torch.cat((c_ab, c_ba), dim=2)


class IterativeSolve(nn.Module):
    """The in-graph GP solve (its own module so its ONNX nodes are named /gp_solver/...)."""

    def __init__(self, method: str, iters: Optional[int]) -> None:
        super().__init__()
        self.method = method
        self.iters = iters

    def forward(self, k_ss: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        with strict_fp32(k_ss.device.type):
            return solve_iterative(k_ss.float(), basis.float(), self.method, self.iters)


class GPSupport(nn.Module):
    """Support side of the GP: K_yy + sigma I of the swapped batch and the Fourier basis."""

    def __init__(self, gp: GaussianProcess) -> None:
        super().__init__()
        self.gp = gp

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with strict_fp32(feat.device.type):
            k_ss = GaussianProcess.support_matrix(swap_halves(feat.float()))
            return k_ss, self.gp.basis(feat.shape[-2], feat.shape[-1], k_ss)


class GPPosterior(nn.Module):
    """K_xy (query [A, B] vs support [B, A]) times the solve -> B x 512 x h x w."""

    def forward(self, feat: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        with strict_fp32(feat.device.type):
            feat = at_least_fp32(feat)
            k_qs = cosine_kernel(flat_tokens(feat), flat_tokens(swap_halves(feat)))
            return GaussianProcess.posterior(k_qs, at_least_fp32(alpha), feat.shape[-2], feat.shape[-1])


class Features(nn.Module):
    """[image0; image1] -> proj.16 of the DINOv2 tokens (2B x 512 x h x w)."""

    def __init__(self, model: RomaCoarse) -> None:
        super().__init__()
        self.dinov2 = model.encoder.dinov2
        self.proj16 = model.proj16
        self.imagenet_norm = model.imagenet_norm

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor:
        x = normalize_images(torch.cat((image0, image1), dim=0), self.imagenet_norm)
        return self.proj16(self.dinov2(x))


class Head(nn.Module):
    """GP posterior -> coordinate decoder -> warp layout."""

    def __init__(self, model: RomaCoarse) -> None:
        super().__init__()
        self.gp_posterior = GPPosterior()
        self.embedding_decoder = model.embedding_decoder
        self.to_warp = ToWarp()

    def forward(self, feat: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gm_cls, gm_certainty = self.embedding_decoder(self.gp_posterior(feat, alpha), feat)
        return self.to_warp(gm_cls, gm_certainty)


class CoarseGraph(nn.Module):
    """One graph: image0, image1 -> warp, certainty (GP solved in the graph)."""

    def __init__(self, model: RomaCoarse, method: str, iters: Optional[int]) -> None:
        super().__init__()
        self.features = Features(model)
        self.gp_support = GPSupport(model.gp)
        self.gp_solver = IterativeSolve(method, iters)
        self.head = Head(model)

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.features(image0, image1)
        k_ss, basis = self.gp_support(feat)
        return self.head(feat, self.gp_solver(k_ss, basis))


class EncodeGraph(nn.Module):
    """Graph 1 of the exact sequence: images -> feat16, gp_kss (K_yy + sigma I), gp_basis."""

    def __init__(self, model: RomaCoarse) -> None:
        super().__init__()
        self.features = Features(model)
        self.gp_support = GPSupport(model.gp)

    def forward(self, image0: torch.Tensor, image1: torch.Tensor):
        feat = self.features(image0, image1)
        k_ss, basis = self.gp_support(feat)
        return feat, k_ss, basis


class DecodeGraph(nn.Module):
    """Graph 2 of the exact sequence: feat16, gp_alpha -> warp, certainty."""

    def __init__(self, model: RomaCoarse) -> None:
        super().__init__()
        self.head = Head(model)

    def forward(self, feat: torch.Tensor, alpha: torch.Tensor):
        return self.head(feat, alpha)


def bridge(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The exact GP solve between "encode" and "decode": gp_alpha = gp_kss^-1 gp_basis."""
    k_ss = torch.as_tensor(tensors[KSS])
    basis = torch.as_tensor(tensors[BASIS]).to(k_ss.device)
    return {ALPHA: solve_exact(k_ss.float(), basis.float())}


def build_plan(model: RomaCoarse, options: ExportOptions) -> ExportPlan:
    """The plan at options.height x options.width, batch options.batch (static shapes)."""
    resolved = resolve_options(dict(options.extra))
    h, w = int(options.height), int(options.width)
    check_input_size(h, w)
    if options.dynamic:
        raise MatchrtError(
            "roma_full exports static shapes only (the GP's grid, the unrolled solver and the "
            "position-embedding resize are sized from the input); drop --dynamic and pass "
            "--batch, --height and --width instead"
        )
    batch = int(options.batch)
    if batch < 1:
        raise MatchrtError(f"roma_full: batch must be >= 1, got {batch}")
    # no copy: the wrappers only reference the model's submodules and change nothing (a copy
    # would double the 1.2 GB of DINOv2 weights in memory during export)
    model = model.eval()
    example = (torch.rand(batch, 3, h, w), torch.rand(batch, 3, h, w))
    iters = None if resolved["gp_iters"] == "auto" else int(resolved["gp_iters"])
    if resolved["gp_solve"] == "iterative":
        graph = CoarseGraph(model, resolved["gp_method"], iters)
        specs = [GraphSpec("main", graph, example, list(INPUTS), list(OUTPUTS), {}, list(FP32_LAYERS),
                           tf32=False)]
    else:
        enc = EncodeGraph(model)
        with torch.no_grad():
            feat, k_ss, basis = enc(*example)
            alpha = solve_exact(k_ss, basis)
        specs = [
            GraphSpec("encode", enc, example, list(INPUTS), [FEATS, KSS, BASIS], {}, list(FP32_LAYERS),
                      tf32=False),
            GraphSpec("decode", DecodeGraph(model), (feat, alpha), [FEATS, ALPHA], list(OUTPUTS), {},
                      list(FP32_LAYERS), tf32=False),
        ]
    return ExportPlan(NAME, specs, resolved, (h, w))


__all__ = ["build_plan", "bridge", "resolve_options", "CoarseGraph", "EncodeGraph", "DecodeGraph",
           "Features", "GPSupport", "GPPosterior", "IterativeSolve", "Head", "ToWarp", "COARSE_SCALE"]
