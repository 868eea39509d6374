"""The `matchrt` command line: one command per pipeline step, each usable alone."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer

from .atomic import atomic_text

app = typer.Typer(
    help="Turn image matchers into ONNX graphs and TensorRT engines; match, check and benchmark them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

MatcherOpt = typer.Option(None, "--matcher", "-m", help="Registered matcher (see `matchrt plugins`).")
CheckpointOpt = typer.Option(None, "--checkpoint", "-c", help="Model checkpoint (.ckpt/.pth/.pt/.safetensors).")
Dinov2Opt = typer.Option(None, "--dinov2", help="DINOv2 ViT-L/14 weights (RoMa matchers).")
WeightsOpt = typer.Option(None, "--weights", help="Other weight sources as NAME=PATH (repeatable).")
RandomOpt = typer.Option(False, "--random-weights",
                         help="Untrained weights in the real checkpoint layout (speed tests only).")
PartialOpt = typer.Option(False, "--allow-partial", help="Load a checkpoint that does not map 100% (warns).")
OptionOpt = typer.Option(None, "--option", "-O", help="Matcher option KEY=VALUE (repeatable, see `info`).")
OnnxOpt = typer.Option(None, "--onnx", help="Run this exported graph (onnxruntime).")
EngineOpt = typer.Option(None, "--engine", help="Run this TensorRT engine or AOTInductor package (.pt2).")
RunBackendOpt = typer.Option(None, "--backend", help="torch, onnxruntime, tensorrt or inductor (default "
                             "from the file).")


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # tables printed to a file or pipe (CI logs, remote runs) get room instead of 80 columns
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


class _ProgressLines:
    """Where no spinner can be drawn (a log file, CI, a remote run): each step a line on stderr with the
    seconds since the start, so that a long compile shows where it is and a hang shows where it stopped."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.start = time.perf_counter()
        self.last = ""

    def update(self, message: str) -> None:
        if message != self.last:
            self.last = message
            self.console.print(f"[{time.perf_counter() - self.start:7.1f} s] {message}", highlight=False,
                               markup=False, soft_wrap=True)


@contextlib.contextmanager
def _status(console: Any, message: str) -> Iterator[Any]:
    """Progress of a long command: rich's spinner on a terminal, else one timestamped line per step."""
    if console.is_terminal:
        with console.status(message) as status:
            yield status
        return
    lines = _ProgressLines(console)
    lines.update(message)
    yield lines


def clean_errors(func: Callable) -> Callable:
    """Print user mistakes as one clear message and exit 2, instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import MatchrtError

        try:
            return func(*args, **kwargs)
        except MatchrtError as exc:
            from rich.markup import escape

            # escaped: messages hold brackets such as `pip install 'matchrt[tensorrt]'`
            _console(stderr=True).print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False,
                                        soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: Optional[List[str]], what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"{what} must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def _weights(checkpoint: Optional[Path], dinov2: Optional[Path], weights: Optional[List[str]]):
    given: dict[str, Optional[Path]] = {"checkpoint": checkpoint, "dinov2": dinov2}
    given.update({k: Path(v) for k, v in _pairs(weights, "--weights").items()})
    return {k: v for k, v in given.items() if v is not None}


def _extra(options: Optional[List[str]], **known: Any) -> dict[str, Any]:
    extra = {k: v for k, v in known.items() if v is not None}
    extra.update({k: _parse_value(v) for k, v in _pairs(options, "--option").items()})
    return extra


def _need_matcher(matcher: Optional[str]) -> str:
    if not matcher:
        raise typer.BadParameter("--matcher is required; `matchrt plugins` lists them")
    return matcher


@app.command()
@clean_errors
def plugins(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List installed plugins, the matchers and backends they register, and their hooks."""
    from .host import get_host

    host = get_host()
    matchers, backends = host.matchers(), host.backends()
    rows = []
    for name, rec in host.records.items():
        plugin = host.pm.get_plugin(name)
        rows.append({
            "name": name,
            "version": rec.version,
            "distribution": rec.distribution,
            "builtin": rec.builtin,
            "hooks": host.hook_names(plugin) if plugin is not None else [],
            "matchers": [m for m in matchers if host.owner(m) == name],
            "backends": [b for b in backends if host.owner(b) == name],
            "error": rec.error,
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    table = Table(title="matchrt plugins")
    for col in ("plugin", "distribution", "registers", "hooks"):
        table.add_column(col)
    for r in rows:
        regs = ", ".join(r["matchers"] + r["backends"]) or ("[red]failed[/]" if r["error"] else "")
        table.add_row(r["name"], f"{r['distribution']} {r['version']}", regs, ", ".join(r["hooks"]))
    _console().print(table)


@app.command()
@clean_errors
def info(matcher: Optional[str] = MatcherOpt) -> None:
    """Show a matcher's input contract, weight files, options and limits."""
    from .host import get_host

    m = get_host().matcher(_need_matcher(matcher))
    c = m.contract
    lines = [
        f"{m.name}: {m.description}",
        f"  input: {c.channels} channel(s), sides multiple of {c.side_multiple}, default "
        f"{c.default_height}x{c.default_width}, resize by {c.resize}"
        + (", square only" if c.square else ""),
        f"  output: {m.output}",
        "  weights: " + "; ".join(f"--{s.name} ({s.description})" for s in m.weight_sources),
        "  options: " + (", ".join(f"{k}={v!r}" for k, v in m.options.items()) or "none"),
        "  tolerances: " + ", ".join(f"{k} {v:g}" for k, v in m.tolerances.items()),
    ]
    lines += [f"  note: {n}" for n in m.notes]
    typer.echo("\n".join(lines))


@app.command()
@clean_errors
def weights(
    matcher: Optional[str] = MatcherOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    dinov2: Optional[Path] = Dinov2Opt,
    weights: Optional[List[str]] = WeightsOpt,
    random_weights: bool = RandomOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Map a checkpoint onto a matcher and report every tensor: mapped, missing, unused, mismatched."""
    from .host import get_host
    from .runner import map_weights, resolve_weights

    host = get_host()
    name = _need_matcher(matcher)
    paths = resolve_weights(host.matcher(name), _weights(checkpoint, dinov2, weights), random_weights)
    report = map_weights(host, name, paths).report
    typer.echo(json.dumps(report.to_dict(), indent=1) if as_json else report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@clean_errors
def export(
    matcher: Optional[str] = MatcherOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    dinov2: Optional[Path] = Dinov2Opt,
    weights: Optional[List[str]] = WeightsOpt,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="ONNX file (default <matcher>.onnx)."),
    height: Optional[int] = typer.Option(None, help="Input height (default: the matcher's)."),
    width: Optional[int] = typer.Option(None, help="Input width (default: the matcher's)."),
    batch: int = typer.Option(1, help="Batch size of the graph."),
    opset: int = typer.Option(17, help="ONNX opset."),
    dynamic: bool = typer.Option(False, help="Dynamic batch and image axes."),
    max_matches: Optional[int] = typer.Option(None, help="Sparse matchers: fixed output size K."),
    threshold: Optional[float] = typer.Option(None, help="Sparse matchers: confidence threshold."),
    gp_solve: Optional[str] = typer.Option(None, help="RoMa: exact (graph sequence) or iterative."),
    upsample_res: Optional[int] = typer.Option(None, help="RoMa: upsampling pass size (0 = off)."),
    option: Optional[List[str]] = OptionOpt,
    random_weights: bool = RandomOpt,
    allow_partial: bool = PartialOpt,
    lint: bool = typer.Option(True, help="Run the TensorRT op check on the graph."),
) -> None:
    """Export a matcher with its weights to ONNX (checked with onnx.checker and the TensorRT lint)."""
    from .export import export_plan, graph_size
    from .host import get_host
    from .images import check_size
    from .runner import is_random, load_model, resolve_weights
    from .types import ExportOptions
    from .weights import sha256_file

    host = get_host()
    name = _need_matcher(matcher)
    info_ = host.matcher(name)
    h = height or info_.contract.default_height
    w = width or info_.contract.default_width
    check_size(h, w, info_.contract, name)
    extra = _extra(option, max_matches=max_matches, threshold=threshold, gp_solve=gp_solve,
                   upsample_res=upsample_res)
    output = output or Path(f"{name}.onnx")
    console = _console(stderr=True)
    with _status(console, f"loading {name} weights") as status:
        paths = resolve_weights(info_, _weights(checkpoint, dinov2, weights), random_weights)
        model, report = load_model(host, name, paths, allow_partial, extra)
        status.update("building the export wrapper")
        plan = host.pm.hook.export_plan(
            matcher=name, model=model,
            options=ExportOptions(h, w, batch=batch, opset=opset, dynamic=dynamic, extra=extra))
        start = time.perf_counter()
        status.update("hashing weight files")
        digests = {k: ("random" if is_random(p) else sha256_file(p)) for k, p in paths.items()}
        manifest = export_plan(plan, output, opset=opset, version=info_.version,
                               progress=lambda msg: status.update(msg), weights_sha256=digests)
    data = json.loads(manifest.read_text())
    for st in data["stages"]:
        path = manifest.parent / st["file"]
        console.print(f"wrote {path} ({graph_size(path) / 1e6:.1f} MB, {st['seconds']:.1f} s)")
    console.print(f"manifest {manifest}; export took {time.perf_counter() - start:.1f} s")
    if random_weights:
        console.print("[yellow]random weights: this graph is for speed tests only[/]")
    if lint:
        problems = _lint_files([manifest.parent / st["file"] for st in data["stages"]])
        if problems:
            raise typer.Exit(1)


def _lint_files(paths: list[Path]) -> int:
    try:
        from .lint import lint_onnx
    except ImportError:
        return 0
    errors = 0
    for path in paths:
        problems = lint_onnx(path)
        bad = [p for p in problems if getattr(p, "severity", "error") == "error"]
        errors += len(bad)
        for p in problems:
            typer.echo(f"{path.name}: {p}", err=True)
        if not problems:
            typer.echo(f"{path.name}: TensorRT op check passed", err=True)
    return errors


@app.command(name="lint")
@clean_errors
def lint_cmd(onnx_files: List[Path] = typer.Argument(..., help="ONNX graphs to check.")) -> None:
    """Check every node of a graph against what TensorRT's ONNX parser supports."""
    for f in onnx_files:
        if not f.exists():
            raise typer.BadParameter(f"{f} does not exist")
    if _lint_files(list(onnx_files)):
        raise typer.Exit(1)


@app.command()
@clean_errors
def build(
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Graph from `matchrt export` (its manifest "
                                        "beside it); tensorrt and onnxruntime build from it."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Engine file (default: <onnx>.engine; "
                                          "inductor: <matcher>.pt2)."),
    backend: Optional[str] = typer.Option(None, help="tensorrt (engine) or onnxruntime (optimised graph) "
                                          "from --onnx; inductor (AOTInductor .pt2) from -m/-c. Default: "
                                          "inductor with -m and no --onnx, else tensorrt."),
    precision: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 (default fp16; inductor on "
                                            "CPU: fp32)."),
    strongly_typed: bool = typer.Option(False, "--strongly-typed", help="TensorRT strongly typed network."),
    workspace: float = typer.Option(8.0, help="Builder workspace limit in GiB."),
    opt_level: int = typer.Option(3, help="TensorRT builder optimisation level (0-5)."),
    min_size: Optional[str] = typer.Option(None, help="Dynamic graphs: HxW of the smallest input."),
    opt_size: Optional[str] = typer.Option(None, help="Dynamic graphs: HxW to tune for."),
    max_size: Optional[str] = typer.Option(None, help="Dynamic graphs: HxW of the largest input."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file (reused and updated)."),
    force: bool = typer.Option(False, help="Rebuild even if an identical engine exists."),
    matcher: Optional[str] = typer.Option(None, "--matcher", "-m", help="inductor: the matcher to build "
                                          "from its torch model."),
    checkpoint: Optional[Path] = CheckpointOpt,
    dinov2: Optional[Path] = Dinov2Opt,
    weights: Optional[List[str]] = WeightsOpt,
    random_weights: bool = RandomOpt,
    allow_partial: bool = PartialOpt,
    option: Optional[List[str]] = OptionOpt,
    height: Optional[int] = typer.Option(None, help="inductor: input height (default: the matcher's)."),
    width: Optional[int] = typer.Option(None, help="inductor: input width (default: the matcher's)."),
    device: Optional[str] = typer.Option(None, help="inductor: cpu or cuda (default: cuda when present); "
                                         "the package runs only there."),
    inductor_config: Optional[List[str]] = typer.Option(None, "--inductor-config", help="inductor: "
                                                        "torch._inductor config KEY=VALUE (repeatable)."),
) -> None:
    """Build a deployable engine: TensorRT or an optimised ONNX from an exported graph, or an
    AOTInductor package (.pt2) from the torch model."""
    from .export import load_manifest, manifest_path
    from .host import get_host

    torch_inputs = {"--matcher": matcher, "--checkpoint": checkpoint, "--dinov2": dinov2,
                    "--weights": weights, "--random-weights": random_weights or None,
                    "--option": option, "--height": height, "--width": width,
                    "--inductor-config": inductor_config}
    backend = backend or ("inductor" if onnx is None and matcher else "tensorrt")
    if backend == "inductor":
        if onnx is not None:
            raise typer.BadParameter("--backend inductor builds from the torch model, not from ONNX: "
                                     "pass -m MATCHER -c CKPT (or --random-weights) instead of --onnx")
        _build_package(_need_matcher(matcher), _weights(checkpoint, dinov2, weights), random_weights,
                       allow_partial, _extra(option), height, width, precision, device, output, force,
                       _pairs(inductor_config, "--inductor-config"))
        return
    given = [flag for flag, value in torch_inputs.items() if value]
    if onnx is None or given:
        raise typer.BadParameter(
            f"--backend {backend} builds from an exported ONNX graph: "
            + (f"{', '.join(given)} belong to --backend inductor; " if given else "")
            + "run `matchrt export -m MATCHER -o M.onnx`, then `matchrt build --onnx M.onnx`, or build an "
            "AOTInductor package from the checkpoint with `matchrt build -m MATCHER -c CKPT --backend inductor`")
    precision = precision or "fp16"
    host = get_host()
    host.backend(backend)
    manifest = load_manifest(onnx)
    base = Path(manifest["dir"])
    suffix = ".engine" if backend == "tensorrt" else ".ort.onnx"
    output = output or onnx.with_name(onnx.stem + suffix)
    if not output.name.endswith(suffix):
        raise typer.BadParameter(f"--output must end in {suffix} for the {backend} backend")
    options = {"precision": precision, "strongly_typed": strongly_typed, "workspace_gb": workspace,
               "opt_level": opt_level, "min_size": min_size, "opt_size": opt_size,
               "max_size": max_size, "timing_cache": str(timing_cache) if timing_cache else None,
               "force": force, "matcher": manifest["matcher"]}
    stages = []
    for st in manifest["stages"]:
        src = base / st["file"]
        dst = output
        if len(manifest["stages"]) > 1:  # model.engine -> model.<stage>.engine
            dst = output.with_name(output.name.replace(suffix, "") + f".{st['name']}{suffix}")
        built = host.pm.hook.build_engine(backend=backend, onnx_path=src, output=dst,
                                          options=dict(options, fp32_layers=st.get("fp32_layers", [])))
        if built is None:
            raise typer.BadParameter(f"backend {backend!r} builds no engines")
        stages.append(dict(st, file=Path(built).name))
        typer.echo(f"built {built}", err=True)
    out_manifest = dict(manifest, stages=stages, backend=backend, precision=precision)
    out_manifest.pop("dir", None)
    mpath = manifest_path(output)
    mpath.write_text(json.dumps(out_manifest, indent=1))
    typer.echo(f"manifest {mpath}", err=True)


def _build_package(matcher: str, weights: dict[str, Path], random_weights: bool, allow_partial: bool,
                   extra: dict[str, Any], height: Optional[int], width: Optional[int],
                   precision: Optional[str],
                   device: Optional[str], output: Optional[Path], force: bool,
                   inductor_configs: dict[str, str]) -> None:
    """`matchrt build --backend inductor`: the matcher's export plan compiled into .pt2 packages."""
    from .host import get_host
    from .images import check_size
    from .package import build_packages, check_request, package_context
    from .runner import load_model, resolve_weights
    from .types import ExportOptions

    host = get_host()
    host.backend("inductor")
    info_ = host.matcher(matcher)
    h = height or info_.contract.default_height
    w = width or info_.contract.default_width
    check_size(h, w, info_.contract, matcher)
    output = output or Path(f"{matcher}.pt2")
    if not output.name.endswith(".pt2"):
        raise typer.BadParameter(f"--output must end in .pt2 for the inductor backend, got {output}")
    if precision is None:
        import torch

        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        precision = "fp16" if cuda else "fp32"
    check_request(precision, device)  # before the weights load
    console = _console(stderr=True)
    with _status(console, f"loading {matcher} weights") as status:
        paths = resolve_weights(info_, weights, random_weights)
        model, _ = load_model(host, matcher, paths, allow_partial, extra)
        status.update("building the export wrapper")
        plan = host.pm.hook.export_plan(matcher=matcher, model=model,
                                        options=ExportOptions(h, w, extra=extra))
        if plan is None:
            raise typer.BadParameter(f"no installed plugin exports {matcher!r}")
        status.update("hashing weights and plugin sources")
        context = package_context(host, matcher, paths, [g.module for g in plan.graphs], extra,
                                  height, width, output)
        start = time.perf_counter()

        def say(message: str) -> None:
            status.update(f"{message} ({time.perf_counter() - start:.0f} s)")
            if message.startswith(("wrote", "building", "equivalent", "note:")) or "up to date" in message:
                console.print(message, highlight=False)

        manifest = build_packages(host, plan, output, context, {
            "precision": precision, "device": device, "force": force, "progress": say,
            "inductor_configs": {k: _parse_value(v) for k, v in inductor_configs.items()}})
    console.print(f"manifest {manifest}")
    if random_weights:
        console.print("[yellow]random weights: this package is for speed tests only[/]")


def _image_paths(images: List[Path]) -> tuple[Path, Path]:
    if len(images) == 1 and images[0].is_dir():
        found = sorted(p for p in images[0].iterdir()
                       if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
        if len(found) != 2:
            raise typer.BadParameter(f"{images[0]} should hold exactly two images, found {len(found)}")
        return found[0], found[1]
    if len(images) != 2:
        raise typer.BadParameter("give two images, or one folder holding two images")
    return images[0], images[1]


def _artifact_backend(engine: Optional[Path], onnx: Optional[Path]) -> Optional[str]:
    """The backend a file runs on: .pt2 -> inductor, other engines -> tensorrt, ONNX -> onnxruntime."""
    if engine is not None:
        return "inductor" if engine.name.endswith(".pt2") else "tensorrt"
    return "onnxruntime" if onnx is not None else None


def _backend_options(device: str, precision: str, compile_: bool = False) -> dict[str, Any]:
    return {"device": device, "precision": precision, "compile": compile_}


@app.command()
@clean_errors
def match(
    images: List[Path] = typer.Argument(..., help="Two images, or a folder holding two."),
    matcher: Optional[str] = MatcherOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    dinov2: Optional[Path] = Dinov2Opt,
    weights: Optional[List[str]] = WeightsOpt,
    onnx: Optional[Path] = OnnxOpt,
    engine: Optional[Path] = EngineOpt,
    backend: Optional[str] = RunBackendOpt,
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda for engines, else cpu)."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or bf16 (torch; engines keep their own)."),
    height: Optional[int] = typer.Option(None, help="Input height (torch backend)."),
    width: Optional[int] = typer.Option(None, help="Input width (torch backend)."),
    option: Optional[List[str]] = OptionOpt,
    model: str = typer.Option("F", help="RANSAC model: F (any scene), H (planar scenes or pure "
                              "rotation) or E (calibrated)."),
    ransac_threshold: float = typer.Option(3.0, help="RANSAC inlier threshold in pixels."),
    ransac_method: str = typer.Option("magsac", help="magsac, accurate, default, prosac or ransac."),
    draw: str = typer.Option("lines", help="lines or points."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-d", help="Write matches.json and pictures here."),
    random_weights: bool = RandomOpt,
    allow_partial: bool = PartialOpt,
) -> None:
    """Match two images, fit a geometric model, and save the matches and a picture."""
    from .geometry import estimate
    from .images import read_image
    from .runner import open_pipeline

    p0, p1 = _image_paths(images)
    image0, image1 = read_image(p0), read_image(p1)  # fail on bad images before loading weights
    artifact = engine or onnx
    backend = backend or _artifact_backend(engine, onnx) or "torch"
    device = device or ("cuda" if backend == "tensorrt" else "cpu")
    console = _console(stderr=True)
    with _status(console, "loading") as status:
        pipe = open_pipeline(
            matcher, backend, _weights(checkpoint, dinov2, weights), artifact, height, width,
            _extra(option), _backend_options(device, precision), allow_partial, random_weights,
            progress=lambda m: status.update(m))
        status.update("matching")
        start = time.perf_counter()
        matches = pipe.match(image0, image1, _extra(option))
        seconds = time.perf_counter() - start
        geo = estimate(matches, model, ransac_threshold, ransac_method)
    matches.metadata.update({"image0": str(p0), "image1": str(p1), "seconds": round(seconds, 4),
                             "random_weights": random_weights, "precision": precision})
    console.print(f"{len(matches)} matches, {geo.num_inliers} {model} inliers "
                  f"({seconds * 1000:.0f} ms, {pipe.info.name} on {pipe.backend})")
    if output_dir is None:
        return
    from .viz import draw_matches, draw_warp, save_png

    output_dir.mkdir(parents=True, exist_ok=True)
    matches.to_json(output_dir / "matches.json", inliers=geo.inliers.tolist(),
                    model=None if geo.model is None else geo.model.tolist(), model_kind=model)
    title = f"{pipe.info.name}: {geo.num_inliers}/{len(matches)} {model} inliers"
    if random_weights:
        title += " (random weights)"
    save_png(draw_matches(image0, image1, matches, geo.inliers, draw, title=title),
             output_dir / "matches.png")
    if matches.warp is not None and matches.certainty is not None:
        save_png(draw_warp(image0, image1, matches.warp, matches.certainty), output_dir / "warp.png")
    console.print(f"wrote {output_dir / 'matches.json'} and pictures in {output_dir}")


@app.command()
@clean_errors
def check(
    images: Optional[List[Path]] = typer.Argument(None, help="Two images (default: a synthetic pair)."),
    matcher: Optional[str] = MatcherOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    dinov2: Optional[Path] = Dinov2Opt,
    weights: Optional[List[str]] = WeightsOpt,
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Exported graph."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="TensorRT engine or AOTInductor package (.pt2)."),
    backend: Optional[str] = typer.Option(None, help="Backend under test (default from the file: .pt2 "
                                          "inductor, engine tensorrt, else onnxruntime)."),
    reference: str = typer.Option("torch", help="Reference backend."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: an inductor package's own "
                                         "device, else cpu)."),
    precision: Optional[str] = typer.Option(None, help="Precision of the backend under test (default: "
                                            "the file's, else fp32)."),
    option: Optional[List[str]] = OptionOpt,
    random_weights: bool = RandomOpt,
) -> None:
    """Run two backends on the same inputs and print max abs and relative error per output."""
    import numpy as np

    from .compare import compare_outputs
    from .export import load_manifest
    from .images import read_image
    from .runner import open_pipeline

    artifact = engine or onnx
    backend = backend or _artifact_backend(engine, onnx) or "onnxruntime"
    extra = _extra(option)
    size: tuple[Optional[int], Optional[int]] = (None, None)
    if artifact is not None:
        manifest = load_manifest(artifact)
        matcher = matcher or manifest["matcher"]
        size = tuple(manifest["input_size"]) or size  # type: ignore[assignment]
        extra = {**manifest.get("options", {}), **extra}
        precision = precision or manifest.get("precision")
        if backend == "inductor":
            device = device or manifest.get("device")
    precision = precision or "fp32"
    device = device or "cpu"
    name = _need_matcher(matcher)
    w = _weights(checkpoint, dinov2, weights)

    def open_(b: str, prec: str):
        return open_pipeline(name, b, w, None if b == "torch" else artifact, size[0], size[1], extra,
                             _backend_options(device, prec), random_weights=random_weights)

    ref, test = open_(reference, "fp32"), open_(backend, precision)
    if images:
        p0, p1 = _image_paths(images)
        im0, im1 = read_image(p0), read_image(p1)
    else:
        rng = np.random.default_rng(0)
        im0 = rng.random((480, 640, 3), dtype=np.float32)
        im1 = np.ascontiguousarray(im0[::-1])
    inputs, _ = ref.prepare(im0, im1)
    rows = compare_outputs(ref.run(inputs), test.run(inputs), ref.info.tolerances.get(precision, 1e-2))
    failed = False
    for row in rows:
        typer.echo(str(row))
        failed |= not getattr(row, "ok", True)
    if failed:
        raise typer.Exit(1)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _per_matcher(values: Optional[List[str]], matchers: list[str], flag: str) -> dict[str, Path]:
    """`--checkpoint PATH` (one matcher) or `--checkpoint MATCHER=PATH` (several)."""
    out: dict[str, Path] = {}
    for v in values or []:
        if "=" in v and v.split("=", 1)[0] in matchers:
            k, p = v.split("=", 1)
            out[k] = Path(p)
        elif len(matchers) == 1:
            out[matchers[0]] = Path(v)
        else:
            raise typer.BadParameter(f"with several matchers, pass {flag} MATCHER=PATH")
    return out


def _size(text: str) -> tuple[int, int]:
    """`832` -> (832, 832); `480x640` -> (480, 640)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise typer.BadParameter(f"--size takes S or HxW (positive integers), got {text!r}")
    return parts[0], parts[1]


def _bench_sizes(values: Optional[List[str]], matchers: list[str]) -> dict[str, list[tuple[int, int]]]:
    """`--size 640,832` (every matcher) and `--size eloftr=640,832` (one matcher)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for value in values or []:
        key, _, sizes = value.rpartition("=")
        if key and key not in matchers:
            raise typer.BadParameter(f"--size {value}: {key!r} is not one of the benchmarked "
                                     f"matchers ({', '.join(matchers)})")
        out.setdefault(key, []).extend(_size(v) for v in _split(sizes))
    return out


def _batches(value: str) -> list[int]:
    try:
        batches = [int(v) for v in _split(value)]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise typer.BadParameter(f"--batch takes positive integers, comma-separated; got {value!r}")
    return batches


def _sweeps(values: Optional[List[str]]) -> dict[str, list[Any]]:
    """`--sweep roma_plus.upsample_res=672,864` -> {"roma_plus.upsample_res": [672, 864]}."""
    out: dict[str, list[Any]] = {}
    for key, text in _pairs(values, "--sweep").items():
        out[key] = [_parse_value(v) for v in _split(text)]
        if not out[key]:
            raise typer.BadParameter(f"--sweep {key}= needs at least one value")
    return out


@app.command()
@clean_errors
def bench(
    matcher: str = typer.Option(..., "--matcher", "-m", help="Comma-separated matchers."),
    backend: str = typer.Option("torch,onnxruntime,tensorrt", help="Comma-separated: torch, "
                                "torch-compile, torch-compile-cudagraph, onnxruntime, tensorrt, "
                                "tensorrt-cudagraph, inductor, inductor-cudagraph."),
    precision: str = typer.Option("fp32,fp16", help="Comma-separated: fp32, fp16, bf16."),
    size: Optional[List[str]] = typer.Option(None, help="Input sizes, comma-separated, each S (square) "
                                             "or HxW; MATCHER=SIZES for one matcher (repeatable). "
                                             "Default: each matcher's."),
    batch: str = typer.Option("1", help="Comma-separated batch sizes: pairs per graph call."),
    sweep: Optional[List[str]] = typer.Option(None, help="[MATCHER.]KEY=V1,V2: a matcher option "
                                              "whose values each get their rows, e.g. "
                                              "roma_plus.upsample_res=672,864 (repeatable)."),
    pairs: Optional[Path] = typer.Option(None, help="Folder of images, matched in consecutive pairs."),
    synthetic: int = typer.Option(4, help="Synthetic homography pairs from --images (if no --pairs)."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Real images for synthetic pairs."),
    runs: int = typer.Option(50, help="Timed runs per combination."),
    warmup: int = typer.Option(10, help="Untimed warm-up runs."),
    time_budget: Optional[float] = typer.Option(None, help="Seconds per combination before timing "
                                                "stops early (at least 3 runs)."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda when present)."),
    checkpoint: Optional[List[str]] = typer.Option(None, "--checkpoint", "-c", help="PATH or MATCHER=PATH."),
    dinov2: Optional[List[str]] = typer.Option(None, "--dinov2", help="PATH or MATCHER=PATH."),
    random_weights: bool = RandomOpt,
    option: Optional[List[str]] = OptionOpt,
    workdir: Optional[Path] = typer.Option(None, help="Keep exported graphs and engines here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write results and provenance as JSON."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a latency chart as PNG."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the table as Markdown."),
) -> None:
    """Benchmark matchers x backends x precisions (x sizes x batches) side by side on the same inputs."""
    from .bench import Bench, BenchConfig, BenchInput, markdown_table, plot, render_table, write_json
    from .images import read_image
    from .synthetic import bundled_images, homography_pairs

    matchers = _split(matcher)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs: list[BenchInput] = []
    if pairs is not None:
        files = sorted(p for p in pairs.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if len(files) < 2:
            raise typer.BadParameter(f"{pairs} holds fewer than two images")
        for a, b in zip(files[0::2], files[1::2]):
            inputs.append(BenchInput(f"{a.name}|{b.name}", read_image(a), read_image(b)))
    else:
        sources = list(images or bundled_images())
        if not sources:
            raise typer.BadParameter("no images for synthetic pairs: pass --images or --pairs")
        loaded = [read_image(p) for p in sources]
        for hp in homography_pairs(loaded, synthetic, size=(480, 640), names=[p.name for p in sources]):
            inputs.append(BenchInput(hp.name, hp.image0, hp.image1, hp.homography))
    ckpts = _per_matcher(checkpoint, matchers, "--checkpoint")
    dinos = _per_matcher(dinov2, matchers, "--dinov2")
    weights_by = {m: {k: v for k, v in (("checkpoint", ckpts.get(m)), ("dinov2", dinos.get(m)))
                      if v is not None} for m in matchers}
    config = BenchConfig(matchers, _split(backend), _split(precision), inputs, runs, warmup, device,
                         None, weights_by, random_weights, _extra(option), workdir,
                         time_budget=time_budget, sizes=_bench_sizes(size, matchers),
                         batches=_batches(batch), sweeps=_sweeps(sweep))
    console = _console(stderr=True)
    with _status(console, "benchmarking") as status:
        b = Bench(config, progress=lambda m: status.update(m),
                  on_row=(lambda bench: write_json(bench, json_out)) if json_out else None)
        rows = b.run()
    any_random = any(r.random_weights for r in rows)
    _console().print(render_table(rows, any_random, f"matchrt bench on {device}"))
    peak = b.meta.get("peak_fp16_tflops")
    if peak:
        typer.echo(f"measured fp16 matrix-product peak: {peak:.0f} TFLOP/s")
    for m, d in b.meta["matchers"].items():
        for shape in d.get("shapes", []):
            if not shape.get("tflop_per_pair"):
                continue
            label = "x".join(map(str, shape["input_size"])) + "".join(
                f" {k}={v}" for k, v in shape["sweep"].items())
            typer.echo(f"{m} {label}: {shape['tflop_per_pair']:.3f} TFLOP per pair (torch FLOP "
                       f"counter), {shape['megapixels']:.2f} MP per pair")
            for r in rows:
                if (r.matcher == m and r.status == "ok" and peak and r.input_size == shape["input_size"]
                        and r.sweep == shape["sweep"]):
                    achieved = shape["tflop_per_pair"] / (r.ms_per_pair["median"] / 1000)
                    typer.echo(f"  {r.backend} {r.precision} batch {r.batch}: {achieved:.1f} TFLOP/s "
                               f"= {100 * achieved / peak:.1f}% of the measured peak")
    if json_out:
        typer.echo(f"wrote {write_json(b, json_out)}", err=True)
    if plot_out:
        import torch

        card = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
        typer.echo(f"wrote {plot(rows, plot_out, any_random, device=card)}", err=True)
    if markdown_out:
        atomic_text(markdown_out, markdown_table(rows, any_random))
        typer.echo(f"wrote {markdown_out}", err=True)


@app.command(name="bench-report")
@clean_errors
def bench_report(
    files: List[Path] = typer.Argument(..., exists=True, dir_okay=False, help="JSON files written by "
                                       "`matchrt bench --json`."),
    one_machine: bool = typer.Option(False, "--one-machine", help="The files come from one GPU: pair rows "
                                     "across files that record no GPU UUID (written before the bench "
                                     "recorded it)."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a latency chart as PNG."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the table as Markdown."),
) -> None:
    """Rows of several bench runs in one table, each beside its speed-up over the eager fp32 row of the
    same GPU (same matcher, input, options and batch)."""
    from .bench import plot
    from .bench_report import collect, markdown, render_table, unmatched

    entries = collect(list(files), one_machine)
    _console().print(render_table(entries))
    missing = unmatched(entries)
    if missing:
        typer.echo(f"{len(missing)} row(s) without an eager fp32 row of their kind from the same GPU "
                   "(\"-\"); files that record no GPU UUID pair across files only with --one-machine", err=True)
    any_random = any(e.row.random_weights for e in entries)
    if plot_out:
        cards = ", ".join(dict.fromkeys(e.gpu for e in entries))
        suffixes = ["" if e.speedup is None else f" ({e.speedup:.2f}x)" for e in entries]
        typer.echo(f"wrote {plot([e.row for e in entries], plot_out, any_random, cards, suffixes)}", err=True)
    if markdown_out:
        typer.echo(f"wrote {atomic_text(markdown_out, markdown(entries))}", err=True)


@app.command()
@clean_errors
def profile(
    images: Optional[List[Path]] = typer.Argument(None, help="Two images, or a folder holding two "
                                                  "(default: the bundled pair)."),
    matcher: Optional[str] = MatcherOpt,
    backend: str = typer.Option("torch", help="One bench backend: torch, torch-compile, "
                                "torch-compile-cudagraph, onnxruntime, tensorrt..."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or bf16."),
    size: Optional[int] = typer.Option(None, help="Square input side (default: the matcher's)."),
    height: Optional[int] = typer.Option(None, help="Input height."),
    width: Optional[int] = typer.Option(None, help="Input width."),
    option: Optional[List[str]] = OptionOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    dinov2: Optional[Path] = Dinov2Opt,
    weights: Optional[List[str]] = WeightsOpt,
    random_weights: bool = RandomOpt,
    allow_partial: bool = PartialOpt,
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda when present)."),
    runs: int = typer.Option(5, help="Profiled pairs (the tables are per pair, their mean)."),
    warmup: int = typer.Option(3, help="Pairs run before profiling (compilation, caches)."),
    top: int = typer.Option(15, help="Kernels (GPU) or ops (CPU) listed."),
    workdir: Optional[Path] = typer.Option(None, help="Keep exported graphs and engines here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the stage and kernel tables as JSON."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Write a Chrome trace (chrome://tracing, Perfetto)."),
) -> None:
    """Time per named stage (encoder, GP, refiners, postprocess...) and the top kernels, on one pair."""
    from .images import read_image
    from .profiler import ProfileConfig, render, run_profile, write_json

    name = _need_matcher(matcher)
    if size is not None and (height is not None or width is not None):
        raise typer.BadParameter("give --size, or --height/--width, not both")
    pair = None
    if images:
        p0, p1 = _image_paths(images)
        pair = (read_image(p0), read_image(p1))
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ProfileConfig(
        name, backend, precision, device, height or size, width or size, _extra(option),
        _weights(checkpoint, dinov2, weights), random_weights, allow_partial, pair, runs, warmup,
        top, trace, workdir)
    console = _console(stderr=True)
    with _status(console, "profiling") as status:
        report, _ = run_profile(config, progress=lambda m: status.update(m))
    _console().print(render(report))
    if json_out:
        typer.echo(f"wrote {write_json(report, json_out)}", err=True)
    if trace:
        typer.echo(f"wrote {trace}", err=True)


@app.command(name="match-pairs")
@clean_errors
def match_pairs(
    image_dir: Path = typer.Argument(..., help="Folder of images; pair names are relative to it."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="hloc pairs file: `name0 name1` a line."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Every pair of images in IMAGE_DIR."),
    sequential: Optional[int] = typer.Option(None, "--sequential", help="Each image with the next N "
                                             "(sorted by name)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for features.h5, matches.h5, "
                                "pairs.txt, summary.json (and the job's journal)."),
    colmap: Optional[Path] = typer.Option(None, "--colmap", help="Also write a COLMAP database here "
                                          "(pycolmap; matches verified by pycolmap)."),
    reconstruct: bool = typer.Option(False, "--reconstruct", help="Run pycolmap's incremental mapping "
                                     "on the database: OUT/sfm (model, stats.json, picture)."),
    matcher: Optional[str] = MatcherOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    dinov2: Optional[Path] = Dinov2Opt,
    weights: Optional[List[str]] = WeightsOpt,
    onnx: Optional[Path] = OnnxOpt,
    engine: Optional[Path] = EngineOpt,
    backend: Optional[str] = RunBackendOpt,
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when present)."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or bf16 (torch)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the graph (torch backend)."),
    height: Optional[int] = typer.Option(None, help="Input height (torch backend)."),
    width: Optional[int] = typer.Option(None, help="Input width (torch backend)."),
    option: Optional[List[str]] = OptionOpt,
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Pairs per graph call (torch: any; "
                                   "an exported graph keeps its own batch)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", "-j", help="Loader processes "
                                              "(default: cores - 1, at most 8); with --ray, actors."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS",
                                      help="Run on Ray Data: `--ray local` starts Ray on this "
                                      "machine; `--ray auto` or `--ray ray://host:10001` joins a cluster."),
    merge_grid: float = typer.Option(2.0, "--merge-grid", help="Cell size in pixels within which "
                                     "keypoints of one image are merged into one (tracks)."),
    resize: Optional[str] = typer.Option(None, "--resize", help="stretch or pad: how images meet the "
                                         "graph's size (default: the matcher's rule)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Forget earlier results in --output."),
    random_weights: bool = RandomOpt,
    allow_partial: bool = PartialOpt,
) -> None:
    """Match many pairs into hloc's features.h5 / matches.h5 (and a COLMAP database and model);
    resumes where a killed run stopped."""
    from .pairjob import PairJob, default_workers, run_pair_job
    from .pairs import exhaustive_pairs, list_images, read_pairs, sequential_pairs

    chosen = [pairs is not None, exhaustive, sequential is not None]
    if sum(chosen) != 1:
        raise typer.BadParameter("give exactly one of --pairs FILE, --exhaustive, --sequential N")
    if pairs is not None:
        pair_list = read_pairs(pairs)
    elif exhaustive:
        pair_list = exhaustive_pairs(list_images(image_dir))
    else:
        pair_list = sequential_pairs(list_images(image_dir), int(sequential or 0))
    artifact = engine or onnx
    backend = backend or _artifact_backend(engine, onnx) or "torch"
    if device is None:
        import torch

        device = "cuda" if backend == "tensorrt" or torch.cuda.is_available() else "cpu"
    if reconstruct and colmap is None:
        colmap = output / "database.db"
    if batch_size < 1:
        raise typer.BadParameter("--batch-size must be at least 1")
    job = PairJob(image_dir, pair_list, output, matcher=matcher, backend=backend,
                  weights=_weights(checkpoint, dinov2, weights), artifact=artifact, height=height,
                  width=width, extra=_extra(option), device=device, precision=precision,
                  compile=compile_, allow_partial=allow_partial, random_weights=random_weights,
                  batch_size=batch_size,
                  num_workers=default_workers() if num_workers is None else num_workers,
                  merge_grid=merge_grid, resize=resize, colmap=colmap, reconstruct=reconstruct,
                  overwrite=overwrite)
    console = _console(stderr=True)
    summary = run_pair_job(job, ray_address=None if ray == "local" else ray, use_ray=ray is not None,
                           log=lambda m: console.print(m, highlight=False))
    rate = summary["pairs_per_s"]
    share = summary["model_share"]
    console.print(
        f"{summary['pairs_matched']} pairs matched ({summary['pairs_skipped']} already done)"
        + (f", {rate:.2f} pairs/s, model {100 * share:.0f}% of the time" if rate and share else "")
        + f"; {summary['merge']['keypoints_per_image']:.0f} keypoints per image; wrote {output}",
        highlight=False)
    if "colmap" in summary:
        c = summary["colmap"]
        console.print(f"COLMAP database {c['path']}: {c['verified_pairs']}/{c['matched_pairs']} pairs "
                      f"verified, {c['inlier_matches']} inlier matches", highlight=False)
    if "reconstruction" in summary:
        r = summary["reconstruction"]
        console.print(f"model {r['path']}: {r['registered_images']}/{r['input_images']} images, "
                      f"{r['points']} points, track length {r['mean_track_length']:.2f}, "
                      f"reprojection error {r['mean_reprojection_error_px']:.2f} px", highlight=False)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
