"""Side-by-side benchmark: matchers x backends x precisions, on the same inputs, in one process.

Eager fp32 torch is the reference every other column is compared with. Timing excludes warm-up,
synchronises the GPU before reading clocks, rotates inputs, and reports set-up (export, engine
build, compilation) separately from per-pair time.

How cost grows: every combination runs at each input size (`sizes`), each value of a swept
option (`sweeps`, e.g. roma_plus's upsample_res) and each batch (`batches`: the graph takes B
pairs at once; time per pair = batch time / B). Rows report milliseconds per pair and per
megapixel: per pair divided by the pixels of all image inputs the graph takes for one pair.
"""

from __future__ import annotations

import itertools
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .compare import compare_outputs, is_sparse, match_set_agreement
from .errors import MatchrtError
from .geometry import auc, corner_error, estimate
from .host import Host, get_host
from .atomic import atomic_text
from .runner import Pipeline, artifact_pipeline, is_random, load_model, resolve_weights, torch_pipeline
from .transfer import batch_inputs
from .types import ExportOptions
from .weights import sha256_file

# A backend name in `--backend` -> (backend plugin, options for it)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "torch": ("torch", {}),
    "torch-compile": ("torch", {"compile": True}),
    "torch-compile-cudagraph": ("torch", {"compile": True, "cuda_graph": True}),
    "onnxruntime": ("onnxruntime", {}),
    "tensorrt": ("tensorrt", {}),
    "tensorrt-cudagraph": ("tensorrt", {"cuda_graph": True}),
    "inductor": ("inductor", {}),
    "inductor-cudagraph": ("inductor", {"cuda_graph": True}),
}


@dataclass
class BenchInput:
    """One pair, prepared once and reused by every combination."""

    name: str
    image0: np.ndarray
    image1: np.ndarray
    homography: Optional[np.ndarray] = None


@dataclass
class BenchRow:
    matcher: str
    backend: str
    precision: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    setup_s: float = 0.0
    model_ms: dict[str, float] = field(default_factory=dict)  # median, p10, p90
    e2e_ms: dict[str, float] = field(default_factory=dict)
    pairs_per_s: float = 0.0
    peak_mem_mb: Optional[float] = None
    max_abs_err: Optional[float] = None
    rel_err: Optional[float] = None
    match_agreement: Optional[float] = None
    # input pairs whose sparse outputs held no match, in the reference or in this row: the outputs were not
    # compared there (random weights often let no pair pass a matcher's threshold: eloftr's bench rows)
    unchecked_pairs: int = 0
    mean_corner_err: Optional[float] = None
    auc: dict[str, float] = field(default_factory=dict)
    tflop_per_pair: Optional[float] = None
    random_weights: bool = False
    onnx_sha256: list[str] = field(default_factory=list)
    input_size: list[int] = field(default_factory=list)  # [height, width] of the main inputs
    batch: int = 1  # pairs per graph call; model_ms and e2e_ms are per call
    sweep: dict[str, Any] = field(default_factory=dict)  # swept option values of this row
    megapixels: Optional[float] = None  # all image inputs of one pair
    ms_per_pair: dict[str, float] = field(default_factory=dict)  # model_ms / batch
    ms_per_mpix: Optional[float] = None  # median ms per pair / megapixels
    # seconds spent building (or finding) an ahead-of-time artifact, kept out of setup_s
    build_s: Optional[float] = None
    # graphs torch.compile compiled after the first call (recompiles): their time shows in no column, and a
    # matcher that recompiles on later calls costs its users that time too
    late_compiles: int = 0


@dataclass
class BenchConfig:
    matchers: list[str]
    backends: list[str]
    precisions: list[str]
    inputs: list[BenchInput]
    runs: int = 50
    warmup: int = 10
    device: str = "cpu"
    size: Optional[int] = None
    weights: dict[str, dict[str, Optional[Path]]] = field(default_factory=dict)
    random_weights: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    workdir: Optional[Path] = None
    ransac_threshold: float = 3.0
    # stop timing a combination after this many seconds (at least 3 timed runs), so one slow CPU
    # column does not hold the whole table hostage; None = always `runs`
    time_budget: Optional[float] = None
    # (height, width) per matcher; key "" for every matcher without its own; else `size` / default
    sizes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    batches: list[int] = field(default_factory=lambda: [1])
    # option -> values, each its own rows ("key" for every matcher, "matcher.key" for one)
    sweeps: dict[str, list[Any]] = field(default_factory=dict)

    def shapes(self, matcher: str, default: tuple[int, int]) -> list[tuple[int, int]]:
        """The (height, width) sizes `matcher` runs at."""
        if matcher in self.sizes:
            return list(self.sizes[matcher])
        if "" in self.sizes:
            return list(self.sizes[""])
        return [(self.size, self.size)] if self.size else [default]

    def sweep_points(self, matcher: str) -> list[dict[str, Any]]:
        """Every combination of the swept options that apply to `matcher` ([{}] without sweeps)."""
        keys = [(k, k.split(".", 1)[1] if "." in k else k) for k in self.sweeps
                if "." not in k or k.startswith(matcher + ".")]
        values = [self.sweeps[k] for k, _ in keys]
        return [dict(zip([name for _, name in keys], combo)) for combo in itertools.product(*values)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1000.0
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "n": len(a)}


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (Dynamo's count, recompiles included);
    0 where Dynamo was never loaded."""
    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


def count_flops(pipe: Pipeline, inputs: dict[str, Any]) -> Optional[float]:
    """TFLOP of one pair through the torch pipeline (torch's FLOP counter; matmul/conv dominated)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    with FlopCounterMode(display=False) as counter:
        pipe.run(inputs)
    return counter.get_total_flops() / 1e12


def measured_peak_tflops(device: str) -> Optional[float]:
    """Dense fp16 matrix-product throughput of this GPU, measured (the ceiling for the fraction)."""
    if not device.startswith("cuda"):
        return None
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


def provenance(config: BenchConfig) -> dict[str, Any]:
    """Versions, hardware and the command line, so a table can be trusted later."""
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": config.device,
        "random_weights": config.random_weights,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    from .engine import tensorrt_module

    trt = tensorrt_module()
    info["tensorrt"] = trt.__version__ if trt is not None else None
    if config.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        # the physical GPU: timings compare only on one (`matchrt bench-report` pairs rows by it)
        uuid = getattr(props, "uuid", None)
        info["gpu_uuid"] = str(uuid) if uuid is not None else None
        info["compute_capability"] = f"{props.major}.{props.minor}"
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


class Bench:
    """Runs every combination of a `BenchConfig` and collects `BenchRow`s."""

    def __init__(self, config: BenchConfig, host: Optional[Host] = None,
                 progress: Optional[Callable[[str], None]] = None,
                 on_row: Optional[Callable[["Bench"], None]] = None):
        self.config = config
        self.host = host or get_host()
        self.progress = progress or (lambda msg: None)
        # called after each row (done, failed or skipped): the CLI rewrites its JSON there, so a
        # run that dies half-way (a native abort in a loaded artifact) keeps the rows it finished
        self.on_row = on_row or (lambda bench: None)
        self.rows: list[BenchRow] = []
        self.meta: dict[str, Any] = {"matchers": {}}
        self._tmp: Optional[tempfile.TemporaryDirectory] = None

    def workdir(self) -> Path:
        if self.config.workdir:
            self.config.workdir.mkdir(parents=True, exist_ok=True)
            return self.config.workdir
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="matchrt-bench-")
        return Path(self._tmp.name)

    def run(self) -> list[BenchRow]:
        if self.config.device.startswith("cuda"):
            # fp32 columns run with PyTorch's defaults (cuDNN convolutions may use TF32), as users
            # and upstream's published timings do; turning TF32 off made RoMa fp32 6x slower (H100)
            self.progress("measuring the GPU's fp16 matrix-product peak")
            self.meta["peak_fp16_tflops"] = measured_peak_tflops(self.config.device)
        for matcher in self.config.matchers:
            self._run_matcher(matcher)
        return self.rows

    # -- one matcher ----------------------------------------------------------------------------
    def _run_matcher(self, matcher: str) -> None:
        cfg = self.config
        info = self.host.matcher(matcher)
        # `-O key=value` applies to every matcher, `-O matcher.key=value` to that matcher only
        extra = {k: v for k, v in cfg.options.items() if "." not in k}
        extra.update({k.split(".", 1)[1]: v for k, v in cfg.options.items()
                      if k.startswith(matcher + ".")})
        paths = resolve_weights(info, cfg.weights.get(matcher, {}), cfg.random_weights)
        self.progress(f"{matcher}: loading weights")
        model, report = load_model(self.host, matcher, paths, options=extra)
        shapes = cfg.shapes(matcher, (info.contract.default_height, info.contract.default_width))
        meta = {"input_size": list(shapes[0]), "weights": {
            k: ("random (deterministic layout fill)" if is_random(p) else sha256_file(p))
            for k, p in paths.items()}, "random_weights": any(is_random(p) for p in paths.values()),
            "weight_report": report.summary(), "shapes": []}
        self.meta["matchers"][matcher] = meta
        for (side_h, side_w), swept in itertools.product(shapes, cfg.sweep_points(matcher)):
            export = ExportOptions(side_h, side_w, extra=dict(extra, **swept))
            self._run_shape(matcher, model, meta, export, swept)

    def _run_shape(self, matcher: str, model: Any, meta: dict[str, Any], export: ExportOptions,
                   swept: dict[str, Any]) -> None:
        """Every batch x backend x precision at one input size and one point of the sweep."""
        cfg = self.config
        ref_pipe = torch_pipeline(self.host, matcher, model, export, {"device": cfg.device})
        prepared = [ref_pipe.prepare(x.image0, x.image1) for x in cfg.inputs]
        label = f"{matcher} {export.height}x{export.width}"
        self.progress(label + "".join(f" {k}={v}" for k, v in swept.items())
                      + ": reference outputs (torch fp32)")
        references = [_to_cpu(ref_pipe.run(inp)) for inp, _ in prepared]
        shape = {"input_size": [export.height, export.width], "sweep": dict(swept),
                 "megapixels": sum(h * w for h, w in ref_pipe.input_sizes.values()) / 1e6}
        try:
            shape["tflop_per_pair"] = count_flops(ref_pipe, prepared[0][0])
        except Exception as exc:  # noqa: BLE001 - the count is informative only
            shape["tflop_per_pair"] = None
            shape["flop_error"] = str(exc)
        meta["shapes"].append(shape)
        if len(meta["shapes"]) == 1:  # the first shape's figures, as before sizes could vary
            meta["tflop_per_pair"] = shape["tflop_per_pair"]
            if "flop_error" in shape:
                meta["flop_error"] = shape["flop_error"]
        for batch in cfg.batches:
            for name in cfg.backends:
                for precision in cfg.precisions:
                    row = BenchRow(matcher, name, precision, tflop_per_pair=shape["tflop_per_pair"],
                                   random_weights=meta["random_weights"],
                                   input_size=[export.height, export.width], batch=batch,
                                   sweep=dict(swept), megapixels=shape["megapixels"])
                    self.rows.append(row)
                    reason = self._unsupported(name, precision)
                    if reason:
                        row.status, row.reason = "skipped", reason
                    else:
                        try:
                            self._run_combination(row, model, replace(export, batch=batch), prepared,
                                                  references)
                        except Exception as exc:  # noqa: BLE001 - one failing column must not end the run
                            self._record_failure(row, exc)
                    self.on_row(self)

    @staticmethod
    def _record_failure(row: BenchRow, exc: Exception) -> None:
        """A MatchrtError skips the row with its message; so does any error of a batch > 1 (the
        plugin's graph or postprocess takes one pair only), unless the GPU ran out of memory."""
        oom = "out of memory" in str(exc).lower()
        if row.batch > 1 and not oom:
            row.status = "skipped"
            row.reason = f"batch>1 unsupported by {row.matcher}: {type(exc).__name__}: {exc}"[:300]
        elif isinstance(exc, MatchrtError):
            row.status, row.reason = "skipped", str(exc).splitlines()[0]
        else:
            row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}"[:300]

    def _unsupported(self, name: str, precision: str) -> Optional[str]:
        if name not in VARIANTS:
            return f"unknown backend {name!r} (known: {', '.join(VARIANTS)})"
        backend, opts = VARIANTS[name]
        binfo = self.host.backends().get(backend)
        if binfo is None:
            return f"backend {backend} is not installed"
        reason = binfo.unavailable()
        if reason:
            return reason
        if precision not in binfo.precisions:
            return f"{backend} does not run {precision} (runs {', '.join(binfo.precisions)})"
        device = self.config.device
        if backend == "tensorrt" and not device.startswith("cuda"):
            return "TensorRT needs a CUDA GPU"
        if backend in ("torch", "inductor") and precision == "fp16" and not device.startswith("cuda"):
            return "fp16 autocast on CPU is not a deployment target; use --device cuda"
        if opts.get("cuda_graph") and not device.startswith("cuda"):
            return "CUDA graphs need a CUDA GPU"
        return None

    def _open(self, row: BenchRow, model: Any, export: ExportOptions) -> Pipeline:
        backend, opts = VARIANTS[row.backend]
        cfg = self.config
        options = dict(opts, precision=row.precision,
                       device=cfg.device if backend != "onnxruntime" else "cpu")
        if backend == "torch":
            return torch_pipeline(self.host, row.matcher, model, export, options)
        if backend == "inductor":
            return self._open_package(row, model, export, options)
        from .export import export_plan, load_manifest

        out = self.workdir() / f"{_artifact_stem(row, export)}.onnx"
        mpath = out.with_name(out.name + ".matchrt.json")
        if not mpath.exists():
            self.progress(f"{row.matcher}: exporting ONNX")
            model.cpu()  # export from CPU; torch sessions move the model to their device again
            plan = self.host.pm.hook.export_plan(matcher=row.matcher, model=model, options=export)
            export_plan(plan, out, version=self.host.matcher(row.matcher).version)
        manifest = load_manifest(out)
        row.onnx_sha256 = [sha256_file(Path(manifest["dir"]) / s["file"]) for s in manifest["stages"]]
        if backend == "onnxruntime":
            return artifact_pipeline(self.host, out, "onnxruntime", options)
        engine = out.with_name(f"{_artifact_stem(row, export)}-{row.precision}.engine")
        self.progress(f"{row.matcher}: building TensorRT engine ({row.precision})")
        stages = []
        for st in manifest["stages"]:
            dst = engine if len(manifest["stages"]) == 1 else engine.with_name(
                engine.stem + f".{st['name']}.engine")
            built = self.host.pm.hook.build_engine(
                backend="tensorrt", onnx_path=Path(manifest["dir"]) / st["file"], output=dst,
                options={"precision": row.precision, "fp32_layers": st.get("fp32_layers", []),
                         "matcher": row.matcher})
            stages.append(dict(st, file=Path(built).name))
        emanifest = dict(manifest, stages=stages)
        emanifest.pop("dir", None)
        engine.with_name(engine.name + ".matchrt.json").write_text(json.dumps(emanifest))
        return artifact_pipeline(self.host, engine, "tensorrt", options)

    def _open_package(self, row: BenchRow, model: Any, export: ExportOptions,
                      options: dict[str, Any]) -> Pipeline:
        """An AOTInductor package in the workdir, built once per precision and device, then loaded."""
        from .package import build_packages, package_context

        cfg = self.config
        start = time.perf_counter()
        device = "cuda" if cfg.device.startswith("cuda") else "cpu"
        out = self.workdir() / f"{_artifact_stem(row, export)}-{row.precision}-{device}.pt2"
        model.to(cfg.device)  # the package is compiled on the device it runs on
        plan = self.host.pm.hook.export_plan(matcher=row.matcher, model=model, options=export)
        info = self.host.matcher(row.matcher)
        paths = resolve_weights(info, cfg.weights.get(row.matcher, {}), cfg.random_weights)
        context = package_context(self.host, row.matcher, paths, [g.module for g in plan.graphs],
                                  export.extra, export.height, export.width, out)
        self.progress(f"{row.matcher}: AOTInductor package ({row.precision}, {device})")
        build_packages(self.host, plan, out, context, {
            "precision": row.precision, "device": cfg.device,
            "progress": lambda m: self.progress(f"{row.matcher}: {m}")})
        row.build_s = time.perf_counter() - start
        return artifact_pipeline(self.host, out, "inductor", options)

    def _run_combination(self, row: BenchRow, model: Any, export: ExportOptions,
                         prepared: list, references: list) -> None:
        import torch

        cfg = self.config
        b, n = row.batch, len(prepared)
        step = f"{row.matcher} / {row.backend} / {row.precision}" + (f" / batch {b}" if b > 1 else "")
        self.progress(f"{step}: setting up")
        start = time.perf_counter()
        pipe = self._open(row, model, export)
        # B pairs per call, rotating over the inputs; the first calls together cover every input
        groups = [[(g + j) % n for j in range(b)] for g in range(0, n, b)]
        first = pipe.run(_batch([prepared[i][0] for i in groups[0]]))  # compilation and lazy
        _sync(cfg.device)  # initialisation count as set-up
        # an ahead-of-time artifact's build is reported apart: its setup is loading it
        row.setup_s = time.perf_counter() - start - (row.build_s or 0.0)
        compiled_by_first_call = graphs_compiled()
        _check_batch(first, b)
        del first
        # fidelity and accuracy on every input, before timing; batched outputs are compared item
        # by item with the batch-1 reference of the same pair
        errs, rels, agree, corners = [], [], [], []
        rtol = pipe.info.tolerances.get(row.precision, 1e-2)
        for g, items in enumerate(groups):
            if len(groups) > 1:  # a call per group: where a slow one (a recompile, a capture) shows in a log
                self.progress(f"{step}: checking outputs, call {g + 1}/{len(groups)}")
            outs = _to_cpu(pipe.run(_batch([prepared[i][0] for i in items])))
            for j, i in enumerate(items):
                out, ref, src = _item(outs, j, b), references[i], cfg.inputs[i]
                a = match_set_agreement(ref, out)
                if a is not None:
                    # sparse outputs: element-wise errors compare different matches once the
                    # ranking differs anywhere, so the match-set agreement is the fidelity figure
                    agree.append(a)
                elif is_sparse(ref):  # a sparse pair without any match says nothing either way
                    row.unchecked_pairs += 1
                else:
                    diffs = [d for d in compare_outputs(ref, out, rtol) if d.mismatched is None]
                    if diffs:
                        errs.append(max(d.max_abs for d in diffs))
                        rels.append(max(d.rel for d in diffs))
                if src.homography is not None:
                    matches = pipe.postprocess(out, prepared[i][1])
                    geo = estimate(matches, "H", cfg.ransac_threshold)
                    h, w = src.image0.shape[:2]
                    corners.append(corner_error(geo.model, src.homography, w, h))
        row.max_abs_err = max(errs) if errs else None
        row.rel_err = max(rels) if rels else None
        row.match_agreement = float(np.mean(agree)) if agree else None
        if corners:
            finite = np.asarray(corners)
            row.mean_corner_err = float(np.mean(np.minimum(finite, 1e3)))
            row.auc = auc(finite)
        # timing
        if cfg.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        model_t, e2e_t = [], []
        self.progress(f"{step}: timing")
        began = time.perf_counter()
        for k in range(cfg.warmup + cfg.runs):
            if (cfg.time_budget is not None and len(model_t) >= 3
                    and time.perf_counter() - began > cfg.time_budget):
                break
            srcs = [cfg.inputs[(k * b + j) % n] for j in range(b)]  # rotate so caches do not flatter
            _sync(cfg.device)
            t0 = time.perf_counter()
            pairs = [pipe.prepare(src.image0, src.image1) for src in srcs]
            inp = _batch([p[0] for p in pairs])
            _sync(cfg.device)
            t1 = time.perf_counter()
            out = pipe.run(inp)
            _sync(cfg.device)
            t2 = time.perf_counter()
            for j, (_, ctx) in enumerate(pairs):
                pipe.postprocess(_item(out, j, b), ctx)
            _sync(cfg.device)
            t3 = time.perf_counter()
            if k >= cfg.warmup:
                model_t.append(t2 - t1)
                e2e_t.append(t3 - t0)
        row.late_compiles = graphs_compiled() - compiled_by_first_call
        row.model_ms, row.e2e_ms = _stats(model_t), _stats(e2e_t)
        row.pairs_per_s = 1000.0 * b / row.e2e_ms["median"]
        row.ms_per_pair = {k: (v / b if k != "n" else v) for k, v in row.model_ms.items()}
        if row.megapixels:
            row.ms_per_mpix = row.ms_per_pair["median"] / row.megapixels
        if cfg.device.startswith("cuda"):
            row.peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20

    # -- reporting ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"provenance": provenance(self.config), "meta": self.meta,
                "config": {"matchers": self.config.matchers, "backends": self.config.backends,
                           "precisions": self.config.precisions, "runs": self.config.runs,
                           "warmup": self.config.warmup, "size": self.config.size,
                           "sizes": {k: [list(x) for x in v] for k, v in self.config.sizes.items()},
                           "batches": self.config.batches, "sweeps": self.config.sweeps,
                           "inputs": [x.name for x in self.config.inputs],
                           "options": self.config.options},
                "rows": [asdict(r) for r in self.rows]}


def _artifact_stem(row: BenchRow, export: ExportOptions) -> str:
    """File name stem of an exported graph: matcher, size, batch (> 1) and swept options."""
    stem = f"{row.matcher}-{export.height}x{export.width}"
    if export.batch > 1:
        stem += f"-b{export.batch}"
    return stem + "".join(f"-{k}{v}" for k, v in sorted(row.sweep.items()))


def _batch(inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Prepared pairs (each 1 x ...) -> one batch of B pairs (B x ...)."""
    if len(inputs) == 1:
        return inputs[0]
    return {k: batch_inputs([x[k] for x in inputs]) for k in inputs[0]}


def _item(outputs: dict[str, Any], j: int, batch: int) -> dict[str, Any]:
    """Pair j of batched outputs, still with a leading batch axis of 1 (what postprocess takes)."""
    if batch == 1:
        return outputs
    return {k: v[j:j + 1] for k, v in outputs.items()}


def _check_batch(outputs: dict[str, Any], batch: int) -> None:
    """A graph run on B pairs must give B results along the first axis of every output."""
    if batch == 1:
        return
    wrong = {k: tuple(v.shape) for k, v in outputs.items()
             if not hasattr(v, "shape") or len(v.shape) == 0 or v.shape[0] != batch}
    if wrong:
        raise MatchrtError(f"outputs {wrong} do not lead with the batch of {batch} pairs")


def _to_cpu(outputs: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: (v.detach().float().cpu() if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v.detach().cpu() if isinstance(v, torch.Tensor) else v)
            for k, v in outputs.items()}


def render_table(rows: list[BenchRow], random_weights: bool, title: str = "matchrt bench"):
    """A rich table of the combinations that ran, and one line per skipped or failed one."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if random_weights:
        title += "\nRANDOM WEIGHTS: accuracy columns are meaningless"
    table = Table(title=title, title_style="bold", show_lines=False)
    for col in ("matcher", "backend", "prec", "input", "B", "model ms p50 (p10-p90)", "ms/pair",
                "ms/MP", "e2e ms", "pairs/s", "peak MB", "setup s", "rel err", "agree", "corner px",
                "AUC@3/5/10"):
        left = col in ("matcher", "backend", "prec", "input")
        table.add_column(col, justify="left" if left else "right")
    notes = []
    for r in rows:
        if r.status != "ok":
            notes.append(Text(f"{r.status}: {_label(r)} / {r.backend} / {r.precision} / "
                              f"{_shape(r)} / batch {r.batch}: {r.reason}", style="yellow"))
            continue
        if r.late_compiles:
            notes.append(Text(f"{_label(r)} / {r.backend} / {r.precision} / {_shape(r)} / batch {r.batch}: "
                              f"torch.compile compiled {r.late_compiles} more graph(s) after the first call "
                              "(recompiles; TORCH_LOGS=recompiles says why): that time is in no column, and "
                              "every process running this matcher pays it", style="yellow"))
        if r.build_s is not None:
            notes.append(Text(f"{_label(r)} / {r.backend} / {r.precision}: artifact built (or reused) in "
                              f"{r.build_s:.1f} s, not counted in setup s (the load)"))
        if r.unchecked_pairs:
            notes.append(Text(_unchecked_note(r), style="yellow"))
        m = r.model_ms
        table.add_row(
            _label(r), r.backend, r.precision, _shape(r), str(r.batch),
            f"{m['median']:.1f} ({m['p10']:.1f}-{m['p90']:.1f})", f"{_per_pair(r):.1f}",
            _fmt_mpix(r), f"{r.e2e_ms['median']:.1f}",
            f"{r.pairs_per_s:.1f}", "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}",
            f"{r.setup_s:.1f}", _fmt(r.rel_err),
            "-" if r.match_agreement is None else f"{r.match_agreement:.3f}",
            "-" if r.mean_corner_err is None else f"{r.mean_corner_err:.2f}",
            "/".join(f"{v:.2f}" for v in r.auc.values()) or "-",
        )
    return Group(table, *notes)


def _unchecked_note(r: BenchRow) -> str:
    return (f"{_label(r)} / {r.backend} / {r.precision} / {_shape(r)} / batch {r.batch}: outputs unchecked on "
            f"{r.unchecked_pairs} input pair(s): no match on either side, so nothing to compare (random weights "
            "rarely pass a matcher's threshold; trained weights, or a lower threshold with -O, give matches)")


def _label(r: BenchRow) -> str:
    return f"{r.matcher} (random weights)" if r.random_weights else r.matcher


def _shape(r: BenchRow) -> str:
    """The row's main input size and swept options: `560x560 upsample_res=864`."""
    size = "x".join(str(v) for v in r.input_size) or "-"
    return size + "".join(f" {k}={v}" for k, v in r.sweep.items())


def _per_pair(r: BenchRow) -> float:
    """Median model milliseconds per pair (a batch's time / its pairs)."""
    return r.ms_per_pair.get("median", r.model_ms["median"] / max(1, r.batch))


def _fmt_mpix(r: BenchRow) -> str:
    return "-" if r.ms_per_mpix is None else f"{r.ms_per_mpix:.1f}"


def markdown_table(rows: list[BenchRow], random_weights: bool) -> str:
    """The same table as Markdown, for READMEs and reports."""
    head = ["matcher", "backend", "precision", "input", "batch", "model ms p50 (p10-p90), per call",
            "ms per pair", "ms per MP", "e2e ms", "pairs/s", "peak MB", "rel err vs torch fp32",
            "match agreement", "TFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {_label(r)} | {r.backend} | {r.precision} | {_shape(r)} | {r.batch} | "
                         f"{r.status}: {r.reason} |" + " |" * (len(head) - 6))
            continue
        m = r.model_ms
        tfs = f"{r.tflop_per_pair / (_per_pair(r) / 1000):.1f}" if r.tflop_per_pair else "-"
        lines.append(
            f"| {_label(r)} | {r.backend} | {r.precision} | {_shape(r)} | {r.batch} | "
            f"{m['median']:.1f} ({m['p10']:.1f}-{m['p90']:.1f}) | {_per_pair(r):.1f} | "
            f"{_fmt_mpix(r)} | {r.e2e_ms['median']:.1f} | {r.pairs_per_s:.1f} | "
            f"{'-' if r.peak_mem_mb is None else f'{r.peak_mem_mb:.0f}'} | {_fmt(r.rel_err)} | "
            f"{'-' if r.match_agreement is None else f'{r.match_agreement:.3f}'} | {tfs} |")
    lines.append("\nms per MP: model milliseconds per pair divided by the megapixels of all image "
                 "inputs the graph takes for one pair; a batch's time is divided by its pairs.")
    built = [r for r in rows if r.status == "ok" and r.build_s is not None]
    if built:
        lines.append("")
        lines += [f"- {_label(r)} / {r.backend} / {r.precision}: artifact built (or reused) in {r.build_s:.1f} s, "
                  f"loaded in {r.setup_s:.1f} s" for r in built]
    unchecked = [r for r in rows if r.status == "ok" and r.unchecked_pairs]
    if unchecked:
        lines.append("")
        lines += [f"- {_unchecked_note(r)}" for r in unchecked]
    if random_weights:
        lines.append("\n**Random weights**: accuracy figures are meaningless; timings are not.")
    return "\n".join(lines) + "\n"


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1e}"


def plot(rows: list[BenchRow], path: Path, random_weights: bool, device: str = "",
         suffixes: Optional[list[str]] = None) -> Path:
    """A PNG bar chart: median model latency per combination, whiskers p10-p90, one panel a matcher; the
    device (the GPU's name) in the title, and ``suffixes[i]`` (e.g. a speed-up) after row i's time."""
    import cv2

    from .viz import save_png

    ok = [r for r in rows if r.status == "ok"]
    suffix_of = {id(r): s for r, s in zip(rows, suffixes or [])}
    matchers = list(dict.fromkeys(r.matcher for r in rows))
    bar_h, gap, left, width = 26, 40, 330, 1100
    if len({(_shape(r), r.batch) for r in ok}) > 1:
        left, width = 470, 1240  # room for the size and batch in the labels
    height = 70 + sum(gap + bar_h * max(1, sum(r.matcher == m for r in ok)) for m in matchers)
    img = np.full((height, width, 3), 255, np.uint8)
    title = "matchrt bench: model ms per pair, median (bar) and p10-p90 (whisker)"
    if device:
        title += f" on {device}"
    if random_weights:
        title += " - random weights"
    cv2.putText(img, title, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    y = 50
    palette = [(66, 133, 244), (52, 168, 83), (251, 188, 5), (234, 67, 53), (155, 89, 182),
               (26, 188, 156)]
    for m in matchers:
        sub = [r for r in ok if r.matcher == m]
        cv2.putText(img, m, (10, y + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 2, cv2.LINE_AA)
        y += gap - 10
        top = max([r.model_ms["p90"] / r.batch for r in sub] or [1.0])
        varied = len({(_shape(r), r.batch) for r in sub}) > 1
        scale = (width - left - (150 if suffix_of else 90)) / top
        for k, r in enumerate(sub):
            color = palette[k % len(palette)][::-1]
            x1 = left + int(_per_pair(r) * scale)
            cv2.rectangle(img, (left, y + 3), (x1, y + bar_h - 3), color, -1)
            lo = left + int(r.model_ms["p10"] / r.batch * scale)
            hi = left + int(r.model_ms["p90"] / r.batch * scale)
            mid = y + bar_h // 2
            cv2.line(img, (lo, mid), (hi, mid), (0, 0, 0), 1)
            cv2.line(img, (lo, mid - 5), (lo, mid + 5), (0, 0, 0), 1)
            cv2.line(img, (hi, mid - 5), (hi, mid + 5), (0, 0, 0), 1)
            text = f"{r.backend} {r.precision}" + (f" {_shape(r)} B{r.batch}" if varied else "")
            cv2.putText(img, text[:48], (10, y + 18), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5, (0, 0, 0), 1, cv2.LINE_AA)
            suffix = suffix_of.get(id(r), "")
            cv2.putText(img, f"{_per_pair(r):.1f} ms{suffix}", (hi + 6, y + 18),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
            y += bar_h
        y += 10
    return save_png(img, path)


def write_json(bench: Bench, path: Path) -> Path:
    """The bench's rows and provenance as JSON (temporary name, then renamed into place)."""
    return atomic_text(path, json.dumps(bench.to_json(), indent=1, default=str))


def open_backend(host: Host, matcher: str, backend: str, precision: str, model: Any,
                 export: ExportOptions, device: str, workdir: Path,
                 progress: Optional[Callable[[str], None]] = None,
                 weights: Optional[dict[str, Optional[Path]]] = None, random_weights: bool = False) -> Pipeline:
    """One `--backend` variant opened exactly as the bench opens it (ONNX export and engine
    build included, files under `workdir`), or a MatchrtError saying why it cannot run here.
    ``weights`` / ``random_weights``: where ``model``'s weights came from, which an AOTInductor
    package records (its provenance and rebuild command)."""
    bench = Bench(BenchConfig([matcher], [backend], [precision], [], device=device, workdir=workdir,
                              weights={matcher: dict(weights or {})}, random_weights=random_weights),
                  host, progress)
    reason = bench._unsupported(backend, precision)
    if reason:
        raise MatchrtError(f"{matcher} / {backend} / {precision}: {reason}")
    return bench._open(BenchRow(matcher, backend, precision), model, export)
