"""Plain data types shared by the core, the backends and every matcher plugin."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np

ResizeMode = Literal["stretch", "pad"]
Rounding = Literal["floor", "nearest", "ceil"]


@dataclass(frozen=True)
class InputContract:
    """What a matcher's graph expects: channels, divisor of the sides, default size, resize rule."""

    channels: int  # 1 = grayscale, 3 = RGB
    side_multiple: int  # every input side must be a multiple of this (14 for ViT/14, 32 for RepVGG)
    default_height: int
    default_width: int
    resize: ResizeMode = "stretch"  # how an image of another size is brought to the graph's size
    rounding: Rounding = "nearest"  # how a requested side that is not a multiple is rounded
    square: bool = False  # the matcher only supports H == W
    # resampling when resizing: "area" (antialiased downscale, OpenCV INTER_AREA) or "linear"
    # (bilinear without antialiasing, as torch's interpolate(align_corners=False))
    interpolation: Literal["area", "linear"] = "area"


@dataclass(frozen=True)
class WeightSource:
    """One weight file a matcher reads (a matcher may need several, e.g. RoMa + DINOv2)."""

    name: str  # CLI flag without dashes: "checkpoint", "dinov2"
    description: str
    required: bool = True
    layout: Optional[Path] = None  # TSV of the real file's key layout, for --random-weights
    default: Optional[Path] = None  # a file used when the user passes none (e.g. packaged weights)


@dataclass(frozen=True)
class MatcherInfo:
    """A matcher as a plugin registers it."""

    name: str
    description: str
    contract: InputContract
    weight_sources: tuple[WeightSource, ...] = (WeightSource("checkpoint", "model checkpoint"),)
    output: Literal["sparse", "dense"] = "sparse"
    # export options the matcher understands, with their defaults (e.g. {"max_matches": 2048})
    options: Mapping[str, Any] = field(default_factory=dict)
    # relative tolerance of a graph against the fp32 torch model, per precision
    tolerances: Mapping[str, float] = field(
        default_factory=lambda: {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}
    )
    notes: tuple[str, ...] = ()  # limits a user should know, printed by `matchrt info`
    version: str = "0"


@dataclass
class MappingReport:
    """How the tensors of one weight file were used."""

    source: str
    path: str
    total: int
    mapped: int
    unused: list[str] = field(default_factory=list)  # tensors no parameter took
    reserved: dict[str, list[str]] = field(default_factory=dict)  # tensors another matcher uses


@dataclass
class WeightReport:
    """The result of mapping weight files onto a model: every count a user needs to trust it."""

    matcher: str
    sources: list[MappingReport]
    target_total: int
    missing: list[str] = field(default_factory=list)  # target parameters/buffers left unfilled
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def unexpected(self) -> list[str]:
        return [k for s in self.sources for k in s.unused]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["shape_mismatches"] = [
            {"key": k, "source": list(a), "target": list(b)} for k, a, b in self.shape_mismatches
        ]
        return d

    def summary(self, limit: int = 8) -> str:
        lines = [f"weights for {self.matcher}:"]
        for s in self.sources:
            line = f"  {s.source} ({s.path}): {s.mapped}/{s.total} tensors mapped"
            for owner, keys in s.reserved.items():
                line += f", {len(keys)} used by {owner}"
            if s.unused:
                line += f", {len(s.unused)} unused"
            lines.append(line)
        filled = self.target_total - len(self.missing)
        lines.append(f"  model: {filled}/{self.target_total} tensors filled")
        lines.append(
            f"  missing: {len(self.missing)}, unexpected: {len(self.unexpected)}, "
            f"shape mismatches: {len(self.shape_mismatches)}"
        )
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")
                lines.append(f"  first {title}: {shown}")
        for k, a, b in self.shape_mismatches[:limit]:
            lines.append(f"  shape mismatch {k}: file {tuple(a)} vs model {tuple(b)}")
        return "\n".join(lines)


@dataclass
class MappedWeights:
    """What the weight-mapping hook returns: a state dict ready for `load_state_dict(strict=True)`."""

    state_dict: dict[str, Any]
    report: WeightReport


@dataclass
class GraphSpec:
    """One exportable graph: a torch module and how its inputs and outputs are named."""

    name: str  # stage name, e.g. "main", "encode", "refine"
    module: Any  # torch.nn.Module
    example_inputs: tuple[Any, ...]  # torch tensors, in input_names order
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    # ONNX node name patterns TensorRT should keep in fp32 when building reduced precision
    fp32_layers: list[str] = field(default_factory=list)
    # whether those fp32 layers may use TF32 (None: the builder's default, on for fp16/bf16)
    tf32: Optional[bool] = None
    # compiled torch runs on CUDA: freeze the weights into the compiled graphs (Inductor's freezing,
    # weight-only work folded at compile time). A plugin opts in where it measured that it pays
    freeze_weights: bool = False
    # Inductor settings an AOTInductor package of this graph needs to compute its function (the
    # builder's --inductor-config values win over them); e.g. roma_plus's split products, whose
    # pieces must be rounded where the graph casts them: {"emulate_precision_casts": True}
    inductor_configs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportPlan:
    """One graph, or a sequence the runner executes with the `bridge_stages` hook between them."""

    matcher: str
    graphs: list[GraphSpec]
    options: dict[str, Any] = field(default_factory=dict)  # resolved export options, stored in metadata
    input_size: tuple[int, int] = (0, 0)  # (height, width) of the images the graph takes


@dataclass
class ExportOptions:
    """Options of `matchrt export`; `extra` carries the matcher-specific ones (threshold, gp_solve...)."""

    height: int
    width: int
    batch: int = 1
    opset: int = 17
    dynamic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairContext:
    """Where a pair came from and how it was resized, so outputs map back to original pixels."""

    original_size0: tuple[int, int]  # (height, width)
    original_size1: tuple[int, int]
    input_size: tuple[int, int]  # (height, width) given to the graph
    scale0: tuple[float, float]  # (sx, sy): input pixel = original pixel * scale
    scale1: tuple[float, float]
    image0: Optional[np.ndarray] = None  # original images, for pictures
    image1: Optional[np.ndarray] = None
    path0: Optional[str] = None
    path1: Optional[str] = None


@dataclass
class Matches:
    """Correspondences in original-image pixels, plus what produced them."""

    keypoints0: np.ndarray  # N x 2 (x, y)
    keypoints1: np.ndarray  # N x 2
    confidence: np.ndarray  # N
    metadata: dict[str, Any] = field(default_factory=dict)
    # dense matchers: the warp (H x 2W x 4, normalised) and certainty (H x 2W), for pictures
    warp: Optional[np.ndarray] = None
    certainty: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.keypoints0 = np.asarray(self.keypoints0, dtype=np.float32).reshape(-1, 2)
        self.keypoints1 = np.asarray(self.keypoints1, dtype=np.float32).reshape(-1, 2)
        self.confidence = np.asarray(self.confidence, dtype=np.float32).reshape(-1)
        n = len(self.keypoints0)
        if len(self.keypoints1) != n or len(self.confidence) != n:
            raise ValueError(
                f"Matches need equal lengths, got {n}, {len(self.keypoints1)}, {len(self.confidence)}"
            )

    def __len__(self) -> int:
        return len(self.keypoints0)

    def select(self, mask: np.ndarray) -> "Matches":
        return Matches(
            self.keypoints0[mask], self.keypoints1[mask], self.confidence[mask],
            dict(self.metadata), self.warp, self.certainty,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "keypoints0": self.keypoints0.tolist(),
            "keypoints1": self.keypoints1.tolist(),
            "confidence": self.confidence.tolist(),
            "metadata": self.metadata,
        }

    def to_json(self, path: Path, **extra: Any) -> None:
        data = self.to_dict()
        data.update(extra)
        Path(path).write_text(json.dumps(data, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass(frozen=True)
class BackendInfo:
    """A runtime backend as a plugin registers it."""

    name: str
    description: str
    # returns None when usable, else the reason and the install hint
    unavailable: Callable[[], Optional[str]]
    # artifact kind it runs: "torch" (the model itself), "onnx", "engine" (built from ONNX) or
    # "package" (built from the torch model, e.g. AOTInductor .pt2)
    artifact: Literal["torch", "onnx", "engine", "package"]
    precisions: Sequence[str] = ("fp32",)
