"""Where a TensorRT engine came from, and whether it may run here: the `<engine>.json` record.

An engine is only valid for the TensorRT version and the GPU (compute capability) it was built
with. Every engine matchrt builds gets a JSON record beside it (`model.engine` ->
`model.engine.json`); loading compares that record with the running machine first, so a
mismatch is a clear MatchrtError naming the rebuild command instead of TensorRT's own
deserialisation failure. The same record decides whether a build can be skipped.

API (all pure functions but `current_environment` and the file helpers):

    provenance_path(engine) -> Path                       `<engine>.json`
    read_provenance(engine) -> dict | None
    write_provenance(engine, record) -> Path
    build_inputs(record) -> dict                           the fields that determine an engine
    cache_decision(existing, wanted, engine_exists) -> str | None
        None: an identical engine exists (skip); else the reason to build
    compatibility_problems(record, environment) -> list[str]
        what differs between the build machine and this one (GPU, compute capability, TensorRT)
    check_compatible(engine, record, environment) -> None  raises MatchrtError with the rebuild command
    rebuild_command(record, engine) -> str                 `matchrt build ... --force`
    current_environment(device=0) -> dict                  TensorRT/CUDA/driver versions, GPU, capability
    onnx_sha256(path) -> str                               graph file + its external-data files
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import MatchrtError

SCHEMA = 1
# fields of the "build" section that change the engine (timing cache and progress do not)
BUILD_KEYS = ("precision", "strongly_typed", "tf32", "profiles", "fp32_layers", "workspace_gb",
              "opt_level", "autocast")
# fields of the "environment" section an engine is bound to
ENV_KEYS = ("tensorrt", "gpu", "compute_capability")

PathLike = Union[str, Path]


def provenance_path(engine: PathLike) -> Path:
    """`model.engine` -> `model.engine.json`."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def read_provenance(engine: PathLike) -> Optional[dict[str, Any]]:
    """The record beside an engine, or None when there is none (or it is unreadable)."""
    path = provenance_path(engine)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_provenance(engine: PathLike, record: Mapping[str, Any]) -> Path:
    path = provenance_path(engine)
    path.write_text(json.dumps(record, indent=1, sort_keys=False, default=str) + "\n")
    return path


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def onnx_sha256(path: PathLike) -> str:
    """sha256 over the graph file and, in name order, every external-data file it references."""
    import onnx

    path = Path(path)
    h = hashlib.sha256()
    h.update(sha256_file(path).encode())
    model = onnx.load(str(path), load_external_data=False)
    files = sorted({e.value for t in model.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL
                    for e in t.external_data if e.key == "location"})
    for name in files:
        f = path.parent / name
        h.update(name.encode())
        h.update(sha256_file(f).encode() if f.exists() else b"missing")
    return h.hexdigest()


# --- pure logic -----------------------------------------------------------------------------------------
def build_inputs(record: Mapping[str, Any]) -> dict[str, Any]:
    """What determines an engine: the graph, the build settings, TensorRT and the GPU."""
    build = record.get("build") or {}
    env = record.get("environment") or {}
    return {
        "onnx_sha256": (record.get("onnx") or {}).get("sha256"),
        **{k: _normal(build.get(k)) for k in BUILD_KEYS},
        **{k: env.get(k) for k in ENV_KEYS},
    }


def _normal(value: Any) -> Any:
    """Lists and tuples compare alike; dict order does not matter."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_decision(existing: Optional[Mapping[str, Any]], wanted: Mapping[str, Any],
                   engine_exists: bool = True) -> Optional[str]:
    """None when the existing engine was built from identical inputs; else why it must be built."""
    if not engine_exists:
        return "no engine yet"
    if existing is None:
        return "the engine has no provenance record"
    old, new = build_inputs(existing), build_inputs(wanted)
    changed = [k for k in new if old.get(k) != new.get(k)]
    if changed:
        return "changed: " + ", ".join(changed)
    return None


def compatibility_problems(record: Mapping[str, Any], environment: Mapping[str, Any]) -> list[str]:
    """Why an engine built as `record` says cannot run in `environment` (empty: it can)."""
    built = record.get("environment") or {}
    problems = []
    labels = {"tensorrt": "TensorRT version", "gpu": "GPU", "compute_capability": "compute capability"}
    for key in ("tensorrt", "compute_capability", "gpu"):
        want, have = built.get(key), environment.get(key)
        if want is None or have is None:
            continue
        if str(want) != str(have):
            problems.append(f"{labels[key]}: engine built for {want}, this machine has {have}")
    return problems


def rebuild_command(record: Mapping[str, Any], engine: Optional[PathLike] = None) -> str:
    """The `matchrt build` command that rebuilds this engine on the current machine."""
    build = record.get("build") or {}
    onnx_file = (record.get("onnx") or {}).get("path") or "MODEL.onnx"
    out = str(engine) if engine is not None else record.get("engine") or "MODEL.engine"
    cmd = ["matchrt", "build", "--onnx", str(onnx_file), "--output", out,
           "--precision", str(build.get("precision", "fp16"))]
    if build.get("strongly_typed"):
        cmd.append("--strongly-typed")
    if build.get("workspace_gb") is not None:
        cmd += ["--workspace", f"{float(build['workspace_gb']):g}"]
    if build.get("opt_level") is not None:
        cmd += ["--opt-level", str(build["opt_level"])]
    sizes = build.get("sizes") or {}
    for key in ("min", "opt", "max"):
        if sizes.get(key):
            h, w = sizes[key]
            cmd += [f"--{key}-size", f"{h}x{w}"]
    cmd.append("--force")
    return " ".join(shlex.quote(c) for c in cmd)


def check_compatible(engine: PathLike, record: Optional[Mapping[str, Any]],
                     environment: Mapping[str, Any]) -> None:
    """Refuse an engine built for another GPU or TensorRT, naming the rebuild command."""
    if record is None:
        return
    problems = compatibility_problems(record, environment)
    if problems:
        raise MatchrtError(
            f"{engine} cannot run here: " + "; ".join(problems) + ". TensorRT engines are bound to "
            "the TensorRT version and GPU they were built with. Rebuild it on this machine:\n  "
            + rebuild_command(record, engine))


# --- the running machine ---------------------------------------------------------------------------------
def current_environment(device: int = 0) -> dict[str, Any]:
    """TensorRT, CUDA and driver versions, GPU name and compute capability of this machine.

    Values that cannot be found are None (the comparison then skips them)."""
    env: dict[str, Any] = {"tensorrt": None, "cuda": None, "driver": None, "gpu": None,
                           "compute_capability": None}
    try:
        import tensorrt as trt

        env["tensorrt"] = getattr(trt, "__version__", None)
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(device)
            env["gpu"] = props.name
            env["compute_capability"] = f"{props.major}.{props.minor}"
            env["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if env["gpu"] is None:
        env.update({k: v for k, v in _cuda_python_device(device).items() if v is not None})
    env["driver"] = _driver_version()
    return env


def _cuda_python_device(device: int) -> dict[str, Any]:
    from .backends.tensorrt_backend import cuda_python_device_info

    return cuda_python_device_info(device)


def _driver_version() -> Optional[str]:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None
