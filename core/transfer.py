"""Page-locked (pinned) host memory at the two ends of a GPU run: prepared inputs written straight
into it (`host_buffer`) and copied to the GPU while the host launches the graph (`to_device`), and
large outputs (dense warps, certainty maps) copied back through it (`host_array`)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

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


def pinning_available() -> bool:
    """Whether page-locked host memory can be had here (torch with a CUDA GPU)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def host_buffer(shape: tuple[int, ...], dtype: Any = np.float32, pinned: bool = False) -> np.ndarray:
    """An uninitialised host array; page-locked when ``pinned`` (and a GPU is present).

    Writing a prepared input straight into page-locked memory makes its copy to the GPU a direct
    transfer: from pageable memory the driver stages it through a bounce buffer (two 832 x 832
    gray images took 0.47 ms of eloftr's 5.4 ms of GPU time per pair on an H100, roma_plus's four
    RGB inputs 3.5 ms). It costs no extra host copy: the preparation writes its last copy here
    instead of into ordinary memory. The array keeps its block alive; torch caches freed blocks,
    so a loop over pairs reuses them.
    """
    if not (pinned and pinning_available()):
        return np.empty(shape, dtype=dtype)
    import torch

    dt = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    return torch.empty(shape, dtype=dt, pin_memory=True).numpy()


def to_device(values: Iterable[Any], device: Any) -> tuple[list[Any], Callable[[], None]]:
    """``values`` as tensors on ``device``, and a ``wait`` to call before handing control back.

    Copies from page-locked memory to a CUDA device are queued without blocking the host, which
    meanwhile goes on to launch the graph (a blocking copy held it for the transfer first: eloftr
    832 compiled fp16 on an H200, 4.51 -> 4.37 ms a pair without the wait, session 25; the wait
    comes after the launch). ``wait`` returns once the copies are done, so that after the session's
    call the caller may reuse or free its host buffers, as after a blocking copy; it is usually done
    already by then. Elsewhere the copies block and ``wait`` does nothing.
    """
    import torch

    tensors = [torch.as_tensor(v) for v in values]
    device = torch.device(device)
    queued = [device.type == "cuda" and t.device.type == "cpu" and t.is_pinned() for t in tensors]
    moved = [t.to(device, non_blocking=q) for t, q in zip(tensors, queued)]
    if not any(queued):
        return moved, lambda: None
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))
    return moved, copied.synchronize


def batch_inputs(items: list[Any]) -> Any:
    """Equal-shaped prepared inputs (each 1 x ...) as one B x ... tensor, page-locked when they are."""
    import torch

    parts = [torch.as_tensor(x) for x in items]
    shape = (sum(int(p.shape[0]) for p in parts), *parts[0].shape[1:])
    out = torch.empty(shape, dtype=parts[0].dtype, pin_memory=parts[0].is_pinned())
    return torch.cat(parts, 0, out=out)


__all__ = ["host_array", "host_buffer", "batch_inputs", "pinning_available", "to_device"]
