"""YAML in, strictly: ``yaml.safe_load`` semantics (no tags that build objects), but a key written
twice in one mapping is an error (PyYAML silently keeps the last) and every failure is one line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"key {key!r} appears twice in one mapping")
        self.problem = f"key {key!r} appears twice in one mapping"
        self.line = line


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if dup:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing or unreadable file, bad YAML, a duplicate key or a
    top level that is not a mapping raise one-line :class:`ConfigError` naming the file (and line)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p}: not found")
    if not p.is_file():
        raise ConfigError(f"{what} {p}: not a file")
    try:
        text = p.read_text()
    except PermissionError:
        raise ConfigError(f"{what} {p}: cannot read it (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p}: not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"{what} {p}: cannot read it ({err.strerror or err})") from None
    try:
        data = parse_yaml(text)
    except DuplicateKey as err:
        raise ConfigError(f"{what} {p}: line {err.line}: {err.problem}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        why = getattr(err, "problem", None)
        raise ConfigError(f"{what} {p}:{where} is not valid YAML{f' ({why})' if why else ''}") from None
    except RecursionError:
        raise ConfigError(f"{what} {p}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p}: expected a mapping of sections, got {type(data).__name__}")
    return data
