"""Stage 3 of benchmarks/gpu.sh: CE and DLB trained side by side on one GPU, on the real CIFAR-10.

Protocol: ResNet-32 on the full 50,000-image training set of the CIFAR-10 JPEG archive (held on the GPU:
data.on_device), the full 10,000-image test set, the ``cpu-short`` recipe (SGD-Nesterov lr 0.05, cosine
with 1 warm-up epoch, wd 5e-4, batch 64 new samples per step) over E epochs, seed 0, bf16 autocast and
channels_last (the trainer's CUDA defaults). CE and DLB run at once, two ``python -m selfkd train``
processes on the one GPU; each writes its metrics.jsonl (test accuracy, ECE, NLL, seconds) per epoch.

E: ``--epochs N``, or ``auto``: as many as fit in ``--budget`` seconds, from the step timings of
stage 2 (the slower of CE and DLB for the model without compile, with 4 runs sharing the GPU when
measured, else 2x the one-run time: two runs share it here), times the steps of an epoch and a 25%
margin for evaluation and the epoch's end; ``--epochs-fallback`` when there is no such timing. The
images are decoded once before the runs start (both read the decoded-image cache). At ``--budget``
seconds after the start, runs still going are stopped: their finished epochs stay in metrics.jsonl.

Writes ``--plan`` (JSON: E and how it was chosen, the run directories, the runs' exit statuses) before
the runs start and again when they end. Exit status 0 when both runs finished, 124 when the budget cut
them, 1 when one failed.

    python benchmarks/gpu_accuracy.py --data .gpudata/cifar10-jpeg.tar.gz --runs /tmp/gpu-runs \\
        --plan benchmarks/results/gpu_accuracy.json --epochs auto --steps benchmarks/results/gpu_steps.jsonl
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STARTUP_S = 25.0  # a run's start before its first step: imports, CUDA context, the cached data, the dry forward
MARGIN = 1.25


def subset_archive(src: Path, dst: Path, train_per_class: int, test_per_class: int) -> Path:
    """A .tar.gz of the first N train and M test images of each class of ``src`` (the smoke run's data)."""
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(src, "r:*") as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin:
            parts = m.name.strip("./").split("/")
            if not m.isfile() or len(parts) != 3:
                continue
            limit = train_per_class if parts[0] == "train" else test_per_class
            key = (parts[0], parts[1])
            if taken.get(key, 0) >= limit:
                continue
            taken[key] = taken.get(key, 0) + 1
            data = tin.extractfile(m).read()
            info = tarfile.TarInfo("/".join(parts))
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def step_ms(rows: list[dict], model: str) -> tuple[float, str] | None:
    """Per-step milliseconds of the slower method (CE or DLB, no compile) with the GPU shared by two runs
    at most, and where it came from; None without such a timing."""
    ok = [r for r in rows if r.get("status") == "ok" and r["model"] == model and not r["compile"]
          and r["method"] in ("ce", "dlb")]
    shared = [r for r in ok if r["runs"] >= 2]
    if {r["method"] for r in shared} == {"ce", "dlb"}:
        r = max(shared, key=lambda r: r["ms_per_step"])
        return r["ms_per_step"], f"{r['method']} with {r['runs']} runs sharing the device"
    alone = [r for r in ok if r["runs"] == 1]
    if {r["method"] for r in alone} == {"ce", "dlb"}:
        r = max(alone, key=lambda r: r["ms_per_step"])
        return 2 * r["ms_per_step"], f"2 x {r['method']} alone"
    return None


def choose_epochs(ms: float, n_train: int, batch: int, seconds: float) -> tuple[int, float]:
    """Epochs that fit ``seconds`` after a run's start (at least 2: the recipe warms up for one), and the
    estimated seconds per epoch."""
    per_epoch = math.ceil(n_train / batch) * ms / 1000 * MARGIN
    return max(2, int((seconds - STARTUP_S) // per_epoch)), per_epoch


def train_cmd(a: argparse.Namespace, method: str, epochs: int, cuda: bool) -> list[str]:
    cmd = [sys.executable, "-m", "selfkd", "train", "--data", "imagefolder", "--data-dir", str(a.data),
           "--model", a.model, "--method", method, "--preset", "cpu-short", "--epochs", str(epochs),
           "--batch-size", str(a.batch_size), "--seed", "0", "--out", str(a.runs / method), "--no-progress",
           "--set", f"data.cache_dir={a.cache}", "--set", "train.log=csv"]
    if cuda:
        return cmd + ["--device", "cuda", "--set", "data.on_device=true"]
    return cmd + ["--device", "cpu", "--threads", "1"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the CIFAR-10 JPEG archive")
    p.add_argument("--runs", type=Path, required=True, help="a new folder for the run directories")
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--cache", type=Path, help="decoded-image cache (default RUNS/cache)")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--methods", nargs="+", default=["ce", "dlb"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", default="auto", help="a number, or auto (from --steps)")
    p.add_argument("--epochs-fallback", type=int, default=10)
    p.add_argument("--steps", type=Path, help="stage 2's gpu_steps.jsonl, for --epochs auto")
    p.add_argument("--budget", type=float, default=225, help="seconds from the start to stop the runs")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--train-per-class", type=int, help="smoke: train on the first N images of each class")
    p.add_argument("--test-per-class", type=int, help="smoke: test on the first M images of each class")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.runs.exists() and any(a.runs.iterdir()):
        print(f"gpu_accuracy: {a.runs} is not empty", file=sys.stderr)
        return 2
    a.runs.mkdir(parents=True, exist_ok=True)
    a.cache = a.cache or a.runs / "cache"
    if a.train_per_class or a.test_per_class:
        a.data = subset_archive(a.data, a.runs / "subset.tar.gz", a.train_per_class or 10**9, a.test_per_class or 10**9)

    from selfkd.data.imagefolder import load_imagefolder

    bundle = load_imagefolder(a.data, cache_dir=a.cache)  # decode once; both runs read the cache
    n_train, n_test = len(bundle.train), len(bundle.test)
    decode_s = time.perf_counter() - t0
    plan: dict = {"model": a.model, "methods": a.methods, "batch_size": a.batch_size, "recipe": "cpu-short",
                  "n_train": n_train, "n_test": n_test, "decode_s": decode_s, "budget_s": a.budget,
                  "device": a.device, "runs_dir": str(a.runs)}
    left = a.budget - (time.perf_counter() - t0)
    if a.epochs == "auto":
        rows = [json.loads(x) for x in a.steps.read_text().splitlines() if x.strip()] if a.steps and a.steps.exists() else []
        got = step_ms(rows, a.model)
        if got is None:
            epochs, how = a.epochs_fallback, f"fallback {a.epochs_fallback}: no step timing of {a.model} CE and DLB"
        else:
            epochs, per_epoch = choose_epochs(got[0], n_train, a.batch_size, left)
            plan["estimated_epoch_s"] = per_epoch
            how = (f"auto: {got[0]:.2f} ms/step ({got[1]}) x {math.ceil(n_train / a.batch_size)} steps x {MARGIN} "
                   f"= {per_epoch:.1f} s/epoch in the {left:.0f} s left less {STARTUP_S:.0f} s start")
    else:
        epochs, how = int(a.epochs), "given"
    plan.update(epochs=epochs, epochs_how=how)
    a.plan.parent.mkdir(parents=True, exist_ok=True)
    a.plan.write_text(json.dumps(plan, indent=1))
    print(f"gpu_accuracy: {n_train} train / {n_test} test images, decoded in {decode_s:.0f} s; {epochs} epochs ({how})",
          flush=True)

    cuda = a.device == "cuda"
    procs = {}
    for m in a.methods:
        log = open(a.runs / f"{m}.log", "w")
        procs[m] = subprocess.Popen(train_cmd(a, m, epochs, cuda), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = t0 + a.budget
    while any(pr.poll() is None for pr in procs.values()) and time.perf_counter() < deadline:
        time.sleep(0.5)
    cut = [m for m, pr in procs.items() if pr.poll() is None]
    for m in cut:
        procs[m].send_signal(signal.SIGTERM)
    for m in cut:
        try:
            procs[m].wait(timeout=5)
        except subprocess.TimeoutExpired:
            procs[m].kill()
            procs[m].wait()
    plan["status"] = {m: ("cut off (time bound)" if m in cut else "finished" if pr.returncode == 0
                          else f"failed: exit {pr.returncode}") for m, pr in procs.items()}
    plan["wall_s"] = time.perf_counter() - t0
    a.plan.write_text(json.dumps(plan, indent=1))
    for m, s in plan["status"].items():
        print(f"gpu_accuracy: {m}: {s}", flush=True)
        if s.startswith("failed"):
            print((a.runs / f"{m}.log").read_text()[-2000:], file=sys.stderr)
    if any(s.startswith("failed") for s in plan["status"].values()):
        return 1
    return 124 if cut else 0


if __name__ == "__main__":
    raise SystemExit(main())
