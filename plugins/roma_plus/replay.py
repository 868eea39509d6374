"""CUDA-graph replay of the coarse stage's split regions (DINOv2 and the coordinate decoder).

Those regions run eagerly, outside torch.compile (their split products pick their own tensor-core
precision per layer), so no CUDA graph of torch.compile covers them, and launching their kernels
one by one from Python (535 a pair in DINOv2's region) costs more CPU time than the GPU needs to
run them: on an H100 host, profiled, that region held the CPU for 47 ms per pair against 18.9 ms
of GPU work, so the GPU time the split products saved never reached the wall clock. ``replayed`` captures a
region's launches once per input shape and replays them: the same kernels on the same data,
so the same bits, for one launch.

A module's graphs live on the module (its split copy, rebuilt when the weights change), keyed by
the inputs' shapes, dtypes and device and the grad / inference mode. The first call of a key runs
eagerly (it compiles Triton kernels and sets up library handles, which a capture may not do), the
second captures and replays, later ones replay. Inputs are copied into the graph's own buffers and
outputs copied out, with the eager call's strides (``copy_like``), so callers may keep them. Not for
concurrent callers of one model (the buffers are shared); a capture that fails leaves that key eager
for good (with a warning naming the cause).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map

_GRAPHS_ATTR = "_matchrt_region_graphs"  # a plain attribute: outside the state dict and children
_SEEN = "seen"  # the key ran once, eagerly
_EAGER = "eager"  # capture failed: the key stays eager


class _Captured:
    """One captured call: its input buffers, the graph, and the outputs the graph writes."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device):
            # buffers laid out as the eager call's inputs (a view that skips elements stays so), so the
            # captured run's views and outputs have the eager call's strides
            self.inputs = tuple(copy_like(a) if isinstance(a, torch.Tensor) else a for a in args)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # one run on a side stream before capturing, as torch advises
                fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn(*self.inputs)

    def __call__(self, args: tuple[Any, ...]) -> Any:
        for buffer, a in zip(self.inputs, args):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(a)
        self.graph.replay()
        return tree_map(lambda t: copy_like(t) if isinstance(t, torch.Tensor) else t, self.outputs)


def copy_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in new memory with ``t``'s sizes and strides, also where ``t`` is a view that skips
    elements (DINOv2's patch tokens without the class token, the decoder's classes without its
    certainty channel), which ``clone`` would make contiguous; an inference tensor exactly when ``t`` is one.

    Why: the first call of an input kind runs eagerly and returns such views; replays must return
    tensors of the same layout. torch.compile guards the compiled code after a region on its inputs'
    strides, so contiguous copies from the second call on recompiled every compiled function downstream
    of DINOv2 and the decoder once: 105 s of a roma_plus pair's second call on an H200 (session 23).
    """
    # an inference tensor where ``t`` is one, else a normal tensor (also under inference mode): torch.compile
    # guards on the dispatch keys too, and an eager output that is a view of a normal input is a normal tensor
    with torch.inference_mode(t.is_inference()):
        if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
            return t.clone()  # an expanded view: elements share memory, nothing can be written in that layout
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        return out.copy_(t)


def _key(args: tuple[Any, ...]) -> tuple[Any, ...]:
    parts: list[Any] = [torch.is_grad_enabled(), torch.is_inference_mode_enabled()]
    for a in args:
        parts.append((tuple(a.shape), a.dtype, str(a.device), a.requires_grad) if isinstance(a, torch.Tensor)
                     else ("value", repr(a)))
    return tuple(parts)


def replayable(args: tuple[Any, ...]) -> bool:
    """Inputs a graph can take: CUDA tensors (at least one, all on one device), no capture under way,
    no trace (torch.export's fake tensors have no memory to capture)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return (bool(tensors) and all(t.is_cuda for t in tensors) and len({t.device for t in tensors}) == 1
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


def replayed(module: torch.nn.Module, *args: Any) -> Any:
    """``module(*args)``, through a CUDA graph of it once the same kind of input comes again."""
    if not replayable(args):
        return module(*args)
    graphs = module.__dict__.setdefault(_GRAPHS_ATTR, {})
    key = _key(args)
    entry = graphs.get(key)
    if entry is None or entry == _EAGER:
        if entry is None:
            graphs[key] = _SEEN
        return module(*args)
    if entry == _SEEN:
        try:
            entry = _Captured(module, args)
        except RuntimeError as error:
            graphs[key] = _EAGER
            warnings.warn(f"matchrt: the CUDA-graph capture of {type(module).__name__} failed, it runs eagerly "
                          f"from now on: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
                          RuntimeWarning, stacklevel=2)
            return module(*args)
        graphs[key] = entry
    return entry(args)


def drop_graphs(module: torch.nn.Module) -> None:
    """Free the graphs (and their memory pools) kept for ``module``."""
    module.__dict__.pop(_GRAPHS_ATTR, None)


__all__ = ["copy_like", "drop_graphs", "replayed", "replayable"]
