"""The numbers of a report: mean and sample standard deviation, differences paired by seed, pooled reliability bins."""
from __future__ import annotations

import math
import re
import statistics
from typing import Any

import numpy as np

from ...engine.rundir import TEST_CORRECT  # RUN/test_correct.npy: per-test-image correctness of the last epoch (bool)
from ...errors import ConfigError
from ..intervals import Interval, paired_bootstrap, paired_interval
from .collect import NOISE, Group, RunInfo, _j, _noise_text


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


PAIRED = [("last_acc", "Δ last acc", 2), ("best_acc", "Δ best-epoch acc (test-selected)", 2), ("ece", "Δ ECE", 4),
          ("nll", "Δ NLL", 4)]
INTERVAL_FROM = {"bootstrap": "paired bootstrap over seeds and test images (per-image correctness)",
                 "t+binomial": "t over seeds, widened by the binomial test-sampling error (summaries)"}
_ITEM = re.compile(r",\s*(?=[^,=\[\]]+=)")  # label parts: "name=value, name=value" (a value may hold ", ")


def _spec(baseline: str) -> list[str]:
    items = [x.strip() for x in _ITEM.split(baseline)]
    bad = [x for x in items if "=" not in x or not x.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"report: --baseline {baseline!r}: {bad[0]!r} is not name=value (the form of the group "
                          "labels, e.g. 'method=ce')")
    return items


def _rest(g: Group, free: set[str], method: bool) -> str:
    """The group's config without the baseline's keys (``free``; with the method, all its hyper-parameters):
    the other axes, on which a group and its baseline must agree. Clean data reads alike however it is set."""
    rest = {k: v for k, v in g.flat.items() if k not in free and k not in NOISE and not (method and k.startswith("method."))}
    if not free & set(NOISE):
        rest["\0noise"] = _noise_text(g.flat)
    return _j(rest)


def baselines(groups: list[Group], baseline: str) -> list[tuple[Group, Group | None]]:
    """Each compared group with its baseline group. ``baseline`` is a group's whole label (every group is
    compared with it), or some of its ``name=value`` parts (``method=ce`` on a grid that also varies the noise):
    then each group is compared with the baseline group at the same values of the other axes (None: none)."""
    base = next((g for g in groups if g.label == baseline), None)
    if base is not None:
        return [(g, base) for g in groups if g is not base]
    items = _spec(baseline)
    bases = [g for g in groups if g.flat and all(
        any(f"{k}={v}" == item for k, v, _ in g.parts) for item in items)]
    if not bases:
        raise ConfigError(f"report: --baseline {baseline!r} is not a group; groups: "
                          + ", ".join(repr(g.label) for g in groups)
                          + " (a baseline is a group's label or some of its name=value parts)")
    free = {k for item in items for (n, v, _), keys in zip(bases[0].parts, bases[0].part_keys)
            if f"{n}={v}" == item for k in keys}
    method = "method.name" in free
    out = []
    for g in groups:
        if any(g is b for b in bases) or not g.flat:
            continue
        match = [b for b in bases if _rest(b, free, method) == _rest(g, free, method)]
        if len(match) > 1:
            raise ConfigError(f"report: --baseline {baseline!r} is ambiguous for {g.label!r}: "
                              + " and ".join(repr(b.label) for b in match) + " both match; name more of the label")
        out.append((g, match[0] if match else None))
    return out


def _correct(run: RunInfo) -> np.ndarray | None:
    """The run's per-test-image correctness, when ``RUN/test_correct.npy`` holds it and agrees with the run's
    own last-epoch accuracy (else None: the interval falls back on the summaries)."""
    path = run.path / TEST_CORRECT
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    acc = run.result.get("last_acc")
    if arr.ndim != 1 or not len(arr) or not isinstance(acc, (int, float)) or abs(100 * arr.mean() - acc) > 1e-6:
        return None
    return arr.astype(bool)


def _test_size(run: RunInfo) -> int | None:
    n = run.result.get("test_images", run.result.get("test_docs"))
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def interval(pairs: list[tuple[RunInfo, RunInfo]]) -> tuple[Interval | None, str]:
    """The 95% interval of the paired last-epoch accuracy difference (points), test sampling included:
    :func:`~selfkd.experiments.intervals.paired_bootstrap` when every run has its per-image correctness,
    else :func:`~selfkd.experiments.intervals.paired_interval` from the accuracies and the test-set size.
    ``(None, why)`` when there is no interval."""
    pairs = [(a, b) for a, b in pairs if all(isinstance(r.result.get("last_acc"), (int, float)) for r in (a, b))]
    if len(pairs) < 2:
        return None, "an interval needs 2 seeds or more"
    correct = [(_correct(a), _correct(b)) for a, b in pairs]
    both = [(x, y) for x, y in correct if x is not None and y is not None]
    if len(both) == len(correct) and len({x.shape for c in both for x in c}) == 1:
        return paired_bootstrap(np.stack([x for x, _ in both]), np.stack([y for _, y in both])), ""
    sizes = {_test_size(r) for pair in pairs for r in pair}
    size = sizes.pop() if len(sizes) == 1 else None
    if size is None:
        return None, "the runs do not record one test-set size"
    return paired_interval([a.result["last_acc"] for a, _ in pairs], [b.result["last_acc"] for _, b in pairs],
                           size), ""


def paired(groups: list[Group], baseline: str) -> list[dict[str, Any]]:
    """Per compared group (:func:`baselines`), the differences to its baseline group's run with the same seed
    (finished runs of both): mean ± std of each :data:`PAIRED` key and how many seeds beat the baseline (higher
    accuracy, lower ECE/NLL); for the last-epoch accuracy a 95% interval that counts test sampling
    (:func:`interval`); ``compared``: how many groups were compared with the same baseline group (a best-of-k
    is read as one of k). Pairing removes what a seed shares between two methods (split, init, order)."""
    matched = baselines(groups, baseline)
    arms: dict[int, int] = {}
    for _, b in matched:
        if b is not None:
            arms[id(b)] = arms.get(id(b), 0) + 1
    out = []
    for g, base in matched:
        by_seed = {r.seed: r for r in base.finished} if base is not None else {}
        runs = [(r, by_seed[r.seed]) for r in g.finished if r.seed in by_seed]
        row: dict[str, Any] = {"label": g.label, "baseline": base.label if base is not None else None,
                               "pairs": len(runs), "compared": arms.get(id(base), 0)}
        for key, _, _ in PAIRED:
            diffs = [a.result[key] - b.result[key] for a, b in runs
                     if isinstance(a.result.get(key), (int, float)) and isinstance(b.result.get(key), (int, float))]
            better = sum((d > 0) if key.endswith("acc") else (d < 0) for d in diffs)
            row[key] = {**stat(diffs), "better": better}
        ci, why = interval(runs)
        row["last_acc"]["interval"] = None if ci is None else {
            "mean": ci.mean, "lo": ci.lo, "hi": ci.hi, "units": ci.units, "method": ci.method}
        if ci is None:
            row["last_acc"]["interval_note"] = why if base is not None else "no baseline group at these values"
        out.append(row)
    return out


def pooled_reliability(runs: list[RunInfo]) -> dict[str, Any] | None:
    """Reliability bins summed over runs: count, mean confidence and accuracy per bin, and the ECE."""
    rels = [rel for r in runs if isinstance(rel := r.result.get("reliability"), dict)]
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
