"""The report's PNG plots (matplotlib imported here only: the Agg canvas, no pyplot, no global backend change)."""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any

from ...engine import checkpoint as ckpt
from .collect import Group, _j, _noise_text, _noisy
from .stats import fmt_stat, pooled_reliability, stat


PLOTS = {"curves": "acc_curves.png", "noise": "acc_vs_noise.png", "compute": "acc_vs_compute.png",
         "reliability": "reliability.png"}


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


def _panels(n_panels: int, width: float, height: float, entries: int, sharex: bool = False):
    """A figure of ``n_panels`` side by side (``width`` x ``height`` inches each, taller for a long legend)."""
    fig = _figure(figsize=(width * n_panels, height + 0.25 * math.ceil(entries / 3)))
    return fig, fig.subplots(1, n_panels, squeeze=False, sharex=sharex)[0]


def _finish(fig, axes, entries: int, path: Path):
    """The shared legend under the panels, then the PNG written atomically; returns the figure."""
    _legend(fig, axes, entries)
    _save(fig, path)
    return fig


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(fig, axes, n: int) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(n, 3), fontsize=8, frameon=False)


# (metrics key, y label, title): the panels of acc_curves.png, each drawn only when some run logged it
CURVES = [("test_acc", "test accuracy (%)", "Test accuracy per epoch"),
          ("test_macro_f1", "test macro-F1 (%)", "Test macro-F1 per epoch"),
          ("train_acc", "training accuracy (%)", "Training accuracy per epoch (augmented batches, given labels)"),
          ("train_memorized", "noisy-label fit (%)", "Corrupted training samples predicted as their noisy label")]
LOSS_CURVE = ("train_loss", "training loss (nats, the method's objective)", "Training loss per epoch (mean over steps)")


def plot_curves(groups: list[Group], colors: list, path: Path):
    """Test accuracy per epoch and the other per-epoch metrics the runs logged (training accuracy, or the
    training loss where there is none, as in ``selfkd finetune``; with label noise, the noisy-label fit):
    mean over seeds and min-max band. Returns the figure (None: nothing to draw)."""
    series = []
    for g, c in zip(groups, colors):
        per_epoch: dict[int, list[dict[str, Any]]] = {}
        for r in g.runs:
            for m in r.metrics:
                per_epoch.setdefault(int(m["epoch"]), []).append(m)
        if per_epoch:
            series.append((g, c, dict(sorted(per_epoch.items()))))
    if not series:
        return None

    def logged(key: str) -> bool:
        return any(isinstance(m.get(key), (int, float)) for _, _, pe in series for ms in pe.values() for m in ms)

    panels = [p for p in CURVES if logged(p[0])]
    if not logged("train_acc") and logged(LOSS_CURVE[0]):
        panels.insert(len([p for p in panels if p[0].startswith("test_")]), LOSS_CURVE)
    if not panels:
        return None
    fig, axes = _panels(len(panels), 6.2, 4.4, len(series))
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
        _integer_epochs(ax)
    fig.suptitle("Mean over seeds; band: min–max over seeds", fontsize=9, color="0.35")
    return _finish(fig, axes, len(series), path)


def _points(pts: list[tuple[float, Group]], key: str, shift: float = 0.0
            ) -> tuple[list[float], list[float], list[float], list[Group]]:
    """(x, mean, std, group) of ``key`` over each group's finished runs, sorted by x; groups without a value
    are left out."""
    xs, ys, es, kept = [], [], [], []
    for x, g in sorted(pts, key=lambda p: p[0]):
        st = stat([r.result.get(key) for r in g.finished])
        if st["mean"] is not None:
            xs.append(x + shift)
            ys.append(st["mean"])
            es.append(st["std"] or 0.0)
            kept.append(g)
    return xs, ys, es, kept


BEST_LABEL = "best-epoch test accuracy (%, test-selected epoch)"


def plot_noise(groups: list[Group], colors: list, path: Path):
    """Accuracy (last, best) and noisy-label fit against the noise rate, one line per method/setting.
    Returns the figure (None: the runs do not vary the noise)."""
    points = []
    for g in groups:
        if not g.flat or not g.finished:
            continue
        rate = float(g.flat.get("data.noise.rate") or 0) if _noisy(g.flat) else 0.0
        kind = g.flat.get("data.noise.kind") if _noisy(g.flat) else None
        name = ", ".join(f"{k}={v}" for k, v, is_noise in g.parts if not is_noise) or "runs"
        points.append((name, kind, rate, g))
    if len({p[2] for p in points}) < 2:
        return None
    kinds = sorted({p[1] for p in points if p[1] is not None})
    lines: dict[str, list[tuple[float, Group]]] = {}
    for name, kind, rate, g in points:
        targets = [kind] if kind is not None else (kinds or [None])
        for k in targets:
            key = name if len(kinds) <= 1 else f"{name} ({k})"
            lines.setdefault(key, []).append((rate, g))
    panels = [("last_acc", "last-epoch test accuracy (%)"), ("best_acc", BEST_LABEL)]
    if any(stat([r.result.get("memorized") for r in g.finished])["n"] for *_, g in points):
        panels.append(("memorized", "noisy-label fit (%, memorised)"))
    palette = _colors(len(lines))
    fig, axes = _panels(len(panels), 4.6, 4.2, len(lines), sharex=True)
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
    return _finish(fig, axes, len(lines), path)


MARKERS = "osD^vP*Xph"


def compute_axis(groups: list[Group]) -> tuple[str, dict[int, float]]:
    """The x axis of acc_vs_compute.png: per group (by id), forward + 2 x backward passes per training sample
    over the run (a backward costs about two forwards: Kaplan et al., arXiv 2001.08361), or forward passes alone
    where some run does not record its backward passes; and the axis label."""
    fwd: dict[int, float] = {}
    both: dict[int, float | None] = {}
    for g in groups:
        f = stat([r.result.get("passes") for r in g.finished])
        if g.flat and f["mean"] is not None:
            b = stat([r.result.get("backward_passes") for r in g.finished])
            fwd[id(g)] = f["mean"]
            both[id(g)] = f["mean"] + 2 * b["mean"] if b["n"] == f["n"] else None
    if fwd and None not in both.values():
        return "compute per training sample over the run: forward + 2 × backward passes", both  # type: ignore[return-value]
    return "forward passes per training sample over the run (backward passes not recorded)", fwd


def plot_compute(groups: list[Group], colors: list, path: Path):
    """Accuracy (last, best) against compute (:func:`compute_axis`), one point per group (its label in the
    legend), the groups of one method (and noise setting) joined; groups at the same compute are spread a
    little in x so none hides another. Drawn when the budgets differ; returns the figure (else None)."""
    xlabel, cost = compute_axis(groups)
    noise_varies = len({_j(_noise_text(g.flat)) for g in groups if g.flat}) > 1
    lines: dict[str, list[Group]] = {}
    for g in groups:
        if id(g) in cost:
            key = str(g.flat.get("method.name", "runs")) + (f" ({_noise_text(g.flat)})" if noise_varies else "")
            lines.setdefault(key, []).append(g)
    if len({round(x, 9) for x in cost.values()}) < 2:
        return None
    shown = [g for gs in lines.values() for g in gs]
    top = max(cost.values())
    at: dict[float, list[int]] = {}
    for g in shown:
        at.setdefault(round(cost[id(g)], 9), []).append(id(g))
    shift = {k: (ids.index(k) - (len(ids) - 1) / 2) * 0.015 * top for ids in at.values() for k in ids}
    panels = [("last_acc", "last-epoch test accuracy (%)"), ("best_acc", BEST_LABEL)]
    palette = _colors(len(lines))
    fig, axes = _panels(len(panels), 6.2, 4.6, len(shown), sharex=True)
    for ax, (key, ylabel) in zip(axes, panels):
        for (name, gs), c in zip(lines.items(), palette):
            pts = [(cost[id(g)] + shift[id(g)], g) for g in gs]
            xs, ys, es, kept = _points(pts, key)
            if not xs:
                continue
            if len(xs) > 1:
                ax.plot(xs, ys, color=c, lw=1.0, alpha=0.6)
            for i, (x, y, e, g) in enumerate(zip(xs, ys, es, kept)):
                ax.errorbar([x], [y], yerr=[e], color=c, marker=MARKERS[i % len(MARKERS)], ms=5, capsize=3,
                            lw=1.4, ls="none", label=g.label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy against compute: mean over seeds, error bars ± std (groups at one compute slightly "
                 "offset in x)", fontsize=10)
    return _finish(fig, axes, len(shown), path)


def plot_reliability(groups: list[Group], colors: list, path: Path):
    """Per group, the reliability diagram of its bins summed over the finished runs, with the number of test
    images in each bin under it; the title's ECE is the results table's (mean ± std of the runs' ECEs).
    Returns the figure (None: no run has reliability bins)."""
    items = [(g, c, rel) for g, c in zip(groups, colors) if (rel := pooled_reliability(g.finished)) is not None]
    if not items:
        return None
    ncols = min(4, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig = _figure(figsize=(3.4 * ncols, 5.2 * nrows + 0.6))
    grid = fig.subplots(2 * nrows, ncols, squeeze=False, gridspec_kw={"height_ratios": [3, 1] * nrows})
    axes = [grid[2 * (i // ncols), i % ncols] for i in range(nrows * ncols)]
    below = [grid[2 * (i // ncols) + 1, i % ncols] for i in range(nrows * ncols)]
    for ax, low, (g, c, rel) in zip(axes, below, items):
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
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7, labelbottom=False)
        ece = stat([r.result.get("ece") for r in g.finished])  # the table's number
        runs = rel["runs"]
        ax.set_title(f"{_wrap(g.label)}\nECE {fmt_stat(ece, 4)} (mean over {ece['n']} run{'s' if ece['n'] != 1 else ''})"
                     f"\nbins summed over {runs} run{'s' if runs != 1 else ''}", fontsize=8)
        low.bar([b * width for b in range(rel["bins"])], rel["count"], width=width, align="edge", color=c,
                edgecolor="black", lw=0.5)
        low.set_xlim(0, 1)
        low.set_xlabel("confidence", fontsize=8)
        low.set_ylabel("test images", fontsize=8)
        low.tick_params(labelsize=7)
    for ax in axes[len(items):] + below[len(items):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    bins = items[0][2]["bins"]
    fig.suptitle(f"Reliability diagrams (test set, last epoch): {bins} equal-width confidence bins; a run's ECE is "
                 "Σ_b (n_b / N)·|acc_b − conf_b|, each bin weighted by its share of the test images", fontsize=9)
    _save(fig, path)
    return fig


def draw_plots(groups: list[Group], report_dir: Path) -> tuple[list[tuple[str, str]], str]:
    """Every plot the groups allow, as ``(file name, caption)``; and a note when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."
    colors = _colors(len(groups))
    drawn = []
    for key, draw, caption in (
            ("curves", plot_curves, "Test accuracy per epoch: mean over seeds, band min–max"),
            ("noise", plot_noise, "Accuracy against the label-noise rate: mean ± std over seeds"),
            ("compute", plot_compute, "Accuracy against compute per training sample (forward and backward passes): "
             "mean ± std over seeds"),
            ("reliability", plot_reliability, "Reliability diagrams: bins summed over seeds, test images per bin "
             "below; ECE as in the table")):
        if draw(groups, colors, report_dir / PLOTS[key]) is not None:
            drawn.append((PLOTS[key], caption))
    return drawn, ""
