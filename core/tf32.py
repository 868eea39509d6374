"""PyTorch's TF32 switches as one context manager, for regions that must stay IEEE fp32 (or may not)."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def tf32_switches(enabled: bool) -> Iterator[None]:
    """PyTorch's TF32 switches (cuBLAS matmuls, cuDNN convolutions) set for the region.

    They are process-wide, so they are restored on exit.
    """
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
