"""User code in selfkd: modules named on the command line or in sweep files, and installed packages.

* ``selfkd --import my_pkg.my_module train ...`` (repeatable) and ``import: [my_pkg.my_module]`` in a
  sweep file import modules before anything is resolved, so their ``@selfkd.register_model`` /
  ``@selfkd.register_method`` decorators run. A module name is looked up on ``sys.path`` with the working
  directory first (as ``python -m`` does, also under the ``selfkd`` console script); a name ending in
  ``.py`` is a file, imported under its stem with its folder put on ``sys.path`` (as ``python FILE`` does).
* The modules a run was trained with are recorded in its ``config.yaml`` (top-level ``imports``: module
  names as given, ``.py`` files as absolute paths); ``--resume``, ``selfkd export`` and a sweep's check of
  an existing run import them again (:func:`import_recorded`) before resolving names.
* An installed package that declares entry points in the groups ``selfkd.models`` (name -> a factory
  ``(num_classes, in_channels) -> nn.Module``) or ``selfkd.methods`` (name -> a ``Method`` subclass)
  is found by name: the first lookup of a name that is not registered loads the entry point of that
  name, and listings load them all.

Both registries are a :class:`Registry`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import ConfigError

MODELS = "selfkd.models"
METHODS = "selfkd.methods"
T = TypeVar("T")


def require(module: str, extra: str) -> Any:
    """Import an optional dependency or raise one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{module} is not installed ({err.msg}); install it with: pip install selfkd[{extra}]") from None


HINT = ("it must be importable from the working directory or sys.path: run selfkd from its folder, "
        "set PYTHONPATH=DIR, or give the file (--import path/to/my_mod.py)")


def _cwd_on_path() -> None:
    """``python -m selfkd`` puts the working directory first on ``sys.path``; the console script puts its
    own bin folder there instead. Do as ``python -m`` does, so ``--import my_mod`` finds ./my_mod.py."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _import_file(path: Path) -> None:
    """Import ``path`` (a .py file) as the module named by its stem, once."""
    name = path.stem
    known = getattr(sys.modules.get(name), "__file__", None)
    if known and Path(known).resolve() == path:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"cannot load {path} as a module", name=name)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # its sibling modules, as `python FILE` finds them
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def import_modules(names: Iterable[str], where: str = "--import", base: Path | None = None) -> list[str]:
    """Import each module (a dotted name, or a path ending in ``.py``, relative to ``base`` or the working
    directory); one line naming it if it is missing, raises, or calls ``sys.exit`` (a KeyboardInterrupt
    passes through: it is the user's Ctrl-C). Returns the names to record in a run's config (files as
    absolute paths)."""
    recorded: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: expected a module name like my_pkg.my_module or a .py file (got {name!r})")
        file = None
        if name.endswith(".py"):
            file = Path(name).expanduser()
            file = (file if file.is_absolute() or base is None else base / file).resolve()
            if not file.is_file():
                raise ConfigError(f"{where} {name}: no such file ({file}); expected a .py file or a module name "
                                  "like my_pkg.my_module")
        try:
            if file is not None:
                _import_file(file)
            else:
                _cwd_on_path()
                importlib.import_module(name)
        except ModuleNotFoundError as err:
            if file is None and err.name and (name == err.name or name.startswith(err.name + ".")):
                raise ConfigError(f"{where} {name}: module not found ({err.msg}); {HINT}") from None
            raise ConfigError(f"{where} {name}: importing it raised ModuleNotFoundError: {err.msg}") from None
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
        recorded.append(str(file) if file is not None else name)
    return list(dict.fromkeys(recorded))


def import_recorded(raw: dict[str, Any], source: str) -> None:
    """Import the modules a run recorded (``imports`` in its config.yaml, read as ``raw`` from ``source``)."""
    names = raw.get("imports", []) if isinstance(raw, dict) else []
    if not isinstance(names, list):
        raise ConfigError(f"{source}: imports: expected a list of module names or .py files (got {names!r})")
    import_modules(names, f"{source}: imports: the run was trained with")


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


class Registry(Generic[T]):
    """Names -> objects (model factories, method classes): built-ins, user registrations and the installed
    entry points of ``group``. An unknown name, a taken name (unless ``allow_override``) and an object of the
    wrong kind are ConfigErrors."""

    def __init__(self, kind: str, group: str, check: Callable[[Any], str | None], name_of: Callable[[Any], str],
                 *, own_name: bool = False, valid_name: Callable[[str], bool] = bool, hint: str = ""):
        self.kind = kind  # "model" or "method": names the registry in its errors
        self.group = group
        self.check = check  # why an object cannot be registered (None: it can)
        self.name_of = name_of  # the name an object registers under when none is given
        self.own_name = own_name  # the object's name is the only one it may register under (methods)
        self.valid_name = valid_name
        self.hint = hint  # appended to the known names of an "unknown" error
        self.entries: dict[str, T] = {}
        self.builtin: set[str] = set()

    def add(self, name: str, obj: T, *, allow_override: bool = False) -> T:
        """Register ``obj`` as ``name``; ``register_KIND: ...`` ConfigError if it cannot be. Objects defined in
        selfkd's own modules are the built-ins."""
        self._check_name(name)
        self._check(obj)
        old = self.entries.get(name)
        if old is not None and old is not obj and not allow_override:
            what = (f"a built-in {self.kind}" if name in self.builtin
                    else f"already registered ({getattr(old, '__module__', '?')}.{getattr(old, '__qualname__', old)})")
            raise ConfigError(f"register_{self.kind}: '{name}' is {what}; pass allow_override=True to replace it")
        self.entries[name] = obj
        if getattr(obj, "__module__", "").startswith("selfkd."):
            self.builtin.add(name)
        else:
            self.builtin.discard(name)
        return obj

    def decorator(self) -> Callable[..., Any]:
        """The public ``register_KIND``: ``@register_KIND`` or ``@register_KIND(allow_override=True)``, the
        name being the object's own (``name_of``), or ``@register_KIND("name")`` where a name is given."""

        def register(obj: Any = None, /, name: str | None = None, *, allow_override: bool = False) -> Any:
            if isinstance(obj, str):  # @register_KIND("name")
                obj, name = None, obj
            if name is not None:
                self._check_name(name)

            def add(o: T) -> T:
                self._check(o)
                own = self.name_of(o)
                if name is not None and self.own_name and name != own:
                    raise ConfigError(f"register_{self.kind}: {o!r} is named {own!r}, not {name!r}")
                return self.add(own if name is None else name, o, allow_override=allow_override)

            return add if obj is None else add(obj)

        register.__doc__ = self.decorator.__doc__
        return register

    def _check_name(self, name: object) -> None:
        if not isinstance(name, str) or not self.valid_name(name):
            raise ConfigError(f"register_{self.kind}: invalid {self.kind} name {name!r}")

    def _check(self, obj: object) -> None:
        problem = self.check(obj)
        if problem:
            raise ConfigError(f"register_{self.kind}: {problem}")

    def lookup(self, name: str) -> T | None:
        """The object registered as ``name``, else the installed entry point of that name, else None."""
        if not isinstance(name, str):
            return None
        obj = self.entries.get(name)
        if obj is None:
            obj = self._entry_point(name)
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name`` (an entry point included); ConfigError naming the known ones."""
        obj = self.lookup(name)
        if obj is None:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}{self.hint}")
        return obj

    def names(self) -> list[str]:
        """The registered names, installed entry points included, sorted."""
        for ep in entry_points(self.group):
            if ep.name not in self.entries:
                self._entry_point(ep.name)
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    @contextmanager
    def scope(self) -> Iterator[Registry[T]]:
        """Registrations made inside the ``with`` block are undone at its end (tests, short-lived plugins)."""
        entries, builtin = dict(self.entries), set(self.builtin)
        try:
            yield self
        finally:
            self.entries, self.builtin = entries, builtin

    def _entry_point(self, name: str) -> T | None:
        obj = load_entry_point(self.group, name)
        if obj is None:
            return None
        problem = self.check(obj) or (f"{obj!r} is named {self.name_of(obj)!r}, not {name!r}"
                                      if self.own_name and self.name_of(obj) != name else None)
        if problem:
            raise ConfigError(f"entry point '{name}' ({self.group}): {problem}")
        return self.add(name, obj)
