"""Inference-time graph folding: BatchNorm layers merged into the convolution before them.

An eval-mode BatchNorm is an affine map per channel, so conv -> BN equals one conv with scaled
weights and a shifted bias. Folding removes a full read and write of the activation per BN
(RoMa's refiners and VGG encoder hold 50+ such pairs at up to 864 x 864) from every backend's
graph: torch, Inductor, ONNX and TensorRT all see the folded convolution.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` for an eval-mode BatchNorm (any groups, any stride)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean) * scale + shift)
    return fused


def fold_batchnorm(module: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d in a Sequential or ModuleList.

    The BatchNorm is replaced by ``nn.Identity`` (indices stay, so code that taps a layer by
    position keeps working). Returns the number of folded pairs. Call it on a copy
    (``folded_copy``) when the original must keep its state-dict keys.
    """
    count = 0
    for container in list(module.modules()):
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        names = list(container._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = container._modules[first], container._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training:
                container._modules[first] = fold_conv_bn(conv, bn)
                container._modules[second] = nn.Identity()
                count += 1
    return count


def folded_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with its conv -> BatchNorm pairs folded."""
    out = copy.deepcopy(module)
    fold_batchnorm(out)
    return out


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """A copy sharing every parameter and submodule, whose submodules can be replaced alone.

    (``copy.copy`` of a module shares its ``_modules`` dict: replacing a child there would
    replace it in the original too.)
    """
    out = copy.copy(module)
    out._modules = dict(module._modules)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    return out
