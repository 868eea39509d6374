"""The `tensorrt` backend: builds engines (see `matchrt.engine`) and runs them, optionally as CUDA graphs.

TensorRT is an optional extra (`matchrt[tensorrt]`): nothing here imports it before it is needed,
so a CPU-only install registers the backend and reports it unusable with the install hint.

API:
    unavailable() -> str | None          None when TensorRT and a CUDA GPU are present
    TensorRTSession(engine_path, options)
        .run(inputs: dict[str, Tensor]) -> dict[str, Tensor]   outputs as torch tensors on the GPU
        .input_names, .output_names, .record (the engine's provenance), .close()
        options: device ("cuda", "cuda:1"; "cpu" means the first GPU), cuda_graph (bool: capture
        one CUDA graph per input-shape set and replay it)
    hooks: register_backends, open_session(backend="tensorrt", graph=<engine path>),
           build_engine(backend="tensorrt", onnx_path, output, options) with the options of
           `matchrt build`: precision, strongly_typed, workspace_gb, opt_level, min_size, opt_size,
           max_size ("HxW"), shapes, batch, timing_cache, fp32_layers, tf32, force, progress,
           matcher (its input contract checks the sizes), weights_sha256.

Buffers are torch CUDA tensors when torch has CUDA; otherwise cuda-python allocates them and the
outputs come back as CPU torch tensors.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..engine import INSTALL_HINT, require_tensorrt, tensorrt_module
from ..errors import MatchrtError
from ..hookspecs import hookimpl
from ..provenance import check_compatible, current_environment, read_provenance, rebuild_command
from ..types import BackendInfo

if TYPE_CHECKING:
    import tensorrt as trt
    import torch


# --- availability -------------------------------------------------------------------------------------
def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def _cudart() -> Any:
    """cuda-python's runtime bindings (new and old module layouts), or None."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    return cudart


def _cuda_python_gpus() -> int:
    rt = _cudart()
    if rt is None:
        return 0
    try:
        err, count = rt.cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - no driver
        return 0
    return int(count) if int(err) == 0 else 0


def unavailable() -> Optional[str]:
    """None when engines can be built and run here; else the reason and the install hint."""
    if tensorrt_module() is None:
        return f"TensorRT is not installed: {INSTALL_HINT}"
    if not _torch_cuda() and _cuda_python_gpus() == 0:
        return f"no CUDA GPU is visible: {INSTALL_HINT}"
    return None


def cuda_python_device_info(device: int = 0) -> dict[str, Any]:
    """GPU name, compute capability and CUDA runtime version through cuda-python (no torch CUDA)."""
    rt = _cudart()
    if rt is None:
        return {}
    try:
        err, props = rt.cudaGetDeviceProperties(device)
        if int(err) != 0:
            return {}
        name = props.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        info: dict[str, Any] = {"gpu": str(name), "compute_capability": f"{props.major}.{props.minor}"}
        err, version = rt.cudaRuntimeGetVersion()
        if int(err) == 0:
            info["cuda"] = f"{int(version) // 1000}.{int(version) % 1000 // 10}"
        return info
    except Exception:  # noqa: BLE001 - best effort
        return {}


def _device_index(options: dict[str, Any]) -> int:
    device = str(options.get("device") or "cuda")
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    return 0  # "cuda", or "cpu" (the CLI's default): TensorRT always runs on a GPU


# --- dtypes ---------------------------------------------------------------------------------------------
def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8,
             trt.uint8: torch.uint8, trt.bool: torch.bool}
    if dtype not in table:
        raise MatchrtError(f"engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


def _dims(dims: Any) -> tuple[int, ...]:
    """A TensorRT Dims (indexable, with a length) as a tuple of ints."""
    return tuple(int(dims[i]) for i in range(len(dims)))


# --- the session ----------------------------------------------------------------------------------------------
class TensorRTSession:
    """A deserialised engine with one execution context; `run` speaks torch tensors."""

    def __init__(self, engine_path: Path, options: dict[str, Any]):
        require_tensorrt()
        self.path = Path(engine_path)
        if not self.path.exists():
            raise MatchrtError(f"{self.path} does not exist; build it with `matchrt build --onnx MODEL.onnx`")
        self.device_index = _device_index(options)
        self.cuda_graph = bool(options.get("cuda_graph"))
        # the provenance check comes before TensorRT reads a byte of the engine, so a foreign
        # engine fails with the rebuild command rather than a deserialisation error
        self.record = read_provenance(self.path)
        check_compatible(self.path, self.record, current_environment(self.device_index))
        if self.record is None:
            warnings.warn(f"{self.path} has no provenance record ({self.path.name}.json); "
                          "it cannot be checked against this GPU and TensorRT", stacklevel=2)
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.ERROR)
        self._use_torch = _torch_cuda()
        if self._use_torch:
            import torch

            torch.cuda.set_device(self.device_index)
        self.runtime = trt.Runtime(self._logger)
        engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            hint = ("\n  " + rebuild_command(self.record, self.path)) if self.record else ""
            raise MatchrtError(f"TensorRT could not load {self.path} (corrupt, or built with another "
                               f"TensorRT or GPU). Rebuild it:{hint or ' matchrt build --onnx ... --force'}")
        self.engine: trt.ICudaEngine = engine
        self.context: trt.IExecutionContext = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: engine.get_tensor_dtype(n) for n in names}
        self._io: Optional[_CudaPythonIO] = None
        self._stream: Any = None
        self._graph: Any = None
        self._graph_key: Optional[tuple[tuple[int, ...], ...]] = None
        self._static: dict[str, Any] = {}
        if self._use_torch:
            import torch

            self._stream = torch.cuda.Stream(device=self.device_index)
        else:
            self._io = _CudaPythonIO(self.device_index)
            if self.cuda_graph:
                warnings.warn("CUDA graphs need torch with CUDA; running without", stacklevel=2)
                self.cuda_graph = False

    # -- shapes
    def _set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        missing = [n for n in self.input_names if n not in shapes]
        if missing:
            raise MatchrtError(f"{self.path.name} needs inputs {missing}")
        for name in self.input_names:
            if not self.context.set_input_shape(name, shapes[name]):
                lo, opt, hi = self.engine.get_tensor_profile_shape(name, 0)
                raise MatchrtError(
                    f"input {name} of shape {shapes[name]} is outside the engine's profile "
                    f"(min {_dims(lo)}, opt {_dims(opt)}, max {_dims(hi)}); rebuild with other "
                    "--min-size/--max-size")
        out: dict[str, tuple[int, ...]] = {}
        for name in self.output_names:
            shape = _dims(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise MatchrtError(
                    f"output {name} has a data-dependent shape {shape}; matchrt graphs use fixed-size "
                    "outputs with a validity mask (re-export the graph)")
            out[name] = shape
        return out

    # -- run
    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run the engine on a dict of tensors; returns {output name: tensor}."""
        if self._io is not None:
            return self._run_cuda_python(inputs)
        import torch

        device = torch.device("cuda", self.device_index)
        feed = {n: torch.as_tensor(inputs[n]).to(device=device, dtype=_torch_dtype(self.dtypes[n]))
                .contiguous() for n in self.input_names if n in inputs}
        shapes = {n: tuple(int(d) for d in t.shape) for n, t in feed.items()}
        current = torch.cuda.current_stream(device)
        if self.cuda_graph:
            outs = self._run_graph(feed, shapes, current)
            if outs is not None:
                return outs
        out_shapes = self._set_shapes(shapes)
        # outputs are allocated on the caller's stream, which waits for ours below: their memory
        # is never handed out again before TensorRT has written it
        outputs = {n: torch.empty(s, dtype=_torch_dtype(self.dtypes[n]), device=device)
                   for n, s in out_shapes.items()}
        for n, t in list(feed.items()) + list(outputs.items()):
            self.context.set_tensor_address(n, t.data_ptr())
        self._stream.wait_stream(current)
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise MatchrtError(f"TensorRT failed to run {self.path.name}")
        current.wait_stream(self._stream)
        return outputs

    def _run_graph(self, feed: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                   current: Any) -> Optional[dict[str, Any]]:
        """Replay a captured CUDA graph (captured on first use of each input-shape set)."""
        import torch

        key = tuple(shapes[n] for n in self.input_names if n in shapes)
        if self._graph is None or key != self._graph_key:
            if not self._capture(feed, shapes, key):
                return None
        for n, t in feed.items():
            self._static[n].copy_(t)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            self._graph.replay()
        current.wait_stream(self._stream)
        # the static buffers are overwritten by the next replay: hand out copies
        return {n: self._static[n].clone() for n in self.output_names}

    def _capture(self, feed: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 key: tuple[tuple[int, ...], ...]) -> bool:
        import torch

        self._graph = None
        device = torch.device("cuda", self.device_index)
        out_shapes = self._set_shapes(shapes)
        static = {n: torch.empty_like(t) for n, t in feed.items()}
        static.update({n: torch.empty(s, dtype=_torch_dtype(self.dtypes[n]), device=device)
                       for n, s in out_shapes.items()})
        for n, t in static.items():
            self.context.set_tensor_address(n, t.data_ptr())
        for n, t in feed.items():
            static[n].copy_(t)
        torch.cuda.synchronize(device)
        # one plain enqueue after a shape change lets TensorRT finish its lazy set-up outside capture
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise MatchrtError(f"TensorRT failed to run {self.path.name}")
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                self.context.execute_async_v3(self._stream.cuda_stream)
        except RuntimeError as exc:
            warnings.warn(f"CUDA graph capture failed for {self.path.name} ({exc}); running it "
                          "without CUDA graphs", stacklevel=3)
            self.cuda_graph = False
            return False
        self._graph, self._graph_key, self._static = graph, key, static
        return True

    def _run_cuda_python(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        assert self._io is not None
        arrays = {}
        for n in self.input_names:
            if n not in inputs:
                continue
            v = inputs[n]
            arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            arrays[n] = np.ascontiguousarray(arr, dtype=_numpy_dtype(self.dtypes[n]))
        out_shapes = self._set_shapes({n: tuple(a.shape) for n, a in arrays.items()})
        for n, a in arrays.items():
            self.context.set_tensor_address(n, self._io.upload(n, a))
        host = {n: np.empty(s, dtype=_numpy_dtype(self.dtypes[n])) for n, s in out_shapes.items()}
        for n, a in host.items():
            self.context.set_tensor_address(n, self._io.alloc(n, a.nbytes))
        if not self.context.execute_async_v3(self._io.stream_handle):
            raise MatchrtError(f"TensorRT failed to run {self.path.name}")
        for n, a in host.items():
            self._io.download(n, a)
        self._io.synchronize()
        return {n: torch.from_numpy(a) for n, a in host.items()}

    def close(self) -> None:
        """Free the CUDA graph, the context and the buffers."""
        self._graph = None
        self._static = {}
        if self._io is not None:
            self._io.free()
            self._io = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _numpy_dtype(dtype: trt.DataType) -> Any:
    import numpy as np
    import tensorrt as trt

    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32,
             trt.int64: np.int64, trt.int8: np.int8, trt.uint8: np.uint8, trt.bool: np.bool_}
    if dtype not in table:
        raise MatchrtError(f"engine tensor type {dtype} needs torch with CUDA (no numpy equivalent)")
    return table[dtype]


class _CudaPythonIO:
    """Device buffers and a stream through cuda-python, for machines whose torch has no CUDA."""

    def __init__(self, device: int):
        rt = _cudart()
        if rt is None:
            raise MatchrtError(f"torch has no CUDA here and cuda-python is missing: {INSTALL_HINT}")
        self.rt = rt
        self._check(rt.cudaSetDevice(device))
        self.stream = self._check(rt.cudaStreamCreate())[0]
        self.buffers: dict[str, tuple[int, int]] = {}

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def _check(self, result: Any) -> tuple[Any, ...]:
        result = result if isinstance(result, tuple) else (result,)
        err = result[0]
        if int(err) != 0:
            raise MatchrtError(f"CUDA error {err} (cuda-python)")
        return tuple(result[1:])

    def alloc(self, name: str, nbytes: int) -> int:
        old = self.buffers.get(name)
        if old is not None and old[1] >= nbytes:
            return old[0]
        if old is not None:
            self._check(self.rt.cudaFree(old[0]))
        ptr = int(self._check(self.rt.cudaMalloc(max(nbytes, 1)))[0])
        self.buffers[name] = (ptr, nbytes)
        return ptr

    def upload(self, name: str, array: Any) -> int:
        ptr = self.alloc(name, array.nbytes)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream))
        return ptr

    def download(self, name: str, array: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, self.buffers[name][0], array.nbytes,
                                            kind, self.stream))

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream))

    def free(self) -> None:
        for ptr, _ in self.buffers.values():
            self.rt.cudaFree(ptr)
        self.buffers.clear()
        self.rt.cudaStreamDestroy(self.stream)


# --- hooks -------------------------------------------------------------------------------------------------
@hookimpl
def register_backends(register: Callable[..., None]) -> None:
    register(BackendInfo("tensorrt", "NVIDIA TensorRT engines on a CUDA GPU (fp32/fp16/bf16, CUDA graphs)",
                         unavailable, artifact="engine", precisions=("fp32", "fp16", "bf16")))


@hookimpl
def open_session(backend: str, graph: Any, options: dict[str, Any]) -> Optional[TensorRTSession]:
    if backend != "tensorrt":
        return None
    return TensorRTSession(Path(graph), options)


def engine_options(options: dict[str, Any]) -> dict[str, Any]:
    """`matchrt build` options (a dict) -> keyword arguments of `matchrt.engine.build_engine`."""
    contract = None
    if options.get("matcher"):
        from ..host import get_host

        try:
            contract = get_host().matcher(str(options["matcher"])).contract
        except MatchrtError:
            contract = None
    return {
        "precision": options.get("precision") or "fp16",
        "strongly_typed": bool(options.get("strongly_typed")),
        "min_size": options.get("min_size"),
        "opt_size": options.get("opt_size"),
        "max_size": options.get("max_size"),
        "shapes": options.get("shapes"),
        "batch": options.get("batch"),
        "workspace_gb": float(options.get("workspace_gb") or 8.0),
        "opt_level": int(options["opt_level"]) if options.get("opt_level") is not None else 3,
        "timing_cache": options.get("timing_cache"),
        "fp32_layers": list(options.get("fp32_layers") or ()),
        "tf32": options.get("tf32"),
        "force": bool(options.get("force")),
        "progress": options.get("progress", True),
        "contract": contract,
        "weights_sha256": options.get("weights_sha256"),
    }


@hookimpl
def build_engine(backend: str, onnx_path: Path, output: Path, options: dict[str, Any]) -> Optional[Path]:
    if backend != "tensorrt":
        return None
    from ..engine import build_engine as build

    return build(onnx_path, output, **engine_options(options))
