"""``build_report``: the tables and plots of the grouped runs, written as report.md and report.json."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

from ...errors import ConfigError
from ...engine import checkpoint as ckpt
from ...engine import rundir
from ...engine.rundir import CONFIG
from .collect import Group, RunInfo, SHORT, _j, _noise_text, find_runs, fmt_value, group_runs
from .plots import draw_plots
from .stats import INTERVAL_FROM, PAIRED, fmt_stat, paired, stat


COMMON = ("data.name", "model.name", "train.epochs", "optim.batch_size", "optim.lr", "schedule.kind", "data.subset",
          "data.test_subset", "method.name")
# (summary key, column title, decimals)
COLUMNS = [("last_acc", "last acc %", 2), ("best_acc", "best-epoch acc % (test-selected)", 2), ("ece", "ECE", 4),
           ("nll", "NLL", 4)]
F1_COLUMNS = [("macro_f1", "macro-F1 %", 2)]  # text runs (selfkd finetune)
NOISE_COLUMNS = [("corrupted_acc", "true-label acc on corrupted %", 1), ("memorized", "noisy-label fit %", 1)]
TAIL_COLUMNS = [("seconds", "wall s (measured)", 1), ("seconds_per_epoch", "wall s/epoch (measured)", 1),
                ("peak_mem_mb", "peak MiB", 0), ("passes", "fwd passes/sample", 2), ("backward_passes", "bwd passes/sample", 2)]


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
def build_report(dirs: list[str], out: str | None = None, baseline: str | None = None,
                 warn: Callable[[str], None] | None = None, plots: bool = True) -> str:
    """Write ``report.md``, ``report.json`` and the plots into ``out`` (default ``<dirs[0]>/report``);
    return the markdown. ``baseline``: a group label; adds the seed-paired differences to it. ``warn``
    (default: a ``selfkd: warning:`` line on stderr) hears of each run whose summary cannot be read.
    ``plots=False``: the tables alone (no matplotlib; seconds less per report), no PNG written."""
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
    columns = _columns(runs, noisy)
    data_groups = [_group_data(g, columns) for g in groups]
    drawn, plot_note = draw_plots(groups, report_dir) if plots else ([], "")
    lines = _intro(dirs, runs, groups, noisy)
    lines += _results(groups, data_groups, columns)
    if baseline is not None and pairs is not None:  # pairs: with a baseline only
        lines += _paired_section(baseline, pairs)
    if plot_note:
        lines += [plot_note, ""]
    for fname, alt in drawn:
        lines += [f"![{alt}]({fname})", "", f"*{alt}.*", ""]
    lines += _runs_section(groups, columns)
    markdown = "\n".join(lines)
    ckpt.write_text(report_dir / "report.md", markdown)
    ckpt.write_json(report_dir / "report.json", {"dirs": [str(d) for d in dirs], "groups": data_groups,
                                                  **({"baseline": baseline, "paired": pairs} if pairs is not None else {}),
                                                  "plots": [f for f, _ in drawn]})
    return markdown


def _columns(runs: list[RunInfo], noisy: bool) -> list[tuple[str, str, int]]:
    """The summary columns the runs have: accuracy and calibration, macro-F1 for text, noise fits, costs."""
    f1 = any(r.summary and "macro_f1" in r.summary for r in runs)
    return COLUMNS + (F1_COLUMNS if f1 else []) + (NOISE_COLUMNS if noisy else []) + TAIL_COLUMNS


def _group_data(g: Group, columns: list[tuple[str, str, int]]) -> dict[str, Any]:
    """What report.json holds of a group: its config, statistics and every run."""
    stats = {key: stat([r.result.get(key) for r in g.finished]) for key, _, _ in columns}
    return {
        "label": g.label, "config": g.flat, "stats": stats,
        "finished": len(g.finished), "total": len(g.runs),
        "runs": [{"dir": str(r.path), "name": r.name, "seed": r.seed, "status": r.status, "error": r.error,
                  "epochs_done": len(r.metrics), "epochs": r.epochs,
                  **{key: (r.summary or {}).get(key) for key, _, _ in columns}} for r in g.runs],
    }


def _common(groups: list[Group]) -> list[str]:
    """``key=value`` of the :data:`COMMON` keys (and the noise) that every configured group shares."""
    configured = [g.flat for g in groups if g.flat]
    if not configured:
        return []
    first = configured[0]
    common = [f"{SHORT.get(k, k.split('.')[-1])}={fmt_value(first[k])}"
              for k in COMMON if all(k in f and _j(f[k]) == _j(first[k]) for f in configured)]
    if all(_j(_noise_text(f)) == _j(_noise_text(first)) for f in configured):
        common.append(f"noise={_noise_text(first)}")
    return common


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _intro(dirs: list[str], runs: list[RunInfo], groups: list[Group], noisy: bool) -> list[str]:
    n_fin = sum(r.status == "finished" for r in runs)
    lines = ["# selfkd report", "",
             f"Runs from {', '.join(f'`{d}`' for d in dirs)}: {len(runs)} run{'s' if len(runs) != 1 else ''} in {len(groups)} group"
             f"{'s' if len(groups) != 1 else ''}, {n_fin} finished. A group is one config; its runs differ only "
             "in `train.seed`. Numbers: mean ± sample standard deviation over the finished runs of a group.", ""]
    common = _common(groups)
    if common:
        lines += ["Common to all groups: " + ", ".join(common) + ".", ""]
    if noisy:
        lines += ["With label noise, on the training samples whose label was corrupted: *true-label acc on "
                  "corrupted* is the accuracy against their true labels, *noisy-label fit* the share predicted as "
                  "their noisy label (memorisation).", ""]
    return lines


def _results(groups: list[Group], data_groups: list[dict[str, Any]], columns: list[tuple[str, str, int]]) -> list[str]:
    head = ["group", "finished"] + [title for _, title, _ in columns] + ["notes"]
    rows = []
    for g, d in zip(groups, data_groups):
        finished, notes = _counts(g)
        rows.append([_md(g.label), finished] + [fmt_stat(d["stats"][key], dec) for key, _, dec in columns] + [_md(notes)])
    return ["## Results", ""] + _table(head, rows) + ["", _COST_NOTE, ""]


_COST_NOTE = ("*last acc*: the last epoch's test accuracy, the headline; *best-epoch acc* picks its epoch on the test "
              "set itself, so it is optimistic. ECE: 15 equal-width confidence bins, each bin's |accuracy − mean "
              "confidence| weighted by its share of the test images (Guo et al., 2017), a fraction; NLL in nats. "
              "*fwd/bwd passes/sample*: forward and backward passes per training sample over the run (an auto-trained "
              "teacher's included), counted, not measured: a no-grad forward (a teacher's, a partner's, a snapshot's) "
              "is a forward without a backward. *wall s*, *wall s/epoch* and *peak MiB* are measured where each run "
              "ran, on a machine possibly shared with other work: compare them only between runs made side by side.")


def _paired_cell(st: dict[str, Any], dec: int) -> str:
    if st["mean"] is None:
        return "–"
    spread = "" if st["std"] is None else f" ± {st['std']:.{dec}f}"
    return f"{st['mean']:+.{dec}f}{spread} ({st['better']}/{st['n']} better)"


def _interval_cells(st: dict[str, Any]) -> list[str]:
    ci = st.get("interval")
    if ci is None:
        return [_md(st.get("interval_note", "–")), "–"]
    return [f"[{ci['lo']:+.2f}, {ci['hi']:+.2f}]", "bootstrap" if ci["method"] == "bootstrap" else "t + binomial"]


def _paired_section(baseline: str, pairs: list[dict[str, Any]]) -> list[str]:
    head = (["group", "seeds", PAIRED[0][1], "95% interval of Δ last acc", "interval from"]
            + [t for _, t, _ in PAIRED[1:]] + ["baseline group", "groups vs this baseline"])
    rows = [[_md(row["label"]), str(row["pairs"]), _paired_cell(row["last_acc"], 2), *_interval_cells(row["last_acc"])]
            + [_paired_cell(row[key], dec) for key, _, dec in PAIRED[1:]]
            + [_md(row["baseline"]) if row["baseline"] is not None else "none at these values", str(row["compared"])]
            for row in pairs]
    methods = sorted({row["last_acc"]["interval"]["method"] for row in pairs if row["last_acc"].get("interval")})
    most = max((row["compared"] for row in pairs), default=0)
    per_axis = any(row["baseline"] != baseline for row in pairs)
    text = ["Each run minus the baseline's run with the same seed"
            + (" in the baseline group at the same values of the other axes" if per_axis else "")
            + "; mean ± std over the pairs (*seeds*), and in how many pairs the group was better (higher accuracy, "
            "lower ECE or NLL). The 95% interval of Δ last acc (points) includes test-sampling error: "
            + "; ".join(f"*{'bootstrap' if m == 'bootstrap' else 't + binomial'}*: {INTERVAL_FROM[m]}" for m in methods)
            + ("" if methods else "none could be computed") + "."]
    if most > 1:
        text.append(f"Up to {most} groups are compared with one baseline group (*groups vs this baseline*): the best "
                    f"of {most} differences is biased upwards, and the intervals are not adjusted for the number "
                    "of comparisons.")
    text.append("Best-epoch accuracy picks its epoch on the test set: its difference is not a result.")
    return ([f"## Against `{_md(baseline)}`, paired by seed", "", " ".join(text), ""]
            + _table(head, rows) + [""])


def _run_cells(r: RunInfo, columns: list[tuple[str, str, int]]) -> list[str]:
    summary = r.summary or {}
    cells = [f"`{_md(r.name)}`", fmt_value(r.seed), _md(_run_status(r))]
    for key, _, dec in columns:
        v = summary.get(key)
        text = f"{v:.{dec}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"
        if key == "best_acc" and "best_epoch" in summary and text != "–":
            text += f" (ep {summary['best_epoch']})"
        cells.append(text)
    return cells


def _runs_section(groups: list[Group], columns: list[tuple[str, str, int]]) -> list[str]:
    lines = ["## Runs", ""]
    head = ["run", "seed", "status"] + [title for _, title, _ in columns]
    for g in groups:
        lines += [f"### {_md(g.label)}", ""] + _table(head, [_run_cells(r, columns) for r in g.runs]) + [""]
    return lines
