"""The method registry: names -> classes. Unknown names and hyper-parameters fail loudly.

Built-in methods register with :func:`register`; user code with :func:`register_method` (the same,
with the check that a name is not already taken unless ``allow_override=True``); installed packages
through the ``selfkd.methods`` entry-point group (see :mod:`selfkd.plugins`).
"""
from __future__ import annotations


from typing import Any

from ..errors import ConfigError
from .base import Method

_METHODS: dict[str, type[Method]] = {}
_BUILTIN: set[str] = set()


def register(cls: type[Method]) -> type[Method]:
    """Class decorator for the built-in methods: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' is registered twice")
    _METHODS[cls.name] = cls
    if cls.__module__.startswith(__package__ + "."):
        _BUILTIN.add(cls.name)
    return cls


def register_method(cls: type[Method] | None = None, *, allow_override: bool = False) -> Any:
    """Class decorator for user methods, ``@selfkd.register_method`` or ``@selfkd.register_method(allow_override=True)``:
    make a :class:`Method` subclass available under its ``name``. A name already taken (a built-in one
    included) is an error unless ``allow_override=True``."""

    def add(c: type[Method]) -> type[Method]:
        if not (isinstance(c, type) and issubclass(c, Method)):
            raise ConfigError(f"register_method: expected a subclass of selfkd.Method (got {c!r})")
        if not c.name or not isinstance(c.name, str):
            raise ConfigError(f"register_method: {c.__qualname__} has no name (set the class attribute `name`)")
        old = _METHODS.get(c.name)
        if old is not None and old is not c and not allow_override:
            what = "a built-in method" if c.name in _BUILTIN else f"already registered ({old.__module__}.{old.__qualname__})"
            raise ConfigError(f"register_method: '{c.name}' is {what}; pass allow_override=True to replace it")
        _METHODS[c.name] = c
        return c

    return add if cls is None else add(cls)


def _entry_point(name: str) -> type[Method] | None:
    from ..plugins import METHODS, load_entry_point

    cls = load_entry_point(METHODS, name)
    if cls is None:
        return None
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name != name:
        raise ConfigError(f"entry point '{name}' ({METHODS}) must be a selfkd.Method subclass named '{name}' (got {cls!r})")
    return register_method(cls)


def method_class(name: str) -> type[Method]:
    cls = _METHODS.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str):
        cls = _entry_point(name)
    if cls is None:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(available_methods())}")
    return cls


def build_method(name: str, **params: Any) -> Method:
    return method_class(name)(**params)


def available_methods() -> list[str]:
    """The registered method names (installed entry points included), sorted."""
    from ..plugins import METHODS, entry_points

    for ep in entry_points(METHODS):
        if ep.name not in _METHODS:
            _entry_point(ep.name)
    return sorted(_METHODS)


__all__: list[str] = ["available_methods", "build_method", "method_class", "register", "register_method"]

