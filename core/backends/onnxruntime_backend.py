"""The `onnxruntime` backend: runs exported graphs with the providers asked for, in order."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import MatchrtError
from ..hookspecs import hookimpl
from ..types import BackendInfo


def _unavailable() -> Optional[str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)"
    return None


def _providers(options: dict[str, Any]) -> list[str]:
    import onnxruntime as ort

    asked = options.get("providers") or (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if options.get("device") == "cuda"
        else ["CPUExecutionProvider"]
    )
    available = ort.get_available_providers()
    missing = [p for p in asked if p not in available]
    if options.get("device") == "cuda" and "CUDAExecutionProvider" in missing:
        raise MatchrtError(
            "onnxruntime has no CUDAExecutionProvider here (available: "
            f"{', '.join(available)}). Install onnxruntime-gpu or use --device cpu."
        )
    return [p for p in asked if p in available] or ["CPUExecutionProvider"]


def session_options(options: dict[str, Any]):
    """SessionOptions with full graph optimisation and the thread count asked for."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if options.get("threads"):
        so.intra_op_num_threads = int(options["threads"])
    return so


class OrtSession:
    """An InferenceSession speaking torch tensors."""

    def __init__(self, path: Path, options: dict[str, Any]):
        import onnxruntime as ort

        if options.get("precision", "fp32") != "fp32":
            raise MatchrtError(
                "the onnxruntime backend runs the graph's own precision (fp32); "
                "use --backend tensorrt or torch for fp16/bf16"
            )
        self.session = ort.InferenceSession(str(path), session_options(options),
                                            providers=_providers(options))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        feed = {}
        for n in self.input_names:
            v = inputs[n]
            feed[n] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out = self.session.run(self.output_names, feed)
        return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(self.output_names, out)}


@hookimpl
def register_backends(register):
    register(BackendInfo("onnxruntime", "ONNX Runtime (CPU always; CUDA with onnxruntime-gpu)",
                         _unavailable, artifact="onnx", precisions=("fp32",)))


@hookimpl
def open_session(backend: str, graph: Any, options: dict[str, Any]):
    if backend != "onnxruntime":
        return None
    return OrtSession(Path(graph), options)


@hookimpl
def build_engine(backend: str, onnx_path: Path, output: Path, options: dict[str, Any]):
    """Save onnxruntime's fully optimised graph, so later sessions skip the optimisation."""
    if backend != "onnxruntime":
        return None
    import onnxruntime as ort

    so = session_options(options)
    so.optimized_model_filepath = str(output)
    ort.InferenceSession(str(onnx_path), so, providers=_providers(options))
    return Path(output)
