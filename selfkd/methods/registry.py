"""The method registry: names -> classes. Unknown names and hyper-parameters fail loudly."""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' is registered twice")
    _METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(sorted(_METHODS))}") from None


def build_method(name: str, **params: Any) -> Method:
    return method_class(name)(**params)


def available_methods() -> list[str]:
    return sorted(_METHODS)
