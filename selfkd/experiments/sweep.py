"""``selfkd sweep FILE``: a grid of runs from one YAML file, validated up front, resumable, one progress view.

A sweep file::

    out: runs/noise-study          # root of the run directories; relative to the sweep file's folder
    preset: cpu-short              # optional, below ``base``
    base:                          # config layers, like a --config file (nested sections or dotted keys)
      data: {name: digits}
      train: {epochs: 10}
    grid:                          # axes: dotted config key -> list of values; the runs are the product
      data.noise.rate: [0.0, 0.4]
      train.seed: [0, 1, 2]
    import: [my_pkg.my_models]     # optional: modules to import first (user models and methods)
    variants:                      # optional named axes whose values set several keys at once
      method:
        - {method.name: ce}
        - {name: dlb-T4, method.name: dlb, method.temperature: 4}   # `name`: the label (optional)

Layers per run: defaults < preset < base < the run's axis values. No two axes may set the same key.

Run directories are ``OUT/<axis>=<label>/<axis>=<label>/...``: variant axes first, then grid axes, in the
file's order, with ``train.seed`` always last, e.g. ``OUT/method=dlb-T4/data.noise.rate=0.4/train.seed=1``.
Labels are the values as written (floats via ``repr``, lists joined with ``+``); a label with characters
outside ``[A-Za-z0-9._,+=-]`` or longer than 48 characters is cleaned and gets a short hash of the value.
A variant without ``name`` is labelled by its values (``dlb,temperature=4``). Runs execute with the seed
axis outermost (every group gets its first seed before any gets its second).

The out folder must be new, empty (the sweep file itself aside) or a sweep root selfkd wrote before
(marked by ``OUT/.selfkd-sweep``, or for sweeps from before the marker by selfkd's own ``runs.json`` or
``sweep.yaml``): a folder of other files is refused, never written into.

Everything is checked before anything runs or is written: unknown top-level keys, unknown config keys
in ``base`` and in every axis, every run's resolved config (a typo in the last grid value fails at
once), and that an existing run directory holds the same config (keys added to the config since
then count with their defaults). Then ``OUT/sweep.yaml`` (the resolved spec; ``sweep.resolved.yaml``
when the sweep file itself is ``OUT/sweep.yaml``), ``OUT/runs.json`` (run name -> axis values and
status) and every run's ``config.yaml`` are written, so a report shows the runs not started yet.

Relative paths in the file (``out``, ``data.dir``, ``data.cache_dir``, ``method.teacher``) are relative to
the sweep file's folder, wherever the command runs; they are stored absolute in each run's ``config.yaml``.
``--out`` on the command line is relative to the working directory. Path errors (the out root not
writable, a data root missing or unreadable) are reported once, before anything is written.

Per run: ``summary.json`` exists -> skipped; ``checkpoint.pt`` exists -> resumed exactly; otherwise
started fresh (a run that failed before is retried). A run that raises a :class:`SelfKDError` (e.g. a
non-finite loss, a missing data set) or runs out of GPU memory gets ``RUN/failed.json`` with the
one-line error and the sweep goes on; the result counts finished (trained from scratch), resumed
(continued and finished), skipped (already finished), failed runs and runs left to other processes
(``elsewhere``). Ctrl-C stops the sweep; the interrupted run resumes from its last checkpoint next time.

Several processes may run one sweep at once (:func:`run_jobs`, ``selfkd sweep --jobs N``, or the same
command started twice on one machine): a process trains a run only while it holds an exclusive lock on
``RUN/.lock`` (``flock``, dropped by the OS when the process dies) and passes over runs another process
holds.
On a 2-core CPU, two 1-thread processes train small models about 18% faster than one 2-thread
process (measured with ``benchmarks/step_cost.py``, ResNet-8, batch 64).
"""
from __future__ import annotations

import copy
import hashlib
import multiprocessing
import os
import queue
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel

from ..errors import ConfigError, SelfKDError
from ..engine import checkpoint as ckpt
from ..engine import rundir
from ..engine.config import Config, MethodCfg, build_config, flatten, load_preset, load_yaml, save_yaml
from ..engine.trainer import CHECKPOINT, CONFIG, SUMMARY

FAILED = "failed.json"
LOCK = rundir.LOCK
MARK = ".selfkd-sweep"  # written into the out folder before anything else: a sweep root selfkd made
PATH_KEYS = ("data.dir", "data.cache_dir", "method.teacher")  # relative values: to the sweep file's folder
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
    params = cfg.method.params()
    if "teacher" in params and params["teacher"] is not None:
        method = MethodCfg(name=cfg.method.name, **(params | {"teacher": fix(params["teacher"])}))
        return cfg.model_copy(update={"data": data, "method": method})
    return cfg.model_copy(update={"data": data})


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
    from ..data.loaders import check_root

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
        from ..plugins import import_recorded

        import_recorded(old, str(path))
    try:  # fill keys added to the config since the run started with their defaults
        old = build_config(old, source=str(path)).to_dict()
    except (ConfigError, TypeError, AttributeError):
        pass  # compare as written: the difference names the key
    a, b = _normal(old, run.dir), _normal(run.cfg.to_dict(), run.dir)
    diff = sorted(k for k in a.keys() | b.keys()  # imports: where code is found, not what is trained
                  if k != "imports" and a.get(k, "<unset>") != b.get(k, "<unset>"))
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
    from ..plugins import import_modules

    recorded = import_modules(modules, f"{where}: import:", base=path.parent)  # before any config is resolved
    if out is not None:
        root = Path(out)
    else:
        given = spec.get("out")
        if not isinstance(given, str) or not given:
            raise ConfigError(f"{where}: 'out' is required: the folder of the run directories "
                              "(relative to the sweep file's folder)")
        root = Path(given) if Path(given).is_absolute() else path.parent / given
    preset = spec.get("preset")
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
    if recorded:  # in each run's config.yaml, for resume and export
        layers.append({"imports": recorded})

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

    sweep = Sweep(path, root, preset, base, axes)
    seed_pos = next((i for i, a in enumerate(axes) if a.key == SEED_KEY), None)
    names: set[str] = set()
    for combo in itertools.product(*(range(len(a.labels)) for a in axes)):
        name = "/".join(f"{a.key}={a.labels[i]}" for a, i in zip(axes, combo)) or "run"
        if name.lower() in names:  # also on case-insensitive file systems
            raise ConfigError(f"{where}: two runs share the directory name {name!r}")
        names.add(name.lower())
        sets: dict[str, Any] = {}
        for a, i in zip(axes, combo):
            sets.update(a.sets[i])
        try:
            cfg = build_config(*layers, _nest(sets), source=f"{where}: run {name}")
        except ConfigError as err:
            msg = str(err)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: run {name}: {msg}") from None
        cfg = _anchor(cfg, path.parent)
        order = combo if seed_pos is None else (combo[seed_pos], *combo[:seed_pos], *combo[seed_pos + 1:])
        run = Run(name, root / name, {a.key: a.values[i] for a, i in zip(axes, combo)}, sets, cfg, order=order)
        _check_existing(run, where)
        run.status = _status(run.dir)
        if run.status == "failed":
            run.error = _failure(run.dir)
        sweep.runs.append(run)
    sweep.runs.sort(key=lambda r: r.order)
    return sweep


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


# ---------------------------------------------------------------------------------------------
# claims: one process per run
def _claim(run_dir: Path) -> bool:
    """Take the run's exclusive lock (``RUN/.lock``); False if another process holds it."""
    return rundir.try_lock(run_dir)


def _busy(run_dir: Path) -> bool:
    """Whether another process is training this run now."""
    return rundir.busy(run_dir)


def _refresh(sweep: Sweep, own: Run | None) -> None:
    """Statuses from disk for the runs this process is not training (other processes may be)."""
    for r in sweep.runs:
        if r is own:
            continue
        r.status = _status(r.dir)
        if r.status != "finished" and _busy(r.dir):
            r.status = "running"
        r.error = _failure(r.dir) if r.status == "failed" else None


# ---------------------------------------------------------------------------------------------
# running
_EPOCH = re.compile(r"^epoch (\d+)/(\d+)")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _failures() -> tuple[type[BaseException], ...]:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (SelfKDError, OSError, oom) if oom is not None else (SelfKDError, OSError)


def run_sweep(path: str, *, only_plan: bool = False, progress: bool | None = None,
              log: Callable[[str], None] | None = None, out: str | None = None,
              threads: int | None = None) -> dict[str, Any]:
    """Run (or with ``only_plan`` just list) the sweep in ``path``; see the module docstring.

    ``out`` replaces the file's ``out`` (relative to the current directory). ``progress=None``: a bar
    over runs when stderr is a terminal, plain lines otherwise. Returns ``{"out", "total", "finished",
    "resumed", "skipped", "failed", "pending", "runs": {name: {"dir", "axes", "status"[, "error"]}}}``:
    ``finished`` counts runs trained from scratch now, ``resumed`` runs continued and finished now,
    ``skipped`` runs finished before, ``pending`` (with ``only_plan``) runs still to do. The CLI exits
    non-zero when ``failed`` > 0. ``elsewhere`` counts runs another process was training. ``threads``:
    torch threads for every run (default: a new run takes torch's count, a resumed one its recorded count).
    """
    sweep = plan(path, out=out)
    check_root(sweep, _flag(path, sweep, out))
    if not only_plan:
        check_paths(sweep)
        _mark(sweep.out)
    counts = {"finished": 0, "resumed": 0, "skipped": 0, "failed": 0, "elsewhere": 0, "pending": 0}
    total = len(sweep.runs)
    use_bar = sys.stderr.isatty() if progress is None else progress
    bar = None

    def say(msg: str) -> None:
        if log is not None:
            log(msg)
        elif bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    done_before = sum(r.status == "finished" for r in sweep.runs)
    if only_plan:
        counts["skipped"] = done_before
        counts["pending"] = total - done_before
        say(f"sweep {sweep.out}: {total} run{'s' if total != 1 else ''} ({done_before} finished, "
            f"{sum(r.status == 'unfinished' for r in sweep.runs)} to resume)")
        for r in sweep.runs:
            say(f"  {r.name}  [{r.status}{': ' + r.error if r.error else ''}]")
        return _result(sweep, counts)

    spec_path = sweep.out / SPEC
    if spec_path.resolve() == sweep.path.resolve():  # never overwrite the sweep file itself
        spec_path = sweep.out / "sweep.resolved.yaml"
    ckpt.write_text(spec_path, yaml.safe_dump(sweep.spec(), sort_keys=False))
    for r in sweep.runs:  # every run's resolved config, so a report lists runs not started yet
        if not (r.dir / CONFIG).exists():
            ckpt.write_text(r.dir / CONFIG, save_yaml(r.cfg))
    ckpt.write_json(sweep.out / RUNS, sweep.table())
    say(f"sweep {sweep.out}: {total} run{'s' if total != 1 else ''}, {done_before} already finished, "
        f"{sum(r.status == 'unfinished' for r in sweep.runs)} to resume")
    if use_bar:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done_before, desc="sweep", unit="run", dynamic_ncols=True, file=sys.stderr)
    current: Run | None = None
    try:
        for k, r in enumerate(sweep.runs, start=1):
            if r.status == "finished":
                counts["skipped"] += 1
                continue
            if not _claim(r.dir):
                counts["elsewhere"] += 1
                say(f"[{k}/{total}] {r.name}: running in another process")
                if bar is not None:
                    bar.update(1)
                continue
            current = r
            try:
                _train_one(sweep, r, k, counts, bar, say, threads)
            finally:
                rundir.unlock(r.dir)
            current = None
    except KeyboardInterrupt:
        _refresh(sweep, current)
        if current is not None and current.status == "running":
            current.status = "interrupted"
        ckpt.write_json(sweep.out / RUNS, sweep.table())
        if bar is not None:
            bar.close()
            bar = None
        say(f"sweep {sweep.out}: interrupted; run it again to resume")
        raise
    finally:
        if bar is not None:
            bar.close()
            bar = None
    say(f"sweep {sweep.out}: {counts['finished']} finished, {counts['resumed']} resumed, "
        f"{counts['skipped']} skipped, {counts['failed']} failed"
        + (f", {counts['elsewhere']} running in another process" if counts["elsewhere"] else ""))
    return _result(sweep, counts)


def _flag(path: str | Path, sweep: Sweep, out: str | None) -> str:
    return f"--out {sweep.out}" if out is not None else f"sweep {path}: out {sweep.out}"


def _train_one(sweep: Sweep, r: Run, k: int, counts: dict[str, int], bar: Any, say: Callable[[str], None],
               threads: int | None = None) -> None:
    """Train (or resume) one run whose claim this process holds; record its status."""
    from ..engine.trainer import train_run

    tag = f"[{k}/{len(sweep.runs)}] {r.name}"
    if _status(r.dir) == "finished":  # another process finished it after this one planned
        r.status = "finished"
        counts["skipped"] += 1
        if bar is not None:
            bar.update(1)
        return
    resume = (r.dir / CHECKPOINT).exists()
    (r.dir / FAILED).unlink(missing_ok=True)
    _refresh(sweep, r)
    r.status, r.error = "running", None
    ckpt.write_json(sweep.out / RUNS, sweep.table())
    if bar is not None:
        bar.set_postfix_str(f"{r.name}{' (resuming)' if resume else ''}")
    else:
        say(f"{tag}: {'resuming' if resume else 'starting'}")

    def collect(msg: str) -> None:
        m = _EPOCH.match(msg)
        if m and bar is not None:
            bar.set_postfix_str(f"{r.name} epoch {m.group(1)}/{m.group(2)}")

    t0 = time.perf_counter()
    try:
        # resume=True: the folder holds the config.yaml this sweep wrote; a checkpoint, if any, is continued
        summary = train_run(r.cfg, r.dir, resume=True, progress=False, log=collect, threads=threads)
    except _failures() as err:
        r.status, r.error = "failed", _one_line(err)
        ckpt.write_json(r.dir / FAILED, {"error": r.error, "seconds": time.perf_counter() - t0})
        counts["failed"] += 1
        say(f"{tag}: FAILED: {r.error}")
    else:
        r.status = "finished"
        counts["resumed" if resume else "finished"] += 1
        say(f"{tag}: last acc {summary['last_acc']:.2f} | best acc {summary['best_acc']:.2f} | "
            f"{time.perf_counter() - t0:.1f}s")
    if bar is not None:
        bar.update(1)
    _refresh(sweep, r)
    ckpt.write_json(sweep.out / RUNS, sweep.table())


def _result(sweep: Sweep, counts: dict[str, int]) -> dict[str, Any]:
    return {"out": str(sweep.out), "total": len(sweep.runs), **counts, "runs": sweep.table()["runs"]}


# ---------------------------------------------------------------------------------------------
# several processes
def _job(k: int, path: str, out: str | None, threads: int, lines: Any, explicit: int | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        result = run_sweep(path, progress=False, out=out, log=lambda m: lines.put(("line", k, m)), threads=explicit)
    except KeyboardInterrupt:
        lines.put(("line", k, "interrupted"))
        return
    except SelfKDError as err:
        lines.put(("error", k, str(err)))
        return
    lines.put(("done", k, {key: result[key] for key in ("finished", "resumed", "failed")}))


def run_jobs(path: str, jobs: int, *, threads: int | None = None, out: str | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the sweep in ``jobs`` processes sharing its runs (one claim per run, see the module docstring),
    each with ``threads`` torch threads (default: the cores divided among the jobs). Their lines come
    back prefixed ``[job k]``. Returns :func:`run_sweep`'s dict, counts summed over the jobs, statuses
    read back from disk; a job that hit a configuration error counts as one failure."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: expected a positive number of processes")
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    sweep = plan(path, out=out)  # every error a user can fix surfaces before a process starts
    check_root(sweep, _flag(path, sweep, out))
    check_paths(sweep)
    before = sum(r.status == "finished" for r in sweep.runs)
    explicit = threads
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    say(f"sweep {sweep.out}: {len(sweep.runs)} runs, {before} already finished; {jobs} jobs x {threads} thread"
        f"{'s' if threads != 1 else ''}")
    ctx = multiprocessing.get_context("spawn")  # no forked torch state; works wherever the CLI does
    lines = ctx.Queue()
    # not daemonic: a job may start processes of its own (the image decoder's pool)
    procs = [ctx.Process(target=_job, args=(k, path, out, threads, lines, explicit)) for k in range(1, jobs + 1)]
    counts = {"finished": 0, "resumed": 0, "skipped": before, "failed": 0, "elsewhere": 0, "pending": 0}
    answered: set[int] = set()
    try:
        for p in procs:
            p.start()
        live = len(procs)
        while live:
            try:
                kind, k, body = lines.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # a job died without a word (killed): what it left is on disk
                continue
            if kind == "line":
                say(f"[job {k}] {body}")
                continue
            answered.add(k)
            live -= 1
            if kind == "error":
                say(f"[job {k}] error: {body}")
                counts["failed"] += 1
            else:
                for key, n in body.items():
                    counts[key] += n
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    for k, p in enumerate(procs, start=1):
        if k not in answered:  # crashed or killed: its traceback went to stderr; its run resumes next time
            say(f"[job {k}] died (exit code {p.exitcode})")
            counts["failed"] += 1
    final = plan(path, out=out)
    done = sum(r.status == "finished" for r in final.runs)
    say(f"sweep {final.out}: {done} of {len(final.runs)} runs finished; this time {counts['finished']} trained, "
        f"{counts['resumed']} resumed, {counts['failed']} failed")
    return _result(final, counts)
