"""User code in selfkd: modules named on the command line or in sweep files, and installed packages.

* ``selfkd --import my_pkg.my_module train ...`` (repeatable) and ``import: [my_pkg.my_module]`` in a
  sweep file import modules before anything is resolved, so their ``@selfkd.register_model`` /
  ``@selfkd.register_method`` decorators run.
* An installed package that declares entry points in the groups ``selfkd.models`` (name -> a factory
  ``(num_classes, in_channels) -> nn.Module``) or ``selfkd.methods`` (name -> a ``Method`` subclass)
  is found by name: the first lookup of a name that is not registered loads the entry point of that
  name, and listings load them all.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib import metadata
from typing import Any

from .errors import ConfigError

MODELS = "selfkd.models"
METHODS = "selfkd.methods"


def require(module: str, extra: str) -> Any:
    """Import an optional dependency or raise one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{module} is not installed ({err.msg}); install it with: pip install selfkd[{extra}]") from None


def import_modules(names: Iterable[str], where: str = "--import") -> None:
    """Import each module; one line naming it if it is missing, raises, or calls ``sys.exit`` (a
    KeyboardInterrupt passes through: it is the user's Ctrl-C)."""
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: expected a module name like my_pkg.my_module (got {name!r})")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise ConfigError(f"{where} {name}: module not found ({err.msg})") from None
        except Exception as err:  # the user's module raised while importing
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(f"{where} {name}: importing it raised {type(err).__name__}: {first}") from None
        except SystemExit as err:  # sys.exit() at import would end selfkd as if it had run (exit 0, nothing trained)
            raise ConfigError(f"{where} {name}: the module called sys.exit({err.code!r}) while being imported; "
                              "a plugin module must only define and register") from None
        except KeyboardInterrupt:  # Ctrl-C during a slow import: selfkd's usual 'interrupted'
            raise
        except BaseException as err:  # GeneratorExit or a BaseException subclass of the module's own
            raise ConfigError(f"{where} {name}: importing it raised {type(err).__name__} "
                              "(a BaseException that is not an Exception)") from None


def entry_points(group: str) -> list[Any]:
    try:
        return list(metadata.entry_points(group=group))
    except Exception:  # a broken installed distribution must not break the registries
        return []


def load_entry_point(group: str, name: str) -> Any | None:
    """The object an installed package registers as ``name`` in ``group`` (None: no such entry point)."""
    for ep in entry_points(group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as err:
                raise ConfigError(f"entry point '{name}' ({group} = {ep.value}) failed to load: "
                                  f"{type(err).__name__}: {err}") from None
    return None
