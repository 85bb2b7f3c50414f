"""Named recipes shipped with the package (``selfkd/presets/*.yaml``); imports only PyYAML, so
``selfkd presets`` starts fast."""
from __future__ import annotations

from importlib import resources
from typing import Any

from ..errors import ConfigError
from .yamlio import parse_yaml


def presets() -> dict[str, dict[str, Any]]:
    """Every shipped recipe by name."""
    out = {}
    for f in sorted(resources.files("selfkd").joinpath("presets").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            out[f.name[: -len(".yaml")]] = parse_yaml(f.read_text()) or {}
    return out


def load_preset(name: str) -> dict[str, Any]:
    """One named recipe; an unknown name is an error that lists the known ones."""
    table = presets()
    if name not in table:
        raise ConfigError(f"unknown preset '{name}'; known: {', '.join(table)}")
    return table[name]
