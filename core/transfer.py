"""Device -> host copies of large outputs (dense warps, certainty maps) through page-locked memory."""

from __future__ import annotations

from typing import Any

import numpy as np


def host_array(value: Any) -> np.ndarray:
    """``value`` (a tensor on any device, an array or a sequence) as a numpy array.

    A CUDA tensor is copied into page-locked (pinned) host memory: a copy into pageable memory
    runs at a fraction of the bus's speed (roma_plus's dense warp and certainty, 30 MB a pair,
    took 8.3 ms that way on an H100 host, 0.55 ms pinned). torch caches pinned blocks, so a loop
    over pairs reuses them once each pair's arrays are dropped; arrays kept alive keep their
    page-locked memory.
    """
    if isinstance(value, np.ndarray):
        return value
    if not hasattr(value, "detach"):
        return np.asarray(value)
    import torch

    tensor = value.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # numpy has no bf16, and callers want fp32 maps
    if not tensor.is_cuda:
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()


__all__ = ["host_array"]
