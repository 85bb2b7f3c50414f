"""CIFAR DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

``densenet40`` is the DLB code's ``densenetd40k12`` (Shen et al., CVPR 2022;
github.com/Meta-knowledge-Lab/DLB, ``models/densenet.py``, after the ONE/OKDDip code and
gpleiss/efficient_densenet_pytorch). Despite the name it is the *BC* variant, not the
original DenseNet-40 (k=12, 1.0M params, no bottlenecks):

* stem: one 3x3 conv to 2k = 24 channels (no BN/ReLU: every dense layer is pre-activation);
* 3 dense blocks of 6 layers each, growth rate k = 12; each layer is
  BN-ReLU-1x1 conv (4k = 48 channels, "B" bottleneck)-BN-ReLU-3x3 conv (k channels), and
  its output is concatenated to its input;
* between blocks a transition BN-ReLU-1x1 conv-2x2 avg-pool with compression 0.5
  ("C"): channels 24 -> 96 -> 48 -> 120 -> 60 -> 132;
* a final BN-ReLU, global average pool, one linear layer on the 132 features.

Depth: 3 blocks x 6 layers x 2 convs + stem + 2 transitions + fc = 40.

Choices: no dropout (DLB's ``drop_rate`` default 0, never set); the final pool is adaptive,
so other input sizes work (DLB hard-codes an 8x8 pool); the convs get Kaiming normal with
fan_out/relu like our other nets (the DLB code uses PyTorch's ``kaiming_normal_`` default,
fan_in); BN 1/0; the linear layer keeps PyTorch's default weight init with a zero bias,
as in the DLB code.

Parameter counts (exact, for this implementation):

==========  ===========  ============
model       10 classes   100 classes
==========  ===========  ============
densenet40      176,122       188,092
==========  ===========  ============

Like the ResNets, ``features(x)`` returns the output of each of the 3 dense blocks
(stage 2 and 3 start with the preceding transition) and ``stage_channels`` their channel
counts (96/120/132).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import conv1x1, conv3x3, init_conv_bn, stage_outputs

__all__ = ["DenseNet", "densenet40"]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size*k)-BN-ReLU-3x3 conv (k); returns input ++ new features."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        inner = bn_size * growth_rate
        self.layers = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            conv1x1(in_channels, inner),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            conv3x3(inner, growth_rate),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            conv1x1(in_channels, out_channels),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )


class DenseNet(nn.Module):
    """A 3-block CIFAR DenseNet-BC.

    Args:
        growth_rate: k, channels added by each dense layer.
        block_config: dense layers per block (3 blocks).
        num_classes: size of the logits.
        in_channels: channels of the input images.
        compression: transition output = floor(compression * input channels).
        bn_size: bottleneck width as a multiple of k.
    """

    def __init__(
        self,
        growth_rate: int,
        block_config: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        compression: float = 0.5,
        bn_size: int = 4,
    ) -> None:
        super().__init__()
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        channels = 2 * growth_rate
        self.stem = conv3x3(in_channels, channels)
        self.stages = nn.ModuleList()
        self.stage_channels: list[int] = []
        for i, n_layers in enumerate(block_config):
            layers: list[nn.Module] = []
            if i > 0:
                reduced = int(channels * compression)
                layers.append(Transition(channels, reduced))
                channels = reduced
            for _ in range(n_layers):
                layers.append(DenseLayer(channels, growth_rate, bn_size))
                channels += growth_rate
            self.stages.append(nn.Sequential(*layers))
            self.stage_channels.append(channels)
        self.norm = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: Tensor) -> list[Tensor]:
        """The output of each dense block, in order."""
        return stage_outputs(self.stages, self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.features(x)[-1])
        return self.fc(torch.flatten(self.pool(x), 1))


def densenet40(num_classes: int, in_channels: int = 3) -> DenseNet:
    """DLB's DenseNet d40k12: DenseNet-BC, blocks [6, 6, 6], k=12, compression 0.5."""
    return DenseNet(12, (6, 6, 6), num_classes, in_channels)
