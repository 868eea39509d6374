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

__all__ = ["tl", "triton"]
