"""fp32 linear layers as one TF32 tensor-core product of three times the depth ("3xTF32").

``x W^T`` = x_hi W_hi^T + x_lo W_hi^T + x_hi W_lo^T (+ x_lo W_lo^T, about 2^-22 of it, dropped),
where ``x_hi`` keeps the sign, exponent and the 10 mantissa bits TF32 holds and ``x_lo = x - x_hi``
(exact in fp32); likewise for W. The three products are one matrix product over concatenated
depth, ``[x_hi | x_lo | x_hi] @ [W_hi | W_hi | W_lo]^T``, with the weight side built once: one
GEMM call, accumulated in fp32 like an IEEE fp32 GEMM, at a third of the TF32 tensor-core rate
(about 500 TFLOP/s dense on an H100, against 67 for IEEE fp32 on the CUDA cores).

Used by roma_plus's ``coarse_precision=tf32x3`` for the linear layers of DINOv2 and the
coordinate decoder (their attention stays IEEE fp32): the GP turns plain TF32's rounding into
coarse arg-max flips (5.37% of the cells on an H200, against 1.75% from +-0.5/255 input noise),
while an earlier three-call version of this scheme flipped 0.09% but was slower than IEEE fp32
(three GEMMs, two sums, per-call weight splits). Torch runs on TF32 GPUs only (eager, and
torch.compile, which leaves the strict coarse stage eager): traced for ONNX or AOTInductor, or on
a CPU, the layer is the plain linear (IEEE fp32 layers in the graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from matchrt.fold import shallow_module_copy
from matchrt.tf32 import tf32_switches

_TF32_MASK = -8192  # 0xFFFFE000 as int32: keeps sign, exponent and the 10 mantissa bits of TF32


def tf32_head(x: torch.Tensor) -> torch.Tensor:
    """x with the 13 mantissa bits TF32 does not hold cleared (exactly representable in TF32)."""
    return (x.float().contiguous().view(torch.int32) & _TF32_MASK).view(torch.float32)


def split_operand(x: torch.Tensor, weight_side: bool) -> torch.Tensor:
    """[x_hi | x_lo | x_hi] (activations) or [W_hi | W_hi | W_lo] (weights) along the last axis."""
    head = tf32_head(x)
    tail = x.float() - head
    return torch.cat((head, head, tail) if weight_side else (head, tail, head), dim=-1)


class SplitLinear(nn.Module):
    """An ``nn.Linear`` computed as one 3xTF32 product; shares the layer's weight and bias."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        # built once, not a parameter (no checkpoint key): 3x the layer's weight memory
        self.register_buffer("weight_split", split_operand(linear.weight.detach(), True), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # traced graphs (ONNX, torch.export for AOTInductor) keep the plain layer: they have one
        # TF32 setting for the whole graph, so a split product would run as three IEEE ones
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return self.linear(x)
        with tf32_switches(True):
            return F.linear(split_operand(x, False), self.weight_split, self.linear.bias)


def split_linears(module: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its parameters, every ``nn.Linear`` in it a ``SplitLinear``."""
    if isinstance(module, nn.Linear):
        return SplitLinear(module)
    out = shallow_module_copy(module)
    for name, child in module.named_children():
        out._modules[name] = split_linears(child)
    return out


_COPY_ATTR = "_matchrt_split_tf32"  # where split_copy keeps a module's copy (a plain attribute)


def split_copy(module: nn.Module) -> nn.Module:
    """The 3xTF32 copy of ``module`` (``split_linears``), built once and kept on the module itself,
    outside its state dict and children, so every view of a model shares one copy (a bench's
    reference and timed pipelines held two, 4.4 GB each for DINOv2 and the decoder). Rebuilt
    when the weights move or reload; the old copy is dropped before the new one is built."""
    first = next(module.parameters())
    key = (str(first.device), first.data_ptr(), first._version)
    cached = module.__dict__.get(_COPY_ATTR)
    if cached is None or cached[0] != key:
        module.__dict__[_COPY_ATTR] = None
        module.__dict__[_COPY_ATTR] = (key, split_linears(module))
    return module.__dict__[_COPY_ATTR][1]


def split_pays(device: torch.device) -> bool:
    """Does a 3xTF32 product beat an IEEE fp32 one here? Only on a GPU with TF32 tensor cores
    (compute capability 8.0 and up); elsewhere the split would only triple the work."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


__all__ = ["tf32_head", "split_operand", "SplitLinear", "split_linears", "split_copy", "split_pays"]
