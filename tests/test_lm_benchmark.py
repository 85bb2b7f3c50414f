"""benchmarks/lm_finetune.py's report: paired differences and the plain 'where DLB does not help' line."""
import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import lm_finetune  # noqa: E402


def summary(seed, acc, fwd=1.0, epochs=3):
    return {"seed": seed, "last_acc": acc, "macro_f1": acc - 1, "ece": 0.05, "nll": 0.4, "forwards_per_sample": fwd,
            "epochs": epochs, "seconds": 10.0, "train_docs": 100, "test_docs": 50, "max_length": 64,
            "truncated_train": 3}


def test_report_pairs_by_seed_and_says_where_dlb_does_not_help():
    a = argparse.Namespace(seeds=[0, 1], epochs=3, batch_size=16, lr=5e-5, device="cpu", smoke=False, budget="full")
    results = {"bbc": {
        "ce": [summary(0, 90.0), summary(1, 92.0)],
        "ce2x": [summary(0, 93.0, epochs=6), summary(1, 94.0, epochs=6)],
        "dlb": [summary(0, 91.0, 2.0), summary(1, 92.5, 2.0)],          # +0.75 vs ce, -1.75 vs ce2x
        "dlb-entropy": [summary(0, 89.0, 2.0), summary(1, 91.0, 2.0)],  # -1.00 vs ce
    }}
    md = lm_finetune.report(a, results, ["--tasks", "bbc"])
    row = next(line for line in md.splitlines() if line.startswith("| `dlb` |"))
    assert "| 91.75 ± 1.06 |" in row and "| +0.75 ± 0.35 | -1.75 ± 0.35 |" in row and "| 6 ± 0 |" in row
    plain = next(line for line in md.splitlines() if line.startswith("Where DLB does not help"))
    assert "`dlb` vs `ce2x`: -1.75" in plain and "`dlb-entropy` vs `ce`: -1.00" in plain
    assert "`dlb` vs `ce`:" not in plain
    assert "python benchmarks/lm_finetune.py --tasks bbc" in md


def test_paired_table_counts_seeds_and_flags_worse_calibration():
    a = argparse.Namespace(seeds=[0, 1], epochs=2, batch_size=8, lr=2e-4, device="cpu", smoke=False, budget="cpu")

    def run(seed, acc, ece, nll, fwd=1.0, epochs=2):
        return summary(seed, acc, fwd, epochs) | {"ece": ece, "nll": nll}

    results = {"tweets": {
        "ce": [run(0, 70.0, 0.10, 0.70), run(1, 72.0, 0.12, 0.72)],
        "ce2x": [run(0, 71.0, 0.20, 0.80, epochs=4), run(1, 71.0, 0.20, 0.80, epochs=4)],
        "dlb": [run(0, 71.0, 0.05, 0.75, 2.0), run(1, 71.0, 0.16, 0.76, 2.0)],
    }}
    md = lm_finetune.report(a, results, None).splitlines()
    row = next(line for line in md if line.startswith("| `dlb` | `ce` |"))
    # Δacc +1, -1; ΔECE -0.05, +0.04 (mean -0.005); ΔNLL +0.05, +0.04
    assert row == "| `dlb` | `ce` | +0.00 ± 1.41 | +0.00 ± 1.41 | -0.0050 ± 0.0636 | +0.0450 ± 0.0071 | 1 / 1 / 0 of 2 |"
    row2 = next(line for line in md if line.startswith("| `dlb` | `ce2x` |"))
    assert row2.endswith("| 0 / 2 / 2 of 2 |")
    assert lm_finetune.spread([30.0, 10.0, 500.0]) == "30 (10–500)" and lm_finetune.spread([7.0]) == "7"
    plain = next(line for line in md if line.startswith("Where DLB does not help"))
    assert "`dlb` NLL vs `ce`: +0.0450" in plain and "`dlb` ECE vs `ce`" not in plain
    assert "`dlb` vs `ce`: +0.00 points" in plain and "`dlb` ECE vs `ce2x`" not in plain
