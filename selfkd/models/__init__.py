"""Model registry: the CIFAR nets of the DLB paper (CVPR 2022) and a small digits CNN.

Public API::

    build_model(name, num_classes, in_channels=3) -> torch.nn.Module
    available_models() -> list[str]

Every model maps a ``(N, in_channels, H, W)`` batch to ``(N, num_classes)`` logits and works
with ``torch.channels_last``. The CIFAR nets expect 32x32 (VGG: at least 32x32); the ResNets,
VGGs and DenseNet also expose ``features(x)`` (one tensor per stage) and ``stage_channels``.
Weights are initialised from the global torch RNG, so builds are deterministic under
``torch.manual_seed``. Note that ``in_channels`` defaults to 3 for every model, including
``cnn_small``: pass ``in_channels=1`` for the 8x8 digits.

Importing this package builds nothing and registers nothing at run time: the registry is
a plain dict of factory functions.
"""

from __future__ import annotations

import operator
from typing import Callable

from torch import nn

from ..errors import ConfigError
from . import densenet, resnet, small, vgg

__all__ = ["build_model", "available_models"]

ModelFactory = Callable[[int, int], nn.Module]

_MODELS: dict[str, ModelFactory] = {
    "resnet8": resnet.resnet8,
    "resnet20": resnet.resnet20,
    "resnet32": resnet.resnet32,
    "resnet56": resnet.resnet56,
    "resnet110": resnet.resnet110,
    "resnet110b": resnet.resnet110b,
    "wrn20_8": resnet.wrn20_8,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "densenet40": densenet.densenet40,
    "cnn_small": small.cnn_small,
}


def available_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def _check_int(what: str, value: object, minimum: int) -> int:
    """``value`` as an int (Python or NumPy integer, not bool), or ConfigError."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return number


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model by name.

    Raises:
        ConfigError: unknown ``name``, ``num_classes < 2`` or ``in_channels < 1``.
    """
    factory = _MODELS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(available_models())}")
    num_classes = _check_int("num_classes", num_classes, 2)
    in_channels = _check_int("in_channels", in_channels, 1)
    model = factory(num_classes, in_channels)
    model.registry_name = name  # lets error messages name the model as the user spelled it
    return model
