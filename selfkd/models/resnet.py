"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

Layout: a 3x3 stem conv with 16 channels (+BN+ReLU), three stages of residual blocks
with base widths 16/32/64 and strides 1/2/2, global average pooling, one linear layer.
This is the layout of the official DLB code (Shen et al., "Self-Distillation from the
Last Mini-Batch for Consistency Regularization", CVPR 2022; github.com/Meta-knowledge-Lab/DLB,
``models/resnet.py``), which in turn follows the ONE/OKDDip/PCL online-KD code.

Choices, following the DLB code:

* Shortcuts that change shape (stride 2, or a channel change) are a 1x1 conv + BN
  (option B of He et al.), not the zero-padding option A of the original CIFAR paper.
  Option B adds 2,752 parameters to each BasicBlock net (two projections, 16->32 and
  32->64): e.g. ResNet-20 has 272,474 parameters here against the 269,722 (0.27M) of
  option A, for 10 classes.
* ``resnet110`` here is the classic BasicBlock net, depth 6n+2 with n=18.
  The DLB code's "resnet110" is a Bottleneck net [12, 12, 12] (depth 9n+2); that one is
  registered here as ``resnet110b``. Use ``resnet110b`` to reproduce DLB's tables.
* Bottleneck blocks use expansion 4, so a Bottleneck net's stages output 64/128/256
  channels; the first block of stage 1 therefore has a 1x1 conv projection shortcut
  (16 -> 64, stride 1), as in the DLB code.
* ``wrn20_8`` is the DLB code's ``wide_resnet20_8``: Bottleneck [2, 2, 2] with
  ``width_per_group=512`` in the torchvision convention, i.e. the inner (3x3) width of
  each bottleneck is 8x its base width: 128/256/512 inner channels, 64/128/256 output
  channels per stage. Depth = 9*2 + 2 = 20. (It is *not* a Zagoruyko-Komodakis WRN
  built from pre-activation basic blocks.)
* The linear head keeps PyTorch's default init (as the DLB code does); convs and BNs get
  the standard He init (see ``selfkd.models._common.init_conv_bn``). No zero-init of the
  last BN in each block.

Parameter counts (exact, for this implementation):

============  ===========  ============
model         10 classes   100 classes
============  ===========  ============
resnet8            78,042        83,892
resnet20          272,474       278,324
resnet32          466,906       472,756
resnet56          855,770       861,620
resnet110       1,730,714     1,736,564
resnet110b      1,147,738     1,170,868
wrn20_8         6,848,090     6,871,220
============  ===========  ============

Every net has ``stem``, ``stages`` (an ``nn.ModuleList`` of the 3 stages), ``pool`` and
``fc``; ``features(x)`` returns the 3 stage outputs and ``stage_channels`` their channel
counts, so that auxiliary exits (BYOT) can be attached after each stage.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import conv1x1, conv3x3, init_conv_bn, stage_outputs

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet110b",
    "wrn20_8",
]

_BASE_WIDTHS = (16, 32, 64)
_STRIDES = (1, 2, 2)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """Option-B shortcut (1x1 conv + BN) when the shape changes, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first may stride), BN after each, ReLU after the sum."""

    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, width_per_group: int = 64
    ) -> None:
        super().__init__()
        if width_per_group != 64:
            raise ValueError("BasicBlock supports only width_per_group=64")
        out_channels = planes * self.expansion
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (may stride), 1x1 expand (x4); BN after each, ReLU after the sum.

    The inner width is ``planes * width_per_group / 64`` (torchvision convention), so
    ``width_per_group=512`` makes the inner convs 8x wider.
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, width_per_group: int = 64
    ) -> None:
        super().__init__()
        width = planes * width_per_group // 64
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A 3-stage CIFAR ResNet.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        blocks_per_stage: number of blocks in each of the 3 stages.
        num_classes: size of the logits.
        in_channels: channels of the input images.
        width_per_group: bottleneck inner width multiplier x64 (torchvision convention).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: tuple[int, int, int],
        num_classes: int,
        in_channels: int = 3,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != 3:
            raise ValueError(f"expected 3 stages, got {len(blocks_per_stage)}")
        stem_channels = _BASE_WIDTHS[0]
        self.stem = nn.Sequential(
            conv3x3(in_channels, stem_channels),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList()
        self.stage_channels: list[int] = []
        channels = stem_channels
        for planes, stride, n_blocks in zip(_BASE_WIDTHS, _STRIDES, blocks_per_stage):
            layers = []
            for i in range(n_blocks):
                layers.append(block(channels, planes, stride if i == 0 else 1, width_per_group))
                channels = planes * block.expansion
            self.stages.append(nn.Sequential(*layers))
            self.stage_channels.append(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn(self)

    def features(self, x: Tensor) -> list[Tensor]:
        """The output of each of the 3 stages (after the stem), in order."""
        return stage_outputs(self.stages, self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)[-1]
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet8(num_classes: int, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-8: BasicBlock [1, 1, 1], stage outputs 16/32/64."""
    return ResNet(BasicBlock, (1, 1, 1), num_classes, in_channels)


def resnet20(num_classes: int, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-20: BasicBlock [3, 3, 3], stage outputs 16/32/64."""
    return ResNet(BasicBlock, (3, 3, 3), num_classes, in_channels)


def resnet32(num_classes: int, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-32: BasicBlock [5, 5, 5], stage outputs 16/32/64."""
    return ResNet(BasicBlock, (5, 5, 5), num_classes, in_channels)


def resnet56(num_classes: int, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-56: BasicBlock [9, 9, 9], stage outputs 16/32/64."""
    return ResNet(BasicBlock, (9, 9, 9), num_classes, in_channels)


def resnet110(num_classes: int, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-110: BasicBlock [18, 18, 18], stage outputs 16/32/64."""
    return ResNet(BasicBlock, (18, 18, 18), num_classes, in_channels)


def resnet110b(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-110 as in the DLB code: Bottleneck [12, 12, 12], stage outputs 64/128/256."""
    return ResNet(Bottleneck, (12, 12, 12), num_classes, in_channels)


def wrn20_8(num_classes: int, in_channels: int = 3) -> ResNet:
    """DLB's WRN-20-8: Bottleneck [2, 2, 2], inner width 8x (128/256/512), outputs 64/128/256."""
    return ResNet(Bottleneck, (2, 2, 2), num_classes, in_channels, width_per_group=512)
