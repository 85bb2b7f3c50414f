"""Issue 20: the repeat-only control (`dlb-repeat`: DLB's batches, CE on every row, alpha = 0) next to the older
studies' CE and DLB runs, paired by seed, each with a 95% interval.

    selfkd sweep configs/cpu/repeat_short.yaml --threads 1       # 21 runs: 6-epoch clean / noise / augmentation
    selfkd sweep configs/cpu/repeat_converged.yaml --threads 1   # 9 runs: converged clean / sym40 / asym40
    selfkd sweep configs/cpu/repeat_15epoch.yaml --threads 1     # 3 runs: the 15-epoch study (cifar10_cpu.py)
    selfkd train --preset cpu-short --data imagefolder --data-dir ../shared/data/cifar10-jpeg.tar.gz \
        --set data.subset=4000 --set data.test_subset=5000 --model resnet8 --method ce --epochs 6 --seed 0 \
        --device cpu --threads 1 --out benchmarks/runs/repeat_repro/ce-clean-seed0   # a committed CE run, retrained
                                            # (ce-clean-seed0-avx512: the same, on an AVX512 CPU)
    python benchmarks/repeat_control.py [--runs DIR ...] [--out benchmarks/results/repeat_control] [--keep]

Each finished repeat run is matched to the CE and DLB groups of the committed reports (`benchmarks/results/**/
report.json`) by its whole configuration: every key a report records must be equal, except the method's own
keys and the data folder's path. A run that matches no report is listed as unmatched, never paired by name.
The older runs hold per-run accuracies only, so the interval is `paired_interval` (t over the seeds, widened by a
conservative binomial term for the test images), as in `results/intervals_legacy.md`.

`--keep` copies each finished run's record (summary.json, config.yaml, metrics.jsonl, test_correct.npy; no weights)
to `OUT/runs/<sweep>/...`; the report recomputes from them (`--runs OUT/runs/repeat_short ...`).
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cifar10_cpu  # noqa: E402  (the 15-epoch study's configuration)
from evidence import RECORD  # noqa: E402  (the run record evidence.py keeps: summary, config, metrics, per-image)
from intervals_legacy import cifar15_seeds, older_reports  # noqa: E402
from selfkd.engine.config import flatten  # noqa: E402
from selfkd.experiments.intervals import paired_interval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
IGNORED = ("data.dir", "data.cache_dir")  # paths, relative to wherever the sweep file was
CIFAR15 = RESULTS / "cifar10_cpu.md"


def same(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


@functools.cache
def reports() -> list[tuple[Path, dict]]:
    """Every older study's report (its path, its JSON), the 15-epoch study's from its table (no report.json)."""
    return [*((p, json.loads(p.read_text())) for p in older_reports()), (CIFAR15, cifar15_report())]


def cifar15_report() -> dict:
    """The 15-epoch study (benchmarks/cifar10_cpu.py) as report groups: its configuration from the script, its
    per-seed last-epoch accuracies from the committed table (no per-seed ECE was kept: NaN)."""
    args = cifar10_cpu.parser().parse_args([])
    seeds = cifar15_seeds()
    groups = []
    for arm, method, epochs in (("ce", "ce", 15), ("dlb", "dlb", 15), ("ce30", "ce", 30)):
        cfg = flatten(cifar10_cpu.config(args, method, epochs, 0).to_dict())
        cfg.pop("train.seed")
        runs = [{"seed": k, "last_acc": v, "ece": float("nan"), "status": "finished"} for k, v in seeds[arm].items()]
        groups.append({"label": f"{method}, {epochs} epochs", "config": cfg, "runs": runs})
    return {"groups": groups}


def study(path: Path) -> str:
    """A report's name in the table: its folder, or the file for a study without one."""
    return str((path if path.suffix == ".md" else path.parent).relative_to(RESULTS))


def groups_for(cfg: dict, method: str, alpha: float | None) -> list[tuple[Path, dict]]:
    """Report groups trained on `cfg`'s protocol with method `method` (and, for DLB, this alpha)."""
    found = []
    for path, d in reports():
        for g in d["groups"]:
            gc = g["config"]
            if gc.get("method.name") != method or (alpha is not None and not same(gc.get("method.alpha"), alpha)):
                continue
            keys = [k for k in gc if not k.startswith("method.") and k not in IGNORED]
            if all(k in cfg and same(cfg[k], gc[k]) for k in keys):
                found.append((path, g))
    return found


def accs(g: dict) -> dict[int, tuple[float, float]]:
    return {r["seed"]: (r["last_acc"], r["ece"]) for r in g["runs"] if r["status"] == "finished"}


def finished(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("summary.json") if (p.parent / "config.yaml").exists())


def keep(a: argparse.Namespace, root: Path, run: Path) -> None:
    if a.keep:
        dest = a.out / "runs" / root.name / run.relative_to(root)
        if dest.resolve() == run.resolve():  # the report recomputed from its own records
            return
        dest.mkdir(parents=True, exist_ok=True)
        for f in RECORD:
            if (run / f).exists():
                shutil.copy2(run / f, dest / f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+",
                    default=[ROOT / "benchmarks/runs/repeat_short", ROOT / "benchmarks/runs/repeat_converged",
                             ROOT / "benchmarks/runs/repeat_15epoch", ROOT / "benchmarks/runs/repeat_repro"])
    ap.add_argument("--out", type=Path, default=RESULTS / "repeat_control")
    ap.add_argument("--keep", action="store_true", help="copy the finished runs' records (no weights) to OUT/runs/")
    a = ap.parse_args()

    settings: dict[tuple[str, str], dict] = {}  # (sweep, setting) -> seeds' runs and the matched groups
    unmatched: list[str] = []
    repro: list[tuple] = []
    for root in a.runs:
        if not root.exists():
            continue
        for run in finished(root):
            cfg = flatten(yaml.safe_load((run / "config.yaml").read_text()))
            summary = json.loads((run / "summary.json").read_text())
            if cfg["method.name"] == "ce":  # a committed CE run retrained today: how exactly do the pairs pair?
                for path, g in groups_for(cfg, "ce", None):
                    old = accs(g).get(cfg["train.seed"])
                    if old and same(g["config"].get("train.epochs"), cfg["train.epochs"]):
                        exact = old == (summary["last_acc"], summary["ece"])  # ECE to the last bit: the same weights
                        repro.append((f"{root.name}/{run.relative_to(root)}", path, g["label"], cfg["train.seed"],
                                      old[0], summary["last_acc"], exact))
                        break
                keep(a, root, run)
                continue
            if cfg["method.name"] != "dlb" or not same(cfg["method.alpha"], 0.0):
                continue
            setting = next((p for p in run.relative_to(root).parts if p.startswith("setting=")), "setting=clean")
            key = (root.name, setting.split("=", 1)[1])
            ce, dlb = groups_for(cfg, "ce", None), groups_for(cfg, "dlb", 1.0)
            # a CE group at more epochs is another arm (equal compute), not this protocol's baseline
            ce = [(p, g) for p, g in ce if same(g["config"].get("train.epochs"), cfg["train.epochs"])]
            if not ce or not dlb:
                unmatched.append(f"{root.name}/{run.relative_to(root)}")
                continue
            s = settings.setdefault(key, {"runs": {}, "ce": ce[0], "dlb": dlb[0], "cfg": cfg})
            s["runs"][cfg["train.seed"]] = (summary["last_acc"], summary["ece"])
            keep(a, root, run)

    lines = ["# The repeat-only control next to the older studies", "",
             "Commands: `selfkd sweep configs/cpu/repeat_short.yaml --threads 1`, "
             "`selfkd sweep configs/cpu/repeat_converged.yaml --threads 1`, "
             "`selfkd sweep configs/cpu/repeat_15epoch.yaml --threads 1`, then "
             "`python benchmarks/repeat_control.py --keep`.", "",
             "`dlb-repeat` is DLB's sampler and batches with alpha = 0: every row, the repeated half included, gets "
             "CE; no KD term. Each run is paired by seed with the CE and DLB runs of the report whose protocol it "
             "matches key for key (named below). Δ = last-epoch accuracy difference in points with a 95% interval "
             "(t over the seeds, widened by a conservative binomial test-sampling term; the older runs kept no "
             "per-image predictions). k = 3 comparisons per setting share these runs. dECE: mean paired difference "
             "in expected calibration error (negative = better calibrated; — where the study kept no per-seed ECE: "
             "the 15-epoch study's per-seed accuracies are benchmarks/README.md's table).", "",
             "| study | setting | seeds | test images | CE | dlb-repeat | DLB | dlb-repeat − CE | DLB − dlb-repeat | "
             "DLB − CE | dECE rep − CE | dECE DLB − rep |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table = []
    for (sweep, setting), s in sorted(settings.items()):
        rep, ce, dlb = s["runs"], accs(s["ce"][1]), accs(s["dlb"][1])
        seeds = sorted(set(rep) & set(ce) & set(dlb))
        n_test = s["cfg"].get("data.test_subset") or 10000
        row = {"sweep": sweep, "setting": setting, "seeds": seeds, "test_images": n_test,
               "ce_report": str(s["ce"][0].relative_to(ROOT)), "ce_group": s["ce"][1]["label"],
               "dlb_group": s["dlb"][1]["label"]}
        if len(seeds) < 2:
            lines.append(f"| {sweep} | {setting} | {len(seeds)} | {n_test} | (needs 2 paired seeds) |||||||| ")
            table.append(row)
            continue

        def col(d: dict, i: int) -> list[float]:
            return [d[x][i] for x in seeds]

        def mean(v: list[float]) -> float:
            return sum(v) / len(v)

        ivs = {"rep-ce": paired_interval(col(rep, 0), col(ce, 0), n_test),
               "dlb-rep": paired_interval(col(dlb, 0), col(rep, 0), n_test),
               "dlb-ce": paired_interval(col(dlb, 0), col(ce, 0), n_test)}
        dece = {"rep-ce": mean([r - c for r, c in zip(col(rep, 1), col(ce, 1))]),
                "dlb-rep": mean([d - r for d, r in zip(col(dlb, 1), col(rep, 1))])}
        row.update({"acc": {"ce": mean(col(ce, 0)), "dlb-repeat": mean(col(rep, 0)), "dlb": mean(col(dlb, 0))},
                    "delta": {k: {"mean": v.mean, "lo": v.lo, "hi": v.hi} for k, v in ivs.items()}, "dece": dece})
        table.append(row)
        lines.append(f"| {sweep} (`{study(s['ce'][0])}`) | {setting} | {len(seeds)} | {n_test} | "
                     f"{row['acc']['ce']:.2f} | {row['acc']['dlb-repeat']:.2f} | {row['acc']['dlb']:.2f} | "
                     + " | ".join(ivs[k].text() + (" *" if ivs[k].excludes_zero() else "") for k in ivs)
                     + "".join(f" | {v:+.4f}" if v == v else " | —" for v in dece.values()) + " |")  # NaN: not kept
    lines += ["", "`*`: the interval excludes zero (one of k = 3 comparisons per setting, and of "
              f"{3 * sum(1 for r in table if 'delta' in r)} in this table)."]
    if repro:
        lines += ["", "How exactly the pairs pair: committed CE runs retrained with today's code, same protocol and seed "
                  "(their records are in `runs/` beside this report). \"bit for bit\": accuracy and ECE equal to the "
                  "last bit, i.e. the same final weights. Float kernels differ between CPUs (AVX2 vs AVX512), so a run "
                  "retrained on another CPU pairs by protocol and seed only; the seed term of the interval absorbs "
                  "that difference."]
        lines += [f"- `{r}` vs `{study(p)}` {lab}, seed {seed}: {new:.2f} today, {old:.2f} committed "
                  f"(Δ {new - old:+.2f}; {'bit for bit' if exact else 'not bit for bit'})"
                  for r, p, lab, seed, old, new, exact in repro]
    if unmatched:
        lines += ["", "Runs that match no committed report's protocol (not paired): " + ", ".join(unmatched)]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "report.md").write_text("\n".join(lines) + "\n")
    (a.out / "report.json").write_text(json.dumps({"rows": table, "unmatched": unmatched,
                                                   "repro": [[r, str(p.relative_to(ROOT)), lab, seed, old, new, exact]
                                                             for r, p, lab, seed, old, new, exact in repro]}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
