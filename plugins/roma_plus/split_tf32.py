"""fp32 matrix products on tensor cores: each operand split into a TF32 head and a TF32 tail.

``a @ b`` = a_hi b_hi + a_hi b_lo + a_lo b_hi (+ a_lo b_lo, dropped), where a_hi keeps the
sign, exponent and the 10 mantissa bits TF32 holds and a_lo = a - a_hi (exact in fp32). Three
TF32 products give about 21 mantissa bits, close to IEEE fp32 (23), at a third of the TF32
tensor-core rate: on Hopper still about twice the rate of IEEE fp32 (which runs on CUDA cores).
This is the "3xTF32" scheme of NVIDIA's CUTLASS.

Used for roma_plus's coarse stage (``coarse_precision=tf32x3``): DINOv2 and the coordinate
decoder are plain matrix products whose rounding the GP turns into arg-max flips, so plain
TF32 is too coarse, and IEEE fp32 is the slowest part of the model. Torch runs only (the region
is eager); exported graphs keep those layers in IEEE fp32.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from matchrt.plugins.roma_full.ops import tf32_switches

_TAIL_BITS = -8192  # 0xFFFFE000 as int32: clears the 13 mantissa bits TF32 does not hold


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(head, tail) with head exactly representable in TF32 and head + tail == x (fp32)."""
    head = (x.contiguous().view(torch.int32) & _TAIL_BITS).view(torch.float32)
    return head, x - head


def matmul_x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of fp32 tensors from three TF32 products (small terms first)."""
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    with tf32_switches(True):
        return (a_lo @ b_hi + a_hi @ b_lo) + a_hi @ b_hi


def linear_x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` of fp32 tensors from three TF32 products."""
    x_hi, x_lo = split(x)
    w_hi, w_lo = split(weight)
    with tf32_switches(True):
        out = (F.linear(x_lo, w_hi) + F.linear(x_hi, w_lo)) + F.linear(x_hi, w_hi)
    return out if bias is None else out + bias


def attention_x3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                 **_: Any) -> torch.Tensor:
    """softmax(q k^T * scale) v with both products split (the softmax in fp32)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return matmul_x3(torch.softmax(matmul_x3(q * scale, k.transpose(-2, -1)), dim=-1), v)


class SplitTF32(TorchFunctionMode):
    """Within the mode, fp32 CUDA matrix products (linear, matmul, bmm, attention) run as 3xTF32."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.is_cuda and first.dtype == torch.float32:
            if func is F.linear:
                return linear_x3(*args, **kwargs)
            if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm):
                other = args[1]
                if isinstance(other, torch.Tensor) and other.dtype == torch.float32:
                    return matmul_x3(first, other)
            if func is F.scaled_dot_product_attention and not kwargs.get("attn_mask") and len(args) == 3:
                return attention_x3(*args, **kwargs)
        return func(*args, **kwargs)
