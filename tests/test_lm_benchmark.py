"""benchmarks/lm_finetune.py: tuning on a validation split carved from the training documents, the same
grid size per arm, resumable runs, per-document re-scoring and the paired-bootstrap report."""
import argparse
import csv
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lm_finetune  # noqa: E402
import tinylm  # noqa: E402


def test_every_arm_gets_the_same_grid_size():
    lrs = [1e-5, 2e-5, 4e-5, 8e-5]
    for arm in lm_finetune.ARMS:
        assert len(lm_finetune.grid(arm, lrs)) == 4
    assert lm_finetune.grid("ce2x", lrs) == [{"lr": x} for x in lrs]
    assert lm_finetune.grid("dlb", lrs) == [{"lr": 2e-5, "alpha": 0.5}, {"lr": 2e-5, "alpha": 1.0},
                                            {"lr": 4e-5, "alpha": 0.5}, {"lr": 4e-5, "alpha": 1.0}]
    assert lm_finetune.grid("ls", lrs[:2]) == [{"lr": 1e-5, "epsilon": 0.1}, {"lr": 1e-5, "epsilon": 0.2}]
    assert lm_finetune.method_of("dlb-repeat", {"lr": 1e-5}) == {"name": "dlb", "alpha": 0.0}  # the preset
    assert lm_finetune.point_name({"lr": 2e-05, "alpha": 0.5}) == "lr=2e-05,alpha=0.5"


def test_choose_takes_validation_accuracy_then_lower_nll():
    pts = [({"lr": 1}, {"last_acc": 80.0, "nll": 0.5}), ({"lr": 2}, {"last_acc": 81.0, "nll": 0.9}),
           ({"lr": 3}, {"last_acc": 81.0, "nll": 0.7}), ({"lr": 4}, {"last_acc": 81.0, "nll": 0.7})]
    assert lm_finetune.choose(pts) == {"lr": 3}


def test_plan_counts_tuning_and_test_runs():
    a = argparse.Namespace(tasks=["bbc"], arms=["ce", "dlb"], lrs=[1e-4, 2e-4], seeds=[0, 1, 2], epochs=1,
                           val_fraction=0.2)
    runs, hours = lm_finetune.plan(a, {"bbc": (100, 50)})
    r = lm_finetune.RATES
    ce = 2 * (80 / r["train"] + 20 / r["eval"]) + 3 * (100 / r["train"] + 50 * 2 / r["eval"])
    dlb = 2 * (160 / r["train"] + 20 / r["eval"]) + 3 * (200 / r["train"] + 50 * 2 / r["eval"])
    assert runs == 10 and hours == pytest.approx((ce + dlb) / 3600)


def test_tuning_data_is_the_training_documents_only(tmp_path):
    src = tmp_path / "tweets.csv"
    rows = [(f"tweet {i}, with \"quotes\"\nand a line break" if i % 7 == 0 else f"tweet {i}", ["neg", "neu", "pos"][i % 3])
            for i in range(60)]
    with src.open("w", encoding="latin-1", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "sentiment"])
        w.writerows((i, t, y) for i, (t, y) in enumerate(rows))
    a = argparse.Namespace(tweets_path=src, tweets_train=None, tweets_test=None, tweets_length=32, runs=tmp_path / "runs",
                           val_fraction=0.25, val_seed=1)
    from selfkd.data.text import load_text

    test_cfg = lm_finetune.data_cfg(a, "tweets")
    tune_cfg = lm_finetune.tuning_data(a, "tweets", test_cfg)
    full = load_text(src, text_column="text", label_column="sentiment", encoding="latin-1", test_fraction=0.2)
    opts = {k: v for k, v in tune_cfg.items() if k not in ("path", "max_length")}
    tune = load_text(tune_cfg["path"], **opts)
    assert sorted(tune.train.texts + tune.test.texts) == sorted(full.train.texts)  # quoting survives the round trip
    assert not set(tune.test.texts) & set(full.test.texts)
    assert len(tune.test) == 12 and tune.test.labels.bincount().tolist() == [4, 4, 4]  # stratified: 0.25 of 16 per class
    assert tune_cfg["split_seed"] == 1 and tune_cfg["max_length"] == 32
    lm_finetune.tuning_data(a, "tweets", test_cfg)  # same documents: accepted as is
    a.tweets_train = 30
    with pytest.raises(SystemExit, match="holds other training documents"):
        lm_finetune.tuning_data(a, "tweets", lm_finetune.data_cfg(a, "tweets"))


def preds(correct: list[int], n: int = 40) -> dict:
    labels = [i % 2 for i in range(n)]
    return {"labels": labels, "pred": [y if i in correct else 1 - y for i, y in enumerate(labels)], "nll": [0.5] * n}


def test_report_gives_bootstrap_intervals_and_words_null_results():
    a = argparse.Namespace(budget="cpu", epochs=2, batch_size=16, seeds=[0, 1, 2], device="cpu", val_fraction=0.2,
                           val_seed=1, tune_seed=100, lrs=[1e-4, 2e-4], resamples=500)
    base = set(range(30))
    p = {"ce": {s: preds(base) for s in a.seeds}, "ce2x": {s: preds(base) for s in a.seeds},
         "dlb": {s: preds(base | {30, 31, 32, 33}) for s in a.seeds},  # +10 points on every seed
         "dlb-repeat": {s: preds(base) for s in a.seeds}, "ls": {s: preds(base) for s in a.seeds[:2]}}
    summ = {"last_acc": 75.0, "macro_f1": 70.0, "ece": 0.1, "nll": 0.5, "forwards_per_sample": 1.0, "epochs": 2,
            "seconds": 3.0, "train_docs": 100, "test_docs": 40, "max_length": 64, "truncated_train": 0}
    results = {"bbc": {arm: [summ] * len(v) for arm, v in p.items()}}
    tuning = {"bbc": {arm: [({"lr": 1e-4}, {"last_acc": 70.0, "nll": 0.6}), ({"lr": 2e-4}, {"last_acc": 72.0, "nll": 0.6})]
                      for arm in p}}
    md = lm_finetune.report(a, tuning, results, {"bbc": p}, ["--budget", "cpu"]).splitlines()
    row = next(x for x in md if x.startswith("| `dlb` | `ce` |"))
    assert row.startswith("| `dlb` | `ce` | 3 | 4 | +10.00 [")
    assert "10.00 points above `ce` (interval +10.00 [" in row and "one of 4 comparisons with `ce`" in row
    row = next(x for x in md if x.startswith("| `ls` | `ce` |"))  # ls has 2 seeds: paired over those
    assert row == ("| `ls` | `ce` | 2 | 4 | +0.00 [+0.00, +0.00] | +0.0000 [+0.0000, +0.0000] | "
                   "no effect detected at this budget (interval +0.00 [+0.00, +0.00]) |")
    assert any(x.startswith("| `dlb` | `dlb-repeat` | 3 | 1 | +10.00 [") for x in md)
    assert any(x.startswith("| `dlb-repeat` | `ce2x` | 3 | 3 |") for x in md)
    assert sum("**yes**" in x and "lr=0.0002" in x for x in md) == 5
    assert lm_finetune.spread([30.0, 10.0, 500.0]) == "30 (10–500)" and lm_finetune.spread([7.0]) == "7"


def test_smoke_budget_tunes_on_validation_rescores_and_resumes(tmp_path):
    model = tinylm.make_model(tmp_path / "model")
    corpus = tinylm.make_corpus(tmp_path / "corpus", per_class=10)
    runs = tmp_path / "runs"
    argv = ["--budget", "smoke", "--no-install", "--tasks", "bbc", "--arms", "ce", "dlb", "--model", str(model),
            "--bbc-path", str(corpus), "--runs", str(runs), "--threads", "1"]
    assert lm_finetune.main(argv) == 0
    tune = runs / "bbc" / "tune"
    assert sorted(p.name for p in (tune / "ce").iterdir()) == ["lr=0.001", "lr=0.003"]
    assert sorted(p.name for p in (tune / "dlb").iterdir()) == ["lr=0.001,alpha=0.5", "lr=0.001,alpha=1"]
    data = json.loads((tune / "ce" / "lr=0.001" / "data.json").read_text())
    assert data["split"] == "stratified, test_fraction=0.2, split_seed=1"
    assert data["train"] == {"food": 6, "sport": 6, "tech": 6} and data["test"] == {"food": 2, "sport": 2, "tech": 2}
    cfg = (tune / "ce" / "lr=0.001" / "config.yaml").read_text()
    assert str(runs / "bbc" / "train.csv") in cfg and "seed: 100" in cfg
    test = runs / "bbc" / "test"
    for run in ("ce-s0", "ce-s1", "dlb-s0", "dlb-s1"):
        rec = json.loads((test / run / lm_finetune.PREDICTIONS).read_text())
        assert len(rec["labels"]) == len(rec["pred"]) == len(rec["nll"]) == 6
        assert not (test / run / "model").exists()
    md = (runs / "report.md").read_text()
    assert "| `dlb` | `ce` | 2 | 1 |" in md and md.count("**yes**") == 2
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("summary.json")}
    assert len(stamps) == 8
    assert lm_finetune.main(argv) == 0  # every run finished: read back, nothing trained again
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("summary.json")} == stamps
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(optim.batch_size\)"):
        lm_finetune.main(argv + ["--batch-size", "4"])
