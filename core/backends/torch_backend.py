"""The `torch` backend: runs a matcher's export wrapper directly, eager or compiled, any precision."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Optional

from ..hookspecs import hookimpl
from ..transfer import to_device
from ..types import BackendInfo, GraphSpec

DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
FREEZE_ENV = "MATCHRT_FREEZE"  # "1" / "0": freeze every compiled CUDA graph's weights, or none


def compile_options(device_type: str, cuda_graph: bool, freeze_weights: bool = False) -> dict[str, Any]:
    """Inductor settings of a compiled session: CUDA graphs when asked ("reduce-overhead"), and on
    CUDA Inductor's freezing where the graph asks for it (``GraphSpec.freeze_weights``): the weights
    become constants of the compiled graphs, so what is computed from weights alone (autocast's
    casts of every layer's weights, transposes, the depth-wise kernels' tap layouts) is folded once
    at compile time instead of run on every call. eloftr 832 compiled fp16 on an H200: 5.5 -> 4.8 ms
    a pair (session 20, with Inductor's global switch); roma_plus's comparison is still open, so the
    choice is per graph. Sessions run under inference mode, so the weights cannot change under a
    compiled graph. CPUs never freeze (Inductor's CPU freezing also repacks weights for oneDNN:
    another set of kernels). ``MATCHRT_FREEZE=1`` or ``0`` overrides the graph's choice on CUDA."""
    override = os.environ.get(FREEZE_ENV, "").strip()
    freeze = freeze_weights if override not in ("0", "1") else override == "1"
    return {"triton.cudagraphs": bool(cuda_graph), "freezing": device_type == "cuda" and freeze}


class _FreezingOn:
    """``inductor_config.freezing = True`` for the duration of a block, then the previous value. Set
    directly: ``inductor_config.patch`` took 22 us a call on an H200 host (session 25), 3-4x this."""

    def __enter__(self) -> None:
        import torch._inductor.config as inductor_config

        self.previous = inductor_config.freezing
        inductor_config.freezing = True

    def __exit__(self, *exc: Any) -> None:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = self.previous


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
        self.freeze = False
        if options.get("compile"):
            # triton.cudagraphs (mode "reduce-overhead") captures CUDA graphs and replays them for fixed shapes
            settings = compile_options(self.device.type, bool(options.get("cuda_graph")), graph.freeze_weights)
            module = torch.compile(module, dynamic=False, options=settings)
            self.freeze = bool(settings["freezing"])
        self.module = module

    def _freezing(self) -> Any:
        """Inductor's freezing switched on around a frozen session's calls. Dynamo reads it from the
        global config while it traces (it then keeps the parameters as graph constants instead of
        inputs); torch.compile's options reach Inductor only, so with them alone nothing was frozen
        (session 21: eloftr's compiled graph ran unfrozen since session 20). The setting is the
        process's: another thread compiling during such a call would freeze too."""
        return _FreezingOn() if self.freeze else nullcontext()

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import torch

        args, inputs_copied = to_device((inputs[n] for n in self.input_names), self.device)
        autocast: Any = nullcontext()
        if self.precision in DTYPES:
            autocast = torch.autocast(self.device.type, dtype=getattr(torch, DTYPES[self.precision]))
        try:
            with torch.inference_mode(), autocast, self._freezing():
                out = self.module(*args)
        finally:
            inputs_copied()  # the caller's host buffers are free again (also after a failed call)
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
