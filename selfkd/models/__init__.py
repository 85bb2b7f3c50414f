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

Importing this package builds nothing: the registry (:data:`MODELS`, a :class:`~selfkd.plugins.Registry`)
maps names to factory functions. User code adds to it with :func:`register_model`, installed
packages through the ``selfkd.models`` entry-point group (see :mod:`selfkd.plugins`), and
``timm:NAME`` builds ``timm.create_model(NAME, num_classes=..., in_chans=...)`` untrained when timm is
installed (``pip install selfkd[timm]``; timm needs a matching torchvision).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .. import plugins
from ..errors import ConfigError, integer
from . import densenet, resnet, small, vgg

__all__ = ["MODELS", "available_models", "build_model", "register_model"]

ModelFactory = Callable[[int, int], nn.Module]
TIMM = "timm:"


def _check(factory: object) -> str | None:
    return None if callable(factory) else f"expected a factory (num_classes, in_channels) -> nn.Module (got {factory!r})"


def _valid_name(name: str) -> bool:
    return bool(name) and not name.startswith(TIMM) and not any(c.isspace() for c in name)


MODELS: plugins.Registry[ModelFactory] = plugins.Registry(
    "model", plugins.MODELS, _check, lambda factory: getattr(factory, "__name__", ""),
    valid_name=_valid_name, hint=", or timm:ARCH")
for _factory in (resnet.resnet8, resnet.resnet20, resnet.resnet32, resnet.resnet56, resnet.resnet110,
                 resnet.resnet110b, resnet.wrn20_8, vgg.vgg16, vgg.vgg19, densenet.densenet40, small.cnn_small):
    MODELS.add(_factory.__name__, _factory)

#: Decorator: make a factory ``(num_classes, in_channels) -> nn.Module`` available under its function name
#: (``@selfkd.register_model``) or a name given (``@selfkd.register_model("my_net")``). A name that is already
#: taken is an error, unless ``allow_override=True`` (built-in names included).
register_model = MODELS.decorator()


def available_models() -> list[str]:
    """The registered model names (installed entry points included), sorted."""
    return MODELS.names()


def _timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    arch = name[len(TIMM):]
    if not arch:
        raise ConfigError(f"model {name!r}: expected timm:ARCH, e.g. timm:resnet18")
    timm = plugins.require("timm", "timm")
    if arch not in timm.list_models():
        raise ConfigError(f"model {name!r}: timm has no model '{arch}'")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model by name.

    Raises:
        ConfigError: unknown ``name``, ``num_classes < 2`` or ``in_channels < 1``.
    """
    if isinstance(name, str) and name.startswith(TIMM):
        model = _timm(name, integer(num_classes, "num_classes", 2), integer(in_channels, "in_channels", 1))
        model.registry_name = name  # type: ignore[assignment]  # as below
        return model
    factory = MODELS.get(name)
    model = factory(integer(num_classes, "num_classes", 2), integer(in_channels, "in_channels", 1))
    # lets error messages name the model as the user spelled it; torch's stub types Module.__setattr__ for tensors and modules only
    model.registry_name = name  # type: ignore[assignment]
    return model
