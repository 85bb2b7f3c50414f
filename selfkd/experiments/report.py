"""``selfkd report DIR...``: aggregate run directories into a markdown report with tables and plots.

Run directories are the folders under the given ones that hold ``config.yaml`` (or ``failed.json``);
the search does not descend into a run (a method's auto-trained ``RUN/teacher`` is part of its run).
Runs are grouped by their config with ``train.seed`` and the keys that do not change results
(:data:`IGNORED`; also an auto-filled ``method.teacher``) removed; a group's label names the keys that
differ across the groups (``method=dlb, noise=symmetric 0.4``; a method's hyper-parameters only where
they differ between groups of that method). Each group reports mean ± sample standard deviation (n-1)
over its finished runs; failed, unfinished and not yet started runs are listed with their status and
error, never dropped (a run whose ``summary.json`` does not parse is *unreadable*, with a warning on
stderr), and a ``runs.json`` written by ``selfkd sweep`` adds planned runs that have no
directory yet.

``REPORT_DIR`` (default ``<first dir>/report``) gets ``report.md``, ``report.json`` (the same numbers,
unformatted) and PNG plots (matplotlib on the Agg canvas, no global backend change): test accuracy per
epoch (mean line, min-max band over seeds), accuracy against the label-noise rate per method (when the
runs vary it; error bars: std over seeds) and reliability diagrams (bins summed over seeds). Cost
columns: seconds, seconds per epoch, peak memory, and forward passes per training sample over the run
(a method's ``forwards_per_sample`` x epochs, plus its auto-trained teacher's): groups with equal passes
had equal compute.
"""
from __future__ import annotations

import io
import json
import math
import os
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import ConfigError
from ..engine import checkpoint as ckpt
from ..engine import rundir
from ..engine.config import flatten
from ..engine.trainer import CHECKPOINT, CONFIG, METRICS, SUMMARY
from .sweep import FAILED, RUNS

IGNORED = ("train.seed", "train.log_every", "train.eval_batch_size", "data.num_workers", "data.cache_dir",
           "data.download", "imports")  # imports: where code is found, not a config difference
NOISE = ("data.noise.kind", "data.noise.rate")
SHORT = {"method.name": "method", "model.name": "model", "data.name": "data", "data.noise.seed": "noise seed",
         "schedule.kind": "schedule", "data.subset": "subset", "data.test_subset": "test subset", "data.dir": "data dir"}
COMMON = ("data.name", "model.name", "train.epochs", "optim.batch_size", "optim.lr", "schedule.kind", "data.subset",
          "data.test_subset", "method.name")
# (summary key, column title, decimals)
COLUMNS = [("last_acc", "last acc %", 2), ("best_acc", "best acc %", 2), ("ece", "ECE", 4), ("nll", "NLL", 4)]
F1_COLUMNS = [("macro_f1", "macro-F1 %", 2)]  # text runs (selfkd finetune)
NOISE_COLUMNS = [("corrupted_acc", "true-label acc on corrupted %", 1), ("memorized", "noisy-label fit %", 1)]
TAIL_COLUMNS = [("seconds", "seconds", 1), ("seconds_per_epoch", "s/epoch", 1), ("peak_mem_mb", "peak MiB", 0),
                ("passes", "fwd passes/sample", 1)]
PLOTS = {"curves": "acc_curves.png", "noise": "acc_vs_noise.png", "compute": "acc_vs_compute.png",
         "reliability": "reliability.png"}
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


@dataclass
class Group:
    key: tuple
    flat: dict[str, Any]
    runs: list[RunInfo]
    label: str = ""
    parts: list[tuple[str, str, bool]] = field(default_factory=list)  # (short key, value, is noise)

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


def _cost(path: Path, summary: dict[str, Any]) -> dict[str, float]:
    """Derived cost: seconds per epoch, and forward passes per training sample over the whole run
    (``forwards_per_sample`` x epochs, plus those of an auto-trained ``RUN/teacher``): the equal-compute axis."""
    out: dict[str, float] = {}
    epochs, seconds, fwd = summary.get("epochs"), summary.get("seconds"), summary.get("forwards_per_sample")
    if isinstance(epochs, (int, float)) and epochs > 0 and isinstance(seconds, (int, float)):
        out["seconds_per_epoch"] = seconds / epochs
    if isinstance(epochs, (int, float)) and isinstance(fwd, (int, float)):
        out["passes"] = fwd * epochs
        teacher = _read_json(path / "teacher" / SUMMARY) if (path / "teacher" / SUMMARY).is_file() else None
        if isinstance(teacher, dict):
            t_fwd, t_epochs = teacher.get("forwards_per_sample"), teacher.get("epochs")
            if isinstance(t_fwd, (int, float)) and isinstance(t_epochs, (int, float)):
                out["passes"] += t_fwd * t_epochs
    return out


def find_runs(dirs: list[str | Path]) -> list[RunInfo]:
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
    return f"{flat.get('data.noise.kind')} {fmt_value(float(flat.get('data.noise.rate')))}"


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
    configured = [g for g in groups if g.flat]
    keys = sorted({k for g in configured for k in g.flat})

    def varies(k: str, among: list[Group]) -> bool:
        return len({_j(g.flat.get(k, _MISSING)) for g in among}) > 1

    noise = any(varies(k, configured) for k in NOISE)
    plain = [k for k in keys if k not in NOISE and not (k.startswith("method.") and k != "method.name")
             and varies(k, configured)]
    by_method: dict[str, list[Group]] = {}
    for g in configured:
        by_method.setdefault(str(g.flat.get("method.name")), []).append(g)
    method_keys = {m: [k for k in keys if k.startswith("method.") and k != "method.name" and varies(k, gs)]
                   for m, gs in by_method.items()}
    plain.sort(key=lambda k: (not k.endswith(".name"), k))  # data=..., model=... before their details
    shown = plain + sorted({k for ks in method_keys.values() for k in ks})

    def short(k: str) -> str:
        parts = k.split(".")
        s = SHORT.get(k) or (parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1])
        clash = [o for o in shown if o != k and (SHORT.get(o) or o.split(".")[-1]) == s]
        return k if clash or s == "noise" else s

    first = [k for k in ("method.name",) if k in plain]
    rest = [k for k in shown if k not in first]
    for g in groups:
        if not g.flat:
            g.parts = [("run", g.runs[0].name, False)]
            r = g.runs[0]
            g.label = f"{r.name} ({'planned, not started' if r.status == 'not started' else 'no config.yaml'})"
            continue
        parts = [(short(k), fmt_value(g.flat.get(k)), False) for k in first]
        if noise:
            parts.append(("noise", _noise_text(g.flat), True))
        own = method_keys.get(str(g.flat.get("method.name")), [])
        parts += [(short(k), fmt_value(g.flat.get(k)) if k in g.flat else "unset", False)
                  for k in rest if not k.startswith("method.") or k in own]
        if not parts:  # one group: name the method (and the noise)
            parts = [("method", fmt_value(g.flat.get("method.name")), False)]
            if _noisy(g.flat):
                parts.append(("noise", _noise_text(g.flat), True))
        g.parts = parts
        g.label = ", ".join(f"{k}={v}" for k, v, _ in parts)
    order = first + [k for k in NOISE if noise] + rest
    groups.sort(key=lambda g: (not g.flat, tuple(
        (_sortable(0.0 if k in NOISE and not _noisy(g.flat) else g.flat.get(k, _MISSING))) for k in order)))
    seen: dict[str, int] = {}
    for g in groups:  # labels stay unique even when only ignored keys differ
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label += f" #{seen[g.label]}"


# ---------------------------------------------------------------------------------------------
# numbers
def stat(values: list[Any]) -> dict[str, Any]:
    """Mean and sample standard deviation (n-1; None for one value) of the finite values."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "std": None}
    return {"n": n, "mean": math.fsum(vals) / n, "std": statistics.stdev(vals) if n > 1 else None}


def fmt_stat(s: dict[str, Any], decimals: int) -> str:
    if s["mean"] is None:
        return "–"
    text = f"{s['mean']:.{decimals}f}"
    return text if s["std"] is None else f"{text} ± {s['std']:.{decimals}f}"


PAIRED = [("last_acc", "Δ last acc", 2), ("best_acc", "Δ best acc", 2), ("ece", "Δ ECE", 4), ("nll", "Δ NLL", 4)]


def paired(groups: list[Group], baseline: str) -> list[dict[str, Any]]:
    """Per group, the differences to the ``baseline`` group's run with the same seed (finished runs of
    both): mean ± std of each :data:`PAIRED` key and how many seeds beat the baseline (higher accuracy,
    lower ECE/NLL). Pairing removes what a seed shares between two methods (split, init, order)."""
    base = next((g for g in groups if g.label == baseline), None)
    if base is None:
        raise ConfigError(f"report: --baseline {baseline!r} is not a group; groups: "
                          + ", ".join(repr(g.label) for g in groups))
    by_seed = {r.seed: r.summary for r in base.finished}
    out = []
    for g in groups:
        if g is base:
            continue
        pairs = [(r.summary, by_seed[r.seed]) for r in g.finished if r.seed in by_seed]
        row: dict[str, Any] = {"label": g.label, "pairs": len(pairs)}
        for key, _, _ in PAIRED:
            diffs = [a[key] - b[key] for a, b in pairs if isinstance(a.get(key), (int, float))
                     and isinstance(b.get(key), (int, float))]
            better = sum((d > 0) if key.endswith("acc") else (d < 0) for d in diffs)
            row[key] = {**stat(diffs), "better": better}
        out.append(row)
    return out


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short_error(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _run_status(r: RunInfo) -> str:
    if r.status == "finished":
        return "finished"
    if r.status == "failed":
        return f"failed: {r.error}"
    if r.status == "unreadable":
        return f"unreadable: {r.error}"
    if r.status == "unfinished":
        last = r.metrics[-1] if r.metrics else None
        acc = f", test acc {last['test_acc']:.2f}" if last and "test_acc" in last else ""
        return f"unfinished: epoch {len(r.metrics)}/{r.epochs if r.epochs is not None else '?'}{acc}"
    if r.status == "pending":
        return "not started" + (f" ({r.error})" if r.error else "")
    return "not started (no directory yet)"


def _counts(g: Group) -> tuple[str, str]:
    total = len(g.runs)
    text = f"{len(g.finished)}/{total}"
    notes = []
    failed = [r for r in g.runs if r.status == "failed"]
    if failed:
        notes.append(f"{len(failed)} failed: {_short_error(failed[0].error or '')}")
    unfinished = [r for r in g.runs if r.status == "unfinished"]
    if unfinished:
        notes.append(f"{len(unfinished)} unfinished")
    unreadable = [r for r in g.runs if r.status == "unreadable"]
    if unreadable:
        notes.append(f"{len(unreadable)} unreadable: {_short_error(unreadable[0].error or '')}")
    waiting = sum(r.status in ("pending", "not started") for r in g.runs)
    if waiting:
        notes.append(f"{waiting} not started")
    return text, "; ".join(notes)


# ---------------------------------------------------------------------------------------------
# plots (matplotlib imported here only: the Agg canvas, no pyplot, no global backend change)
def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.1)  # long legends stay whole
    ckpt.write_bytes(path, buf.getvalue())


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _wrap(text: str, width: int = 38) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _legend(fig, axes, n: int) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(n, 3), fontsize=8, frameon=False)


def plot_curves(groups: list[Group], colors: list, path: Path) -> bool:
    """Test accuracy per epoch (and, with label noise, the noisy-label fit), mean and min-max band."""
    series = []
    for g, c in zip(groups, colors):
        per_epoch: dict[int, list[dict[str, Any]]] = {}
        for r in g.runs:
            for m in r.metrics:
                per_epoch.setdefault(int(m["epoch"]), []).append(m)
        if per_epoch:
            series.append((g, c, dict(sorted(per_epoch.items()))))
    if not series:
        return False
    panels = [("test_acc", "test accuracy (%)", "Test accuracy per epoch"),
              ("train_acc", "training accuracy (%)", "Training accuracy per epoch (augmented batches, given labels)")]
    if any("train_memorized" in m for _, _, pe in series for ms in pe.values() for m in ms):
        panels.append(("train_memorized", "noisy-label fit (%)",
                       "Corrupted training samples predicted as their noisy label"))
    fig = _figure(figsize=(6.2 * len(panels), 4.4 + 0.25 * math.ceil(len(series) / 3)))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    longest = max(len(pe) for _, _, pe in series)
    for ax, (key, ylabel, title) in zip(axes, panels):
        for g, c, pe in series:
            xs, mean, lo, hi = [], [], [], []
            for ep, ms in pe.items():
                vals = [m[key] for m in ms if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
                if vals:
                    xs.append(ep)
                    mean.append(sum(vals) / len(vals))
                    lo.append(min(vals))
                    hi.append(max(vals))
            if not xs:
                continue
            n = max(len(ms) for ms in pe.values())
            ax.plot(xs, mean, color=c, lw=1.8, marker="o" if longest <= 25 else None, ms=3,
                    label=f"{g.label} (n={n})")
            ax.fill_between(xs, lo, hi, color=c, alpha=0.18, lw=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if longest <= 12:
            ax.set_xticks(range(1, longest + 1))
    fig.suptitle("Mean over seeds; band: min–max over seeds", fontsize=9, color="0.35")
    _legend(fig, axes, len(series))
    _save(fig, path)
    return True


def _points(pts: list[tuple[float, Group]], key: str, shift: float = 0.0
            ) -> tuple[list[float], list[float], list[float], list[Group]]:
    """(x, mean, std, group) of ``key`` over each group's finished runs, sorted by x; groups without a value
    are left out."""
    xs, ys, es, kept = [], [], [], []
    for x, g in sorted(pts, key=lambda p: p[0]):
        st = stat([r.summary.get(key) for r in g.finished])
        if st["mean"] is not None:
            xs.append(x + shift)
            ys.append(st["mean"])
            es.append(st["std"] or 0.0)
            kept.append(g)
    return xs, ys, es, kept


def plot_noise(groups: list[Group], colors: list, path: Path) -> bool:
    """Accuracy (last, best) and noisy-label fit against the noise rate, one line per method/setting."""
    points = []
    for g in groups:
        if not g.flat or not g.finished:
            continue
        rate = float(g.flat.get("data.noise.rate") or 0) if _noisy(g.flat) else 0.0
        kind = g.flat.get("data.noise.kind") if _noisy(g.flat) else None
        name = ", ".join(f"{k}={v}" for k, v, is_noise in g.parts if not is_noise) or "runs"
        points.append((name, kind, rate, g))
    if len({p[2] for p in points}) < 2:
        return False
    kinds = sorted({p[1] for p in points if p[1] is not None})
    lines: dict[str, list[tuple[float, Group]]] = {}
    for name, kind, rate, g in points:
        targets = [kind] if kind is not None else (kinds or [None])
        for k in targets:
            key = name if len(kinds) <= 1 else f"{name} ({k})"
            lines.setdefault(key, []).append((rate, g))
    panels = [("last_acc", "last-epoch test accuracy (%)"), ("best_acc", "best-epoch test accuracy (%)")]
    if any(stat([r.summary.get("memorized") for r in g.finished])["n"] for *_, g in points):
        panels.append(("memorized", "noisy-label fit (%, memorised)"))
    palette = _colors(len(lines))
    fig = _figure(figsize=(4.6 * len(panels), 4.2 + 0.25 * math.ceil(len(lines) / 3)))
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True)[0]
    top = max(p[2] for p in points)
    for ax, (key, ylabel) in zip(axes, panels):
        for i, ((name, pts), c) in enumerate(zip(lines.items(), palette)):
            shift = (i - (len(lines) - 1) / 2) * 0.012 * top  # a small offset keeps error bars apart
            xs, ys, es, _ = _points(pts, key, shift)
            if xs:
                ax.errorbar(xs, ys, yerr=es, color=c, marker="o", ms=4, capsize=3, lw=1.6, label=name)
        ax.set_xlabel("label-noise rate" + (f" ({kinds[0]})" if len(kinds) == 1 else ""))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("Against label noise: mean over seeds, error bars ± std (lines slightly offset in x)", fontsize=10)
    _legend(fig, axes, len(lines))
    _save(fig, path)
    return True


def plot_compute(groups: list[Group], colors: list, path: Path) -> bool:
    """Accuracy (last, best) against forward passes per training sample over the run (the equal-compute
    axis), one line per method (and noise setting), each point a group; drawn when the budgets differ."""
    noise_varies = len({_j(_noise_text(g.flat)) for g in groups if g.flat}) > 1
    lines: dict[str, list[tuple[float, Group]]] = {}
    for g in groups:
        passes = stat([r.summary.get("passes") for r in g.finished])["mean"] if g.flat else None
        if passes is None:
            continue
        key = str(g.flat.get("method.name", "runs")) + (f" ({_noise_text(g.flat)})" if noise_varies else "")
        lines.setdefault(key, []).append((passes, g))
    if len({p for pts in lines.values() for p, _ in pts}) < 2:
        return False
    panels = [("last_acc", "last-epoch test accuracy (%)"), ("best_acc", "best-epoch test accuracy (%)")]
    palette = _colors(len(lines))
    fig = _figure(figsize=(6.2 * len(panels), 4.6 + 0.25 * math.ceil(len(lines) / 3)))
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True)[0]
    for ax, (key, ylabel) in zip(axes, panels):
        for (name, pts), c in zip(lines.items(), palette):
            xs, ys, es, kept = _points(pts, key)
            labels = [", ".join(f"{k}={v}" for k, v, _ in g.parts if k != "method") or g.label for g in kept]
            if not xs:
                continue
            ax.errorbar(xs, ys, yerr=es, color=c, marker="o", ms=4, capsize=3, lw=1.6, label=name)
            for x, y, text in zip(xs, ys, labels):
                ax.annotate(_wrap(text, 28), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6, color=c)
        ax.set_xlabel("forward passes per training sample over the run")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy against compute: mean over seeds, error bars ± std", fontsize=10)
    _legend(fig, axes, len(lines))
    _save(fig, path)
    return True


def pooled_reliability(runs: list[RunInfo]) -> dict[str, Any] | None:
    """Reliability bins summed over runs: count, mean confidence and accuracy per bin, and the ECE."""
    rels = [r.summary.get("reliability") for r in runs if isinstance(r.summary.get("reliability"), dict)]
    if not rels:
        return None
    bins = rels[0]["bins"]
    rels = [x for x in rels if x.get("bins") == bins]
    count = [sum(x["count"][b] for x in rels) for b in range(bins)]
    conf = [sum(x["count"][b] * x["conf"][b] for x in rels) / count[b] if count[b] else 0.0 for b in range(bins)]
    acc = [sum(x["count"][b] * x["acc"][b] for x in rels) / count[b] if count[b] else 0.0 for b in range(bins)]
    total = sum(count)
    ece = sum(count[b] / total * abs(acc[b] - conf[b]) for b in range(bins)) if total else float("nan")
    return {"bins": bins, "count": count, "conf": conf, "acc": acc, "ece": ece, "runs": len(rels)}


def plot_reliability(groups: list[Group], colors: list, path: Path) -> bool:
    items = [(g, c, pooled_reliability(g.finished)) for g, c in zip(groups, colors)]
    items = [(g, c, rel) for g, c, rel in items if rel is not None]
    if not items:
        return False
    ncols = min(4, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig = _figure(figsize=(3.4 * ncols, 4.0 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (g, c, rel) in zip(axes, items):
        width = 1.0 / rel["bins"]
        used = [b for b in range(rel["bins"]) if rel["count"][b]]
        lefts = [b * width for b in used]
        acc = [rel["acc"][b] for b in used]
        gap = [rel["conf"][b] - rel["acc"][b] for b in used]
        ax.bar(lefts, acc, width=width, align="edge", color=c, alpha=0.7, edgecolor="black", lw=0.5, label="accuracy")
        # the gap from each bin's accuracy to its mean confidence: hatched, unfilled, so the bar top stays visible
        ax.bar(lefts, gap, bottom=acc, width=width, align="edge", fill=False, edgecolor="0.1", lw=0.6,
               hatch="///", label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        seeds = rel["runs"]
        ax.set_title(f"{_wrap(g.label)}\nECE {rel['ece']:.4f} (bins pooled over {seeds} run{'s' if seeds > 1 else ''})",
                     fontsize=8)
    for ax in axes[len(items):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle("Reliability diagrams (test set, last epoch)", fontsize=10)
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
def build_report(dirs: list[str], out: str | None = None, baseline: str | None = None,
                 warn: Callable[[str], None] | None = None) -> str:
    """Write ``report.md``, ``report.json`` and the plots into ``out`` (default ``<dirs[0]>/report``);
    return the markdown. ``baseline``: a group label; adds the seed-paired differences to it. ``warn``
    (default: a ``selfkd: warning:`` line on stderr) hears of each run whose summary cannot be read."""
    say = warn or (lambda msg: print(f"selfkd: warning: {msg}", file=sys.stderr, flush=True))
    if not dirs:
        raise ConfigError("report: give at least one directory")
    report_dir = Path(out) if out is not None else Path(dirs[0]) / "report"
    rundir.check_writable(report_dir, "--out" if out is not None else "report folder")  # before any plot is drawn
    runs = find_runs(dirs)
    if not runs:
        raise ConfigError(f"report: no run directories (folders with {CONFIG}) under {', '.join(map(str, dirs))}")
    for r in runs:
        if r.status == "unreadable":
            say(f"{r.path}: {r.error}; the run is listed as unreadable and left out of the means")
    groups = group_runs(runs)
    pairs = paired(groups, baseline) if baseline is not None else None
    noisy = any(r.noisy for r in runs) or any(r.summary and "memorized" in r.summary for r in runs)
    f1 = any(r.summary and "macro_f1" in r.summary for r in runs)
    columns = COLUMNS + (F1_COLUMNS if f1 else []) + (NOISE_COLUMNS if noisy else []) + TAIL_COLUMNS

    data_groups = []
    for g in groups:
        stats = {key: stat([r.summary.get(key) for r in g.finished]) for key, _, _ in columns}
        data_groups.append({
            "label": g.label, "config": g.flat, "stats": stats,
            "finished": len(g.finished), "total": len(g.runs),
            "runs": [{"dir": str(r.path), "name": r.name, "seed": r.seed, "status": r.status, "error": r.error,
                      "epochs_done": len(r.metrics), "epochs": r.epochs,
                      **{key: (r.summary or {}).get(key) for key, _, _ in columns}} for r in g.runs],
        })

    plots: list[tuple[str, str]] = []
    plot_note = ""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot_note = "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."
    else:
        colors = _colors(len(groups))
        if plot_curves(groups, colors, report_dir / PLOTS["curves"]):
            plots.append((PLOTS["curves"], "Test accuracy per epoch: mean over seeds, band min–max"))
        if plot_noise(groups, colors, report_dir / PLOTS["noise"]):
            plots.append((PLOTS["noise"], "Accuracy against the label-noise rate: mean ± std over seeds"))
        if plot_compute(groups, colors, report_dir / PLOTS["compute"]):
            plots.append((PLOTS["compute"], "Accuracy against forward passes per training sample: mean ± std over seeds"))
        if plot_reliability(groups, colors, report_dir / PLOTS["reliability"]):
            plots.append((PLOTS["reliability"], "Reliability diagrams: bins summed over seeds"))

    configured = [g.flat for g in groups if g.flat]
    common = [f"{SHORT.get(k, k.split('.')[-1])}={fmt_value(configured[0][k])}"
              for k in COMMON if configured and all(k in f and _j(f[k]) == _j(configured[0][k]) for f in configured)]
    if configured and all(_j(_noise_text(f)) == _j(_noise_text(configured[0])) for f in configured):
        common.append(f"noise={_noise_text(configured[0])}")

    n_fin = sum(r.status == "finished" for r in runs)
    lines = ["# selfkd report", "",
             f"Runs from {', '.join(f'`{d}`' for d in dirs)}: {len(runs)} run{'s' if len(runs) != 1 else ''} in {len(groups)} group"
             f"{'s' if len(groups) != 1 else ''}, {n_fin} finished. A group is one config; its runs differ only "
             "in `train.seed`. Numbers: mean ± sample standard deviation over the finished runs of a group.", ""]
    if common:
        lines += ["Common to all groups: " + ", ".join(common) + ".", ""]
    if noisy:
        lines += ["With label noise, on the training samples whose label was corrupted: *true-label acc on "
                  "corrupted* is the accuracy against their true labels, *noisy-label fit* the share predicted as "
                  "their noisy label (memorisation).", ""]
    head = ["group", "finished"] + [title for _, title, _ in columns] + ["notes"]
    lines += ["## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, d in zip(groups, data_groups):
        finished, notes = _counts(g)
        cells = [_md(g.label), finished] + [fmt_stat(d["stats"][key], dec) for key, _, dec in columns] + [_md(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if pairs is not None:
        lines += [f"## Against `{_md(baseline)}`, paired by seed", "",
                  "Each run minus the baseline's run with the same seed; mean ± std over the pairs, and in how "
                  "many pairs the group was better (higher accuracy, lower ECE or NLL).", "",
                  "| group | pairs | " + " | ".join(t for _, t, _ in PAIRED) + " |", "|" + "---|" * (2 + len(PAIRED))]
        for row in pairs:
            cells = [_md(row["label"]), str(row["pairs"])]
            for key, _, dec in PAIRED:
                st = row[key]
                if st["mean"] is None:
                    cells.append("–")
                    continue
                spread = "" if st["std"] is None else f" ± {st['std']:.{dec}f}"
                cells.append(f"{st['mean']:+.{dec}f}{spread} ({st['better']}/{st['n']} better)")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if plot_note:
        lines += [plot_note, ""]
    for fname, alt in plots:
        lines += [f"![{alt}]({fname})", "", f"*{alt}.*", ""]
    lines += ["## Runs", ""]
    run_head = ["run", "seed", "status"] + [title for _, title, _ in columns]
    for g in groups:
        lines += [f"### {_md(g.label)}", "", "| " + " | ".join(run_head) + " |", "|" + "---|" * len(run_head)]
        for r in g.runs:
            s = r.summary or {}
            cells = [f"`{_md(r.name)}`", fmt_value(r.seed), _md(_run_status(r))]
            for key, _, dec in columns:
                v = s.get(key)
                text = f"{v:.{dec}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"
                if key == "best_acc" and "best_epoch" in s and text != "–":
                    text += f" (ep {s['best_epoch']})"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    markdown = "\n".join(lines)
    ckpt.write_text(report_dir / "report.md", markdown)
    ckpt.write_json(report_dir / "report.json", {"dirs": [str(d) for d in dirs], "groups": data_groups,
                                                  **({"baseline": baseline, "paired": pairs} if pairs is not None else {}),
                                                  "plots": [f for f, _ in plots]})
    return markdown
