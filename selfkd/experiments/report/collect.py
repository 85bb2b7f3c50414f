"""Finding run directories, reading them, and grouping them by config with labels that name what differs."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ...errors import ConfigError
from ...engine.config import flatten
from ...engine.rundir import CHECKPOINT, CONFIG, FAILED, METRICS, SUMMARY
from ..sweep import RUNS


IGNORED = ("train.seed", "train.log_every", "train.eval_batch_size", "data.num_workers", "data.cache_dir",
           "data.download", "imports")  # imports: where code is found, not a config difference
NOISE = ("data.noise.kind", "data.noise.rate")
SHORT = {"method.name": "method", "model.name": "model", "data.name": "data", "data.noise.seed": "noise seed",
         "schedule.kind": "schedule", "data.subset": "subset", "data.test_subset": "test subset", "data.dir": "data dir"}
_MISSING = "\0missing"


@dataclass
class RunInfo:
    path: Path
    name: str
    config: dict[str, Any] | None
    status: str  # finished | failed | unfinished | unreadable | pending | not started
    summary: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def seed(self) -> Any:
        return (self.config or {}).get("train", {}).get("seed")

    @property
    def epochs(self) -> Any:
        return (self.config or {}).get("train", {}).get("epochs")

    @property
    def noisy(self) -> bool:
        return _noisy(flatten(self.config or {}))

    @property
    def result(self) -> dict[str, Any]:
        """The summary of a finished run (a run is finished exactly when its summary was read)."""
        assert self.summary is not None, f"{self.path}: {self.status} run has no summary"
        return self.summary


@dataclass
class Group:
    key: tuple
    flat: dict[str, Any]
    runs: list[RunInfo]
    label: str = ""
    parts: list[tuple[str, str, bool]] = field(default_factory=list)  # (short key, value, is noise)
    part_keys: list[tuple[str, ...]] = field(default_factory=list)  # the config keys of each part

    @property
    def finished(self) -> list[RunInfo]:
        return [r for r in self.runs if r.status == "finished"]


# ---------------------------------------------------------------------------------------------
# finding and reading runs
def _noisy(flat: dict[str, Any]) -> bool:
    return flat.get("data.noise.kind", "none") != "none" and float(flat.get("data.noise.rate") or 0) > 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _unreadable(path: Path) -> str | None:
    """Why a JSON object file that exists cannot be used (None: it can)."""
    try:
        obj = json.loads(path.read_text())
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror or type(err).__name__})"
    except ValueError as err:
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        return f"{path.name} is not valid JSON{where} (truncated or damaged)"
    return None if isinstance(obj, dict) else f"{path.name} holds a JSON {type(obj).__name__}, not an object"


def _read_run(path: Path, name: str) -> RunInfo:
    config = None
    if (path / CONFIG).is_file():
        try:
            config = yaml.safe_load((path / CONFIG).read_text()) or {}
        except yaml.YAMLError:
            config = None
    metrics = []
    if (path / METRICS).is_file():
        for line in (path / METRICS).read_text().splitlines():
            try:
                metrics.append(json.loads(line))
            except ValueError:
                break
    summary = _read_json(path / SUMMARY) if (path / SUMMARY).is_file() else None
    # a summary.json that exists but does not parse is not an unfinished run: say so, never guess
    bad = _unreadable(path / SUMMARY) if (path / SUMMARY).exists() else None
    if bad is None and isinstance(summary, dict):
        summary = {**summary, **_cost(path, summary)}
    else:
        summary = None
    failed = _read_json(path / FAILED) if (path / FAILED).is_file() else None
    if bad is not None:
        status, error = "unreadable", bad
    elif summary is not None:
        status, error = "finished", None
    elif (path / FAILED).exists():
        status = "failed"
        error = (failed.get("error") if isinstance(failed, dict) else None) or _unreadable(path / FAILED) or "failed"
    elif metrics or (path / CHECKPOINT).exists():
        status, error = "unfinished", None
    else:
        status, error = "pending", None
    if config is None and (path / CONFIG).exists():
        error = (error + "; " if error else "") + f"{CONFIG} is not valid YAML"
    return RunInfo(path, name, config, status, summary, metrics, error)


def _passes(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    """Forward and backward passes per training sample over a run: ``forward_passes`` / ``backward_passes``
    (counted by the method), or for older runs ``forwards_per_sample`` x epochs and no backward count."""
    num = (int, float)
    if isinstance(summary.get("forward_passes"), num):
        bwd = summary.get("backward_passes")
        return float(summary["forward_passes"]), float(bwd) if isinstance(bwd, num) else None
    epochs, fwd = summary.get("epochs"), summary.get("forwards_per_sample")
    if isinstance(epochs, num) and isinstance(fwd, num):
        return fwd * epochs, None
    return None, None


def _cost(path: Path, summary: dict[str, Any]) -> dict[str, float]:
    """Derived cost: seconds per epoch, and forward (``passes``) and backward (``backward_passes``) passes per
    training sample over the whole run, those of an auto-trained ``RUN/teacher`` included: the equal-compute
    axes. A no-grad forward (a teacher's, a partner's, a snapshot's) is a forward without a backward."""
    out: dict[str, float] = {}
    epochs, seconds = summary.get("epochs"), summary.get("seconds")
    if isinstance(epochs, (int, float)) and epochs > 0 and isinstance(seconds, (int, float)):
        out["seconds_per_epoch"] = seconds / epochs
    fwd, bwd = _passes(summary)
    if fwd is None:
        return out
    teacher = _read_json(path / "teacher" / SUMMARY) if (path / "teacher" / SUMMARY).is_file() else None
    if isinstance(teacher, dict):
        t_fwd, t_bwd = _passes(teacher)
        if t_fwd is not None:
            fwd += t_fwd
            bwd = bwd + t_bwd if bwd is not None and t_bwd is not None else None
    out["passes"] = fwd
    if bwd is not None:
        out["backward_passes"] = bwd
    return out


def find_runs(dirs: Sequence[str | Path]) -> list[RunInfo]:
    """Every run directory under ``dirs`` (sorted by path), plus planned runs from ``runs.json`` files
    that have no directory yet (status ``not started``)."""
    runs: list[RunInfo] = []
    seen: set[Path] = set()
    multi = len(dirs) > 1
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise ConfigError(f"report: {root} is not a directory")
        for here, subdirs, files in os.walk(root):
            subdirs.sort()
            here_p = Path(here)
            rel = here_p.relative_to(root)
            name = root.name if rel == Path(".") else str(rel)
            if multi and rel != Path("."):
                name = f"{root.name}/{rel}"
            if CONFIG in files or FAILED in files:
                subdirs[:] = []  # a run's own sub-folders (its CE teacher) belong to it
                real = here_p.resolve()
                if real not in seen:
                    seen.add(real)
                    runs.append(_read_run(here_p, name))
                continue
            if RUNS in files:
                table = _read_json(here_p / RUNS)
                planned = table.get("runs", {}) if isinstance(table, dict) else {}
                for run_name in planned:
                    p = here_p / run_name
                    if not ((p / CONFIG).exists() or (p / FAILED).exists()):
                        label = f"{name}/{run_name}" if rel != Path(".") or multi else run_name
                        runs.append(RunInfo(p, label, None, "not started"))
    return runs


# ---------------------------------------------------------------------------------------------
# grouping and labels
def _group_flat(run: RunInfo) -> dict[str, Any]:
    flat = flatten(run.config or {})
    for k in IGNORED:
        flat.pop(k, None)
    teacher = flat.get("method.teacher")
    if isinstance(teacher, str) and Path(teacher).resolve() == (run.path / "teacher").resolve():
        flat["method.teacher"] = None
    return flat


def _j(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    return str(v)


def _noise_text(flat: dict[str, Any]) -> str:
    if not _noisy(flat):
        return "clean"
    return f"{flat.get('data.noise.kind')} {fmt_value(float(flat['data.noise.rate']))}"


def _sortable(v: Any) -> tuple:
    if v is None or v == _MISSING:
        return (0, 0, "")
    if isinstance(v, bool):
        return (1, int(v), "")
    if isinstance(v, (int, float)):
        return (1, float(v), "")
    return (2, 0, _j(v))


def group_runs(runs: list[RunInfo]) -> list[Group]:
    by_key: dict[tuple, Group] = {}
    for r in runs:
        if r.config is None:
            key: tuple = (("\0run", str(r.path)),)
            flat: dict[str, Any] = {}
        else:
            flat = _group_flat(r)
            key = tuple(sorted((k, _j(v)) for k, v in flat.items()))
        by_key.setdefault(key, Group(key, flat, [])).runs.append(r)
    groups = list(by_key.values())
    _label(groups)
    return groups


def _label(groups: list[Group]) -> None:
    """Give each group its label (the keys that differ across the groups), sort the groups by those keys
    and keep the labels unique."""
    configured = [g for g in groups if g.flat]
    keys = sorted({k for g in configured for k in g.flat})
    noise = any(_varies(k, configured) for k in NOISE)
    plain = [k for k in keys if k not in NOISE and not _is_hyper(k) and _varies(k, configured)]
    by_method: dict[str, list[Group]] = {}
    for g in configured:
        by_method.setdefault(str(g.flat.get("method.name")), []).append(g)
    # a method's hyper-parameters: only those that differ between groups of that method
    method_keys = {m: [k for k in keys if _is_hyper(k) and _varies(k, gs)] for m, gs in by_method.items()}
    plain.sort(key=lambda k: (not k.endswith(".name"), k))  # data=..., model=... before their details
    shown = plain + sorted({k for ks in method_keys.values() for k in ks})
    first = [k for k in ("method.name",) if k in plain]
    rest = [k for k in shown if k not in first]
    for g in groups:
        keyed = _parts(g, first, rest, noise, method_keys.get(str(g.flat.get("method.name")), []), shown)
        g.parts, g.part_keys = [p[:3] for p in keyed], [p[3] for p in keyed]
        g.label = _unconfigured_label(g) if not g.flat else ", ".join(f"{k}={v}" for k, v, _ in g.parts)
    order = first + [k for k in NOISE if noise] + rest
    groups.sort(key=lambda g: (not g.flat, tuple(
        (_sortable(0.0 if k in NOISE and not _noisy(g.flat) else g.flat.get(k, _MISSING))) for k in order)))
    seen: dict[str, int] = {}
    for g in groups:  # labels stay unique even when only ignored keys differ
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label += f" #{seen[g.label]}"


def _varies(k: str, among: list[Group]) -> bool:
    return len({_j(g.flat.get(k, _MISSING)) for g in among}) > 1


def _is_hyper(k: str) -> bool:
    """A method hyper-parameter (``method.temperature``), not the method's name."""
    return k.startswith("method.") and k != "method.name"


def _short(k: str, shown: list[str]) -> str:
    """The name a label uses for key ``k``: its last part (``temperature``), or the whole key when two
    shown keys would read alike."""
    parts = k.split(".")
    s = SHORT.get(k) or (parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1])
    clash = [o for o in shown if o != k and (SHORT.get(o) or o.split(".")[-1]) == s]
    return k if clash or s == "noise" else s


def _unconfigured_label(g: Group) -> str:
    r = g.runs[0]
    return f"{r.name} ({'planned, not started' if r.status == 'not started' else 'no config.yaml'})"


def _parts(g: Group, first: list[str], rest: list[str], noise: bool, own: list[str],
           shown: list[str]) -> list[tuple[str, str, bool, tuple[str, ...]]]:
    """``(name, value, is_noise, config keys)`` of the group's label: the method, the noise, then the other
    keys that vary (of the hyper-parameters, only ``own``: those of this group's method)."""
    if not g.flat:
        return [("run", g.runs[0].name, False, ())]
    parts: list[tuple[str, str, bool, tuple[str, ...]]] = [
        (_short(k, shown), fmt_value(g.flat.get(k)), False, (k,)) for k in first]
    if noise:
        parts.append(("noise", _noise_text(g.flat), True, NOISE))
    parts += [(_short(k, shown), fmt_value(g.flat.get(k)) if k in g.flat else "unset", False, (k,))
              for k in rest if not k.startswith("method.") or k in own]
    if not parts:  # one group: name the method (and the noise)
        parts = [("method", fmt_value(g.flat.get("method.name")), False, ("method.name",))]
        if _noisy(g.flat):
            parts.append(("noise", _noise_text(g.flat), True, NOISE))
    return parts
