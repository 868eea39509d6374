"""Small tensor helpers shared by the RoMa modules (and by roma_plus)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from matchrt.tf32 import tf32_switches


def stable_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax with the maximum subtracted first.

    TensorRT hazard: in fp16 an un-shifted exp overflows for logits above ~11; the shift keeps
    every exponent <= 0 and changes nothing mathematically.
    """
    return torch.softmax(x - x.amax(dim=dim, keepdim=True), dim=dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims.

    Under torch: one fused kernel (flash / memory-efficient attention), no n x n matrix in
    memory. In an ONNX export: MatMul, max-shifted Softmax, MatMul (fp16-safe in any runtime).
    """
    if torch.onnx.is_in_onnx_export():
        return stable_softmax((q * scale) @ k.transpose(-2, -1), -1) @ v
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def centre_coords(n: int, like: torch.Tensor) -> torch.Tensor:
    """Normalised centres of n cells along one side: -1 + (2k + 1) / n for k = 0..n-1.

    Computed from an integer ramp (no linspace: exports as Range + arithmetic).
    """
    k = torch.arange(n, device=like.device, dtype=like.dtype)
    return (2.0 * k + 1.0) / n - 1.0


def coarse_grid(b: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """B x 2 x h x w grid of cell centres in [-1, 1]; channel 0 is x, channel 1 is y."""
    ys = centre_coords(h, like)[:, None].expand(h, w)
    xs = centre_coords(w, like)[None, :].expand(h, w)
    return torch.stack((xs, ys), dim=0)[None].expand(b, 2, h, w)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[A, B] -> [B, A] along the batch axis (the symmetric batch's support side)."""
    a, b = x.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


@contextlib.contextmanager
def strict_fp32(device_type: str, tf32: bool = False) -> Iterator[None]:
    """Autocast off and, on CUDA, no TF32 in matmuls or convolutions: IEEE fp32 for the region.

    Autocast alone is not enough: PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by
    default, and the GP turns rounding of its inputs into arg-max flips of the coarse match.
    ``tf32=True`` switches TF32 on instead (fp32 tensors, TF32 matrix products).
    """
    switches = tf32_switches(tf32) if device_type == "cuda" else contextlib.nullcontext()
    with switches, torch.autocast(device_type=device_type, enabled=False):
        yield
