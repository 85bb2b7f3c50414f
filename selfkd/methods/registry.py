"""The method registry: names -> :class:`~selfkd.methods.base.Method` subclasses (a
:class:`~selfkd.plugins.Registry`). Unknown names and hyper-parameters fail loudly.

Built-in and user methods register the same way, ``@register_method`` (``allow_override=True`` to replace a
taken name); installed packages through the ``selfkd.methods`` entry-point group (see :mod:`selfkd.plugins`).
"""
from __future__ import annotations

from typing import Any

from .. import plugins
from .base import Method


def _check(cls: object) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        return f"expected a subclass of selfkd.Method (got {cls!r})"
    if not cls.name or not isinstance(cls.name, str):
        return f"{cls.__qualname__} has no name (set the class attribute `name`)"
    return None


METHODS: plugins.Registry[type[Method]] = plugins.Registry(
    "method", plugins.METHODS, _check, lambda cls: cls.name, own_name=True)

#: ``@register_method`` or ``@register_method(allow_override=True)``: make a Method subclass available under
#: its ``name``. A name already taken (a built-in one included) is an error unless ``allow_override=True``.
register_method = METHODS.decorator()


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(name: str, **params: Any) -> Method:
    return method_class(name)(**params)


def available_methods() -> list[str]:
    """The registered method names (installed entry points included), sorted."""
    return METHODS.names()


__all__: list[str] = ["METHODS", "available_methods", "build_method", "method_class", "register_method"]
