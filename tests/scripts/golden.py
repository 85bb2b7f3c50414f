"""Golden weights: short real trainings whose final weights must not change under a behaviour-preserving
refactor (issue 17). Runs one `selfkd sweep` of every configuration below (one process, 1 thread) and one
2-rank DLB run (`selfkd train --nproc 2`), and prints {run: sha256 of the final weights} as JSON.

    python tests/scripts/golden.py OUT_DIR            # print the hashes
    python tests/scripts/golden.py OUT_DIR --write    # store them in tests/golden.json under this platform

Only the CLI is used, so the script survives any re-layout of the package.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE.parent / "golden.json"
BASE = {"data": {"name": "digits", "subset": 240, "test_subset": 90}, "model": {"name": "cnn_small"},
        "optim": {"batch_size": 16}, "train": {"epochs": 2, "seed": 3, "log": "csv"}}
VARIANTS = [
    {"name": "ce", "method.name": "ce"},
    {"name": "dlb-joint", "method.name": "dlb"},
    {"name": "dlb-split", "method.name": "dlb", "method.forward": "split"},
    {"name": "cskd", "method.name": "cskd"},
    {"name": "pskd", "method.name": "pskd"},
    {"name": "mrkd", "method.name": "mrkd", "method.interval": 5},
    {"name": "byot", "method.name": "byot", "model.name": "resnet8"},
    {"name": "dlb-mixup", "method.name": "dlb", "augment.mix": "mixup"},
]
DDP = ["--data", "digits", "--model", "cnn_small", "--method", "dlb", "--seed", "3", "--batch-size", "8",
       "--epochs", "2", "--set", "data.subset=240", "--set", "data.test_subset=90", "--set", "train.log=csv",
       "--no-progress", "--threads", "1"]


def platform_key() -> str:
    """What the hashes depend on besides the code: float kernels differ across torch builds and CPUs."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # the kernels torch dispatches to (AVX2 vs AVX512 on x86) change float results; the model name alone does not
    # tell them apart ("AMD EPYC" is both Zen 3 and Zen 4)
    return (f"torch {torch.__version__} | {platform.machine()} | {cpu or platform.processor()} | "
            f"{torch.backends.cpu.get_cpu_capability()}")


def weights_hash(run: Path) -> str:
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def run_all(out: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent.parent))
    spec = out / "golden_sweep.yaml"
    out.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps({"out": str(out / "runs"), "base": BASE, "variants": {"run": VARIANTS}}))
    py = [sys.executable, "-m", "selfkd"]
    subprocess.run(py + ["sweep", str(spec), "--threads", "1", "--no-progress"], env=env, check=True,
                   capture_output=True, timeout=600)
    subprocess.run(py + ["train", "--nproc", "2", *DDP, "--out", str(out / "ddp-dlb")], env=env, check=True,
                   capture_output=True, timeout=600)
    hashes = {v["name"]: weights_hash(out / "runs" / f"run={v['name']}") for v in VARIANTS}
    hashes["ddp2-dlb"] = weights_hash(out / "ddp-dlb")
    return hashes


if __name__ == "__main__":
    got = run_all(Path(sys.argv[1]))
    if "--write" in sys.argv:
        known = json.loads(GOLDEN.read_text())["platforms"] if GOLDEN.exists() else {}
        known[platform_key()] = got
        GOLDEN.write_text(json.dumps({"platforms": known}, indent=1, sort_keys=True) + "\n")
    print(json.dumps(got, indent=1, sort_keys=True))
