"""Triton for matchrt's GPU kernels that torch registers as ops (``torch.library.triton_op``).

``triton`` and ``tl`` are the modules, or None where the kernels cannot run as ops: Triton is not
installed (CPU-only torch), or torch is older than 2.6 and has no ``triton_op``. Modules that
define such kernels import both from here and fall back to plain torch when ``triton`` is None.
"""

from __future__ import annotations

from typing import Any

import torch

triton: Any
tl: Any
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
if not hasattr(torch.library, "triton_op"):
    triton = tl = None


def op_runs_on(x: torch.Tensor) -> bool:
    """Can a Triton op take ``x``: Triton usable, a CUDA tensor, and not an ONNX export (exported
    graphs keep the ordinary torch ops)?"""
    return triton is not None and x.is_cuda and not torch.onnx.is_in_onnx_export()


def launch_runs_on(x: torch.Tensor) -> bool:
    """Can a kernel launched directly (not registered as an op) take ``x``: as ``op_runs_on``, and
    no trace under way (torch.compile, torch.export: a direct launch on their fake tensors fails, so
    traced code takes the kernel's torch path)?"""
    return op_runs_on(x) and not torch.compiler.is_compiling()


__all__ = ["launch_runs_on", "op_runs_on", "tl", "triton"]
