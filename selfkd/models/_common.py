"""Building blocks and weight initialisation shared by the model files.

Nothing here is public API: the registry in :mod:`selfkd.models` is.
"""

from __future__ import annotations

from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm always follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (a BatchNorm always follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def init_conv_bn(module: nn.Module) -> None:
    """Standard He init: convs Kaiming normal (fan_out, relu), bias 0; BN weight 1, bias 0.

    Linear layers are left alone here; each model says what it does with them.
    The result depends only on the global torch RNG, so it is deterministic under
    ``torch.manual_seed``.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def stage_outputs(stages: nn.ModuleList, x: Tensor) -> list[Tensor]:
    """Run ``x`` through ``stages`` in order and return every stage's output (for multi-exit heads)."""
    outs = []
    for stage in stages:
        x = stage(x)
        outs.append(x)
    return outs
