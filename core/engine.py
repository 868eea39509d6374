"""Build TensorRT engines from matchrt ONNX graphs (TensorRT 10.x and 11.x, by feature detection).

API (what `matchrt build` and the `tensorrt` backend call):

    build_engine(onnx_path, output=None, *, precision="fp16", strongly_typed=False,
                 min_size=None, opt_size=None, max_size=None, shapes=None, batch=None,
                 workspace_gb=8.0, opt_level=3, timing_cache=None, fp32_layers=(), tf32=None,
                 force=False, progress=True, contract=None, weights_sha256=None) -> Path
        Sizes are (H, W) tuples or "HxW" strings for the image inputs of a dynamic graph;
        `shapes` gives explicit {input: (min, opt, max)} shapes for any other dynamic input.
        `timing_cache`: a file reused and updated (default: one per TensorRT version and GPU
        under the matchrt cache dir). Skips the build when `<output>.json` records identical
        inputs, unless `force`. Prints the equivalent `trtexec` command. Returns the engine path.
    plan_build(...same arguments, no TensorRT needed...) -> BuildPlan   profiles, flags, record
    read_graph_inputs(model) -> list[GraphInput]; resolve_profiles(...) -> dict[str, Profile]
    parse_size("480x640") -> (480, 640); layer_matches(name, patterns) -> bool
    trtexec_command(plan, layer_names=()) -> str
    tensorrt_module() -> the real `tensorrt` module or None; require_tensorrt() -> module
    INSTALL_HINT: the text every "TensorRT missing" message carries

Precision: on TensorRT 10, fp16/bf16 use the builder flags (weak typing) and the layers named by
the ONNX metadata `matchrt.fp32_layers` (glob patterns on node names, plus `fp32_layers`) are
pinned to fp32 with OBEY_PRECISION_CONSTRAINTS. TensorRT 11 removed those flags: there, and with
`strongly_typed=True`, an fp16/bf16 engine is built strongly typed from a mixed-precision copy of
the graph made with NVIDIA ModelOpt AutoCast (the fp32 patterns become its excluded nodes).
fp32 engines turn TF32 off unless `tf32=True`, so they meet the 1e-4 fp32 tolerance; a graph
whose metadata says `matchrt.tf32: false` (fp32 layers that must be IEEE fp32) keeps it off in
fp16/bf16 engines too, unless `tf32=True`.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union

from .errors import MatchrtError
from .provenance import (
    SCHEMA,
    cache_decision,
    current_environment,
    onnx_sha256,
    provenance_path,
    read_provenance,
    rebuild_command,
    sha256_file,
    write_provenance,
)

if TYPE_CHECKING:
    import tensorrt as trt

    from .types import InputContract

INSTALL_HINT = "pip install 'matchrt[tensorrt]' on a machine with an NVIDIA GPU"
PRECISIONS = ("fp32", "fp16", "bf16")

Shape = tuple[int, ...]
Size = tuple[int, int]
SizeLike = Union[str, Sequence[int], None]


# --- TensorRT discovery ----------------------------------------------------------------------------
def tensorrt_module() -> Any:
    """The real TensorRT Python module, or None.

    A type-stubs-only install (tensorrt-stubs) leaves an importable namespace package with no
    attributes: that is not TensorRT."""
    try:
        import tensorrt
    except Exception:  # noqa: BLE001 - ImportError, or OSError when its libraries fail to load
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None


def require_tensorrt() -> Any:
    module = tensorrt_module()
    if module is None:
        raise MatchrtError(f"TensorRT is not installed: {INSTALL_HINT}")
    return module


def weak_typing_available(trt_module: Any) -> bool:
    """TensorRT 10 has precision builder flags (FP16, BF16); TensorRT 11 removed them."""
    return hasattr(trt_module.BuilderFlag, "FP16")


# --- graph inputs and optimisation profiles (pure) ---------------------------------------------------------
@dataclass(frozen=True)
class GraphInput:
    """An ONNX graph input: fixed dims are ints, dynamic ones their symbol ("?" when unnamed)."""

    name: str
    dims: tuple[Union[int, str], ...]
    dtype: str = "FLOAT"

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.dims)


@dataclass(frozen=True)
class Profile:
    """min/opt/max shapes of one input."""

    min: Shape
    opt: Shape
    max: Shape

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def read_graph_inputs(model: Any) -> list[GraphInput]:
    """The real inputs of an ONNX model (initializers listed as inputs are left out)."""
    import onnx

    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[Union[int, str]] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or "?")
        out.append(GraphInput(vi.name, tuple(dims), onnx.TensorProto.DataType.Name(tt.elem_type)))
    return out


def parse_size(value: SizeLike) -> Optional[Size]:
    """"480x640" / "480,640" / (480, 640) -> (480, 640); "512" -> (512, 512); None -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,*]\s*(\d+)\s*)?", value)
        if m is None:
            raise MatchrtError(f"size {value!r} is not HxW (e.g. 480x640)")
        nums = [int(g) for g in m.groups() if g is not None]
    else:
        nums = [int(v) for v in value]
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise MatchrtError(f"size {value!r} is not HxW with positive sides (e.g. 480x640)")
    return nums[0], nums[1]


def _is_image(inp: GraphInput) -> bool:
    return len(inp.dims) == 4 and inp.name.startswith("image")


def resolve_profiles(
    inputs: Sequence[GraphInput],
    *,
    shapes: Optional[Mapping[str, Sequence[Sequence[int]]]] = None,
    min_size: SizeLike = None,
    opt_size: SizeLike = None,
    max_size: SizeLike = None,
    batch: Optional[int] = None,
    default_size: SizeLike = None,
    contract: Optional["InputContract"] = None,
) -> dict[str, Profile]:
    """min/opt/max shapes for every input.

    Fixed dims are kept. For dynamic image inputs (`image*`, N x C x H x W) H and W come from the
    sizes (only `opt_size`: min = max = opt; none: `default_size`, else the contract's default);
    the batch dim from `batch` (default 1). A symbol learnt there (e.g. "height") fills the same
    symbol in any other input; anything left needs `shapes`."""
    shapes = dict(shapes or {})
    sizes = [parse_size(min_size), parse_size(opt_size), parse_size(max_size)]
    if sizes[1] is None:
        sizes[1] = parse_size(default_size)
        if sizes[1] is None and contract is not None:
            sizes[1] = (contract.default_height, contract.default_width)
    if sizes[0] is None:
        sizes[0] = sizes[1]
    if sizes[2] is None:
        sizes[2] = sizes[1]
    any_dynamic = any(i.dynamic for i in inputs)
    given_sizes = any(s is not None for s in (min_size, opt_size, max_size))
    if any_dynamic and any(inp.dynamic and _is_image(inp) for inp in inputs):
        if sizes[1] is None:
            raise MatchrtError("the graph has dynamic image sides: give --opt-size HxW "
                               "(and --min-size/--max-size for a range)")
        _check_sizes(sizes, contract)  # type: ignore[arg-type]
    symbols: dict[str, tuple[int, int, int]] = {}
    profiles: dict[str, Profile] = {}
    for inp in inputs:
        if inp.name in shapes:
            profiles[inp.name] = _explicit(inp, shapes.pop(inp.name))
            for k, d in enumerate(inp.dims):
                if isinstance(d, str) and d != "?":
                    p = profiles[inp.name]
                    symbols.setdefault(d, (p.min[k], p.opt[k], p.max[k]))
            continue
        if not _is_image(inp):
            continue
        if not inp.dynamic:
            if given_sizes and any(tuple(inp.dims[2:]) != s for s in sizes if s is not None):
                raise MatchrtError(
                    f"{inp.name} has the fixed size {inp.dims[2]}x{inp.dims[3]} in this graph; sizes "
                    "apply to graphs exported with --dynamic (or re-export at the size you want)")
        rng: list[tuple[int, int, int]] = []
        for k, d in enumerate(inp.dims):
            if isinstance(d, int):
                rng.append((d, d, d))
            elif k == 0:
                b = int(batch or 1)
                rng.append((b, b, b))
            elif k == 1:
                raise MatchrtError(f"{inp.name} has a dynamic channel dimension; export it fixed")
            else:
                side = k - 2
                trip = (sizes[0][side], sizes[1][side], sizes[2][side])  # type: ignore[index]
                rng.append(trip)
            if isinstance(d, str) and d != "?":
                symbols.setdefault(d, rng[-1])
        profiles[inp.name] = Profile(*(tuple(r[j] for r in rng) for j in range(3)))
    if shapes:
        raise MatchrtError(f"--shapes names unknown inputs: {', '.join(sorted(shapes))}")
    for inp in inputs:
        if inp.name in profiles:
            continue
        rng = []
        for k, d in enumerate(inp.dims):
            if isinstance(d, int):
                rng.append((d, d, d))
            elif d in symbols:
                rng.append(symbols[d])
            elif k == 0 and (d == "?" or "batch" in d.lower()):
                b = int(batch or 1)
                rng.append((b, b, b))
            else:
                raise MatchrtError(
                    f"cannot tell the range of dimension {k} ({d!r}) of input {inp.name}: pass its "
                    f"min/opt/max shapes explicitly (shapes={{'{inp.name}': (min, opt, max)}})")
        profiles[inp.name] = Profile(*(tuple(r[j] for r in rng) for j in range(3)))
    return profiles


def _explicit(inp: GraphInput, triple: Sequence[Sequence[int]]) -> Profile:
    if len(triple) != 3:
        raise MatchrtError(f"shapes for {inp.name} need (min, opt, max)")
    mn, op, mx = (tuple(int(v) for v in s) for s in triple)
    for s in (mn, op, mx):
        if len(s) != len(inp.dims):
            raise MatchrtError(f"{inp.name} has rank {len(inp.dims)}, got shape {s}")
        for k, d in enumerate(inp.dims):
            if isinstance(d, int) and s[k] != d:
                raise MatchrtError(f"{inp.name} dimension {k} is fixed at {d} in the graph, got {s[k]}")
    if not all(a <= b <= c for a, b, c in zip(mn, op, mx)):
        raise MatchrtError(f"shapes for {inp.name} must satisfy min <= opt <= max, got {mn}, {op}, {mx}")
    return Profile(mn, op, mx)


def _check_sizes(sizes: Sequence[Size], contract: Optional["InputContract"]) -> None:
    mn, op, mx = sizes
    for side in (0, 1):
        if not mn[side] <= op[side] <= mx[side]:
            raise MatchrtError(f"sizes must satisfy min <= opt <= max, got {mn}, {op}, {mx}")
    if contract is None:
        return
    for s in sizes:
        if s[0] % contract.side_multiple or s[1] % contract.side_multiple:
            raise MatchrtError(f"size {s[0]}x{s[1]}: every side must be a multiple of "
                               f"{contract.side_multiple} for this matcher")
        if contract.square and s[0] != s[1]:
            raise MatchrtError(f"size {s[0]}x{s[1]}: this matcher takes square inputs only")


# --- fp32 layer patterns (pure) -------------------------------------------------------------------------
_UNIQUE_SUFFIX = re.compile(r"_\d+$")


def layer_matches(name: str, patterns: Iterable[str]) -> bool:
    """Glob patterns on ONNX node names, applied to TensorRT layer names.

    The ONNX parser names a layer after its node, adding `_<n>` when one node makes several
    layers, so `/attn/Softmax` also matches `/attn/Softmax_3`."""
    base = _UNIQUE_SUFFIX.sub("", name)
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def metadata_tf32(meta: Mapping[str, str], precision: str) -> bool:
    """TF32 default of a build: the graph's `matchrt.tf32` if it says, else on for fp16/bf16 only.

    A graph whose fp32 layers must be IEEE fp32 (roma_plus's strict coarse stage) says false.
    """
    raw = meta.get("matchrt.tf32")
    if raw is not None:
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, bool):
            raise MatchrtError(f"ONNX metadata matchrt.tf32 must be true or false, got {raw!r}")
        return value and precision != "fp32"
    return precision != "fp32"


def metadata_fp32_layers(meta: Mapping[str, str]) -> list[str]:
    raw = meta.get("matchrt.fp32_layers")
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        raise MatchrtError("ONNX metadata matchrt.fp32_layers is not a JSON list") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MatchrtError("ONNX metadata matchrt.fp32_layers must be a JSON list of strings")
    return value


# --- the plan (pure) ----------------------------------------------------------------------------------------
@dataclass
class BuildPlan:
    """Everything a build needs, decided before TensorRT is touched."""

    onnx_path: Path
    output: Path
    precision: str
    strongly_typed: bool
    autocast: bool  # fp16/bf16 through a mixed-precision copy of the graph (strong typing)
    tf32: bool
    profiles: dict[str, Profile]
    fp32_layers: list[str]
    workspace_gb: float
    opt_level: int
    timing_cache: Optional[Path]
    sizes: dict[str, Optional[Size]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    weights_sha256: Optional[str] = None

    @property
    def dynamic(self) -> bool:
        return any(p.dynamic for p in self.profiles.values())

    def build_section(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "autocast": self.autocast,
            "tf32": self.tf32,
            "profiles": {k: v.to_dict() for k, v in self.profiles.items()},
            "fp32_layers": list(self.fp32_layers),
            "workspace_gb": self.workspace_gb,
            "opt_level": self.opt_level,
            "sizes": {k: list(v) if v else None for k, v in self.sizes.items()},
        }

    def record(self, environment: Mapping[str, Any], onnx_digest: str) -> dict[str, Any]:
        """The provenance record (without the engine's own hash and timings)."""
        meta = self.metadata
        return {
            "schema": SCHEMA,
            "engine": self.output.name,
            "onnx": {"path": str(self.onnx_path.resolve()), "file": self.onnx_path.name,
                     "sha256": onnx_digest},
            "weights_sha256": self.weights_sha256 or meta.get("matchrt.weights_sha256") or None,
            "matcher": meta.get("matchrt.matcher"),
            "matcher_version": meta.get("matchrt.version"),
            "stage": meta.get("matchrt.stage"),
            "build": self.build_section(),
            "environment": dict(environment),
        }


def plan_build(
    onnx_path: Union[str, Path],
    output: Union[str, Path, None] = None,
    *,
    precision: str = "fp16",
    strongly_typed: bool = False,
    weak_typing: bool = True,
    min_size: SizeLike = None,
    opt_size: SizeLike = None,
    max_size: SizeLike = None,
    shapes: Optional[Mapping[str, Sequence[Sequence[int]]]] = None,
    batch: Optional[int] = None,
    workspace_gb: float = 8.0,
    opt_level: int = 3,
    timing_cache: Union[str, Path, None] = None,
    fp32_layers: Iterable[str] = (),
    tf32: Optional[bool] = None,
    contract: Optional["InputContract"] = None,
    weights_sha256: Optional[str] = None,
) -> BuildPlan:
    """Read the graph and decide profiles and flags; no TensorRT needed (`weak_typing` says
    whether the TensorRT that will build has precision flags)."""
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise MatchrtError(f"{onnx_path} does not exist; create it with `matchrt export`")
    if precision not in PRECISIONS:
        raise MatchrtError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not 0 <= int(opt_level) <= 5:
        raise MatchrtError(f"--opt-level {opt_level}: TensorRT's builder optimisation level is 0 to 5")
    if workspace_gb <= 0:
        raise MatchrtError(f"--workspace {workspace_gb}: give a positive size in GiB")
    out = Path(output) if output is not None else onnx_path.with_suffix(".engine")
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    patterns = list(dict.fromkeys(metadata_fp32_layers(meta) + list(fp32_layers)))
    default_size = None
    if meta.get("matchrt.input_size"):
        try:
            hw = json.loads(meta["matchrt.input_size"])
            default_size = (int(hw[0]), int(hw[1])) if hw and min(hw) > 0 else None
        except (ValueError, TypeError, IndexError):
            default_size = None
    profiles = resolve_profiles(read_graph_inputs(model), shapes=shapes, min_size=min_size,
                                opt_size=opt_size, max_size=max_size, batch=batch,
                                default_size=default_size, contract=contract)
    strongly = bool(strongly_typed) or not weak_typing
    return BuildPlan(
        onnx_path=onnx_path, output=out, precision=precision, strongly_typed=strongly,
        autocast=strongly and precision != "fp32",
        tf32=bool(tf32) if tf32 is not None else metadata_tf32(meta, precision),
        profiles=profiles, fp32_layers=patterns if precision != "fp32" else [],
        workspace_gb=float(workspace_gb), opt_level=int(opt_level),
        timing_cache=Path(timing_cache) if timing_cache else None,
        sizes={"min": parse_size(min_size), "opt": parse_size(opt_size), "max": parse_size(max_size)},
        metadata=meta, weights_sha256=weights_sha256,
    )


def _shape_arg(profiles: Mapping[str, Profile], which: str) -> str:
    return ",".join(f"{n}:" + "x".join(str(v) for v in getattr(p, which)) for n, p in profiles.items())


def autocast_command(plan: BuildPlan, converted: Union[str, Path]) -> str:
    cmd = ["python", "-m", "modelopt.onnx.autocast", "--onnx_path", str(plan.onnx_path),
           "--output_path", str(converted), "--low_precision_type", plan.precision, "--keep_io_types"]
    if plan.fp32_layers:
        cmd += ["--nodes_to_exclude", *[_glob_regex(p) for p in plan.fp32_layers]]
    return " ".join(shlex.quote(c) for c in cmd)


def trtexec_command(plan: BuildPlan, layer_names: Sequence[str] = (),
                    onnx_file: Union[str, Path, None] = None) -> str:
    """The `trtexec` command that builds the same engine (for reproduction and bug reports)."""
    cmd = ["trtexec", f"--onnx={onnx_file or plan.onnx_path}", f"--saveEngine={plan.output}"]
    if plan.strongly_typed:
        cmd.append("--stronglyTyped")
    elif plan.precision != "fp32":
        cmd.append(f"--{plan.precision}")
    if not plan.tf32:
        cmd.append("--noTF32")
    if plan.dynamic:
        for which in ("min", "opt", "max"):
            cmd.append(f"--{which}Shapes={_shape_arg(plan.profiles, which)}")
    names = [n for n in layer_names if not set(n) & {",", ":"}]
    if names and not plan.strongly_typed:
        cmd.append("--precisionConstraints=obey")
        cmd.append("--layerPrecisions=" + ",".join(f"{n}:fp32" for n in names))
    cmd.append(f"--memPoolSize=workspace:{int(round(plan.workspace_gb * 1024))}M")
    cmd.append(f"--builderOptimizationLevel={plan.opt_level}")
    if plan.timing_cache:
        cmd.append(f"--timingCacheFile={plan.timing_cache}")
    return " ".join(shlex.quote(c) for c in cmd)


def _glob_regex(pattern: str) -> str:
    return "^" + fnmatch.translate(pattern)


def default_timing_cache(environment: Mapping[str, Any]) -> Path:
    """One timing cache per TensorRT version and GPU, under the matchrt cache dir."""
    from .runner import cache_dir

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", str(environment.get("gpu") or "gpu")).strip("-")
    cc = str(environment.get("compute_capability") or "").replace(".", "")
    return cache_dir() / "tensorrt" / f"timing-trt{environment.get('tensorrt')}-{gpu}-sm{cc}.cache"


# --- the build (needs TensorRT and a GPU) -------------------------------------------------------------------
def build_engine(
    onnx_path: Union[str, Path],
    output: Union[str, Path, None] = None,
    *,
    precision: str = "fp16",
    strongly_typed: bool = False,
    min_size: SizeLike = None,
    opt_size: SizeLike = None,
    max_size: SizeLike = None,
    shapes: Optional[Mapping[str, Sequence[Sequence[int]]]] = None,
    batch: Optional[int] = None,
    workspace_gb: float = 8.0,
    opt_level: int = 3,
    timing_cache: Union[str, Path, None] = None,
    fp32_layers: Iterable[str] = (),
    tf32: Optional[bool] = None,
    force: bool = False,
    progress: bool = True,
    contract: Optional["InputContract"] = None,
    weights_sha256: Optional[str] = None,
    verbose: bool = False,
) -> Path:
    """Build (or reuse) `output` from `onnx_path`; write `<output>.json` beside it."""
    trt_mod = require_tensorrt()
    plan = plan_build(onnx_path, output, precision=precision, strongly_typed=strongly_typed,
                      weak_typing=weak_typing_available(trt_mod), min_size=min_size,
                      opt_size=opt_size, max_size=max_size, shapes=shapes, batch=batch,
                      workspace_gb=workspace_gb, opt_level=opt_level, timing_cache=timing_cache,
                      fp32_layers=fp32_layers, tf32=tf32, contract=contract,
                      weights_sha256=weights_sha256)
    environment = current_environment()
    if environment.get("gpu") is None:
        raise MatchrtError(f"no CUDA GPU is visible: TensorRT builds on the GPU it targets ({INSTALL_HINT})")
    if plan.timing_cache is None:
        plan.timing_cache = default_timing_cache(environment)
    record = plan.record(environment, onnx_sha256(plan.onnx_path))
    reason = cache_decision(read_provenance(plan.output), record, plan.output.exists())
    say = _Say(progress)
    if reason is None and not force:
        say(f"{plan.output} is up to date (same graph, settings, TensorRT and GPU); --force rebuilds")
        return plan.output
    say(f"building {plan.output.name}: {reason if reason else 'forced'}")
    start = time.perf_counter()
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".matchrt-build-", dir=plan.output.parent) as tmp:
        source = plan.onnx_path
        if plan.autocast:
            source = _autocast(plan, Path(tmp))
            say("equivalent commands:\n  " + autocast_command(plan, source.name))
        engine_bytes, matched, command = _build(plan, source, say, verbose)
    partial = plan.output.with_name(plan.output.name + ".partial")
    partial.write_bytes(engine_bytes)
    provenance_path(plan.output).unlink(missing_ok=True)  # never a new engine beside an old record
    partial.replace(plan.output)
    record.update({
        "engine_sha256": sha256_file(plan.output),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.perf_counter() - start, 1),
        "fp32_layers_matched": matched,
        "trtexec": command,
    })
    record["rebuild"] = rebuild_command(record, plan.output)
    write_provenance(plan.output, record)
    say(f"wrote {plan.output} ({len(engine_bytes) / 1e6:.1f} MB, {record['build_seconds']} s)")
    return plan.output


class _Say:
    """Messages on stderr through rich (so they do not tear the progress bars)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._console: Any = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
        return self._console

    def __call__(self, message: str, style: str = "") -> None:
        if self.enabled:
            self.console.print(message, style=style or None, markup=False)


def _autocast(plan: BuildPlan, workdir: Path) -> Path:
    """A mixed-precision copy of the graph for a strongly typed fp16/bf16 build (ModelOpt AutoCast)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        raise MatchrtError(
            f"a {plan.precision} engine with strong typing (TensorRT 11, or --strongly-typed) needs a "
            "mixed-precision graph, made with NVIDIA ModelOpt AutoCast: pip install 'nvidia-modelopt[onnx]'. "
            "Or build fp32, or with TensorRT 10 without --strongly-typed") from None
    import onnx

    converted = convert_to_mixed_precision(
        onnx_path=str(plan.onnx_path), low_precision_type=plan.precision,
        nodes_to_exclude=[_glob_regex(p) for p in plan.fp32_layers] or None, keep_io_types=True)
    out = workdir / f"{plan.onnx_path.stem}.{plan.precision}.onnx"
    big = converted.ByteSize() > (1 << 31) - (1 << 26)
    onnx.save_model(converted, str(out), save_as_external_data=big, location=out.name + ".data")
    return out


def _make_logger(verbose: bool) -> Any:
    import tensorrt as trt

    class _Logger(trt.ILogger):
        """Keeps errors for the failure message, warnings for a short summary."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            elif level == int(trt.ILogger.Severity.WARNING):
                if msg not in self.warnings:
                    self.warnings.append(msg)
            elif verbose:
                print(msg, file=sys.stderr)

    return _Logger()


def _make_monitor(progress: Any) -> Any:
    import tensorrt as trt

    class _Monitor(trt.IProgressMonitor):
        """TensorRT's build phases as rich progress bars, nested phases indented.

        TensorRT may call it from several threads, hence the lock; Ctrl-C inside a callback
        turns into a cancellation request (step_complete returning False)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.tasks: dict[str, tuple[Any, int]] = {}
            self.lock = threading.Lock()
            self.cancelled = False

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            try:
                with self.lock:
                    parent = self.tasks.get(parent_phase) if parent_phase else None
                    depth = parent[1] + 1 if parent else 0
                    task = progress.add_task("  " * depth + phase_name, total=max(num_steps, 1))
                    self.tasks[phase_name] = (task, depth)
            except KeyboardInterrupt:
                self.cancelled = True

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                with self.lock:
                    entry = self.tasks.get(phase_name)
                    if entry is not None:
                        progress.update(entry[0], completed=step + 1)
            except KeyboardInterrupt:
                self.cancelled = True
            return not self.cancelled  # False asks TensorRT to cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                entry = self.tasks.pop(phase_name, None)
                if entry is not None:
                    progress.remove_task(entry[0])

    return _Monitor()


def _parser_errors(parser: trt.OnnxParser) -> list[str]:
    """Each parser error as "node (op): description"."""

    def call(obj: Any, name: str) -> Any:
        fn = getattr(obj, name, None)
        try:
            return fn() if callable(fn) else fn
        except Exception:  # noqa: BLE001 - older bindings lack some accessors
            return None

    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = call(err, "node")
        node_name = call(err, "node_name") or (f"node #{node}" if node is not None and node >= 0
                                               else "<graph>")
        op = call(err, "node_operator") or "?"
        out.append(f"{node_name} ({op}): {call(err, 'desc') or err}")
    return out


def _constrain_layers(network: trt.INetworkDefinition, patterns: Sequence[str]) -> list[str]:
    """Pin the float layers matching `patterns` to fp32 (precision and output types)."""
    import tensorrt as trt

    floats = {trt.float32, trt.float16, trt.bfloat16}
    matched = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not layer_matches(layer.name, patterns):
            continue
        ins = [layer.get_input(j) for j in range(layer.num_inputs)]
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        # shape and index layers keep their integer types; a cast from integers is left alone too
        if not outs or any(t is None or t.dtype not in floats for t in outs):
            continue
        if any(t is not None and t.dtype not in floats for t in ins):
            continue
        layer.precision = trt.float32
        for j in range(len(outs)):
            layer.set_output_type(j, trt.float32)
        matched.append(layer.name)
    return matched


def _build(plan: BuildPlan, source: Path, say: _Say, verbose: bool) -> tuple[bytes, list[str], str]:
    import tensorrt as trt

    logger = _make_logger(verbose)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = _parser_errors(parser) or logger.errors or ["unknown parser error"]
        raise MatchrtError(
            f"TensorRT's ONNX parser refused {plan.onnx_path.name}:\n  " + "\n  ".join(errors)
            + f"\nRun `matchrt lint {plan.onnx_path}` for a full static check of the graph.")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_gb * (1 << 30)))
    config.builder_optimization_level = plan.opt_level
    tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
    if not plan.tf32 and tf32_flag is not None:
        config.clear_flag(tf32_flag)
    matched: list[str] = []
    if not plan.strongly_typed and plan.precision != "fp32":
        # weak typing (TensorRT 10): looked up by name, since TensorRT 11 has no such flags
        config.set_flag(getattr(trt.BuilderFlag, plan.precision.upper()))
        if plan.fp32_layers:
            matched = _constrain_layers(network, plan.fp32_layers)
            if matched:
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            else:
                say(f"warning: no layer matches the fp32 patterns {plan.fp32_layers}", "yellow")
    if plan.dynamic:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name not in plan.profiles:
                raise MatchrtError(f"no optimisation profile for input {name}")
            p = plan.profiles[name]
            profile.set_shape(name, trt.Dims(list(p.min)), trt.Dims(list(p.opt)), trt.Dims(list(p.max)))
        config.add_optimization_profile(profile)
    cache_path = plan.timing_cache
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.exists() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            say(f"warning: timing cache {cache_path} does not fit this TensorRT/GPU; starting a new one",
                "yellow")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    command = trtexec_command(plan, matched, source if plan.autocast else None)
    say("equivalent trtexec command:\n  " + command)
    engine = _serialize(builder, network, config, say)
    if engine is None:
        raise MatchrtError(f"TensorRT failed to build {plan.output.name}:\n  "
                           + "\n  ".join(logger.errors[-10:] or ["no error message from TensorRT"]))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    if logger.warnings and say.enabled:
        shown = logger.warnings[:8]
        say(f"TensorRT warnings ({len(logger.warnings)} distinct):\n  " + "\n  ".join(shown), "yellow")
    return bytes(engine), matched, command


def _serialize(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig,
               say: _Say) -> Optional[trt.IHostMemory]:
    import tensorrt as trt

    if not say.enabled or not hasattr(trt, "IProgressMonitor"):
        return builder.build_serialized_network(network, config)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=say.console, transient=True) as bars:
        monitor = _make_monitor(bars)
        config.progress_monitor = monitor
        engine = builder.build_serialized_network(network, config)
    if monitor.cancelled:
        raise KeyboardInterrupt
    return engine
