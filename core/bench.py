"""Side-by-side benchmark: matchers x backends x precisions, on the same inputs, in one process.

Eager fp32 torch is the reference every other column is compared with. Timing excludes warm-up,
synchronises the GPU before reading clocks, rotates inputs, and reports set-up (export, engine
build, compilation) separately from per-pair time.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .compare import compare_outputs, is_sparse, match_set_agreement
from .errors import MatchrtError
from .geometry import auc, corner_error, estimate
from .host import Host, get_host
from .runner import Pipeline, artifact_pipeline, is_random, load_model, resolve_weights, torch_pipeline
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
    mean_corner_err: Optional[float] = None
    auc: dict[str, float] = field(default_factory=dict)
    tflop_per_pair: Optional[float] = None
    random_weights: bool = False
    onnx_sha256: list[str] = field(default_factory=list)
    # seconds spent building (or finding) an ahead-of-time artifact, kept out of setup_s
    build_s: Optional[float] = None


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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1000.0
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "n": len(a)}


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
                 progress: Optional[Callable[[str], None]] = None):
        self.config = config
        self.host = host or get_host()
        self.progress = progress or (lambda msg: None)
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
        side_h = cfg.size or info.contract.default_height
        side_w = cfg.size or info.contract.default_width
        # `-O key=value` applies to every matcher, `-O matcher.key=value` to that matcher only
        extra = {k: v for k, v in cfg.options.items() if "." not in k}
        extra.update({k.split(".", 1)[1]: v for k, v in cfg.options.items()
                      if k.startswith(matcher + ".")})
        paths = resolve_weights(info, cfg.weights.get(matcher, {}), cfg.random_weights)
        self.progress(f"{matcher}: loading weights")
        model, report = load_model(self.host, matcher, paths, options=extra)
        export = ExportOptions(side_h, side_w, extra=extra)
        meta = {"input_size": [side_h, side_w], "weights": {
            k: ("random (deterministic layout fill)" if is_random(p) else sha256_file(p))
            for k, p in paths.items()}, "random_weights": any(is_random(p) for p in paths.values()),
            "weight_report": report.summary()}
        self.meta["matchers"][matcher] = meta
        ref_pipe = torch_pipeline(self.host, matcher, model, export, {"device": cfg.device})
        prepared = [ref_pipe.prepare(x.image0, x.image1) for x in cfg.inputs]
        self.progress(f"{matcher}: reference outputs (torch fp32)")
        references = [_to_cpu(ref_pipe.run(inp)) for inp, _ in prepared]
        try:
            meta["tflop_per_pair"] = count_flops(ref_pipe, prepared[0][0])
        except Exception as exc:  # noqa: BLE001 - the count is informative only
            meta["tflop_per_pair"] = None
            meta["flop_error"] = str(exc)
        for name in cfg.backends:
            for precision in cfg.precisions:
                row = BenchRow(matcher, name, precision, tflop_per_pair=meta.get("tflop_per_pair"),
                               random_weights=meta["random_weights"])
                self.rows.append(row)
                reason = self._unsupported(name, precision)
                if reason:
                    row.status, row.reason = "skipped", reason
                    continue
                try:
                    self._run_combination(row, model, export, prepared, references)
                except MatchrtError as exc:
                    row.status, row.reason = "skipped", str(exc).splitlines()[0]
                except Exception as exc:  # noqa: BLE001 - one failing column must not end the run
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

        out = self.workdir() / f"{row.matcher}-{export.height}x{export.width}.onnx"
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
        engine = out.with_name(f"{row.matcher}-{export.height}x{export.width}-{row.precision}.engine")
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
        out = self.workdir() / f"{row.matcher}-{export.height}x{export.width}-{row.precision}-{device}.pt2"
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
        self.progress(f"{row.matcher} / {row.backend} / {row.precision}: setting up")
        start = time.perf_counter()
        pipe = self._open(row, model, export)
        first = pipe.run(prepared[0][0])  # compilation and lazy initialisation count as set-up
        _sync(cfg.device)
        # an ahead-of-time artifact's build is reported apart: its setup is loading it
        row.setup_s = time.perf_counter() - start - (row.build_s or 0.0)
        del first
        # fidelity and accuracy on every input, before timing
        errs, rels, agree, corners = [], [], [], []
        for (inp, ctx), ref, src in zip(prepared, references, cfg.inputs):
            out = _to_cpu(pipe.run(inp))
            rtol = pipe.info.tolerances.get(row.precision, 1e-2)
            a = match_set_agreement(ref, out)
            if a is not None:
                # sparse outputs: element-wise errors compare different matches once the ranking
                # differs anywhere, so the match-set agreement is the fidelity figure
                agree.append(a)
            elif not is_sparse(ref):  # a sparse pair without any match says nothing either way
                diffs = [d for d in compare_outputs(ref, out, rtol) if d.mismatched is None]
                if diffs:
                    errs.append(max(d.max_abs for d in diffs))
                    rels.append(max(d.rel for d in diffs))
            if src.homography is not None:
                matches = pipe.postprocess(out, ctx)
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
        n = len(prepared)
        model_t, e2e_t = [], []
        self.progress(f"{row.matcher} / {row.backend} / {row.precision}: timing")
        began = time.perf_counter()
        for i in range(cfg.warmup + cfg.runs):
            if (cfg.time_budget is not None and len(model_t) >= 3
                    and time.perf_counter() - began > cfg.time_budget):
                break
            src = cfg.inputs[i % n]  # rotate inputs so caches do not flatter results
            _sync(cfg.device)
            t0 = time.perf_counter()
            inp, ctx = pipe.prepare(src.image0, src.image1)
            _sync(cfg.device)
            t1 = time.perf_counter()
            out = pipe.run(inp)
            _sync(cfg.device)
            t2 = time.perf_counter()
            pipe.postprocess(out, ctx)
            _sync(cfg.device)
            t3 = time.perf_counter()
            if i >= cfg.warmup:
                model_t.append(t2 - t1)
                e2e_t.append(t3 - t0)
        row.model_ms, row.e2e_ms = _stats(model_t), _stats(e2e_t)
        row.pairs_per_s = 1000.0 / row.e2e_ms["median"]
        if cfg.device.startswith("cuda"):
            row.peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20

    # -- reporting ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"provenance": provenance(self.config), "meta": self.meta,
                "config": {"matchers": self.config.matchers, "backends": self.config.backends,
                           "precisions": self.config.precisions, "runs": self.config.runs,
                           "warmup": self.config.warmup, "size": self.config.size,
                           "inputs": [x.name for x in self.config.inputs],
                           "options": self.config.options},
                "rows": [asdict(r) for r in self.rows]}


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
    for col in ("matcher", "backend", "prec", "model ms p50 (p10-p90)", "e2e ms", "pairs/s",
                "peak MB", "setup s", "rel err", "agree", "corner px", "AUC@3/5/10"):
        table.add_column(col, justify="left" if col in ("matcher", "backend", "prec") else "right")
    notes = []
    for r in rows:
        if r.status != "ok":
            notes.append(Text(f"{r.status}: {_label(r)} / {r.backend} / {r.precision}: {r.reason}",
                              style="yellow"))
            continue
        if r.build_s is not None:
            notes.append(Text(f"{_label(r)} / {r.backend} / {r.precision}: artifact built (or reused) in "
                              f"{r.build_s:.1f} s, not counted in setup s (the load)"))
        m = r.model_ms
        table.add_row(
            _label(r), r.backend, r.precision,
            f"{m['median']:.1f} ({m['p10']:.1f}-{m['p90']:.1f})", f"{r.e2e_ms['median']:.1f}",
            f"{r.pairs_per_s:.1f}", "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}",
            f"{r.setup_s:.1f}", _fmt(r.rel_err),
            "-" if r.match_agreement is None else f"{r.match_agreement:.3f}",
            "-" if r.mean_corner_err is None else f"{r.mean_corner_err:.2f}",
            "/".join(f"{v:.2f}" for v in r.auc.values()) or "-",
        )
    return Group(table, *notes)


def _label(r: BenchRow) -> str:
    return f"{r.matcher} (random weights)" if r.random_weights else r.matcher


def markdown_table(rows: list[BenchRow], random_weights: bool) -> str:
    """The same table as Markdown, for READMEs and reports."""
    head = ["matcher", "backend", "precision", "model ms p50 (p10-p90)", "e2e ms", "pairs/s",
            "peak MB", "rel err vs torch fp32", "match agreement", "TFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {_label(r)} | {r.backend} | {r.precision} | {r.status}: {r.reason} |"
                         + " |" * (len(head) - 4))
            continue
        m = r.model_ms
        tfs = f"{r.tflop_per_pair / (m['median'] / 1000):.1f}" if r.tflop_per_pair else "-"
        lines.append(
            f"| {_label(r)} | {r.backend} | {r.precision} | {m['median']:.1f} ({m['p10']:.1f}-"
            f"{m['p90']:.1f}) | {r.e2e_ms['median']:.1f} | {r.pairs_per_s:.1f} | "
            f"{'-' if r.peak_mem_mb is None else f'{r.peak_mem_mb:.0f}'} | {_fmt(r.rel_err)} | "
            f"{'-' if r.match_agreement is None else f'{r.match_agreement:.3f}'} | {tfs} |")
    built = [r for r in rows if r.status == "ok" and r.build_s is not None]
    if built:
        lines.append("")
        lines += [f"- {_label(r)} / {r.backend} / {r.precision}: artifact built (or reused) in {r.build_s:.1f} s, "
                  f"loaded in {r.setup_s:.1f} s" for r in built]
    if random_weights:
        lines.append("\n**Random weights**: accuracy figures are meaningless; timings are not.")
    return "\n".join(lines) + "\n"


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1e}"


def plot(rows: list[BenchRow], path: Path, random_weights: bool) -> Path:
    """A PNG bar chart: median model latency per combination, whiskers p10-p90, one panel a matcher."""
    import cv2

    from .viz import save_png

    ok = [r for r in rows if r.status == "ok"]
    matchers = list(dict.fromkeys(r.matcher for r in rows))
    bar_h, gap, left, width = 26, 40, 330, 1100
    height = 70 + sum(gap + bar_h * max(1, sum(r.matcher == m for r in ok)) for m in matchers)
    img = np.full((height, width, 3), 255, np.uint8)
    title = "matchrt bench: model latency, median (bar) and p10-p90 (whisker)"
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
        top = max([r.model_ms["p90"] for r in sub] or [1.0])
        scale = (width - left - 90) / top
        for k, r in enumerate(sub):
            color = palette[k % len(palette)][::-1]
            x1 = left + int(r.model_ms["median"] * scale)
            cv2.rectangle(img, (left, y + 3), (x1, y + bar_h - 3), color, -1)
            lo, hi = left + int(r.model_ms["p10"] * scale), left + int(r.model_ms["p90"] * scale)
            mid = y + bar_h // 2
            cv2.line(img, (lo, mid), (hi, mid), (0, 0, 0), 1)
            cv2.line(img, (lo, mid - 5), (lo, mid + 5), (0, 0, 0), 1)
            cv2.line(img, (hi, mid - 5), (hi, mid + 5), (0, 0, 0), 1)
            cv2.putText(img, f"{r.backend} {r.precision}", (10, y + 18), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5, (0, 0, 0), 1, cv2.LINE_AA)
            cv2.putText(img, f"{r.model_ms['median']:.1f} ms", (hi + 6, y + 18),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
            y += bar_h
        y += 10
    return save_png(img, path)


def write_json(bench: Bench, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bench.to_json(), indent=1, default=str))
    return path
