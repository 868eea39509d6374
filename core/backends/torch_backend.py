"""The `torch` backend: runs a matcher's export wrapper directly, eager or compiled, any precision."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional

from ..hookspecs import hookimpl
from ..types import BackendInfo, GraphSpec

DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def _unavailable() -> Optional[str]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed: pip install torch"
    return None


class TorchSession:
    """Calls a GraphSpec's module; fp16/bf16 run under autocast, inputs and outputs stay fp32."""

    def __init__(self, graph: GraphSpec, options: dict[str, Any]):
        import torch

        self.input_names = list(graph.input_names)
        self.output_names = list(graph.output_names)
        self.device = torch.device(options.get("device") or "cpu")
        self.precision = options.get("precision", "fp32")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            from ..errors import MatchrtError

            raise MatchrtError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        module = graph.module.eval().to(self.device)
        if options.get("compile"):
            # "reduce-overhead" captures CUDA graphs and replays them for fixed shapes
            mode = "reduce-overhead" if options.get("cuda_graph") else "default"
            module = torch.compile(module, mode=mode, dynamic=False)
        self.module = module

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        args = [torch.as_tensor(inputs[n]).to(self.device) for n in self.input_names]
        autocast: Any = nullcontext()
        if self.precision in DTYPES:
            autocast = torch.autocast(self.device.type, dtype=getattr(torch, DTYPES[self.precision]))
        with torch.inference_mode(), autocast:
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        named = {n: out[n] for n in self.output_names} if isinstance(out, dict) else dict(
            zip(self.output_names, out))
        # reduced precision stays inside the model: callers always get fp32 (as an fp32 graph gives)
        return {n: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
                for n, v in named.items()}


@hookimpl
def register_backends(register):
    register(BackendInfo("torch", "PyTorch eager (or torch.compile), CPU or CUDA, fp32/fp16/bf16 autocast",
                         _unavailable, artifact="torch", precisions=("fp32", "fp16", "bf16")))


@hookimpl
def open_session(backend: str, graph: Any, options: dict[str, Any]):
    if backend != "torch":
        return None
    return TorchSession(graph, options)
