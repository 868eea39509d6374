"""AOTInductor packages (`.pt2`): a matcher's export graphs compiled ahead of time, with provenance.

A package is built from the torch model through the plugin's export plan (`torch.export` then
`torch._inductor.aoti_compile_and_package`), not from ONNX, and loads later without recompiling
and without the model's Python code. fp16/bf16 packages trace the export wrapper under
`torch.autocast`, so regions a plugin runs with autocast off (roma_plus's strict coarse stage)
stay fp32 in the compiled program; inputs and outputs are float32 as with every backend.

Like a TensorRT engine, a package is bound to what compiled it: the torch build (its C++ ABI
and, on GPUs, the CUDA kernels), the GPU's compute capability, or, for CPU packages, the CPU
(Inductor compiles C++ with `-march=native`). Every package gets a record beside it
(`model.pt2` -> `model.pt2.json`, the same helpers as engines); loading compares it with the
running machine first and refuses a mismatch with the exact rebuild command, before torch
reads the package. The same record decides whether a build can be skipped.

API:
    PackageContext: who asks for the build (matcher, weights, plugin, the command's options)
    package_context(host, matcher, paths, modules, user_options, height, width, output)
    build_package(graph, output, context, *, precision, device, ...) -> Path    one stage
    build_packages(host, plan, output, context, options) -> Path               every stage + manifest
    package_environment(device_type) -> dict        torch/CUDA/driver, GPU and capability, CPU
    package_inputs(record) -> dict                  the fields that determine a package
    package_cache_decision(existing, wanted, exists) -> str | None
    package_problems(record, environment) -> list[str]
    check_package(path, record, environment) -> None    raises with the rebuild command
    package_rebuild_command(record, package) -> str
    stage_package_path(output, stage, stages) -> Path
    tf32_policy(precision, graph_tf32) -> bool      whether fp32 math may use TF32 in this package
    check_request(precision, device) -> torch.device    refuses what cannot be built, before any work
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional

from .atomic import atomic_text
from .cxx_toolchain import choose_compiler
from .errors import MatchrtError
from .provenance import _driver_version, _normal, provenance_path, read_provenance, sha256_file
from .tf32 import tf32_switches

if TYPE_CHECKING:
    import torch

    from .host import Host
    from .types import ExportPlan, GraphSpec

SCHEMA = 1
SUFFIX = ".pt2"
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# fields of the "build" section that change a package
BUILD_KEYS = ("precision", "device", "tf32", "autocast", "options", "input_shapes", "input_dtypes",
              "inductor_configs", "cxx")
# fields of the "environment" section a package is bound to, per device type
ENV_KEYS = {"cuda": ("torch", "gpu", "compute_capability"),
            "cpu": ("torch", "machine", "cpu", "vec_isa")}
LABELS = {"torch": "torch", "gpu": "GPU", "compute_capability": "compute capability",
          "machine": "CPU architecture", "cpu": "CPU", "vec_isa": "CPU vector instructions"}

Progress = Callable[[str], None]


# --- the running machine ----------------------------------------------------------------------------------
def _cpu_info() -> dict[str, Optional[str]]:
    """CPU model and the widest vector instruction set Inductor may use (from /proc/cpuinfo)."""
    model: Optional[str] = None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    model = model or platform.processor() or None
    isa = None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        isa = "avx512"
    elif "avx2" in flags:
        isa = "avx2"
    elif "sve" in flags:
        isa = "sve"
    elif "asimd" in flags or platform.machine() in ("aarch64", "arm64"):
        isa = "neon"
    return {"cpu": model, "vec_isa": isa}


def package_environment(device_type: str = "cuda", index: int = 0) -> dict[str, Any]:
    """torch, CUDA and driver versions, GPU name and compute capability, CPU model of this machine.

    Values that cannot be found are None (the comparison then skips them)."""
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": None,
                           "gpu": None, "compute_capability": None,
                           "python": platform.python_version(), "machine": platform.machine()}
    env.update(_cpu_info())
    if device_type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(index)
        env["gpu"] = props.name
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["driver"] = _driver_version()
    return env


# --- pure logic -----------------------------------------------------------------------------------------------
def tf32_policy(precision: str, graph_tf32: Optional[bool]) -> bool:
    """May fp32 math use TF32 in this package? As engines: never in fp32 packages (the 1e-4 fp32
    tolerance), in fp16/bf16 ones unless the graph forbids it (roma_plus's strict coarse stage)."""
    if precision == "fp32":
        return False
    return graph_tf32 is not False


def package_inputs(record: Mapping[str, Any]) -> dict[str, Any]:
    """What determines a package: code, weights, settings, torch and the device it was built for."""
    build = record.get("build") or {}
    env = record.get("environment") or {}
    keys = ENV_KEYS.get(str(build.get("device")), ENV_KEYS["cuda"])
    return {
        "schema": record.get("schema"),
        "matcher": record.get("matcher"),
        "stage": record.get("stage"),
        "plugin_sha256": (record.get("plugin") or {}).get("source_sha256"),
        "weights_sha256": _normal({k: (v or {}).get("sha256")
                                   for k, v in (record.get("weights") or {}).items()}),
        **{k: _normal(build.get(k)) for k in BUILD_KEYS},
        **{k: env.get(k) for k in keys},
    }


def package_cache_decision(existing: Optional[Mapping[str, Any]], wanted: Mapping[str, Any],
                           package_exists: bool = True) -> Optional[str]:
    """None when the existing package was built from identical inputs; else why it must be built."""
    if not package_exists:
        return "no package yet"
    if existing is None:
        return "the package has no provenance record"
    old, new = package_inputs(existing), package_inputs(wanted)
    changed = [k for k in new if old.get(k) != new.get(k)]
    return ("changed: " + ", ".join(changed)) if changed else None


def package_problems(record: Mapping[str, Any], environment: Mapping[str, Any]) -> list[str]:
    """Why a package built as `record` says cannot run in `environment` (empty: it can)."""
    built = record.get("environment") or {}
    device = str((record.get("build") or {}).get("device") or "cpu")
    problems = []
    if device == "cuda" and environment.get("gpu") is None:
        problems.append("device: the package runs on a CUDA GPU, and torch sees none here")
    for key in ENV_KEYS.get(device, ENV_KEYS["cuda"]):
        want, have = built.get(key), environment.get(key)
        if want is None or have is None:
            continue
        if str(want) != str(have):
            problems.append(f"{LABELS[key]}: package built for {want}, this machine has {have}")
    return problems


def _flag_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def package_rebuild_command(record: Mapping[str, Any], package: Any = None) -> str:
    """The `matchrt build` command that rebuilds this package (all its stages) on this machine."""
    build = record.get("build") or {}
    command = record.get("command") or {}
    out = command.get("output") or (str(package) if package is not None else record.get("package"))
    cmd = ["matchrt", "build", "-m", str(record.get("matcher") or "MATCHER")]
    flags = {"checkpoint": "-c", "dinov2": "--dinov2"}
    for name, info in (record.get("weights") or {}).items():
        if info.get("random") or not info.get("path"):
            continue
        path = str(info["path"])
        cmd += [flags[name], path] if name in flags else ["--weights", f"{name}={path}"]
    if record.get("random_weights"):
        cmd.append("--random-weights")
    for key, value in (command.get("options") or {}).items():
        cmd += ["-O", f"{key}={_flag_value(value)}"]
    if command.get("height"):
        cmd += ["--height", str(command["height"])]
    if command.get("width"):
        cmd += ["--width", str(command["width"])]
    for key, value in (build.get("inductor_configs") or {}).items():
        cmd += ["--inductor-config", f"{key}={_flag_value(value)}"]
    cmd += ["--backend", "inductor", "--precision", str(build.get("precision", "fp32")),
            "--device", str(build.get("device", "cpu")), "-o", str(out or "MODEL.pt2"), "--force"]
    return " ".join(shlex.quote(c) for c in cmd)


def check_package(package: Any, record: Optional[Mapping[str, Any]],
                  environment: Mapping[str, Any]) -> None:
    """Refuse a package built for another torch, GPU or CPU, naming the rebuild command."""
    if record is None:
        return
    problems = package_problems(record, environment)
    if problems:
        raise MatchrtError(
            f"{package} cannot run here: " + "; ".join(problems) + ". AOTInductor packages are "
            "bound to the torch build and the GPU (or CPU) they were compiled for. Rebuild it on "
            "this machine:\n  " + package_rebuild_command(record, package))


def stage_package_path(output: Path, stage: str, stages: int) -> Path:
    """A single graph keeps the requested name; a sequence gets `name.<stage>.pt2`."""
    output = Path(output)
    if stages == 1:
        return output
    return output.with_name(f"{output.name[:-len(SUFFIX)]}.{stage}{SUFFIX}")


# --- who asks for a build ---------------------------------------------------------------------------------
@dataclass
class PackageContext:
    """Everything a package's record says about where it came from, besides the graph itself."""

    matcher: str
    matcher_version: str = ""
    plugin: dict[str, Any] = field(default_factory=dict)  # name, distribution, version, source_sha256
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> path, sha256, random
    random_weights: bool = False
    # what `matchrt build` was given, for the rebuild command: options, height, width, output
    command: dict[str, Any] = field(default_factory=dict)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered for this process while its size and mtime stay the same
    (a bench builds several packages from one 1.6 GB checkpoint)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def _torch_dirs() -> list[Path]:
    import torch

    return [Path(p).resolve() for p in torch.__path__]


def source_sha256(objects: Iterable[Any]) -> tuple[str, list[str]]:
    """sha256 over the Python sources of the packages defining `objects` (modules, classes or
    instances), torch's own excepted: a change to a plugin's code invalidates its packages."""
    torch_dirs = _torch_dirs()
    dirs: set[Path] = set()
    for obj in objects:
        name = obj.__name__ if isinstance(obj, type(sys)) else (
            obj.__module__ if isinstance(obj, type) else type(obj).__module__)
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if not file:
            continue
        folder = Path(file).resolve().parent
        if any(folder == d or d in folder.parents for d in torch_dirs):
            continue
        dirs.add(folder)
    h = hashlib.sha256()
    for folder in sorted(dirs):
        for f in sorted(folder.glob("*.py")):
            h.update(f"{folder.name}/{f.name}".encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest(), [str(d) for d in sorted(dirs)]


def package_context(host: "Host", matcher: str, paths: Mapping[str, Path],
                    modules: Iterable[Any] = (), user_options: Optional[Mapping[str, Any]] = None, height: Optional[int] = None,
                    width: Optional[int] = None, output: Optional[Path] = None) -> PackageContext:
    """The context of a build: weight digests, the plugin's identity and source digest."""
    from .runner import is_random

    info = host.matcher(matcher)
    owner = host.owner(matcher)
    plugin_obj = host.pm.get_plugin(owner)
    record = host.records.get(owner)
    objects: list[Any] = [plugin_obj] if plugin_obj is not None else []
    for module in modules:  # the export wrappers and every submodule: their packages' sources
        objects += list(module.modules()) if hasattr(module, "modules") else [module]
    digest, folders = source_sha256(objects)
    weights = {}
    for name, path in paths.items():
        random = is_random(Path(path))
        weights[name] = {"path": str(Path(path).resolve()), "sha256": file_sha256(Path(path)),
                         "random": random}
    return PackageContext(
        matcher=matcher, matcher_version=info.version,
        plugin={"name": owner, "distribution": record.distribution if record else None,
                "version": record.version if record else None, "source_sha256": digest,
                "source_dirs": folders},
        weights=weights, random_weights=any(w["random"] for w in weights.values()),
        command={"options": dict(user_options or {}), "height": height, "width": width,
                 "output": str(output) if output is not None else None})


# --- the build ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tf32_allowed(enabled: bool) -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN within the block when `enabled` is False (else unchanged)."""
    if enabled:
        yield
        return
    with tf32_switches(False):
        yield


def check_request(precision: str, device: Optional[str]) -> "torch.device":
    """The device a package is built for, after refusing what cannot be built (before any work)."""
    if precision not in PRECISIONS:
        raise MatchrtError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    dev = _resolve_device(device)
    if precision == "fp16" and dev.type == "cpu":
        raise MatchrtError("fp16 packages are for CUDA GPUs (fp16 autocast on CPU is not a deployment "
                           "target); build fp32 or bf16 for --device cpu")
    return dev


def _resolve_device(device: Optional[str]) -> "torch.device":
    import torch

    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type not in ("cpu", "cuda"):
        raise MatchrtError(f"--device {name}: AOTInductor packages are built for cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MatchrtError("--device cuda asked for, but torch sees no CUDA GPU: a CUDA package is "
                           "compiled on the GPU it runs on. Use --device cpu, or build on the GPU machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _wrapper(graph: "GraphSpec", precision: str, device_type: str) -> "torch.nn.Module":
    """The graph's module under autocast (fp16/bf16), outputs cast back to float32, as a tuple."""
    import torch

    class Packaged(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wrapped = graph.module

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if precision in DTYPES:
                with torch.autocast(device_type, dtype=getattr(torch, DTYPES[precision])):
                    out = self.wrapped(*inputs)
            else:
                out = self.wrapped(*inputs)
            if isinstance(out, torch.Tensor):
                out = (out,)
            elif isinstance(out, dict):
                out = tuple(out[n] for n in graph.output_names)
            return tuple(o.float() if o.is_floating_point() else o for o in out)

    return Packaged().eval()


def export_program(graph: "GraphSpec", precision: str, device: "torch.device") -> Any:
    """`torch.export` of the graph's wrapper on `device` (autocast captured in the program).

    The wrapper runs once eagerly first: a plugin may build inference state in its first call on a
    device (roma_plus's split weights, which need the real weights; while torch.export traces, the
    parameters are fake tensors), and the export then captures that state as constants."""
    import torch

    wrapper = _wrapper(graph, precision, device.type).to(device)
    inputs = tuple(torch.as_tensor(t).to(device) for t in graph.example_inputs)
    try:
        with torch.no_grad():
            wrapper(*inputs)
            return torch.export.export(wrapper, inputs, strict=False)
    except Exception as exc:  # noqa: BLE001 - name the graph and the remedy
        raise MatchrtError(
            f"torch.export could not capture graph {graph.name!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). The inductor backend needs an export "
            "wrapper without data-dependent Python control flow; the onnx/tensorrt path may still work"
        ) from exc


def _record(graph: "GraphSpec", output: Path, context: PackageContext, precision: str,
            device: "torch.device", tf32: bool, plan_options: Mapping[str, Any],
            inductor_configs: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance record of a package (without its own hash and timings)."""
    from . import __version__

    return {
        "schema": SCHEMA,
        "kind": "aotinductor",
        "package": output.name,
        "matchrt": __version__,
        "matcher": context.matcher,
        "matcher_version": context.matcher_version,
        "stage": graph.name,
        "plugin": dict(context.plugin),
        "weights": {k: dict(v) for k, v in context.weights.items()},
        "random_weights": context.random_weights,
        "build": {
            "precision": precision,
            "device": device.type,
            "tf32": tf32,
            "autocast": f"{device.type}/{DTYPES[precision]}" if precision in DTYPES else None,
            "options": json.loads(json.dumps(dict(plan_options), default=str)),
            "inputs": list(graph.input_names),
            "outputs": list(graph.output_names),
            "input_shapes": {n: list(t.shape) for n, t in zip(graph.input_names, graph.example_inputs)},
            "input_dtypes": {n: str(t.dtype).removeprefix("torch.")
                             for n, t in zip(graph.input_names, graph.example_inputs)},
            "inductor_configs": dict(inductor_configs),
        },
        "environment": package_environment(device.type, device.index or 0),
        "command": dict(context.command),
    }


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> Path:
    """Write JSON under a temporary name and rename it into place (readers never see half a file)."""
    return atomic_text(path, json.dumps(data, indent=1, default=str) + "\n")


def _remove_stale_partials(output: Path) -> None:
    """Delete what builds of `output` killed half-way left (their process is gone)."""
    stem = output.name[:-len(SUFFIX)]
    for partial in output.parent.glob(f".{stem}.*.partial{SUFFIX}"):
        pid = partial.name[len(stem) + 2:-len(".partial" + SUFFIX)]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            partial.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def build_package(
    graph: "GraphSpec",
    output: Path,
    context: PackageContext,
    *,
    precision: str = "fp32",
    device: Optional[str] = None,
    plan_options: Optional[Mapping[str, Any]] = None,
    inductor_configs: Optional[Mapping[str, Any]] = None,
    force: bool = False,
    progress: Optional[Progress] = None,
) -> Path:
    """Compile one graph into `output` (a `.pt2`) with `<output>.json` beside it; reuse an
    identical package unless `force`. Returns the package's path."""
    import torch
    import torch._inductor.config

    say = progress or (lambda message: None)
    output = Path(output)
    if not output.name.endswith(SUFFIX):
        raise MatchrtError(f"an AOTInductor package must end in {SUFFIX}, got {output}")
    dev = check_request(precision, device)
    configs = {**graph.inductor_configs, **(inductor_configs or {})}
    tf32 = tf32_policy(precision, graph.tf32)
    record = _record(graph, output, context, precision, dev, tf32, plan_options or {}, configs)
    # the C++ compiler is part of what a package is: one whose packages cannot load is replaced
    compiler_configs, record["build"]["cxx"], note = choose_compiler(configs)
    if note:
        say(f"note: {note}")
    reason = package_cache_decision(read_provenance(output), record, output.exists())
    if reason is None and not force:
        say(f"{output} is up to date (same code, weights, settings, torch and device); --force rebuilds")
        return output
    say(f"building {output.name}: {reason if reason else 'forced'}")
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    start = time.perf_counter()
    switches = tf32_allowed(tf32) if dev.type == "cuda" else contextlib.nullcontext()
    partial = output.with_name(f".{output.name[:-len(SUFFIX)]}.{os.getpid()}.partial{SUFFIX}")
    try:
        with switches:
            say(f"{graph.name}: torch.export ({precision} on {dev})")
            program = export_program(graph, precision, dev)
            exported = time.perf_counter()
            say(f"{graph.name}: compiling with AOTInductor (minutes for large models)")
            meta = {"matchrt.matcher": context.matcher, "matchrt.stage": graph.name,
                    "matchrt.inputs": json.dumps(list(graph.input_names)),
                    "matchrt.outputs": json.dumps(list(graph.output_names)),
                    "matchrt.precision": precision}
            # a copy: inductor writes into the dict it is given; the names live in the record too,
            # for a torch whose AOTInductor keeps no metadata
            compile_configs = dict(configs, **compiler_configs)
            if hasattr(torch._inductor.config.aot_inductor, "metadata"):
                compile_configs["aot_inductor.metadata"] = meta
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial),
                                                     inductor_configs=compile_configs)
        provenance_path(output).unlink(missing_ok=True)  # never a new package beside an old record
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    record.update({
        "package_sha256": sha256_file(output),
        "bytes": output.stat().st_size,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "export_seconds": round(exported - start, 1),
        "build_seconds": round(time.perf_counter() - start, 1),
    })
    record["rebuild"] = package_rebuild_command(record, output)
    write_json_atomic(provenance_path(output), record)
    say(f"wrote {output} ({record['bytes'] / 1e6:.1f} MB, {record['build_seconds']} s)")
    return output


def build_packages(host: "Host", plan: "ExportPlan", output: Path, context: PackageContext,
                   options: Mapping[str, Any], backend: str = "inductor") -> Path:
    """One package per graph of `plan` through the `build_package` hook, then the manifest
    (`<output>.matchrt.json`, as for engines) that `match --engine`, `check` and `bench` read."""
    from .export import input_shapes, manifest_path

    output = Path(output)
    if not output.name.endswith(SUFFIX):
        raise MatchrtError(f"--output must end in {SUFFIX} for the {backend} backend, got {output}")
    stages: list[dict[str, Any]] = []
    device = None
    hook_options = dict(options, context=context, plan_options=dict(plan.options))
    for graph in plan.graphs:
        dst = stage_package_path(output, graph.name, len(plan.graphs))
        built = host.pm.hook.build_package(backend=backend, graph=graph, output=dst, options=hook_options)
        if built is None:
            raise MatchrtError(f"backend {backend!r} builds nothing from torch graphs; it builds from "
                               "ONNX: `matchrt export` first, then `matchrt build --onnx`")
        record = read_provenance(built) or {}
        device = device or (record.get("build") or {}).get("device")
        stages.append({"name": graph.name, "file": Path(built).name, "inputs": list(graph.input_names),
                       "input_shapes": input_shapes(graph), "outputs": list(graph.output_names),
                       "build_seconds": record.get("build_seconds")})
    manifest = {
        "matcher": plan.matcher,
        "version": context.matcher_version,
        "options": json.loads(json.dumps(plan.options, default=str)),
        "input_size": list(plan.input_size),
        "weights_sha256": {k: v.get("sha256") for k, v in context.weights.items()},
        "stages": stages,
        "backend": backend,
        "precision": options.get("precision", "fp32"),
        "device": device,
    }
    return write_json_atomic(manifest_path(output), manifest)
