"""95% intervals (seeds + test sampling) for every paired comparison in the committed reports of the older
studies, which hold per-run accuracies but no per-image predictions.

    python benchmarks/intervals_legacy.py > benchmarks/results/intervals_legacy.md

Each interval is `selfkd.experiments.intervals.paired_interval`: a t-interval over the seeds widened, in
quadrature, by a conservative binomial test-sampling term. `k` is how many arms were compared with the same
baseline in that report: with k arms, one of them excluding zero by chance is k times as likely.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from selfkd.experiments.intervals import interval_from_summary, paired_interval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FULL_TEST = {"cifar10": 10000, "imagefolder": 10000, "cifar100": 10000}  # the CIFAR-10 JPEG test split


def older_reports() -> list[Path]:
    """The committed report.json files of the older studies: every one but the new studies' (evidence_cifar10,
    repeat_control), which carry their own intervals."""
    return [p for p in sorted(RESULTS.rglob("report.json")) if not {"evidence_cifar10", "repeat_control"} & set(p.parts)]


def sweep_rows(report: Path) -> list[str]:
    d = json.loads(report.read_text())
    if not d.get("baseline"):
        return method_pairs(report, d)
    groups = {g["label"]: g for g in d["groups"]}
    base = groups[d["baseline"]]
    n_test = base["config"].get("data.test_subset") or FULL_TEST[base["config"]["data.name"]]
    by_seed = {r["seed"]: r["last_acc"] for r in base["runs"] if r["status"] == "finished"}
    rows = []
    k = len(d["paired"])
    for p in d["paired"]:
        runs = {r["seed"]: r["last_acc"] for r in groups[p["label"]]["runs"] if r["status"] == "finished"}
        seeds = sorted(set(runs) & set(by_seed))
        if len(seeds) < 2:
            continue
        iv = paired_interval([runs[s] for s in seeds], [by_seed[s] for s in seeds], n_test)
        flag = "yes" if iv.excludes_zero() else "no"
        rows.append(f"| `{report.parent.relative_to(RESULTS)}` | {p['label']} | {d['baseline']} | {iv.units} | {n_test} "
                    f"| {iv.text()} | {flag} | {k} |")
    return rows


def method_pairs(report: Path, d: dict) -> list[str]:
    """Reports without a baseline (noise, augmentation): DLB against CE within each setting of the other keys."""
    def key(g: dict) -> str:
        return json.dumps({k: v for k, v in g["config"].items() if k not in ("method.name",) and not k.startswith("method.")},
                          sort_keys=True)
    groups = d["groups"]
    pairs = [(a, b) for a in groups for b in groups
             if a["config"]["method.name"] == "dlb" and b["config"]["method.name"] == "ce" and key(a) == key(b)]
    rows = []
    for a, b in pairs:
        runs_a = {r["seed"]: r["last_acc"] for r in a["runs"] if r["status"] == "finished"}
        runs_b = {r["seed"]: r["last_acc"] for r in b["runs"] if r["status"] == "finished"}
        seeds = sorted(set(runs_a) & set(runs_b))
        if len(seeds) < 2:
            continue
        n_test = b["config"].get("data.test_subset") or FULL_TEST[b["config"]["data.name"]]
        iv = paired_interval([runs_a[s] for s in seeds], [runs_b[s] for s in seeds], n_test)
        rows.append(f"| `{report.parent.relative_to(RESULTS)}` | {a['label']} | {b['label']} | {iv.units} | {n_test} "
                    f"| {iv.text()} | {'yes' if iv.excludes_zero() else 'no'} | {len(pairs)} |")
    return rows


def lm_rows(md: Path) -> list[str]:
    """The LM study's markdown: per task, the arms' accuracies and the Δacc vs ce / ce2x columns."""
    found, task, n_test, acc = [], None, None, {}
    text = md.read_text()
    seeds = len(re.search(r"seeds ([\d ]+);", text).group(1).split())
    for line in text.splitlines():
        if line.startswith("## "):
            task, acc = line[3:].strip(), {}
        m = re.match(r"\d+ training / (\d+) test documents", line)
        if m:
            n_test = int(m.group(1))
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 9 or not cells[0].startswith("`"):
            continue
        arm = cells[0].strip("`")
        acc[arm] = float(cells[1].split("±")[0])
        for col, base in ((7, "ce"), (8, "ce2x")):
            if "±" in cells[col]:
                mean, sd = (float(x.replace("−", "-")) for x in cells[col].split("±"))
                found.append((task, arm, base, interval_from_summary(mean, sd, seeds, acc[arm], acc[arm] - mean, n_test), n_test))
    rows = []
    for task, arm, base, iv, n_test in found:
        k = sum(1 for t, _, b, _, _ in found if (t, b) == (task, base))
        rows.append(f"| `lm_finetune.md` {task} | {arm} | {base} | {iv.units} | {n_test} | {iv.text()} | "
                    f"{'yes' if iv.excludes_zero() else 'no'} | {k} |")
    return rows


def cifar15_seeds() -> dict[str, dict[int, float]]:
    """The 15-epoch benchmark's per-seed last-epoch accuracies, {"ce": {seed: acc}, "dlb": ..., "ce30": ...},
    from its per-seed table (seed | CE 15 | DLB 15 | CE 30) in benchmarks/README.md, which copies
    results/cifar10_cpu.md's runs; full 10,000-image test set."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    section = text.split("## What the CIFAR-10 CPU benchmark shows", 1)[1].split("\n## ", 1)[0]
    rows = [m.groups() for m in re.finditer(r"^\| (\d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", section, re.M)]
    return {arm: {int(r[0]): float(r[i]) for r in rows} for i, arm in ((1, "ce"), (2, "dlb"), (3, "ce30"))}


def cifar15_rows() -> list[str]:
    """The 15-epoch benchmark's two comparisons (:func:`cifar15_seeds`)."""
    seeds = cifar15_seeds()
    ce, dlb, ce2 = (list(seeds[k].values()) for k in ("ce", "dlb", "ce30"))
    rows = []
    for arm, base, a, b in (("dlb, 15 epochs", "ce, 15 epochs", dlb, ce), ("dlb, 15 epochs", "ce, 30 epochs", dlb, ce2)):
        iv = paired_interval(a, b, 10000)
        rows.append(f"| `cifar10_cpu.md` | {arm} | {base} | {iv.units} | 10000 | {iv.text()} | "
                    f"{'yes' if iv.excludes_zero() else 'no'} | 1 |")
    return rows


def main() -> None:
    print("# Intervals for the older studies' paired comparisons\n")
    print("Command: `python benchmarks/intervals_legacy.py > benchmarks/results/intervals_legacy.md`\n")
    print("Δ last-epoch accuracy (points), arm minus baseline, paired by seed, with a 95% interval that counts the "
          "seeds (t over the paired units) and test sampling (binomial, conservative: two independent accuracies "
          "on N images), combined in quadrature. 'excl. 0': the interval excludes zero. k: arms compared with the "
          "same baseline in that report (a best-of-k result is one of k chances).\n")
    print("| report | arm | baseline | units | test images | Δ acc [95% interval] | excl. 0 | k |")
    print("|---|---|---|---|---|---|---|---|")
    for report in older_reports():
        for row in sweep_rows(report):
            print(row)
    for row in cifar15_rows():
        print(row)
    for row in lm_rows(RESULTS / "lm_finetune.md"):
        print(row)


if __name__ == "__main__":
    main()
