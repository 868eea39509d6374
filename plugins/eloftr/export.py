"""Export wrapper: ELoFTR as one TensorRT-clean graph with fixed-size, confidence-sorted outputs.

Inputs `image0`, `image1`: B x 1 x H x W float32 in [0, 1] (grayscale, as upstream feeds them);
with `resize=pad` also `image0_mask`, `image1_mask` (B x 1 x H x W, 1 = image content, 0 = the
bottom/right padding), which the core fills when it pads the images.
Outputs: `keypoints0`, `keypoints1` (B x K x 2, x/y in pixels of the H x W input), `confidence`
(B x K, descending), `valid` (B x K, bool). Slots past the last match above the threshold are
invalid and zero.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from matchrt.errors import MatchrtError
from matchrt.types import ExportOptions, ExportPlan, GraphSpec

from . import candidate_kernel, lse_kernel
from .model import (
    COARSE_STRIDE, DEFAULT_THRESHOLD, DUAL_SOFTMAX_TEMPERATURE, SIDE_MULTIPLE, ELoFTR, Padding, content_extents,
    int_div, keep_masks, refine, rope_tables,
)

NAME = "eloftr"
DEFAULT_MAX_MATCHES = 2048
TOPK_LIMIT = 3840  # TensorRT's ITopKLayer takes K <= 3840
INT32_LIMIT = 2**31 - 1
DEFAULTS: dict[str, Any] = {"max_matches": DEFAULT_MAX_MATCHES, "threshold": DEFAULT_THRESHOLD, "fuse": True,
                            "resize": "stretch"}
RESIZE_MODES = ("stretch", "pad")
INPUTS = ["image0", "image1"]
MASK_INPUTS = ["image0_mask", "image1_mask"]  # resize=pad: where each padded image's content is
OUTPUTS = ["keypoints0", "keypoints1", "confidence", "valid"]
# fp16-sensitive nodes (glob patterns on ONNX node names, which carry the module scope):
# the dual softmax whose product (~1e-5 .. 1e-2) is compared with the threshold, the fine
# matching softmaxes, and the coarse LayerNorms (variance of 256 channels after attention).
FP32_LAYERS = ["/coarse_matching/*", "/fine_matching/*", "/loftr_coarse/*/norm*"]


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def resolve_options(extra: dict[str, Any]) -> dict[str, Any]:
    """Export options with defaults filled in; refuses what the graph cannot honour.

    Keys it does not know (run-time options such as `mutual`) pass through untouched.
    """
    try:
        k = int(extra.get("max_matches", DEFAULT_MAX_MATCHES))
        thr = float(extra.get("threshold", DEFAULT_THRESHOLD))
    except (TypeError, ValueError) as exc:
        raise MatchrtError(f"eloftr: max_matches must be an integer and threshold a number ({exc})") from None
    if k < 1 or k > TOPK_LIMIT:
        raise MatchrtError(
            f"eloftr: max_matches={k} is out of range: the graph selects matches with TopK, and "
            f"TensorRT's TopK takes K <= {TOPK_LIMIT}. Use 1 <= max_matches <= {TOPK_LIMIT}."
        )
    if not 0.0 <= thr < 1.0:
        raise MatchrtError(f"eloftr: threshold={thr} must lie in [0, 1) (a dual-softmax confidence)")
    resize = str(extra.get("resize", "stretch")).strip().lower()
    if resize not in RESIZE_MODES:
        raise MatchrtError(
            f"eloftr: resize={extra.get('resize')!r} is not a mode; use resize=stretch (the default, "
            "as the MatchAnything demo) or resize=pad (keep the aspect ratio, pad bottom-right, mask "
            "the padding, as upstream's hloc matcher)"
        )
    resolved = dict(extra)
    resolved.update(max_matches=k, threshold=thr, fuse=_as_bool(extra.get("fuse", True)), resize=resize)
    return resolved


TOPK_GROUPS = 64  # first stage of the flat top-K: one TopK per 1/64 of the matrix


def topk_flat(x: torch.Tensor, k: int, groups: int = TOPK_GROUPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of x (B x N) and their INT32 indices, sorted.

    Exact two-stage selection: the top k of each of `groups` equal slices, then the top k of
    those candidates (every global top-k entry is among its slice's top k). On an H200 at 832
    (N = 117 M) this takes 1.6 ms instead of 2.3 ms in fp32 and 1.0 ms in fp16. A single TopK
    when the slices would be too small to pay. TensorRT: both TopKs have K <= 3840.
    """
    b, n = int(x.shape[0]), int(x.shape[1])
    if n % groups or n // groups < 16 * k:
        value, flat = x.topk(k, dim=1)
        return value, flat.to(torch.int32)
    size = n // groups
    part_value, part_index = x.reshape(b * groups, size).topk(k, dim=1)  # (B G) x k
    value, pick = part_value.reshape(b, groups * k).topk(k, dim=1)  # B x k, into the candidates
    pick = pick.to(torch.int32)
    rows = torch.arange(b, dtype=torch.int32, device=x.device)[:, None] * (groups * k)
    local = part_index.to(torch.int32).reshape(b * groups * k).index_select(0, (rows + pick).reshape(b * k))
    return value, int_div(pick, k) * size + local.reshape(b, k)


class CoarseSelect(nn.Module):
    """Dual-softmax confidence, border removal and the K most confident pairs above threshold."""

    def __init__(self, k: int, threshold: float):
        super().__init__()
        self.k = k
        self.threshold = threshold

    def forward(self, feat0: torch.Tensor, feat1: torch.Tensor, padding: Optional[Padding] = None):
        h, w = int(feat0.shape[2]), int(feat0.shape[3])
        n = h * w
        # border cells (of the content, with padding) are zeroed inside the confidence pass:
        # two small vectors, not an L x S mask (which would be folded into a huge initializer)
        keep = keep_masks(h, w, padding, feat0.device)  # 1 (or B) x L each
        k = min(self.k, n * n)
        cap = candidate_kernel.capacity(n, n, self.threshold, k)
        if cap is not None and candidate_kernel.usable(feat0):
            return self._listed(feat0, feat1, padding, keep, k, cap)
        conf = ELoFTR.confidence(feat0, feat1, padding, keep)  # B x L x S
        # every pair above the threshold is a match (no mutual-nearest step): the top K of the
        # flattened matrix are exactly the K most confident of them.
        # TensorRT hazards: K is a constant (no data-dependent shape, K <= 3840); the flat index
        # (< L*S, checked to fit INT32 at export) is cast to INT32 right away and split into
        # (i, j) with integer ops only, never through floats (L*S exceeds fp16's 65504 and
        # fp32's exact 2^24).
        value, flat = topk_flat(conf.reshape(-1, n * n), k)
        i_ids = int_div(flat, n)
        j_ids = flat - i_ids * n
        valid = value > self.threshold
        return value, i_ids, j_ids, valid

    def _listed(self, feat0: torch.Tensor, feat1: torch.Tensor, padding: Optional[Padding],
                keep: tuple[torch.Tensor, torch.Tensor], k: int, cap: int):
        """The same selection through candidate_kernel (torch on CUDA): no confidence matrix, and
        TopK over the short list of pairs above the threshold instead of all L x S."""
        n = int(feat0.shape[2]) * int(feat0.shape[3])
        if padding is None:  # the kernels scale the bare product themselves: no scaled copy in memory
            source = ELoFTR.similarity(feat0, feat1, scaled=False)
            scale = 1.0 / DUAL_SOFTMAX_TEMPERATURE
        else:
            source = ELoFTR.similarity(feat0, feat1, padding)
            scale = 1.0
        # both log-sum-exps in one read of the matrix (lse_kernel), then the candidate pass
        row, col = ELoFTR.drop_cells(*lse_kernel.log_sum_exps(source, scale), keep)
        keys = candidate_kernel.candidates(source, scale, row, col, self.threshold, cap)
        value, flat, valid = candidate_kernel.decode(keys.topk(k, dim=1).values, source.dtype)
        i_ids = int_div(flat, n)
        return value, i_ids, flat - i_ids * n, valid


class FineRefine(nn.Module):
    """Gathers the fine windows of the selected pairs and refines them to (sub-)pixels.

    In fp32 whatever the run's precision (autocast off, windows cast up), as TensorRT keeps
    ``/fine_matching/*`` (FP32_LAYERS): the arg-max over a window's 64 x 64 fine confidences jumps
    between near-equal cells when they are rounded to fp16. The deterministic weights on the MegaDepth
    pair at 320, 300 matches, CPU autocast (session 26): all in fp16, 212 of fp32's matches had no
    partner within 0.5 px (this stage alone in fp16: 209); this stage in fp32 and the rest in fp16,
    18; fp32 on the images plus +-0.5/255 noise, 14. On an H200 the compiled fp16 graph kept 62 of
    215 (noise: 196). The stage is small (2048 windows of 64 x 100 at 832)."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.size = (height, width)

    def forward(self, fine0: torch.Tensor, fine1: torch.Tensor, i_ids: torch.Tensor, j_ids: torch.Tensor):
        with torch.autocast(fine0.device.type, enabled=False):
            return self._refine(fine0.float(), fine1.float(), i_ids, j_ids)

    def _refine(self, fine0: torch.Tensor, fine1: torch.Tensor, i_ids: torch.Tensor, j_ids: torch.Tensor):
        b, k = int(i_ids.shape[0]), int(i_ids.shape[1])  # static: the graph has a fixed batch
        wc = self.size[1] // COARSE_STRIDE
        b_ids = torch.arange(b, dtype=torch.int32, device=i_ids.device)[:, None].repeat(1, k).reshape(b * k)
        win0, win1 = ELoFTR.windows(fine0, fine1, b_ids, i_ids.reshape(b * k), j_ids.reshape(b * k), self.size)
        d0, d1, _ = refine(win0, win1)
        kp0 = ELoFTR.coarse_corner(i_ids.reshape(b * k), wc) + d0
        kp1 = ELoFTR.coarse_corner(j_ids.reshape(b * k), wc) + d1
        return kp0.reshape(b, k, 2), kp1.reshape(b, k, 2)


class ELoFTRGraph(nn.Module):
    """image0, image1 -> keypoints0, keypoints1, confidence, valid (K fixed, sorted)."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, model: ELoFTR, max_matches: int, threshold: float, height: int, width: int):
        super().__init__()
        self.model = model
        self.k = max_matches
        self.size = (height, width)
        self.coarse_matching = CoarseSelect(max_matches, threshold)
        self.fine_matching = FineRefine(height, width)
        # TensorRT hazard (RoPE): the tables come from Range/Sin/Cos (rope_tables) for this static
        # size and are stored once as buffers, so the graph holds two small initializers instead
        # of a sliced 256 x 256 table or one folded copy per layer. Rows and columns share the
        # position scale 832 / max(height, width), as upstream at non-square sizes.
        cos, sin = rope_tables(height // SIDE_MULTIPLE, width // SIDE_MULTIPLE, height, width)
        self.register_buffer("rope_cos", cos[None])  # 1 x h x w x C; persistent: one initializer
        self.register_buffer("rope_sin", sin[None])

    def forward(self, image0: torch.Tensor, image1: torch.Tensor,
                image0_mask: Optional[torch.Tensor] = None, image1_mask: Optional[torch.Tensor] = None):
        size = (int(image0.shape[-2]), int(image0.shape[-1]))
        if size != self.size:
            raise ValueError(f"this graph takes {self.size[0]}x{self.size[1]} images, got {size}")
        padding = None
        if image0_mask is not None and image1_mask is not None:
            padding = content_extents((image0_mask, image1_mask))
        feats_c, x2, x1 = self.model.extract(image0, image1)
        feat0, feat1 = self.model.transform(feats_c, size, (self.rope_cos, self.rope_sin), padding)
        value, i_ids, j_ids, valid = self.coarse_matching(feat0, feat1, padding)
        fine0, fine1 = self.model.fine_maps(feat0, feat1, x2, x1)
        kp0, kp1 = self.fine_matching(fine0, fine1, i_ids, j_ids)
        zero = torch.zeros((), dtype=value.dtype, device=value.device)
        kp0 = torch.where(valid[..., None], kp0, zero)
        kp1 = torch.where(valid[..., None], kp1, zero)
        value = torch.where(valid, value, zero)
        short = self.k - value.shape[1]
        if short > 0:  # a grid with fewer than K pairs: pad with invalid slots
            kp0, kp1 = F.pad(kp0, [0, 0, 0, short]), F.pad(kp1, [0, 0, 0, short])
            value = F.pad(value, [0, short])
            valid = F.pad(valid.to(torch.int32), [0, short]).to(torch.bool)  # TRT pads no BOOL
        return kp0, kp1, value, valid


def export_model(model: ELoFTR, fuse: bool) -> ELoFTR:
    """A copy of the model for export, RepVGG-fused (and BatchNorm-folded) when asked."""
    model = copy.deepcopy(model).eval()
    return model.fuse() if fuse else model


def build_plan(model: ELoFTR, options: ExportOptions) -> ExportPlan:
    """The one-graph plan at options.height x options.width, batch options.batch (all static)."""
    resolved = resolve_options(dict(options.extra))
    h, w = int(options.height), int(options.width)
    if h % SIDE_MULTIPLE or w % SIDE_MULTIPLE or h <= 0 or w <= 0:
        raise MatchrtError(f"eloftr needs sides that are multiples of {SIDE_MULTIPLE}; got {h}x{w}")
    cells = (h // COARSE_STRIDE) * (w // COARSE_STRIDE)
    if cells * cells > INT32_LIMIT:
        raise MatchrtError(
            f"eloftr at {h}x{w} has {cells}^2 coarse pairs, more than INT32 indices address; "
            "use a smaller size (at most about 1700 x 1700 pixels)"
        )
    if options.dynamic:
        raise MatchrtError(
            "eloftr exports static shapes only (RoPE positions, the coarse grid and the fixed-K "
            "selection depend on batch, height and width); drop --dynamic and pass --batch, "
            "--height and --width instead"
        )
    batch = int(options.batch)
    if batch < 1:
        raise MatchrtError(f"eloftr: batch must be >= 1, got {batch}")
    graph = ELoFTRGraph(export_model(model, resolved["fuse"]), resolved["max_matches"], resolved["threshold"],
                        h, w)
    example: tuple[torch.Tensor, ...] = (torch.rand(batch, 1, h, w), torch.rand(batch, 1, h, w))
    names = list(INPUTS)
    if resolved["resize"] == "pad":  # the graph takes the content masks and the core pads
        mask = torch.zeros(batch, 1, h, w)
        mask[:, :, : h - SIDE_MULTIPLE, :] = 1.0  # any top-left rectangle traces the same graph
        example, names = example + (mask, mask.clone()), names + MASK_INPUTS
    # compiled CUDA runs freeze the weights: 5.5 -> 4.8 ms a pair at 832 on an H200 (session 20)
    spec = GraphSpec("main", graph, example, names, list(OUTPUTS), {}, list(FP32_LAYERS), freeze_weights=True)
    return ExportPlan(NAME, [spec], resolved, (h, w))
