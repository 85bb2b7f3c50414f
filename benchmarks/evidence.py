"""Issue 20's study: DLB vs CE vs the repeat-only control, at equal epochs and at equal compute, with 95%
intervals that count test sampling (a paired two-way bootstrap over the paired units and the test images).

    selfkd sweep configs/cpu/evidence_headline.yaml --threads 1 # ce, dlb, dlb-repeat, ce-2x first (same runs)
    selfkd sweep configs/cpu/evidence_core.yaml --threads 1     # the runs (resumable; --jobs 2 on an idle machine)
    selfkd sweep configs/cpu/evidence_rf.yaml --threads 1
    python benchmarks/evidence.py [--core DIR] [--rf DIR] [--out benchmarks/results/evidence_cifar10] [--keep]

Per finished run it reads each test image's correctness of the final weights from `RUN/test_correct.npy`
(`selfkd train` writes it; a run made before it did is re-scored from `checkpoint.pt` once and the file
cached), checked against the run's own last-epoch accuracy, then writes `report.md` and `report.json`.
A run not finished yet is left out and counted: partial results say so.

`--keep` also copies each finished run's record (summary.json, config.yaml, metrics.jsonl, test_correct.npy; no
weights) to `OUT/runs/{core,rf}/...`, committed with the report: the report recomputes from them
(`--core OUT/runs/core --rf OUT/runs/rf`), and copying them into a sweep's `--out` (with its sweep.yaml and
runs.json) lets `selfkd sweep` skip them, so a study cut off by the end of a session resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selfkd.experiments.intervals import paired_bootstrap  # noqa: E402

UNITS = 10  # 2 subset draws x 5 seeds (evidence_core.yaml)
# (arm, baseline, question): the comparisons the study was designed for, fixed before any run
COMPARISONS = [
    ("dlb", "ce", "equal epochs: DLB vs CE"),
    ("dlb-repeat", "ce", "equal epochs: repeated augmentation alone vs CE"),
    ("dlb", "dlb-repeat", "distillation: DLB vs its own batches without the KD term"),
    ("dlb", "ce-2x", "equal compute: DLB vs CE at 2E"),
    ("dlb-repeat", "ce-2x", "equal compute: repeat-only vs CE at 2E"),
    ("dlb-rf0.25", "ce", "equal epochs: repeat_fraction 0.25 vs CE"),
    ("dlb-rf0.25", "ce-1.25x", "equal compute: repeat_fraction 0.25 vs CE at 1.25E"),
    ("ce-2x", "ce", "what 2x the epochs buys CE"),
]
RF_COMPARISONS = [
    ("dlb-rf0.25", "dlb-rf0.25-a0", "r=0.25: distillation (alpha 1) vs exposure only (alpha 0)"),
    ("dlb-rf0.25-a0.25", "dlb-rf0.25-a0", "r=0.25: r=1's per-row KD weight (alpha 0.25) vs alpha 0"),
    ("dlb-rf0.25", "dlb-rf0.25-a0.25", "r=0.25: per-row weight alpha/16 vs alpha/64"),
]
# added after the r=0.25 rows above were seen (exploratory, kept apart from the fixed ones): the two contrasts
# that complete "exposure, per-row weight or distillation": the repeat's exposure alone against CE, and the
# fraction at one per-row KD weight (alpha/64: r=0.25 at alpha 0.25 vs r=1 at alpha 1)
POST_HOC = [
    ("dlb-rf0.25-a0", "ce", "r=0.25: exposure alone (alpha 0, 1.25E) vs CE"),
    ("dlb-rf0.25-a0.25", "dlb", "one per-row KD weight (alpha/64): r=0.25 vs r=1"),
]
# forward and backward passes per training sample per epoch (each row is forwarded and back-propagated)
PASSES = {"ce": 1.0, "ce-2x": 1.0, "ce-1.25x": 1.0, "dlb": 2.0, "dlb-repeat": 2.0, "dlb-rf0.25": 1.25,
          "dlb-rf0.25-a0.25": 1.25, "dlb-rf0.25-a0": 1.25}


def score(run: Path) -> np.ndarray:
    """Per-test-image correctness of the run's final weights: RUN/test_correct.npy (which `selfkd train` writes),
    else re-scored from checkpoint.pt and cached there; either way checked against summary.json's last_acc."""
    cache = run / "test_correct.npy"
    want = json.loads((run / "summary.json").read_text())["last_acc"]
    if cache.exists():
        correct = np.load(cache, allow_pickle=False)
        if correct.dtype != np.bool_ or correct.ndim != 1 or abs(100 * correct.mean() - want) > 1e-6:
            raise SystemExit(f"{cache}: not the per-image correctness of summary.json's last_acc {want} "
                             f"(a {correct.dtype} array of shape {correct.shape}, mean {100 * correct.mean():.4f})")
        return correct
    import torch

    from selfkd.engine import checkpoint as ckpt
    from selfkd.engine.config import resolve
    from selfkd.engine.setup import build

    torch.set_num_threads(1)
    cfg = resolve(file=str(run / "config.yaml"))
    setup = build(cfg)
    model = setup.model
    model.load_state_dict(ckpt.load(run / "checkpoint.pt")["model"])
    model.eval()
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    test, out = setup.test, []
    with torch.no_grad():
        for a in range(0, len(test), 1000):
            x = setup.augment.normalize(test.batch(range(a, min(a + 1000, len(test))))[0])
            if setup.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).argmax(1))
    correct = (torch.cat(out) == test.labels).numpy()
    if abs(100 * correct.mean() - want) > 1e-6:
        raise SystemExit(f"{run}: re-scored accuracy {100 * correct.mean():.2f} != summary.json's {want}")
    np.save(cache, correct)
    return correct


def collect(root: Path) -> dict[str, dict[tuple[int, int], Path]]:
    """arm -> {(subset_seed, seed): finished run dir}."""
    arms: dict[str, dict[tuple[int, int], Path]] = {}
    for summary in sorted(root.glob("arm=*/**/summary.json")):
        run = summary.parent
        parts = dict(p.split("=", 1) for p in run.relative_to(root).parts)
        unit = (int(parts.get("data.subset_seed", 0)), int(parts["train.seed"]))
        arms.setdefault(parts["arm"], {})[unit] = run
    return arms


RECORD = ("summary.json", "config.yaml", "metrics.jsonl", "test_correct.npy")


def keep(root: Path, runs: dict[str, dict[tuple[int, int], Path]], dest: Path) -> int:
    """Copy each finished run's record (no weights) under dest, keeping its path below the sweep root."""
    n = 0
    for by_unit in runs.values():
        for run in by_unit.values():
            score(run)  # test_correct.npy exists before the record is copied
            to = dest / run.relative_to(root)
            if to.resolve() == run.resolve():
                continue
            to.mkdir(parents=True, exist_ok=True)
            for name in RECORD:
                if (run / name).exists():
                    shutil.copy2(run / name, to / name)
            n += 1
    for name in ("sweep.yaml", "runs.json"):
        if (root / name).exists() and (dest / name).resolve() != (root / name).resolve():
            shutil.copy2(root / name, dest / name)
    return n


def curve(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: r[key] for r in rows if key in r and r[key] is not None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--core", type=Path, default=ROOT / "benchmarks/runs/evidence_core")
    p.add_argument("--rf", type=Path, default=ROOT / "benchmarks/runs/evidence_rf")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evidence_cifar10")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--keep", action="store_true", help="copy each finished run's record (no weights) to OUT/runs/")
    a = p.parse_args(argv)
    arms = collect(a.core)
    rf = collect(a.rf) if a.rf.exists() else {}
    if a.keep:
        n = keep(a.core, arms, a.out / "runs" / "core") + (keep(a.rf, rf, a.out / "runs" / "rf") if rf else 0)
        print(f"kept {n} run records under {a.out / 'runs'}", file=sys.stderr)
    # the rf study runs on subset draw 0 only: pair its arms with the core's units of that draw
    arms.update(rf)
    summaries = {arm: {u: json.loads((r / "summary.json").read_text()) for u, r in runs.items()} for arm, runs in arms.items()}
    lines = ["# DLB vs CE vs the repeat-only control (issue 20): ResNet-8, 2,000-image CIFAR-10 subsets, 100 epochs", "",
             "Commands: `selfkd sweep configs/cpu/evidence_core.yaml --threads 1`, "
             "`selfkd sweep configs/cpu/evidence_rf.yaml --threads 1`, then `python benchmarks/evidence.py`.", "",
             "Protocol: real CIFAR-10 (JPEG), ResNet-8, `cpu-short` (SGD-Nesterov lr 0.05, cosine, 1 warm-up epoch, "
             "batch 64 new samples), E = 100 epochs; class-stratified 2,000-image training subsets, two draws x seeds "
             "0-4 = 10 paired units; the full 10,000-image test set. Accuracy is the last epoch's (no selection on the "
             "test set). Intervals: 95 %, paired two-way bootstrap over units and test images "
             f"({a.resamples} resamples).", ""]
    need = {arm: 5 if arm.startswith("dlb-rf0.25-") else UNITS for arm in PASSES}  # evidence_rf: draw 0 only
    done = {arm: len(arms.get(arm, {})) for arm in PASSES}
    partial = any(done[arm] < need[arm] for arm in PASSES)  # an arm not started yet counts too
    if partial:
        lines += [f"**Partial: finished units per arm: {', '.join(f'{k} {done[k]}/{need[k]}' for k in PASSES)}.** "
                  "Only the units every compared arm has are paired.", ""]
    lines += ["| arm | units | fwd+bwd passes / sample | last acc % | ECE | NLL |", "|---|---|---|---|---|---|"]
    table = {}
    for arm in [x for x in PASSES if x in summaries]:
        s = list(summaries[arm].values())
        acc = np.array([x["last_acc"] for x in s])
        ece = np.array([x["ece"] for x in s])
        nll = np.array([x["nll"] for x in s])
        epochs = s[0]["epochs"]
        table[arm] = {"units": len(s), "passes": PASSES[arm] * epochs, "acc": acc.mean(), "acc_sd": acc.std(ddof=1) if len(s) > 1 else 0.0,
                      "ece": ece.mean(), "nll": nll.mean()}
        sd = f" ± {table[arm]['acc_sd']:.2f}" if len(s) > 1 else ""
        lines.append(f"| `{arm}` | {len(s)} | {PASSES[arm] * epochs:g} | {acc.mean():.2f}{sd} | {ece.mean():.3f} | {nll.mean():.3f} |")
    lines += ["", "Paired differences (arm − baseline, points), over the units both have:", ""]
    header = ["| question | arm | baseline | units | Δ last acc [95 %] | excl. 0 | Δ ECE | Δ NLL |", "|---|---|---|---|---|---|---|---|"]

    def compare(pairs):
        rows, out = [], []
        for arm, base, question in pairs:
            if arm not in arms or base not in arms:
                continue
            units = sorted(set(arms[arm]) & set(arms[base]))
            if len(units) < 2:
                continue
            ca = np.stack([score(arms[arm][u]) for u in units])
            cb = np.stack([score(arms[base][u]) for u in units])
            iv = paired_bootstrap(ca, cb, resamples=a.resamples, seed=0)
            d_ece = np.mean([summaries[arm][u]["ece"] - summaries[base][u]["ece"] for u in units])
            d_nll = np.mean([summaries[arm][u]["nll"] - summaries[base][u]["nll"] for u in units])
            out.append({"question": question, "arm": arm, "baseline": base, "units": len(units), "mean": iv.mean,
                        "lo": iv.lo, "hi": iv.hi, "d_ece": d_ece, "d_nll": d_nll})
            rows.append(f"| {question} | `{arm}` | `{base}` | {len(units)} | {iv.text()} | {'yes' if iv.excludes_zero() else 'no'} "
                        f"| {d_ece:+.3f} | {d_nll:+.3f} |")
        return rows, out

    rows, results = compare(COMPARISONS + RF_COMPARISONS)
    lines += header + rows
    fixed = len(COMPARISONS) + len(RF_COMPARISONS)
    lines += ["", f"{fixed} comparisons were fixed before any run; {len(results)} have units to pair (the rows above)"
              f"{'' if len(results) == fixed else ', the rest wait for their arms'}. With that many, about one interval "
              "in 20 misses by chance.", ""]
    rows, post_hoc = compare(POST_HOC)
    if rows:
        lines += [f"Added after the r=0.25 rows above were seen ({len(post_hoc)} more, exploratory: not fixed in advance, "
                  "so read them as questions for a new run, not as tests):", ""] + header + rows + [""]
    if "ce" in arms:  # is CE converged? test accuracy over the last 20 % of epochs, and NLL's trend
        flat = []
        for u, run in sorted(arms["ce"].items()):
            acc, nll = curve(run, "test_acc"), curve(run, "test_nll")
            late = sorted(e for e in acc if e >= 80)
            flat.append((u, acc[late[0]], acc[late[-1]], nll[late[0]], nll[late[-1]]))
        lines += ["CE's convergence: test accuracy and NLL at epoch 80 and 100 (the last 20 % of epochs), per unit:", "",
                  "| unit (subset draw, seed) | acc @80 | acc @100 | NLL @80 | NLL @100 |", "|---|---|---|---|---|"]
        lines += [f"| {u} | {a80:.2f} | {a100:.2f} | {n80:.3f} | {n100:.3f} |" for u, a80, a100, n80, n100 in flat]
        lines.append("")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "report.md").write_text("\n".join(lines) + "\n")
    (a.out / "report.json").write_text(json.dumps({"arms": table, "comparisons": results, "post_hoc": post_hoc, "partial": partial,
                                                    "units": {k: [list(u) for u in sorted(v)] for k, v in arms.items()}},
                                                   indent=1, default=float) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
