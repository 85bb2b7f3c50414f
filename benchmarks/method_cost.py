"""Cost of every method under the CPU study protocol, each measured alone in a fresh process.

The sweeps in ``configs/cpu/`` time their runs while two of them share the machine; this measures
the same training (real CIFAR-10 JPEG, fixed 4,000-image subset, ResNet-8, batch 64, the real
trainer, samplers, DataLoader and augmentation) one method at a time on a quiet machine:
``selfkd train`` for ``--epochs`` epochs in a new process per method and repeat, interleaved over
methods so drifting machine load hits every method alike. Reported per method: training seconds
per epoch averaged over the epochs after the first (no evaluation, no start-up, no warm-up), new
samples/s, and peak memory (the process's peak resident set during those epochs; it includes the
decoded data set and the interpreter, so compare the differences).

MrKD's first snapshot comes after ``interval`` steps (200 by default: past the measured epoch), so
``mrkd``/``mrkd-tc`` run with ``method.interval=20`` here to time a step that forwards its teacher.
``tfkd-self`` trains its teacher first (one CE run, not timed here); the student's epoch is timed.

    python benchmarks/method_cost.py                      # every method, 3 repeats
    python benchmarks/method_cost.py --methods ce dlb --repeats 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import command, median_range

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
EXTRA = {"mrkd": ["--set", "method.interval=20"], "mrkd-tc": ["--set", "method.interval=20"]}


def measure(a: argparse.Namespace, method: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "selfkd", "train", "--data", "imagefolder", "--data-dir", str(a.data),
           "--model", a.model, "--method", method, "--preset", "cpu-short", "--epochs", str(a.epochs),
           "--device", "cpu", "--threads", str(a.threads), "--out", str(out), "--no-progress",
           "--set", f"data.subset={a.subset}", "--set", "data.test_subset=500", "--set", f"data.cache_dir={a.cache}",
           *EXTRA.get(method, [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"method_cost: {method}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    summary = json.loads((out / "summary.json").read_text())
    timed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[1:]]  # after warm-up
    mean = lambda key: statistics.fmean(m[key] for m in timed)  # noqa: E731
    return {"train_s": mean("train_seconds"), "samples_per_s": mean("samples_per_s"),
            "images_per_s": mean("images_per_s"), "peak_mb": max(m["peak_mem_mb"] for m in timed),
            "fwd": summary["forwards_per_sample"], "torch": summary["torch"], "threads": summary["threads"]}


def main(argv: list[str] | None = None) -> int:
    from selfkd.methods import available_methods

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--model", default="resnet8")
    p.add_argument("--epochs", type=int, default=3, help="every epoch after the first is timed")
    p.add_argument("--subset", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--cache", type=Path, default=HERE / "cache")
    p.add_argument("--results", type=Path, default=HERE / "results" / "method_cost.md")
    a = p.parse_args(argv)
    methods = a.methods or available_methods()

    table: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="selfkd-cost-") as tmp:
        for r in range(a.repeats):
            for method in methods:
                res = measure(a, method, Path(tmp) / f"{method}-{r}")
                table.setdefault(method, []).append(res)
                print(f"repeat {r}: {method}: {res['train_s']:.2f} s/epoch, {res['peak_mb']:.0f} MiB", flush=True)

    base = statistics.median(x["train_s"] for x in table["ce"]) if "ce" in table else None
    first = next(iter(table.values()))[0]
    lines = [
        f"# Method cost: {a.model}, real CIFAR-10 ({a.subset}-image subset), batch 64, each method alone",
        "",
        f"Command: `{command(__file__, argv)}`",
        "",
        f"CPU, {first['threads']} threads, torch {first['torch']}; `selfkd train` for {a.epochs} epochs in a fresh process "
        f"per method and repeat (interleaved); training time per epoch (no evaluation) averaged over the epochs after "
        f"the first, and the peak resident set; "
        f"median (min–max) of {a.repeats} processes. `mrkd`/`mrkd-tc` with `method.interval=20` so the timed "
        "epoch forwards their teacher; `tfkd-self`'s teacher training is not included.",
        "",
        "| method | fwd passes/sample | train s/epoch | x CE | new samples/s | images/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, rs in table.items():
        ratio = f"{statistics.median(x['train_s'] for x in rs) / base:.2f}" if base else "–"
        lines.append(f"| {method} | {rs[0]['fwd']:g} | {median_range([x['train_s'] for x in rs], '{:.2f}')} | {ratio} | "
                     f"{median_range([x['samples_per_s'] for x in rs], '{:.0f}')} | {median_range([x['images_per_s'] for x in rs], '{:.0f}')} | "
                     f"{median_range([x['peak_mb'] for x in rs], '{:.0f}')} |")
    from selfkd.engine.checkpoint import write_text

    write_text(a.results, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
