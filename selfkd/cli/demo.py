"""``selfkd demo``: CE vs DLB on scikit-learn's real 8x8 digits, clean and with 40% symmetric noise."""
from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

from ..engine.config import build_config
from ..engine.trainer import Trainer
from ..engine.setup import build

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


VERDICT = ("One seed on a small data set (1347 8x8 digits): these numbers show the tool at work, not which "
           "method is better; multi-seed CIFAR-10 comparisons are in benchmarks/results/ (see benchmarks/README.md).")
_EPOCH = re.compile(r"^epoch (\d+)/(\d+) \|.*\| test acc ([\d.]+)")


def _epoch_lines(tag: str, epochs: int):
    """Progress inside a demo run: about five lines per run (and a step bar on a terminal)."""
    every = max(1, epochs // 5)

    def log(msg: str) -> None:
        m = _EPOCH.match(msg)
        if m and (int(m.group(1)) % every == 0 or m.group(1) == m.group(2)):
            print(f"  {tag}: epoch {m.group(1)}/{m.group(2)}, test acc {m.group(3)}", file=sys.stderr, flush=True)

    return log


def _run_name(method: str, noise: float) -> str:
    return f"{method}-noise{int(noise * 100)}"


def run_demo(out: str | None, epochs: int, seed: int, progress: bool | None, threads: int | None = None) -> int:
    from ..engine import rundir
    from ..errors import ConfigError

    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: expected at least 1")
    if out:  # four runs go into it: as `train --out`, only a new or empty folder
        root = Path(out)
        rundir.check_writable(root)
        found = rundir.foreign_entries(root) if root.is_dir() else []
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--out {root}: is a file, not a folder")
        if found:
            runs = {"config.yaml", "checkpoint.pt"} | {_run_name(m, n) for m, n in GRID}
            what = "already holds a run" if runs & set(found) else "is not empty"
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise ConfigError(f"--out {root}: {what} ({shown}); the demo writes its four runs only into a new "
                              "or empty folder")
    else:
        root = Path(tempfile.mkdtemp(prefix="selfkd-demo-"))
    print(f"selfkd demo: cnn_small on digits (1347 train / 450 test), {epochs} epochs each, seed {seed}; runs in {root}",
          flush=True)
    rows = []
    for method, noise in GRID:
        run = root / _run_name(method, noise)
        t0 = time.perf_counter()
        summary = Trainer(build(demo_config(method, noise, epochs, seed)), run, progress=progress,
                          log=_epoch_lines(f"{method} noise {noise:.0%}", epochs), threads=threads).run()
        print(f"  {method:>4} noise {noise:.0%}: last acc {summary['last_acc']:.2f} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
        rows.append((method, noise, summary))
    print()
    head = "| method | label noise | last acc % | best acc % | ECE | NLL | seconds |"
    print(head)
    print("|---|---|---|---|---|---|---|")
    for method, noise, s in rows:
        label = f"{noise:.0%} symmetric" if noise else "clean"
        print(f"| {method} | {label} | {s['last_acc']:.2f} | {s['best_acc']:.2f} | "
              f"{s['ece']:.4f} | {s['nll']:.4f} | {s['seconds']:.1f} |")
    print(f"\n{VERDICT}\nSame epochs for both methods: DLB forwards every sample twice per epoch.")
    return 0
