"""1 process x 2 threads vs 2 DDP ranks x 1 thread (gloo) on the CPU: CE and DLB on real CIFAR-10.

    python benchmarks/ddp_cpu.py [--data-dir ../shared/data/cifar10-jpeg.tar.gz] [--subset 2000] [--epochs 1]

Each cell is one ``selfkd train`` run (ResNet-8, batch 64 new samples per step in total: 64 in one
process, 32 per rank with 2 ranks, so both step on the same global batch); images/s and peak memory
come from the run's summary.json (peak: the largest rank's resident set). Writes
benchmarks/results/ddp_cpu.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--subset", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/ddp_cpu.md"))
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("ce", "dlb"):
            for label, extra in (("1 process x 2 threads", ["--threads", "2", "--batch-size", "64"]),
                                 ("2 ranks x 1 thread", ["--threads", "1", "--nproc", "2", "--batch-size", "32"])):
                out = Path(tmp) / f"{method}-{len(rows)}"
                cmd = [sys.executable, "-m", "selfkd", "train", "--data", "imagefolder", "--data-dir", a.data_dir,
                       "--model", "resnet8", "--method", method, "--epochs", str(a.epochs), "--no-progress",
                       "--set", f"data.subset={a.subset}", "--set", "data.test_subset=1000",
                       "--set", f"data.cache_dir={tmp}/cache", "--out", str(out), *extra]
                subprocess.run(cmd, check=True, cwd=ROOT)
                s = json.loads((out / "summary.json").read_text())
                rows.append(f"| {method} | {label} | {s['images_per_s']:.0f} | {s['peak_mem_mb']:.0f} | "
                            f"{s['train_seconds']:.1f} |")
                print(rows[-1], flush=True)
    text = "\n".join([
        "# DDP on the CPU: 1 process x 2 threads vs 2 ranks x 1 thread", "",
        f"Command: `{command(__file__, argv)}`. Real CIFAR-10 JPEGs, ResNet-8, {a.subset} training images, "
        f"{a.epochs} epoch(s), global batch 64 new samples per step. 2-core CPU, one run per cell, "
        "short runs with the first epoch's warm-up included: indicative only.", "",
        "| method | processes | images/s | peak MiB per rank | train s |", "| --- | --- | --- | --- | --- |", *rows, ""])
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
