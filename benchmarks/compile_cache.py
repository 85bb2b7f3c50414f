"""Compilation paid once: 3 tiny compiled runs that share one inductor cache folder (train.compile_cache).

    python benchmarks/compile_cache.py [--model cnn_small] [--epochs 2] [--threads 1]

Two ways the runs meet, each with a cache folder of its own that starts empty:

* ``sweep``: one ``selfkd sweep`` of 3 seeds (one process); its compiled runs default to ``OUT/compile_cache``.
* ``processes``: 3 ``selfkd train`` processes in turn, each with ``--set train.compile_cache=DIR`` (the
  same DIR), as separate jobs, a sweep with ``--jobs`` or a resume would meet it: nothing of an earlier
  run's compilation is left in memory, so what a later run skips comes from the folder.

Reported per run: ``compile_s`` of its first epoch (metrics.jsonl: seconds spent compiling, kept out of
``epoch_seconds``), the first epoch's ``epoch_seconds``, and the whole command's wall time. Digits (8x8),
DLB, 240 training / 90 test images: the training itself takes a second; compilation is what is measured.
Writes ``--results`` (default benchmarks/results/compile_cache.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import command  # noqa: E402


def _first_epoch(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def _selfkd(args: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "selfkd", *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"selfkd {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn_small")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=HERE / "results" / "compile_cache.md")
    a = p.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(a.threads))
    base = {"data": {"name": "digits", "subset": 240, "test_subset": 90}, "model": {"name": a.model},
            "method": {"name": "dlb"}, "optim": {"batch_size": 16},
            "train": {"epochs": a.epochs, "compile": True, "log": "csv", "device": "cpu"}}
    rows: list[tuple[str, str, dict, float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        spec = t / "sweep.yaml"
        spec.write_text(json.dumps({"out": "runs", "base": base, "grid": {"train.seed": [0, 1, 2]}}))
        wall = _selfkd(["sweep", str(spec), "--threads", str(a.threads), "--no-progress"], env)
        for seed in range(3):
            rows.append(("sweep", f"train.seed={seed}", _first_epoch(t / "runs" / f"train.seed={seed}"), None))
        rows.append(("sweep", "(whole sweep)", {}, wall))
        print(f"sweep: {[round(r[2]['compile_s'], 1) for r in rows if r[2]]} s compiling, {wall:.0f} s in all", flush=True)
        flags = ["--data", "digits", "--model", a.model, "--method", "dlb", "--epochs", str(a.epochs), "--batch-size", "16",
                 "--compile", "--set", "data.subset=240", "--set", "data.test_subset=90", "--set", "train.log=csv",
                 "--set", f"train.compile_cache={t / 'cache'}", "--device", "cpu", "--threads", str(a.threads), "--no-progress"]
        for seed in range(3):
            run = t / f"proc{seed}"
            wall = _selfkd(["train", *flags, "--seed", str(seed), "--out", str(run)], env)
            rows.append(("processes", f"seed {seed}", _first_epoch(run), wall))
            print(f"process {seed}: {rows[-1][2]['compile_s']:.1f} s compiling, {wall:.0f} s in all", flush=True)

    import torch

    from selfkd.engine.checkpoint import write_text

    lines = [
        f"# Compilation paid once: {a.model}, DLB, 3 runs sharing one compile cache",
        "",
        f"Command: `{command(__file__, argv)}`",
        "",
        f"torch {torch.__version__}, {a.threads} thread(s), digits 240/90 images, {a.epochs} epochs, train.compile=true. "
        "`compile_s`: seconds spent compiling in the first epoch (metrics.jsonl), kept out of `epoch_seconds`.",
        "",
        "| how | run | compile_s (epoch 1) | epoch_seconds (epoch 1) | command wall s |",
        "|---|---|---|---|---|",
    ]
    for how, name, row, wall in rows:
        c = f"{row['compile_s']:.1f}" if row else ""
        e = f"{row['epoch_seconds']:.2f}" if row else ""
        lines.append(f"| {how} | {name} | {c} | {e} | {'' if wall is None else f'{wall:.0f}'} |")
    write_text(a.results, "\n".join(lines) + "\n")
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
