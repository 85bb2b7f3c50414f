"""A small CNN for 8x8 single-channel digits (scikit-learn's ``load_digits``).

Not from the DLB paper: a fast model for smoke tests, examples and CPU-only experiments.
Layout (every conv 3x3, padding 1, no bias, followed by BN + ReLU):

    conv 32 -> conv 32 -> 2x2 max-pool -> conv 64 -> global average pool -> linear K

Spatial size only shrinks in the single 2x2 pool, and the head pools globally, so any
input of at least 2x2 pixels and any number of input channels works (8x8 gives 4x4 after
the pool). Init: convs Kaiming normal (fan_out, relu), BN 1/0, linear PyTorch default.

Parameter counts (exact, for this implementation; 1 input channel):

==========  ===========  ============
model       10 classes   100 classes
==========  ===========  ============
cnn_small        28,842        34,692
==========  ===========  ============
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import conv3x3, init_conv_bn

__all__ = ["SmallCNN", "cnn_small"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """conv-conv-pool-conv-GAP-linear with BN.

    Args:
        num_classes: size of the logits.
        in_channels: channels of the input images.
        widths: output channels of the three convs.
    """

    def __init__(
        self, num_classes: int, in_channels: int = 1, widths: tuple[int, int, int] = (32, 32, 64)
    ) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, c1),
            _conv_bn_relu(c1, c2),
            nn.MaxPool2d(kernel_size=2, stride=2),
            _conv_bn_relu(c2, c3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


def cnn_small(num_classes: int, in_channels: int = 1) -> SmallCNN:
    """The small digits CNN (conv 32-32-pool-64, GAP, linear)."""
    return SmallCNN(num_classes, in_channels)
