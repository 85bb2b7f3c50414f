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
a plain dict of factory functions. User code adds to it with :func:`register_model`, installed
packages through the ``selfkd.models`` entry-point group (see :mod:`selfkd.plugins`), and
``timm:NAME`` builds ``timm.create_model(NAME, num_classes=..., in_chans=...)`` untrained when timm is
installed (``pip install selfkd[timm]``; timm needs a matching torchvision).
"""

from __future__ import annotations

import operator
from typing import Callable

from torch import nn

from ..errors import ConfigError
from . import densenet, resnet, small, vgg

__all__ = ["build_model", "available_models", "register_model"]

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


_BUILTIN = frozenset(_MODELS)
TIMM = "timm:"


def register_model(name: str, *, allow_override: bool = False) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make a factory ``(num_classes, in_channels) -> nn.Module`` available as ``name``::

        @selfkd.register_model("my_net")
        def my_net(num_classes, in_channels):
            return MyNet(num_classes, in_channels)

    A name that is already taken is an error, unless ``allow_override=True`` (built-in names included).
    """
    if not isinstance(name, str) or not name or name.startswith(TIMM) or any(c.isspace() for c in name):
        raise ConfigError(f"register_model: invalid model name {name!r}")

    def add(factory: ModelFactory) -> ModelFactory:
        if not callable(factory):
            raise ConfigError(f"register_model({name!r}): expected a factory (num_classes, in_channels) -> nn.Module")
        if name in _MODELS and _MODELS[name] is not factory and not allow_override:
            what = "a built-in model" if name in _BUILTIN else "already registered"
            raise ConfigError(f"register_model: '{name}' is {what}; pass allow_override=True to replace it")
        _MODELS[name] = factory
        return factory

    return add


def _entry_point(name: str) -> ModelFactory | None:
    from ..plugins import MODELS, load_entry_point

    factory = load_entry_point(MODELS, name)
    if factory is not None:
        register_model(name)(factory)
    return factory


def available_models() -> list[str]:
    """The registered model names (installed entry points included), sorted."""
    from ..plugins import MODELS, entry_points

    for ep in entry_points(MODELS):
        if ep.name not in _MODELS:
            _entry_point(ep.name)
    return sorted(_MODELS)


def _timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    arch = name[len(TIMM):]
    if not arch:
        raise ConfigError(f"model {name!r}: expected timm:ARCH, e.g. timm:resnet18")
    from ..plugins import require

    timm = require("timm", "timm")
    if arch not in timm.list_models():
        raise ConfigError(f"model {name!r}: timm has no model '{arch}'")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)


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
    if isinstance(name, str) and name.startswith(TIMM):
        model = _timm(name, _check_int("num_classes", num_classes, 2), _check_int("in_channels", in_channels, 1))
        model.registry_name = name
        return model
    factory = _MODELS.get(name) if isinstance(name, str) else None
    if factory is None and isinstance(name, str):
        factory = _entry_point(name)
    if factory is None:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(available_models())}, or timm:ARCH")
    num_classes = _check_int("num_classes", num_classes, 2)
    in_channels = _check_int("in_channels", in_channels, 1)
    model = factory(num_classes, in_channels)
    model.registry_name = name  # lets error messages name the model as the user spelled it
    return model
