"""CE vs self-distillation on the real CIFAR-10, a protocol that fits a 2-core CPU.

Protocol (defaults): ResNet-8 on a fixed, class-stratified 10,000-image subset of the CIFAR-10
training set (the JPEG archive in ../shared/data), the full 10,000-image test set, the `cpu-short`
recipe (SGD-Nesterov lr 0.05, cosine with 1 warmup epoch, wd 5e-4, batch 64 new samples per step),
random crop (pad 4) + flip, 15 epochs, seeds 0 1 2.

Two comparisons:
* equal epochs: every method trains for E epochs;
* equal compute: a method that forwards each sample f times per epoch (DLB: f = 2) is compared
  with CE trained for round(f * E) epochs.

Runs live in ``--runs`` (one directory each; finished runs are skipped, interrupted ones resumed);
the report is written to ``--results``. Re-running the same command re-uses finished runs.

    python benchmarks/cifar10_cpu.py                       # CE vs DLB, 3 seeds
    python benchmarks/cifar10_cpu.py --methods ce dlb --seeds 0 --epochs 2 --subset 1000   # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import command
from selfkd.engine.checkpoint import write_text
from selfkd.engine.config import build_config
from selfkd.engine.rundir import CHECKPOINT, SUMMARY
from selfkd.engine.trainer import Trainer
from selfkd.engine.setup import build
from selfkd.methods import build_method

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def config(a: argparse.Namespace, method: str, epochs: int, seed: int):
    return build_config({
        "data": {"name": "imagefolder", "dir": str(a.data), "subset": a.subset, "subset_seed": 0,
                 "cache_dir": str(a.cache)},
        "model": {"name": a.model},
        "method": {"name": method},
        "optim": {"lr": 0.05, "batch_size": a.batch_size, "weight_decay": 5e-4, "momentum": 0.9, "nesterov": True},
        "schedule": {"kind": "cosine", "warmup_epochs": 1},
        "train": {"epochs": epochs, "seed": seed, "device": "cpu"},
    }, source="benchmark")


def run_one(a: argparse.Namespace, method: str, epochs: int, seed: int) -> dict:
    run = a.runs / f"{method}-e{epochs}-s{seed}"
    if (run / SUMMARY).exists():
        return json.loads((run / SUMMARY).read_text())
    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {run.name} ...", flush=True)
    trainer = Trainer(build(config(a, method, epochs, seed)), run, progress=False, log=lambda m: None)
    summary = trainer.run(resume=(run / CHECKPOINT).exists())
    print(f"    last {summary['last_acc']:.2f} best {summary['best_acc']:.2f} ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    return summary


def stat(values: list[float], fmt: str = "{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def row(label: str, runs: list[dict]) -> str:
    per_epoch = [r["train_seconds"] / r["epochs"] for r in runs]
    return (f"| {label} | {runs[0]['epochs']} | {stat([r['last_acc'] for r in runs])} | "
            f"{stat([r['best_acc'] for r in runs])} | {stat([r['ece'] for r in runs], '{:.4f}')} | "
            f"{stat([r['nll'] for r in runs], '{:.4f}')} | {stat([r['seconds'] for r in runs], '{:.0f}')} | "
            f"{stat(per_epoch, '{:.1f}')} | {stat([r['peak_mem_mb'] for r in runs], '{:.0f}')} |")


HEAD = ("| method | epochs | last acc % | best acc % | ECE | NLL | seconds | train s/epoch | peak RSS MiB |\n"
        "|---|---|---|---|---|---|---|---|---|")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["ce", "dlb"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--model", default="resnet8")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--cache", type=Path, default=HERE / "cache")
    p.add_argument("--runs", type=Path, default=HERE / "runs" / "cifar10_cpu")
    p.add_argument("--results", type=Path, default=HERE / "results" / "cifar10_cpu.md")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)

    fps = {m: build_method(m).forwards_per_sample for m in a.methods}
    plan = [(m, a.epochs) for m in a.methods]
    compute = sorted({int(round(f * a.epochs)) for f in fps.values() if f != 1.0})
    plan += [("ce", e) for e in compute if ("ce", e) not in plan]
    results: dict[tuple[str, int], list[dict]] = {}
    for seed in a.seeds:
        for method, epochs in plan:
            results.setdefault((method, epochs), []).append(run_one(a, method, epochs, seed))

    cmd = command(__file__, argv)
    r0 = results[plan[0]][0]
    lines = [
        f"# CIFAR-10 on CPU: {', '.join(a.methods)}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Protocol: {a.model} on a fixed class-stratified {a.subset}-image subset of the real CIFAR-10 training set "
        f"(JPEG archive), full 10,000-image test set, SGD-Nesterov lr 0.05 cosine (1 warmup epoch), wd 5e-4, "
        f"{a.batch_size} new samples per step, crop+flip, seeds {' '.join(map(str, a.seeds))} "
        f"(mean ± std over seeds). Machine: {r0['device']}, torch {r0['torch']}, Python {r0['python']}.",
        "Accuracy is top-1 on the test set at the last epoch and at the best epoch (the best-epoch number selects on "
        "the test set, as the DLB/CS-KD/PS-KD codes do; the last-epoch number is the honest one). ECE (15 bins) and "
        "NLL are at the last epoch. Peak RSS is the training process's peak resident memory.",
        "",
        f"## Equal epochs ({a.epochs})",
        "",
        HEAD,
        *[row(m, results[(m, a.epochs)]) for m in a.methods],
        "",
        "## Equal compute (forward passes per training sample)",
        "",
        HEAD,
    ]
    for m in a.methods:
        if fps[m] != 1.0:
            e = int(round(fps[m] * a.epochs))
            lines += [row(f"{m} ({fps[m]:g} fwd/sample)", results[(m, a.epochs)]), row(f"ce at {e} epochs", results[("ce", e)])]
    write_text(a.results, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
