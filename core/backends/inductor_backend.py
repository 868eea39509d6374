"""The `inductor` backend: AOTInductor packages (`.pt2`), built from the torch model, loaded in seconds.

Packages are built by `matchrt.package` (through the `build_package` hook) and run here without
recompiling and without the model's Python code. On a CUDA GPU the call can be captured once in a
CUDA graph and replayed (`cuda_graph=True`, the bench's `inductor-cudagraph`).

API:
    InductorSession(package_path, options)
        .run(inputs: dict[str, Tensor]) -> dict[str, Tensor]   float outputs as float32
        .input_names, .output_names, .record (the package's provenance), .device, .load_seconds
        options: device ("cuda:1" picks the GPU of a CUDA package; the package decides cpu or cuda),
        cuda_graph (bool)
    hooks: register_backends, open_session(backend="inductor", graph=<package path>),
           build_package(backend="inductor", graph=<GraphSpec>, output, options) with options
           precision, device, force, progress, inductor_configs, context (a PackageContext),
           plan_options.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from .. import package_load_check as load_check
from ..errors import MatchrtError
from ..hookspecs import hookimpl
from ..package import (
    PackageContext,
    build_package as build,
    check_package,
    package_environment,
    package_rebuild_command,
    tf32_allowed,
)
from ..provenance import read_provenance
from ..trace_regions import PACKAGE_CALL
from ..transfer import to_device
from ..types import BackendInfo, GraphSpec

NAME = "inductor"


def unavailable() -> Optional[str]:
    """None when torch has AOTInductor packaging (torch >= 2.6); else the reason."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "PyTorch is not installed: pip install torch"
    inductor = getattr(torch, "_inductor", None)
    if inductor is None:
        import importlib

        try:
            inductor = importlib.import_module("torch._inductor")
        except ImportError as exc:
            return f"torch {torch.__version__} has no Inductor ({exc})"
    if not hasattr(inductor, "aoti_compile_and_package") or not hasattr(inductor, "aoti_load_package"):
        return f"torch {torch.__version__} has no AOTInductor packaging: pip install 'torch>=2.6'"
    return None


def _load(path: Path, device_index: int, single_threaded: bool) -> Any:
    """The package's model, from torch's package loader directly (else `aoti_load_package`).

    Not through `aoti_load_package` where avoidable: torch's `load_pt2` first reads the machine's
    CPU vector ISA (`get_device_information`), only to log a warning on a mismatch, and that probe
    builds and loads test programs in child Python processes that each import torch: 46.6 s of the
    first load in every process on the lent H100 (torch 2.11), 0.07 s for the next load. matchrt's
    provenance check has already refused a package from another torch, GPU or CPU."""
    import torch
    import torch._inductor

    loader_cls = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    try:
        from torch._inductor.package.package import AOTICompiledModel
    except ImportError:  # pragma: no cover - torch without the wrapper: its public entry point
        AOTICompiledModel = None
    if loader_cls is not None and AOTICompiledModel is not None:
        try:
            return AOTICompiledModel(loader_cls(str(path), "model", single_threaded, 1, device_index))
        except TypeError:  # pragma: no cover - another constructor signature: the public entry point
            pass
    params = inspect.signature(torch._inductor.aoti_load_package).parameters
    kwargs: dict[str, Any] = {}
    if "device_index" in params:
        kwargs["device_index"] = device_index
    if "run_single_threaded" in params:
        kwargs["run_single_threaded"] = single_threaded
    return torch._inductor.aoti_load_package(str(path), **kwargs)


def _names(model: Any, key: str, fallback: list[str]) -> list[str]:
    try:
        meta = model.get_metadata()
    except Exception:  # noqa: BLE001 - older torch: no metadata accessor
        return fallback
    raw = meta.get(key) if isinstance(meta, dict) else None
    return list(json.loads(raw)) if raw else fallback


class InductorSession:
    """A loaded AOTInductor package; `run` speaks dicts of torch tensors, as every session."""

    def __init__(self, package: Path, options: dict[str, Any]):
        import torch

        self.path = Path(package)
        if not self.path.exists():
            raise MatchrtError(f"{self.path} does not exist; build it with `matchrt build -m MATCHER "
                               "--backend inductor -o MODEL.pt2`")
        self.record = read_provenance(self.path)
        build_info = (self.record or {}).get("build") or {}
        asked = torch.device(options.get("device") or "cpu")
        device_type = str(build_info.get("device") or asked.type)
        index = asked.index if asked.type == "cuda" and asked.index is not None else 0
        # the provenance check comes before torch reads a byte of the package, so a foreign package
        # fails with the rebuild command rather than a loader error or a crash
        environment = package_environment(device_type, index)
        check_package(self.path, self.record, environment)
        if self.record is None:
            warnings.warn(f"{self.path} has no provenance record ({self.path.name}.json); it cannot be "
                          "checked against this torch and GPU", stacklevel=2)
        self.device = torch.device("cuda", index) if device_type == "cuda" else torch.device("cpu")
        self.cuda_graph = bool(options.get("cuda_graph"))
        if self.cuda_graph and self.device.type != "cuda":
            raise MatchrtError(f"CUDA graphs need a CUDA package on a CUDA GPU; {self.path.name} is a "
                               f"{device_type} package (use the inductor backend without CUDA graphs)")
        self.tf32 = bool(build_info.get("tf32", True))
        load_index = index if self.device.type == "cuda" else -1
        if load_check.wanted(device_type):  # a loader that segfaults becomes an error with a remedy
            from ..runner import cache_dir

            load_check.check_load_in_child(self.path, load_index, environment, cache_dir())
        start = time.perf_counter()
        try:
            self.model = _load(self.path, load_index, self.cuda_graph)
        except Exception as exc:  # noqa: BLE001 - torch's loader errors are long and opaque
            hint = package_rebuild_command(self.record, self.path) if self.record else (
                "matchrt build -m MATCHER --backend inductor -o MODEL.pt2 --force")
            raise MatchrtError(f"torch could not load {self.path} ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}). Rebuild it:\n  {hint}") from exc
        self.load_seconds = time.perf_counter() - start
        self.input_names = _names(self.model, "matchrt.inputs", list(build_info.get("inputs") or []))
        self.output_names = _names(self.model, "matchrt.outputs", list(build_info.get("outputs") or []))
        if not self.input_names or not self.output_names:
            raise MatchrtError(f"{self.path} names no inputs or outputs (not built by matchrt?); "
                               "rebuild it with `matchrt build --backend inductor`")
        dtypes = build_info.get("input_dtypes") or {}
        self.input_dtypes = {n: getattr(torch, dtypes.get(n, "float32")) for n in self.input_names}
        self._boxed = getattr(getattr(self.model, "loader", None), "boxed_run", None)
        self._range = f"{PACKAGE_CALL} {self.path.name} ##"
        self._graph: Any = None
        self._graph_key: Any = None
        self._static_in: list[Any] = []
        self._static_out: list[Any] = []

    def _call(self, args: list[Any]) -> list[Any]:
        if self._boxed is not None:
            return list(self._boxed(list(args)))  # boxed calling convention: it consumes the list
        out = self.model(*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run the package on a dict of tensors; returns {output name: tensor} on its device."""
        import torch

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise MatchrtError(f"{self.path.name} needs inputs {missing}")
        # the package runs on the current stream of the current device: make that its GPU
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with device, tf32_allowed(self.tf32 or self.device.type != "cuda"), torch.inference_mode():
            moved, inputs_copied = to_device((inputs[n] for n in self.input_names), self.device)
            try:
                args = [a.to(self.input_dtypes[n]).contiguous() for n, a in zip(self.input_names, moved)]
                # a named range: profiles charge the package's kernels to it (trace_regions), not to "eager"
                with torch.profiler.record_function(self._range):
                    outs = self._run_graph(args) if self.cuda_graph else self._call(args)
            finally:
                inputs_copied()  # the caller's host buffers are free again (also after a failed call)
        return {n: (o.float() if o.is_floating_point() else o) for n, o in zip(self.output_names, outs)}

    def _run_graph(self, args: list[Any]) -> list[Any]:
        """Replay the CUDA graph captured on the first call (again after an input-shape change)."""
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if self._graph is None or key != self._graph_key:
            self._capture(args, key)
        for static, a in zip(self._static_in, args):
            static.copy_(a)
        self._graph.replay()
        # the static outputs are overwritten by the next replay: hand out copies
        return [o.clone() for o in self._static_out]

    def _capture(self, args: list[Any], key: Any) -> None:
        import torch

        self._graph = None
        static_in = [a.clone() for a in args]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # lazy initialisation (kernels, cuBLAS/cuDNN handles) outside capture
                self._call(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = self._call(static_in)
        except Exception as exc:  # noqa: BLE001 - say which package and why, never fall back silently
            raise MatchrtError(f"CUDA graph capture of {self.path.name} failed ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); run it without CUDA "
                               "graphs (backend inductor)") from exc
        self._graph, self._graph_key = graph, key
        self._static_in, self._static_out = static_in, static_out

    def close(self) -> None:
        """Free the CUDA graph and its buffers."""
        self._graph = None
        self._static_in, self._static_out = [], []


# --- hooks ---------------------------------------------------------------------------------------------
@hookimpl
def register_backends(register: Callable[..., None]) -> None:
    register(BackendInfo(NAME, "AOTInductor packages (.pt2) built from the torch model; CPU or CUDA, "
                         "fp32/fp16/bf16, CUDA graphs", unavailable, artifact="package",
                         precisions=("fp32", "fp16", "bf16")))


@hookimpl
def open_session(backend: str, graph: Any, options: dict[str, Any]) -> Optional[InductorSession]:
    if backend != NAME:
        return None
    if isinstance(graph, GraphSpec):
        raise MatchrtError("the inductor backend runs a built package: `matchrt build -m MATCHER --backend "
                           "inductor -o MODEL.pt2`, then pass --engine MODEL.pt2")
    return InductorSession(Path(graph), options)


@hookimpl
def build_package(backend: str, graph: GraphSpec, output: Path, options: dict[str, Any]) -> Optional[Path]:
    if backend != NAME:
        return None
    context = options.get("context")
    if not isinstance(context, PackageContext):
        raise MatchrtError("build_package needs a PackageContext under options['context'] "
                           "(see matchrt.package.package_context)")
    return build(graph, Path(output), context, precision=options.get("precision") or "fp32",
                 device=options.get("device"), plan_options=options.get("plan_options") or {},
                 inductor_configs=options.get("inductor_configs") or {},
                 force=bool(options.get("force")), progress=options.get("progress"))
