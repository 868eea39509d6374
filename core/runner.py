"""One runner for every matcher and backend: load weights, run the graph sequence, postprocess."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .errors import MatchrtError
from .export import load_manifest
from .host import Host, get_host
from .images import check_size, prepare_pair
from .types import ExportOptions, MatcherInfo, Matches, PairContext, WeightReport
from .weights import enforce, load_checkpoint, write_random_checkpoint

def cache_dir() -> Path:
    """Where matchrt keeps generated files (MATCHRT_CACHE_DIR, default ~/.cache/matchrt)."""
    import os

    return Path(os.environ.get("MATCHRT_CACHE_DIR") or Path.home() / ".cache" / "matchrt")


def resolve_weights(
    info: MatcherInfo, given: dict[str, Optional[Path]], random_weights: bool = False,
    cache: Optional[Path] = None,
) -> dict[str, Path]:
    """Pick a file for each weight source: the user's, the plugin's packaged one, else random if asked.

    Random files are named `*-random.pt` (see `is_random`).
    """
    paths: dict[str, Path] = {}
    for src in info.weight_sources:
        path = given.get(src.name)
        if path is None and src.default is not None:
            path = Path(src.default)  # real weights shipped with the plugin beat random ones
        if path is None and random_weights:
            if src.layout is None:
                raise MatchrtError(f"{info.name} ships no key layout for {src.name}; --random-weights "
                                   "cannot build one")
            out = Path(cache or cache_dir() / "random-weights") / f"{info.name}-{src.name}-random.pt"
            if not out.exists():
                write_random_checkpoint(src.layout, out, lightning=src.name == "checkpoint")
            path = out
        if path is None:
            if src.required:
                raise MatchrtError(
                    f"{info.name} needs --{src.name} ({src.description}). Pass the file, or "
                    "--random-weights to use untrained weights in the real layout (speed tests only)."
                )
            continue
        paths[src.name] = Path(path)
    unknown = set(k for k, v in given.items() if v is not None) - {s.name for s in info.weight_sources}
    if unknown:
        raise MatchrtError(f"{info.name} takes no weight file {', '.join(sorted(unknown))}; it reads "
                           f"{', '.join(s.name for s in info.weight_sources)}")
    return paths


def is_random(path: Path) -> bool:
    """Whether a resolved weight file is a generated random-weight checkpoint."""
    return Path(path).name.endswith("-random.pt") and cache_dir() in Path(path).parents


def map_weights(host: Host, matcher: str, paths: dict[str, Path], options: Optional[dict] = None):
    """Load the weight files and map them with the plugin's hook (no enforcement here)."""
    sources = {name: load_checkpoint(p) for name, p in paths.items()}
    mapped = host.pm.hook.map_weights(
        matcher=matcher, sources=sources, paths={k: str(v) for k, v in paths.items()},
        options=options or {},
    )
    if mapped is None:
        raise MatchrtError(f"no installed plugin maps weights for {matcher!r}; it is registered but "
                           "not implemented yet")
    return mapped


def load_model(
    host: Host, matcher: str, paths: dict[str, Path], allow_partial: bool = False,
    options: Optional[dict] = None,
) -> tuple[Any, WeightReport]:
    """The matcher's torch model with its weights, and the mapping report."""
    mapped = map_weights(host, matcher, paths, options)
    enforce(mapped.report, allow_partial)
    model = host.pm.hook.create_model(matcher=matcher, options=options or {})
    if model is None:
        raise MatchrtError(f"no installed plugin creates a model for {matcher!r}")
    result = model.load_state_dict(mapped.state_dict, strict=not allow_partial)
    del result
    return model.eval(), mapped.report


@dataclass
class Stage:
    name: str
    session: Any
    inputs: list[str]
    outputs: list[str]


@dataclass
class Pipeline:
    """A matcher's graph (or graph sequence) opened on one backend."""

    host: Host
    info: MatcherInfo
    backend: str
    stages: list[Stage]
    input_sizes: dict[str, tuple[int, int]]
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Raw outputs of the last stage; `bridge_stages` runs between stages."""
        tensors = dict(inputs)
        for k, stage in enumerate(self.stages):
            missing = [n for n in stage.inputs if n not in tensors]
            if missing:
                raise MatchrtError(f"stage {stage.name} lacks inputs {missing}")
            tensors.update(stage.session.run({n: tensors[n] for n in stage.inputs}))
            if k < len(self.stages) - 1:
                extra = self.host.pm.hook.bridge_stages(
                    matcher=self.info.name, stage=stage.name, tensors=tensors, options=self.options)
                if extra is None:
                    raise MatchrtError(f"{self.info.name} exported several stages but no plugin "
                                       "bridges them (bridge_stages)")
                tensors.update(extra)
        return {n: tensors[n] for n in self.stages[-1].outputs}

    @property
    def feeds_gpu(self) -> bool:
        """Whether the first graph copies its inputs to a CUDA GPU (a torch or Inductor session on
        a CUDA device, or a TensorRT engine): then prepared inputs go to page-locked memory."""
        session = self.stages[0].session if self.stages else None
        device = getattr(session, "device", None)
        return getattr(device, "type", None) == "cuda" or hasattr(session, "device_index")

    def prepare(self, image0: np.ndarray, image1: np.ndarray) -> tuple[dict[str, Any], PairContext]:
        import torch

        arrays, ctx = prepare_pair(image0, image1, self.info.contract, self.input_sizes,
                                   pinned=self.feeds_gpu)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}, ctx

    def postprocess(self, outputs: dict[str, Any], ctx: PairContext, options: Optional[dict] = None) -> Matches:
        opts = dict(self.options)
        opts.update(options or {})
        matches = self.host.pm.hook.postprocess(matcher=self.info.name, outputs=outputs, pair=ctx,
                                                options=opts)
        if matches is None:
            raise MatchrtError(f"no installed plugin postprocesses {self.info.name!r} outputs")
        matches.metadata.setdefault("matcher", self.info.name)
        matches.metadata.setdefault("backend", self.backend)
        return matches

    def match(self, image0: np.ndarray, image1: np.ndarray, options: Optional[dict] = None) -> Matches:
        """Two images (as read by `read_image`) -> Matches in original pixels."""
        inputs, ctx = self.prepare(image0, image1)
        return self.postprocess(self.run(inputs), ctx, options)


def _image_sizes(shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    return {n: (int(s[-2]), int(s[-1])) for n, s in shapes.items() if n.startswith(("image0", "image1"))}


def torch_pipeline(
    host: Host, matcher: str, model: Any, export: ExportOptions, backend_options: dict[str, Any],
) -> Pipeline:
    """Run the plugin's export wrapper itself with the torch backend (the reference path)."""
    info = host.matcher(matcher)
    check_size(export.height, export.width, info.contract, matcher)
    plan = host.pm.hook.export_plan(matcher=matcher, model=model, options=export)
    if plan is None:
        raise MatchrtError(f"no installed plugin exports {matcher!r}")
    stages, sizes = [], {}
    for g in plan.graphs:
        session = host.pm.hook.open_session(backend="torch", graph=g, options=backend_options)
        stages.append(Stage(g.name, session, list(g.input_names), list(g.output_names)))
        sizes.update(_image_sizes({n: list(t.shape) for n, t in zip(g.input_names, g.example_inputs)}))
    return Pipeline(host, info, "torch", stages, sizes, dict(plan.options), source="torch")


def artifact_pipeline(host: Host, path: Path, backend: str, backend_options: dict[str, Any],
                      matcher: Optional[str] = None) -> Pipeline:
    """Open an exported graph (or engine) sequence described by its manifest."""
    manifest = load_manifest(Path(path))
    name = manifest["matcher"]
    if matcher and matcher != name:
        raise MatchrtError(f"{path} was exported for {name!r}, not {matcher!r}")
    info = host.matcher(name)
    base = Path(manifest["dir"])
    stages, sizes = [], {}
    for st in manifest["stages"]:
        file = base / st["file"]
        if not file.exists():
            raise MatchrtError(f"{file} is missing (listed in the manifest of {path})")
        session = host.pm.hook.open_session(backend=backend, graph=file, options=backend_options)
        if session is None:
            raise MatchrtError(f"backend {backend!r} cannot open {file}")
        stages.append(Stage(st["name"], session, list(st["inputs"]), list(st["outputs"])))
        sizes.update(_image_sizes(st.get("input_shapes", {})))
    return Pipeline(host, info, backend, stages, sizes, dict(manifest.get("options", {})),
                    source=str(path))


def open_pipeline(
    matcher: Optional[str],
    backend: str = "torch",
    weights: Optional[dict[str, Optional[Path]]] = None,
    artifact: Optional[Path] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    extra: Optional[dict[str, Any]] = None,
    backend_options: Optional[dict[str, Any]] = None,
    allow_partial: bool = False,
    random_weights: bool = False,
    host: Optional[Host] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Pipeline:
    """What `match`, `check` and `bench` use: torch from weights, or a graph/engine from a file."""
    host = host or get_host()
    backend_options = dict(backend_options or {})
    host.backend(backend)  # fails with the install hint when missing; never falls back
    if backend == "torch":
        if matcher is None:
            raise MatchrtError("--matcher is needed with --backend torch")
        info = host.matcher(matcher)
        paths = resolve_weights(info, weights or {}, random_weights)
        if progress:
            progress(f"loading {matcher} weights")
        model, _ = load_model(host, matcher, paths, allow_partial, extra)
        export = ExportOptions(height or info.contract.default_height,
                               width or info.contract.default_width, extra=dict(extra or {}))
        return torch_pipeline(host, matcher, model, export, backend_options)
    if artifact is None:
        raise MatchrtError(
            f"--backend {backend} runs an exported file: pass --onnx model.onnx (or --engine for "
            "tensorrt engines and inductor .pt2 packages); create it with `matchrt export` (or "
            "`matchrt build -m MATCHER --backend inductor`)"
        )
    return artifact_pipeline(host, artifact, backend, backend_options, matcher)
