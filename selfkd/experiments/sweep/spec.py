"""A sweep file read and checked: its axes, every run's resolved config and directory, and each run's status on disk."""
from __future__ import annotations

import copy
import hashlib
import os
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ...errors import ConfigError, SelfKDError
from ...engine import rundir
from ...engine.config import WHERE_KEYS, Config, MethodCfg, build_config, flatten, load_preset, load_yaml
from ...engine.rundir import CHECKPOINT, CONFIG, FAILED, SUMMARY


LOCK = rundir.LOCK
MARK = ".selfkd-sweep"  # written into the out folder before anything else: a sweep root selfkd made
COMPILE_CACHE = "compile_cache"  # OUT/compile_cache: the compiled graphs a sweep's runs share
PATH_KEYS = ("data.dir", "data.cache_dir", "method.teacher", "train.compile_cache")  # relative values: to the sweep file's folder
RUNS = "runs.json"
SPEC = "sweep.yaml"
TOP_KEYS = ("out", "preset", "base", "grid", "variants", "import")
SEED_KEY = "train.seed"
_SAFE = re.compile(r"[^A-Za-z0-9._,+=-]")
_MAX_LABEL = 48


# ---------------------------------------------------------------------------------------------
# keys and labels
def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}``."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"key '{key}': '{p}' is set both as a value and as a section")
        node[parts[-1]] = copy.deepcopy(value)
    return tree


def _expand(layer: dict[str, Any], where: str) -> dict[str, Any]:
    """A config layer whose keys may be dotted at any level -> nested sections."""
    out: dict[str, Any] = {}
    for key, value in layer.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"{where}: bad key {key!r}")
        if isinstance(value, dict):
            value = _expand(value, where)
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out


def _check_key(key: Any, where: str) -> str:
    """A dotted config key must name a config field (``method.*`` is checked by the method's Params)."""
    if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"{where}: bad key {key!r}; expected a dotted config key such as 'optim.lr'")
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is MethodCfg:
            return key
        fields = model.model_fields
        if part not in fields:
            at = ".".join(parts[: i + 1])
            raise ConfigError(f"{where}: unknown config key '{key}' (no '{at}'; known here: {', '.join(fields)})")
        ann = fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif i < len(parts) - 1:
            raise ConfigError(f"{where}: unknown config key '{key}' ('{'.'.join(parts[: i + 1])}' is a value, not a section)")
    return key


def _check_tree(tree: dict[str, Any], where: str, prefix: str = "") -> None:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        _check_key(key, where)
        if isinstance(v, dict) and not key.startswith("method."):
            _check_tree(v, where, key + ".")


def _raw_label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "+".join(_raw_label(v) for v in value) or "empty"
    if isinstance(value, dict):
        return ",".join(f"{k}={_raw_label(v)}" for k, v in value.items())
    return str(value)


def label(value: Any) -> str:
    """A filesystem-safe, readable and (with its hash suffix when cleaned) unambiguous label."""
    raw = _raw_label(value)
    safe = _SAFE.sub("_", raw)[:_MAX_LABEL].strip(".") or "_"
    if safe != raw:
        digest = hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:6]
        safe = f"{safe}_{digest}"
    return safe


def _variant_label(entry: dict[str, Any]) -> str:
    parts = []
    for i, (k, v) in enumerate(entry.items()):
        last = k.split(".")[-1]
        parts.append(_raw_label(v) if last == "name" and i == 0 else f"{last}={_raw_label(v)}")
    return label(",".join(parts))


# ---------------------------------------------------------------------------------------------
# the plan
@dataclass
class Axis:
    key: str  # a dotted config key (grid) or a variant axis name
    labels: list[str]
    sets: list[dict[str, Any]]  # per value: dotted key -> value
    values: list[Any]  # per value: what runs.json shows (the grid value, or the variant's label)

    @property
    def keys(self) -> set[str]:
        return {k for s in self.sets for k in s}


@dataclass
class Run:
    name: str
    dir: Path
    axes: dict[str, Any]
    sets: dict[str, Any]
    cfg: Config
    status: str = "pending"  # pending | finished | unfinished | failed | running | interrupted
    error: str | None = None
    order: tuple[int, ...] = ()


@dataclass
class Sweep:
    path: Path
    out: Path
    preset: str | None
    base: dict[str, Any]
    axes: list[Axis]
    runs: list[Run] = field(default_factory=list)

    def spec(self) -> dict[str, Any]:
        return {
            "source": str(self.path.resolve()), "out": str(self.out.resolve()), "preset": self.preset, "base": self.base,
            "axes": [
                {"key": a.key, "values": [{"label": lab, "set": s} for lab, s in zip(a.labels, a.sets)]}
                for a in self.axes
            ],
            "runs": len(self.runs),
        }

    def table(self) -> dict[str, Any]:
        return {
            "sweep": str(self.path), "out": str(self.out), "axes": [a.key for a in self.axes],
            "runs": {r.name: {"dir": r.name, "axes": r.axes, "status": r.status,
                              **({"error": r.error} if r.error else {})} for r in self.runs},
        }


def _grid_axis(key: Any, values: Any, where: str) -> Axis:
    _check_key(key, f"{where}: grid")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: grid '{key}': expected a non-empty list of values, got {values!r}")
    labels = [label(v) for v in values]
    _unique(labels, values, f"{where}: grid '{key}'")
    return Axis(key, labels, [{key: v} for v in values], list(values))


def _variant_axis(name: Any, entries: Any, where: str) -> Axis:
    if not isinstance(name, str) or not name or _SAFE.search(name):
        raise ConfigError(f"{where}: variants: bad axis name {name!r}; use letters, digits and ._-")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: variants '{name}': expected a non-empty list of mappings")
    labels, sets = [], []
    for i, entry in enumerate(entries):
        at = f"{where}: variants '{name}' entry {i + 1}"
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(f"{at}: expected a mapping of dotted config keys to values, got {entry!r}")
        entry = dict(entry)
        given = entry.pop("name", None)
        entry = flatten(_expand(entry, at))  # nested sections or dotted keys -> dotted leaves
        if not entry:
            raise ConfigError(f"{at}: sets no config key")
        for k in entry:
            _check_key(k, at)
        labels.append(label(given) if given is not None else _variant_label(entry))
        sets.append(entry)
    _unique(labels, sets, f"{where}: variants '{name}'")
    return Axis(name, labels, sets, labels)


def _unique(labels: list[str], values: list[Any], where: str) -> None:
    seen: dict[str, Any] = {}
    for lab, v in zip(labels, values):
        if lab in seen:
            raise ConfigError(f"{where}: {seen[lab]!r} and {v!r} give the same directory name '{lab}'")
        seen[lab] = v


def _overlap(axes: list[Axis], where: str) -> None:
    owner: dict[str, str] = {}
    for a in axes:
        for k in a.keys:
            for other, who in owner.items():
                if who != a.key and (k == other or k.startswith(other + ".") or other.startswith(k + ".")):
                    raise ConfigError(f"{where}: axes '{who}' and '{a.key}' both set '{min(k, other, key=len)}'")
            owner.setdefault(k, a.key)


def _anchor(cfg: Config, folder: Path) -> Config:
    """Relative ``PATH_KEYS`` in a sweep file mean: relative to the file's folder, as ``out`` does. They
    are stored absolute, so each run's ``config.yaml`` works from any working directory."""
    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return os.path.normpath(os.path.abspath(folder / value))
        return value

    data = cfg.data.model_copy(update={"dir": fix(cfg.data.dir), "cache_dir": fix(cfg.data.cache_dir)})
    train = cfg.train.model_copy(update={"compile_cache": fix(cfg.train.compile_cache)})
    params = cfg.method.params()
    if "teacher" in params and params["teacher"] is not None:
        method = MethodCfg(name=cfg.method.name, **(params | {"teacher": fix(params["teacher"])}))
        return cfg.model_copy(update={"data": data, "train": train, "method": method})
    return cfg.model_copy(update={"data": data, "train": train})


def _shared_cache(cfg: Config, out: Path) -> Config:
    """A compiled run without ``train.compile_cache`` keeps its graphs in the sweep's ``OUT/compile_cache``:
    the sweep's later runs (and every resume) load them instead of compiling again."""
    if not cfg.train.compile or cfg.train.compile_cache is not None:
        return cfg
    folder = os.path.normpath(os.path.abspath(out / COMPILE_CACHE))
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile_cache": folder})})


def _normal(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Flattened config, with the auto-filled teacher path (``RUN/teacher``) treated as unset and path
    keys compared as absolute paths (runs written before paths were anchored hold them as typed)."""
    flat = flatten(cfg)
    teacher = flat.get("method.teacher")
    if isinstance(teacher, str) and Path(teacher).resolve() == (run_dir / "teacher").resolve():
        flat["method.teacher"] = None
    for k in PATH_KEYS:
        if isinstance(flat.get(k), str):
            flat[k] = os.path.normpath(os.path.abspath(Path(flat[k]).expanduser()))
    return flat


def check_paths(sweep: Sweep) -> None:
    """Path errors shared by every run still to do, reported once before anything is written: the root
    of the run directories must be writable, and a data root they all read must exist and be readable.
    A data root only some runs use is left to those runs: each records its error in ``failed.json``."""
    from ...data.loaders import check_root

    rundir.check_writable(sweep.out, f"sweep {sweep.path}: out")
    todo = [r for r in sweep.runs if r.status != "finished"]
    roots = {(r.cfg.data.name, r.cfg.data.dir, r.cfg.data.download) for r in todo}
    if len(roots) == 1 and len(todo) > 0:
        name, root, download = roots.pop()
        try:
            check_root(name, root, download)
        except SelfKDError as err:
            many = f"all {len(todo)} runs" if len(todo) > 1 else "its run"
            raise ConfigError(f"sweep {sweep.path}: {many}: {err}") from None


def _is_root(out: Path) -> bool:
    """A folder selfkd made a sweep root: its marker, or (sweeps from before the marker) selfkd's own
    ``runs.json`` or resolved spec, recognised by their keys."""
    if (out / MARK).is_file():
        return True
    try:
        table = json.loads((out / RUNS).read_text())
        if isinstance(table, dict) and {"sweep", "out", "axes", "runs"} <= table.keys():
            return True
    except (OSError, ValueError):
        pass
    for name in (SPEC, "sweep.resolved.yaml"):
        try:
            spec = yaml.safe_load((out / name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(spec, dict) and {"source", "out", "axes", "runs"} <= spec.keys():
            return True
    return False


def check_root(sweep: Sweep, flag: str) -> None:
    """The out folder must be new, empty (the sweep file itself aside) or a sweep root selfkd wrote
    (then its runs are resumed): a folder of other files is never written into."""
    out = sweep.out
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"{flag}: a dangling symbolic link (to {os.readlink(out)}); remove it or choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}: is a file, not a folder")
    if not out.is_dir() or _is_root(out):
        return
    own = sweep.path.resolve()
    ours = {r.name.split("/")[0] for r in sweep.runs}  # this sweep's own run directories (another process's)
    try:  # so are a lock and a path probe of another process starting this sweep at the same moment
        found = sorted(p.name for p in out.iterdir() if p.name != LOCK and p.name not in ours
                       and not p.name.startswith(".selfkd-probe-") and p.resolve() != own)
    except OSError as err:
        raise ConfigError(f"{flag}: cannot list it ({err.strerror or err})") from None
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(f"{flag}: folder is not empty ({shown}) and is not a sweep written by selfkd; a sweep "
                          "starts only in a new or empty folder (or resumes in its own)")


def _mark(out: Path) -> None:
    """Create the marker (first, so that another process starting the same sweep sees a sweep root)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / MARK, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as err:
        raise SelfKDError(f"cannot write {out / MARK}: {err.strerror or err}") from None
    os.close(fd)


def _check_existing(run: Run, where: str) -> None:
    """An existing run directory must hold the config this sweep would give it (no silent mixing)."""
    path = run.dir / CONFIG
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{where}: run {run.name}: {path} is not valid YAML") from None
    if isinstance(old, dict):
        from ...plugins import import_recorded

        import_recorded(old, str(path))
    try:  # fill keys added to the config since the run started with their defaults
        old = build_config(old, source=str(path)).to_dict()
    except (ConfigError, TypeError, AttributeError):
        pass  # compare as written: the difference names the key
    a, b = _normal(old, run.dir), _normal(run.cfg.to_dict(), run.dir)
    diff = sorted(k for k in a.keys() | b.keys()  # WHERE_KEYS: where things are found, not what is trained
                  if k not in WHERE_KEYS and a.get(k, "<unset>") != b.get(k, "<unset>"))
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{where}: run {run.name} already exists with another config ({k}: {a.get(k, '<unset>')!r} there, "
            f"{b.get(k, '<unset>')!r} now{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
            f"restore the sweep file or move {run.dir} away"
        )


def plan(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Parse and validate a sweep file and every run it implies; reads run directories, writes nothing."""
    path = Path(path)
    where = f"sweep {path}"
    spec = load_yaml(path, "sweep file")
    unknown = [k for k in spec if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; known: {', '.join(TOP_KEYS)}")
    modules = spec.get("import", [])
    if not isinstance(modules, list):
        raise ConfigError(f"{where}: import: expected a list of module names (got {modules!r})")
    from ...plugins import import_modules

    recorded = import_modules(modules, f"{where}: import:", base=path.parent)  # before any config is resolved
    root = Path(out) if out is not None else _out_root(spec, path, where)
    preset = spec.get("preset")
    layers = _base_layers(spec, preset, where)
    if recorded:  # in each run's config.yaml, for resume and export
        layers.append({"imports": recorded})
    axes = _axes(spec, where)
    sweep = Sweep(path, root, preset, layers[-1], axes)
    seed_pos = next((i for i, a in enumerate(axes) if a.key == SEED_KEY), None)
    names: set[str] = set()
    for combo in itertools.product(*(range(len(a.labels)) for a in axes)):
        name = "/".join(f"{a.key}={a.labels[i]}" for a, i in zip(axes, combo)) or "run"
        if name.lower() in names:  # also on case-insensitive file systems
            raise ConfigError(f"{where}: two runs share the directory name {name!r}")
        names.add(name.lower())
        order = combo if seed_pos is None else (combo[seed_pos], *combo[:seed_pos], *combo[seed_pos + 1:])
        sweep.runs.append(_run(sweep, layers, combo, name, order, where))
    sweep.runs.sort(key=lambda r: r.order)
    return sweep


def _out_root(spec: dict[str, Any], path: Path, where: str) -> Path:
    """The file's ``out``, relative to the file's folder."""
    given = spec.get("out")
    if not isinstance(given, str) or not given:
        raise ConfigError(f"{where}: 'out' is required: the folder of the run directories "
                          "(relative to the sweep file's folder)")
    return Path(given) if Path(given).is_absolute() else path.parent / given


def _base_layers(spec: dict[str, Any], preset: Any, where: str) -> list[dict[str, Any]]:
    """The config layers every run shares: the preset (if any), then ``base`` (checked, keys nested)."""
    layers: list[dict[str, Any]] = []
    if preset is not None:
        try:
            layers.append(load_preset(preset))
        except ConfigError as err:
            raise ConfigError(f"{where}: preset: {err}") from None
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: base: expected a mapping of config sections, got {type(base).__name__}")
    base = _expand(base, f"{where}: base")
    _check_tree(base, f"{where}: base")
    layers.append(base)
    return layers


def _axes(spec: dict[str, Any], where: str) -> list[Axis]:
    """The variants axes, then the grid axes, in the file's order; the seed axis last."""
    grid = spec.get("grid") or {}
    variants = spec.get("variants") or {}
    for name, value in (("grid", grid), ("variants", variants)):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name}: expected a mapping, got {type(value).__name__}")
    axes = [_variant_axis(k, v, where) for k, v in variants.items()]
    taken = {a.key for a in axes}
    for k, v in grid.items():
        if k in taken:
            raise ConfigError(f"{where}: grid '{k}' has the name of a variants axis")
        axes.append(_grid_axis(k, v, where))
    axes.sort(key=lambda a: a.key == SEED_KEY)  # stable: the seed axis last
    _overlap(axes, where)
    return axes


def _run(sweep: Sweep, layers: list[dict[str, Any]], combo: tuple[int, ...], name: str, order: tuple[int, ...],
         where: str) -> Run:
    """The run at ``combo`` (one value index per axis): its resolved config, checked against its directory."""
    axes = sweep.axes
    sets: dict[str, Any] = {}
    for a, i in zip(axes, combo):
        sets.update(a.sets[i])
    try:
        cfg = build_config(*layers, _nest(sets), source=f"{where}: run {name}")
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: run {name}: {msg}") from None
    cfg = _shared_cache(_anchor(cfg, sweep.path.parent), sweep.out)
    run = Run(name, sweep.out / name, {a.key: a.values[i] for a, i in zip(axes, combo)}, sets, cfg, order=order)
    _check_existing(run, where)
    run.status = _status(run.dir)
    if run.status == "failed":
        run.error = _failure(run.dir)
    return run


def _status(run_dir: Path) -> str:
    if (run_dir / SUMMARY).exists():
        return "finished"
    if (run_dir / FAILED).exists():
        return "failed"
    if (run_dir / CHECKPOINT).exists():
        return "unfinished"
    return "pending"


def _failure(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / FAILED).read_text()).get("error")
    except (OSError, ValueError, AttributeError):
        return None


def _busy(run_dir: Path) -> bool:
    """Whether another process is training this run now."""
    return rundir.busy(run_dir)


def _flag(path: str | Path, sweep: Sweep, out: str | None) -> str:
    return f"--out {sweep.out}" if out is not None else f"sweep {path}: out {sweep.out}"
