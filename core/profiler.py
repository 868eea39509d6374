"""`matchrt profile`: where one pair's time goes, per named stage and per kernel (torch.profiler).

The pipeline runs a few warm-up pairs, then `runs` pairs under torch.profiler with the stage
markers of `matchrt.profiling` on (eager torch only). Every kernel (GPU) or op (CPU) is charged
to the stages enclosing the CPU call that launched it; a stage's time is the device time of its
kernels (GPU) or its wall time on the CPU (CPU runs), per pair (averaged over the profiled runs).
Postprocess is a stage of its own around the plugin's postprocess hook.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from .atomic import atomic_path, atomic_text
from .errors import MatchrtError
from .profiling import PREFIX, range_name, recording
from .trace_regions import GRAPH_CALL, PACKAGE_CALL, RegionRow, innermost, load_events, regions as trace_regions

ROOT = "matchrt.pair"  # profiler range around one pair (graph run + postprocess)
POSTPROCESS = "postprocess"
UNMARKED = "(not in a stage)"
# device-side events that are not work: the GPU copy of a profiler range, waits, counters
NOT_DEVICE_WORK = {"gpu_user_annotation", "cuda_sync", "gpu_pm_counter", "overhead"}


@dataclass
class StageRow:
    """One stage path, per profiled pair."""

    name: str  # path of nested stages, "coarse transformer/self-attention"
    depth: int
    ms: float  # device time of its kernels (GPU) or wall time (CPU)
    cpu_ms: float  # wall time of the stage's ranges on the CPU
    calls: float
    share: float  # of the total


@dataclass
class KernelRow:
    """One kernel (GPU) or op (CPU) name, per profiled pair."""

    name: str
    ms: float  # self device time (GPU kernels) or self CPU time (CPU ops)
    calls: float
    share: float  # of the total
    stage: str  # the stage path holding most of its time ("-" outside every stage)


@dataclass
class ProfileReport:
    """What `matchrt profile` prints and writes (`--json`)."""

    matcher: str
    backend: str
    precision: str
    device: str
    time_kind: str  # "GPU kernel time" or "CPU time"
    input_size: list[int]
    runs: int
    total_ms: float
    stages: list[StageRow]
    kernels: list[KernelRow]
    wall_ms: dict[str, Optional[float]] = field(default_factory=dict)
    stage_markers: bool = True
    # GPU runs without stage markers: time per compiled graph / eager region (trace_regions)
    regions: list[RegionRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- analysis of profiler events (pure: works on any objects shaped like FunctionEvent) --------

def _is_cpu(event: Any) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CPU")


def _stage_name(event: Any) -> Optional[str]:
    name = event.name
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def _is_marker(event: Any) -> bool:
    return event.name.startswith(PREFIX) or event.name == ROOT


def _path(event: Any, cache: dict[int, tuple[str, ...]]) -> tuple[str, ...]:
    """Stage names enclosing `event` (itself included), outermost first; repeats collapsed."""
    key = id(event)
    if key in cache:
        return cache[key]
    parent = getattr(event, "cpu_parent", None)
    path = _path(parent, cache) if parent is not None else ()
    name = _stage_name(event)
    if name is not None and (not path or path[-1] != name):
        path = path + (name,)
    cache[key] = path
    return path


def _within_root(event: Any) -> bool:
    while event is not None:
        if event.name == ROOT:
            return True
        event = getattr(event, "cpu_parent", None)
    return False


def _device_items(events: list[Any]) -> list[tuple[str, float, Any, Any]]:
    """(kernel name, microseconds, launching CPU event or None, the kernel's event) per device activity."""
    launchers = {e.id: e for e in events if _is_cpu(e) and not getattr(e, "linked_correlation_id", 0)}
    # the GPU copy of a CPU range (an AOTInductor package's call, a compiled graph's) carries the
    # range's name; torch builds without `activity_type` on their events would count it as a kernel
    # spanning all the work it holds (the package's 40 ms counted twice, H200, session 28)
    ranges = {e.name for e in events if _is_cpu(e) and getattr(e, "is_user_annotation", False)}
    items = []
    for e in events:
        if _is_cpu(e) or _is_marker(e) or e.name == "Context Sync":
            continue
        if getattr(e, "activity_type", None) in NOT_DEVICE_WORK or getattr(e, "is_user_annotation", False):
            continue
        if e.name in ranges or e.name.startswith((PACKAGE_CALL, GRAPH_CALL)):
            continue
        duration = e.time_range.end - e.time_range.start
        items.append((e.name, float(duration), launchers.get(getattr(e, "linked_correlation_id", 0)), e))
    return items


def _device_stage_ranges(events: list[Any], cache: dict[int, tuple[str, ...]]
                         ) -> list[tuple[float, float, tuple[str, ...]]]:
    """(start, end, stage path) of the device-side copies of the stage ranges, by start time.

    On CUDA the profiler mirrors a range onto the GPU timeline only where it launched kernels
    itself, from its first such kernel to its last: a range whose work is all in nested stages has
    no copy, and a copy need not span its children. So the k-th copy of a name takes the path of the
    k-th CPU range of that name (the CPU side knows the nesting) when both sides count the same
    occurrences; otherwise the path is read from containment on the GPU timeline.
    """
    def order(e: Any) -> tuple[float, float]:
        return (float(e.time_range.start), -float(e.time_range.end))

    marks = sorted((e for e in events if not _is_cpu(e) and _stage_name(e) is not None), key=order)
    cpu_paths: dict[str, list[tuple[str, ...]]] = {}
    for r in sorted((e for e in events if _is_cpu(e) and _stage_name(e) is not None), key=order):
        cpu_paths.setdefault(str(_stage_name(r)), []).append(_path(r, cache))
    device_count: dict[str, int] = {}
    for m in marks:
        device_count[str(_stage_name(m))] = device_count.get(str(_stage_name(m)), 0) + 1
    seen: dict[str, int] = {}
    out: list[tuple[float, float, tuple[str, ...]]] = []
    stack: list[tuple[float, float, tuple[str, ...]]] = []
    for m in marks:
        start, end = float(m.time_range.start), float(m.time_range.end)
        while stack and stack[-1][1] <= start:
            stack.pop()
        name = str(_stage_name(m))
        k = seen.get(name, 0)
        seen[name] = k + 1
        if len(cpu_paths.get(name, [])) == device_count[name]:
            path = cpu_paths[name][k]
        else:
            parent = stack[-1][2] if stack else ()
            path = parent if parent and parent[-1] == name else parent + (name,)
        stack.append((start, end, path))
        out.append((start, end, path))
    return out


def _cpu_items(events: list[Any]) -> list[tuple[str, float, Any]]:
    """(op name, self CPU microseconds, the op) for every op inside a profiled pair."""
    items = []
    for e in events:
        if not _is_cpu(e) or _is_marker(e) or getattr(e, "is_async", False):
            continue
        if getattr(e, "is_user_annotation", False) or getattr(e, "is_python_function", False):
            continue
        if not _within_root(e):
            continue
        self_us = e.time_range.end - e.time_range.start - sum(
            c.time_range.end - c.time_range.start for c in getattr(e, "cpu_children", []))
        if self_us > 0:
            items.append((e.name, float(self_us), e, e))
    return items


def analyse(events: Iterable[Any], runs: int, on_gpu: bool, top: int = 15
            ) -> tuple[float, list[StageRow], list[KernelRow]]:
    """Total time per pair (ms), the stage rows (tree order) and the top kernels/ops.

    GPU: kernel time; a kernel counts for every stage enclosing the CPU op that launched it, and
    the total is all kernel time in the profiled window. CPU: a stage's time is the wall time of
    its ranges; the total the wall time of the profiled pairs; ops ranked by self CPU time.
    """
    events = list(events)
    runs = max(1, runs)
    cache: dict[int, tuple[str, ...]] = {}
    ranges = [e for e in events if _is_cpu(e) and _stage_name(e) is not None]
    ranges.sort(key=lambda e: e.time_range.start)
    order: list[tuple[str, ...]] = []
    wall: dict[tuple[str, ...], float] = {}
    calls: dict[tuple[str, ...], int] = {}
    for r in ranges:
        path = _path(r, cache)
        parent = getattr(r, "cpu_parent", None)
        if parent is not None and _path(parent, cache) == path:
            continue  # a stage inside itself: counted once, at the outer range
        if path not in wall:
            order.append(path)
            wall[path] = 0.0
            calls[path] = 0
        wall[path] += r.time_range.end - r.time_range.start
        calls[path] += 1
    items = _device_items(events) if on_gpu else _cpu_items(events)
    # GPU: a kernel belongs to the stages whose device-side range holds it; where the profiler
    # recorded no device-side ranges, to the stages around the CPU op that launched it
    device_ranges = _device_stage_ranges(events, cache) if on_gpu else []
    starts = [r[0] for r in device_ranges]
    for r in device_ranges:  # stages seen only on the device side still get a row
        if r[2] not in wall:
            order.append(r[2])
            wall[r[2]], calls[r[2]] = 0.0, 0
    item_time: dict[tuple[str, ...], float] = {}
    per_kernel: dict[str, dict[tuple[str, ...], float]] = {}
    kernel_calls: dict[str, int] = {}
    for name, us, launcher, event in items:
        if device_ranges:
            path = innermost(device_ranges, starts, float(event.time_range.start))
        else:
            path = _path(launcher, cache) if launcher is not None else ()
        for k in range(1, len(path) + 1):
            item_time[path[:k]] = item_time.get(path[:k], 0.0) + us
        per_kernel.setdefault(name, {})
        per_kernel[name][path] = per_kernel[name].get(path, 0.0) + us
        kernel_calls[name] = kernel_calls.get(name, 0) + 1
    if on_gpu:
        total_us = sum(item[1] for item in items)
        stage_us = {p: item_time.get(p, 0.0) for p in order}
    else:
        total_us = sum(e.time_range.end - e.time_range.start for e in events
                       if _is_cpu(e) and e.name == ROOT)
        stage_us = dict(wall)
    total_ms = total_us / 1000.0 / runs

    def share(us: float) -> float:
        return us / total_us if total_us > 0 else 0.0

    rows = [StageRow("/".join(p), len(p) - 1, stage_us[p] / 1000.0 / runs,
                     wall[p] / 1000.0 / runs, calls[p] / runs, share(stage_us[p]))
            for p in _tree_order(order)]
    outside = total_us - sum(stage_us[p] for p in order if len(p) == 1)
    if outside > 0 and total_us > 0:
        rows.append(StageRow(UNMARKED, 0, outside / 1000.0 / runs, 0.0, 0.0, share(outside)))
    kernels = []
    for name, by_path in per_kernel.items():
        us = sum(by_path.values())
        main = max(by_path.items(), key=lambda kv: kv[1])[0]
        kernels.append(KernelRow(name, us / 1000.0 / runs, kernel_calls[name] / runs, share(us),
                                 "/".join(main) or "-"))
    kernels.sort(key=lambda k: -k.ms)
    return total_ms, rows, kernels[:top]


def _tree_order(paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Paths in first-seen order, each followed by its descendants."""
    children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for p in paths:
        children.setdefault(p[:-1], []).append(p)
    out: list[tuple[str, ...]] = []

    def walk(parent: tuple[str, ...]) -> None:
        for child in children.get(parent, []):
            out.append(child)
            walk(child)

    walk(())
    listed = set(out)
    return out + [p for p in paths if p not in listed]  # (a parent always precedes; kept safe)


# -- running a pipeline under the profiler -----------------------------------------------------

@dataclass
class ProfileConfig:
    """What `matchrt profile` runs: one matcher on one backend, precision, device and size."""

    matcher: str
    backend: str = "torch"
    precision: str = "fp32"
    device: str = "cpu"
    height: Optional[int] = None
    width: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False
    allow_partial: bool = False
    images: Optional[tuple[Any, Any]] = None  # two images as read_image gives them
    runs: int = 5
    warmup: int = 3
    top: int = 15
    trace: Optional[Path] = None
    workdir: Optional[Path] = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _default_images() -> tuple[Any, Any]:
    """The bundled MegaDepth pair when run from a checkout, else a fixed random pair."""
    from .images import read_image
    from .synthetic import bundled_images

    found = bundled_images()
    if len(found) >= 2:
        return read_image(found[0]), read_image(found[1])
    rng = np.random.default_rng(0)
    image = rng.random((480, 640, 3), dtype=np.float32)
    return image, np.ascontiguousarray(image[::-1])


def _eager_roots(pipe: Any, backend: str) -> Optional[list[Any]]:
    """The torch modules that run eagerly in this pipeline, or None when markers cannot show."""
    from .bench import VARIANTS

    plugin, opts = VARIANTS.get(backend, (backend, {}))
    if plugin != "torch" or opts.get("compile"):
        return None
    roots = [getattr(st.session, "module", None) for st in pipe.stages]
    if any(r is None or not hasattr(r, "modules") or hasattr(r, "_orig_mod") for r in roots):
        return None
    return roots


def run_profile(config: ProfileConfig, host: Any = None,
                progress: Optional[Callable[[str], None]] = None) -> tuple[ProfileReport, Any]:
    """Profile one pair through `config`'s pipeline; returns the report and the torch profiler."""
    import tempfile

    from .bench import open_backend
    from .host import get_host
    from .images import check_size
    from .runner import is_random, load_model, resolve_weights
    from .types import ExportOptions

    host = host or get_host()
    say = progress or (lambda msg: None)
    info = host.matcher(config.matcher)
    h = config.height or info.contract.default_height
    w = config.width or info.contract.default_width
    check_size(h, w, info.contract, config.matcher)
    if config.runs < 1:
        raise MatchrtError(f"--runs must be at least 1, got {config.runs}")
    paths = resolve_weights(info, config.weights, config.random_weights)
    say(f"{config.matcher}: loading weights")
    model, _ = load_model(host, config.matcher, paths, config.allow_partial, dict(config.options))
    export = ExportOptions(h, w, extra=dict(config.options))
    images = config.images or _default_images()
    with tempfile.TemporaryDirectory(prefix="matchrt-profile-") as tmp:
        pipe = open_backend(host, config.matcher, config.backend, config.precision, model, export,
                            config.device, config.workdir or Path(tmp), say, config.weights, config.random_weights)
        report, prof = _profile_pipeline(pipe, config, images, say)
    report.input_size = [h, w]
    report.provenance["random_weights"] = any(is_random(p) for p in paths.values())
    if report.provenance["random_weights"]:
        report.notes.append("random weights: timings are real; data-dependent work (e.g. how many "
                            "matches pass a threshold) may differ with trained weights")
    return report, prof


def _profile_pipeline(pipe: Any, config: ProfileConfig, images: tuple[Any, Any],
                      say: Callable[[str], None]) -> tuple[ProfileReport, Any]:
    """Warm up, then profile `config.runs` pairs (graph run + postprocess) and analyse them."""
    import torch

    from .bench import BenchConfig, provenance

    inputs, ctx = pipe.prepare(*images)
    say(f"{config.matcher}: warming up ({max(1, config.warmup)} pairs)")
    for _ in range(max(1, config.warmup)):  # the first run compiles and initialises
        pipe.postprocess(pipe.run(inputs), ctx)
    # the wall time without the profiler, from pairs after the warm-up: the warm-up pairs themselves
    # compile, and a CUDA-graph backend records its graphs in the second and third (eloftr compiled:
    # 25.6 ms "without the profiler" from those, against 6.2 ms with it)
    steady: list[float] = []
    for _ in range(min(config.runs, 3)):
        _sync(config.device)
        start = time.perf_counter()
        pipe.postprocess(pipe.run(inputs), ctx)
        _sync(config.device)
        steady.append(time.perf_counter() - start)
    roots = _eager_roots(pipe, config.backend)
    notes = []
    if roots is None:
        notes.append(f"stages: not available with --backend {config.backend} (compiled graphs, "
                     "ONNX and engines carry no stage markers); the kernel table and the total are "
                     "complete, and on a GPU the region table charges kernels to the compiled graph or "
                     "eager region that launched them. Run --backend torch for the eager per-stage profile.")
    on_gpu = config.device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    elif pipe.backend == "onnxruntime":
        notes.append("onnxruntime runs outside torch's profiler: its time shows as one block")
    say(f"{config.matcher}: profiling {config.runs} pairs")
    timed: list[float] = []
    # markers on for eager torch only: elsewhere the flag would just make torch.compile re-trace
    markers = recording(*roots) if roots is not None else nullcontext([])
    with markers as names, torch.profiler.profile(activities=activities) as prof:
        for _ in range(config.runs):
            _sync(config.device)
            start = time.perf_counter()
            with torch.profiler.record_function(ROOT):
                out = pipe.run(inputs)
                _sync(config.device)
                with torch.profiler.record_function(range_name(POSTPROCESS)):
                    pipe.postprocess(out, ctx)
                    _sync(config.device)
            timed.append(time.perf_counter() - start)
    if roots is not None and not names:
        notes.append(f"{config.matcher} marks no stages (see matchrt.profiling.mark_stages)")
    say("analysing the profile")
    total, stages, kernels = analyse(prof.events(), config.runs, on_gpu, config.top)
    if on_gpu and not total:
        notes.append("no CUDA kernel was recorded: is CUPTI available to torch.profiler here?")
    prov = provenance(BenchConfig([config.matcher], [config.backend], [config.precision], [],
                                  device=config.device, random_weights=config.random_weights))
    report = ProfileReport(
        matcher=config.matcher, backend=config.backend, precision=config.precision,
        device=config.device, time_kind="GPU kernel time" if on_gpu else "CPU time",
        input_size=[], runs=config.runs, total_ms=total, stages=stages, kernels=kernels,
        wall_ms={"profiled": 1000 * statistics.median(timed),
                 "unprofiled": 1000 * statistics.median(steady)},
        stage_markers=roots is not None, notes=notes, options=dict(pipe.options), provenance=prov)
    if config.trace:
        atomic_path(Path(config.trace), lambda tmp: prof.export_chrome_trace(str(tmp)))
    if on_gpu and roots is None:  # no stages: charge kernels to compiled graphs and eager regions
        report.regions = _regions(prof, config)
        report.notes.extend(_launch_bound(report.regions))
        report.notes.extend(_idle_inside(report.regions))
    return report, prof


def _regions(prof: Any, config: ProfileConfig) -> list[RegionRow]:
    """The region table, read back from the chrome trace (written to a temporary file if not asked)."""
    import tempfile

    if config.trace:
        return trace_regions(load_events(Path(config.trace)), config.runs)
    with tempfile.TemporaryDirectory(prefix="matchrt-trace-") as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return trace_regions(load_events(path), config.runs)


def _launch_bound(rows: list[RegionRow]) -> list[str]:
    """Notes on regions whose launching CPU time exceeds their kernels' GPU time (by a quarter)."""
    return [f"{r.name}: {r.cpu_ms:.1f} ms of CPU for {r.gpu_ms:.1f} ms of GPU work ({r.launches:g} launches): "
            "launch-bound, the GPU waits for Python; fewer launches or a CUDA graph pay here"
            for r in rows if r.name != "eager" and r.cpu_ms > 1.25 * r.gpu_ms and r.cpu_ms > 1.0]


def _idle_inside(rows: list[RegionRow]) -> list[str]:
    """Notes on regions whose GPU idles between their kernels for over 5% of their span (and 0.05 ms)."""
    return [f"{r.name}: the GPU idles {r.span_ms - r.gpu_ms:.2f} ms of its {r.span_ms:.2f} ms span between its "
            f"{r.launches:g} kernels and copies (launch latency of each, memsets the most): fewer kernels pay here"
            for r in rows if r.span_ms is not None and r.span_ms - r.gpu_ms > max(0.05 * r.span_ms, 0.05)]


def write_json(report: ProfileReport, path: Path) -> Path:
    """The report as JSON (stage and kernel tables, totals, provenance), written atomically."""
    text = json.dumps(report.to_json(), indent=1, default=str)
    return atomic_text(path, text)


def render(report: ProfileReport):
    """Rich tables: stages (indented by nesting) and the top kernels or ops."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    unit = "GPU ms" if report.time_kind.startswith("GPU") else "CPU ms"
    h, w = report.input_size
    title = (f"matchrt profile: {report.matcher} / {report.backend} / {report.precision} on "
             f"{report.device}, {h}x{w}, per pair (mean of {report.runs})")
    stages = Table(title=title, title_style="bold")
    for col in ("stage", unit, "share", "CPU wall ms", "calls"):
        stages.add_column(col, justify="left" if col == "stage" else "right")
    for r in report.stages:
        label = "  " * r.depth + r.name.rsplit("/", 1)[-1]
        stages.add_row(label, f"{r.ms:.3f}", f"{100 * r.share:.1f}%",
                       f"{r.cpu_ms:.3f}" if r.cpu_ms else "-", f"{r.calls:g}" if r.calls else "-")
    stages.add_row(Text("total", style="bold"), Text(f"{report.total_ms:.3f}", style="bold"), "100%",
                   "", "")
    what = "kernels" if report.time_kind.startswith("GPU") else "ops"
    kernels = Table(title=f"top {len(report.kernels)} {what} by self time", title_style="bold")
    for col in (what[:-1], f"self {unit}", "share", "calls", "stage"):
        kernels.add_column(col, justify="left" if col in (what[:-1], "stage") else "right",
                           overflow="fold")
    for k in report.kernels:
        kernels.add_row(k.name[:100], f"{k.ms:.3f}", f"{100 * k.share:.1f}%", f"{k.calls:g}", k.stage)
    tables: list[Any] = [stages, kernels]
    if report.regions:
        by_region = Table(title="GPU time by compiled graph / eager region (who launched each kernel)",
                          title_style="bold")
        for col in ("region", "GPU ms", "GPU span ms", "share", "CPU ms", "launches"):
            by_region.add_column(col, justify="left" if col == "region" else "right")
        for g in report.regions:
            by_region.add_row(g.name, f"{g.gpu_ms:.3f}", f"{g.span_ms:.3f}" if g.span_ms is not None else "-",
                              f"{100 * g.share:.1f}%", f"{g.cpu_ms:.3f}" if g.cpu_ms else "-", f"{g.launches:g}")
        tables.append(by_region)
    wall = report.wall_ms
    lines = [f"wall time per pair: {wall['profiled']:.2f} ms profiled"
             + (f", {wall['unprofiled']:.2f} ms without the profiler" if wall.get("unprofiled") else "")]
    lines += report.notes
    return Group(*tables, *(Text(line, style="yellow" if i else "") for i, line in enumerate(lines)))


__all__ = ["KernelRow", "ProfileConfig", "ProfileReport", "RegionRow", "StageRow", "analyse", "render",
           "run_profile", "write_json"]
