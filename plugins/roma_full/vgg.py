"""VGG19-BN feature pyramid: the fine-scale encoder of RoMa (strides 1, 2, 4, 8).

The module list mirrors torchvision's ``vgg19_bn().features[:39]`` index by index (conv, bn,
relu, ..., maxpool), so a checkpoint key ``matcher.model.encoder.cnn.layers.N.<p>`` maps onto
``layers.N.<p>`` of this module by stripping a prefix. The last max-pool of that slice (index 39)
is left out: its output is never used, only the tensors entering each max-pool are.
"""

from __future__ import annotations

import torch
from torch import nn

# channels of each conv; "M" is a 2x2 max-pool. Four stages end in a pool: strides 1, 2, 4, 8.
_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512))
STRIDES: tuple[int, ...] = (1, 2, 4, 8)
CHANNELS: dict[int, int] = {1: 64, 2: 128, 4: 256, 8: 512}


class VGG19Pyramid(nn.Module):
    """VGG19-BN trunk returning ``{1: B x 64 x H x W, 2: .. x H/2, 4: .. x H/4, 8: B x 512 x H/8}``.

    Each entry is the activation right before a max-pool, i.e. after the last conv-bn-relu of the
    stage. Sides that are not multiples of 8 are floored by the pools (as upstream).
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.taps: list[int] = []  # indices whose INPUT is a pyramid level (the max-pools)
        cin = 3
        for i, stage in enumerate(_STAGES):
            if i > 0:
                self.taps.append(len(layers))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            for cout in stage:
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]
                cin = cout
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        feats: dict[int, torch.Tensor] = {}
        level = 0
        for idx, layer in enumerate(self.layers):
            if idx in self.taps:
                feats[STRIDES[level]] = x
                level += 1
            x = layer(x)
        feats[STRIDES[level]] = x  # the last stage's output (upstream pools it next and drops that)
        return feats


def vgg_key(checkpoint_key: str, prefix: str = "matcher.model.encoder.cnn.") -> str | None:
    """``matcher.model.encoder.cnn.layers.N.p`` -> ``layers.N.p`` (None for other keys)."""
    return checkpoint_key[len(prefix):] if checkpoint_key.startswith(prefix) else None
