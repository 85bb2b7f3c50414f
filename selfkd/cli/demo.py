"""``selfkd demo``: CE vs DLB on scikit-learn's real 8x8 digits, clean and with 40% symmetric noise."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from ..engine.config import build_config
from ..engine.trainer import Trainer, build

GRID = [("ce", 0.0), ("dlb", 0.0), ("ce", 0.4), ("dlb", 0.4)]


def demo_config(method: str, noise: float, epochs: int, seed: int):
    return build_config({
        "data": {"name": "digits", "noise": {"kind": "symmetric" if noise else "none", "rate": noise, "seed": 0}},
        "model": {"name": "cnn_small"},
        "method": {"name": method},
        "optim": {"lr": 0.05, "batch_size": 32, "weight_decay": 5e-4},
        "schedule": {"kind": "cosine", "warmup_epochs": 1 if epochs > 1 else 0},
        "train": {"epochs": epochs, "seed": seed, "device": "cpu"},
    }, source="demo")


def run_demo(out: str | None, epochs: int, seed: int, progress: bool | None) -> int:
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="selfkd-demo-"))
    print(f"selfkd demo: cnn_small on digits (1347 train / 450 test), {epochs} epochs each, seed {seed}; runs in {root}",
          flush=True)
    rows = []
    for method, noise in GRID:
        run = root / f"{method}-noise{int(noise * 100)}"
        t0 = time.perf_counter()
        log_lines: list[str] = []
        summary = Trainer(build(demo_config(method, noise, epochs, seed)), run, progress=progress,
                          log=log_lines.append).run()
        print(f"  {method:>4} noise {noise:.0%}: last acc {summary['last_acc']:.2f} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
        rows.append((method, noise, summary))
    print()
    head = f"| method | label noise | last acc % | best acc % | ECE | NLL | seconds |"
    print(head)
    print("|---|---|---|---|---|---|---|")
    for method, noise, s in rows:
        label = f"{noise:.0%} symmetric" if noise else "clean"
        print(f"| {method} | {label} | {s['last_acc']:.2f} | {s['best_acc']:.2f} | "
              f"{s['ece']:.4f} | {s['nll']:.4f} | {s['seconds']:.1f} |")
    print("\nSame epochs for both methods: DLB forwards every sample twice per epoch. One seed; see "
          "benchmarks/ for multi-seed comparisons.", file=sys.stderr)
    return 0
