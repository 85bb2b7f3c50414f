"""CIFAR VGG-16/19 with BatchNorm (Simonyan & Zisserman, ICLR 2015; BN variant).

Follows the official DLB code (Shen et al., CVPR 2022; github.com/Meta-knowledge-Lab/DLB,
``models/vgg.py``), which follows the ONE/OKDDip/PCL online-KD code:

* five conv stages, each 3x3 conv + BN + ReLU repeated, then a 2x2 max-pool:
  VGG-16 = [64]*2, [128]*2, [256]*3, [512]*3, [512]*3;
  VGG-19 = [64]*2, [128]*2, [256]*4, [512]*4, [512]*4.
  On 32x32 inputs the five pools leave a 512x1x1 map.
* a 3-layer head 512 -> 512 -> 512 -> K with ReLU between the layers.

Choices where we differ from, or had to read into, the DLB code:

* Dropout: the DLB code has ``Dropout(p=dropout)`` after each hidden FC layer, but its
  default is ``dropout=0.0`` and the training script never sets it, so DLB trains
  *without* dropout. The registry builds with ``dropout=0.0``; the ``VGG`` class takes a
  ``dropout`` argument, and the head's state_dict keys do not depend on it.
* The DLB convs carry a bias although a BN follows each one; that bias is redundant
  (BN removes it), so ours have none. This saves 4,224 (VGG-16) / 5,504 (VGG-19)
  parameters and changes nothing else.
* An ``AdaptiveAvgPool2d(1)`` sits before the head, so inputs larger than 32x32 (e.g.
  64x64) work; on 32x32 it is a no-op. Inputs must be at least 32x32 (five 2x2 pools).
* Init as in the DLB code: convs Kaiming normal (fan_out, relu), BN 1/0, linear weights
  N(0, 0.01) with zero bias.

Parameter counts (exact, for this implementation):

=======  ===========  ============
model    10 classes   100 classes
=======  ===========  ============
vgg16     15,249,354    15,295,524
vgg19     20,560,330    20,606,500
=======  ===========  ============

Like the ResNets, ``features(x)`` returns the output of each of the 5 stages (after its
pool) and ``stage_channels`` their channel counts.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ._common import conv3x3, init_conv_bn, stage_outputs

__all__ = ["VGG", "vgg16", "vgg19"]

# Stage widths and convs per stage.
_CONFIGS: dict[int, tuple[tuple[int, int], ...]] = {
    16: ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)),
    19: ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4)),
}


class VGG(nn.Module):
    """VGG with BN for CIFAR-sized inputs.

    Args:
        depth: 16 or 19.
        num_classes: size of the logits.
        in_channels: channels of the input images.
        dropout: dropout after each hidden FC layer (DLB: 0.0).
    """

    def __init__(
        self, depth: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth not in _CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(_CONFIGS)}, got {depth}")
        self.stages = nn.ModuleList()
        self.stage_channels: list[int] = []
        channels = in_channels
        for width, n_convs in _CONFIGS[depth]:
            layers: list[nn.Module] = []
            for _ in range(n_convs):
                layers += [conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            self.stages.append(nn.Sequential(*layers))
            self.stage_channels.append(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)

        def drop() -> nn.Module:
            return nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(channels, 512)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("drop1", drop()),
                    ("fc2", nn.Linear(512, 512)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("drop2", drop()),
                    ("fc3", nn.Linear(512, num_classes)),
                ]
            )
        )
        init_conv_bn(self)
        for m in self.classifier.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> list[Tensor]:
        """The output of each of the 5 stages, in order."""
        return stage_outputs(self.stages, x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)[-1]
        return self.classifier(torch.flatten(self.pool(x), 1))


def vgg16(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-16 with BN, CIFAR head 512-512-K, no dropout (as DLB trains it)."""
    return VGG(16, num_classes, in_channels)


def vgg19(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-19 with BN, CIFAR head 512-512-K, no dropout (as DLB trains it)."""
    return VGG(19, num_classes, in_channels)
