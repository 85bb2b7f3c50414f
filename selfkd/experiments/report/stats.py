"""The numbers of a report: mean and sample standard deviation, differences paired by seed, pooled reliability bins."""
from __future__ import annotations

import math
import statistics
from typing import Any

from ...errors import ConfigError
from .collect import Group, RunInfo


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
