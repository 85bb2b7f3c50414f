"""The GPU campaign's table (benchmarks/gpu.sh runs it after every stage, so a cut-off run keeps one).

Reads what the stages wrote into DIR and writes DIR/gpu.md (and the accuracy runs' epochs as
DIR/gpu_epochs.jsonl, since the run directories stay on the machine); reads no device and imports no
torch. Files: gpu_env.json (device, versions), gpu_stages.jsonl (each stage's bound, seconds, status),
gpu_tests.txt (pytest's last lines), gpu_steps.jsonl (benchmarks/gpu_steps.py), gpu_accuracy.json
(benchmarks/gpu_accuracy.py's plan, naming the run directories). A file not there yet is reported as such.

    python benchmarks/gpu_report.py DIR [--smoke]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

PAPER_EPOCHS = 240
PAPER_RUNS_PER_MODEL = 14 * 3  # configs/paper/cifar100_methods.yaml: 14 methods x 3 seeds per model


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def steps_section(rows: list[dict]) -> list[str]:
    if not rows:
        return ["Not run yet."]
    out = ["| model | method | compile | runs | images/s (sum) | ms/step | warm-up s | peak MiB | host syncs/step | status |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lead = f"| {r['model']} | {r['method']} | {'on' if r['compile'] else 'off'} | {r['runs']} |"
        if r["status"] == "ok":
            where = f" ({r['sync_where']})" if r.get("sync_where") else ""
            out.append(f"{lead} {r['images_per_s']:,.0f} | {r['ms_per_step']:.2f} | {r['warmup_s']:.1f} | "
                       f"{r['peak_mib']:,.0f} | {r['syncs_per_step']:g}{where} | ok |")
        else:
            out.append(f"{lead} | | | | | {r['status']} |")
    return out


def epoch_s(hist: list[dict]) -> float | None:
    """Median seconds per epoch, leaving out the first (cuDNN autotuning, allocator warm-up) when there are more."""
    secs = [h["epoch_seconds"] for h in hist]
    if not secs:
        return None
    return statistics.median(secs[1:] if len(secs) > 1 else secs)


def accuracy_section(plan: dict | None, hists: dict[str, list[dict]]) -> list[str]:
    if plan is None:
        return ["Not run yet."]
    out = [f"{plan['model']} on {plan['n_train']:,} training / {plan['n_test']:,} test images of the CIFAR-10 JPEG archive "
           f"({'data on the GPU: data.on_device' if plan['device'] == 'cuda' else 'CPU, data in host memory'}), "
           f"{', '.join(plan['methods'])} at once in one process each, "
           f"recipe {plan['recipe']} (SGD-Nesterov lr 0.05, cosine, 1 warm-up epoch, wd 5e-4, batch "
           f"{plan['batch_size']}), seed 0, {plan['epochs']} epochs ({plan['epochs_how']}). Images decoded in "
           f"{plan['decode_s']:.0f} s. Status: "
           + (", ".join(f"{m} {s}" for m, s in plan["status"].items()) if "status" in plan else "running or cut off")
           + ".", ""]
    methods = plan["methods"]
    head = " | ".join(f"{m} acc % | {m} ECE | {m} NLL | {m} s" for m in methods)
    out += [f"| epoch | {head} |", "| --- |" + " --- | --- | --- | --- |" * len(methods)]
    for e in range(1, max((len(h) for h in hists.values()), default=0) + 1):
        cells = []
        for m in methods:
            h = next((x for x in hists.get(m, []) if x["epoch"] == e), None)
            cells.append("– | – | – | –" if h is None else
                         f"{h['test_acc']:.2f} | {h['test_ece']:.4f} | {h['test_nll']:.4f} | {h['epoch_seconds']:.1f}")
        out.append(f"| {e} | " + " | ".join(cells) + " |")
    out += ["", f"Projected time of the paper's {PAPER_EPOCHS}-epoch run (median epoch seconds after the first x "
            f"{PAPER_EPOCHS}, with the {len(methods)} runs sharing the device as measured):", ""]
    for m in methods:
        s = epoch_s(hists.get(m, []))
        out.append(f"* {m}: " + ("no finished epoch" if s is None else f"{s:.1f} s/epoch -> {hours(PAPER_EPOCHS * s)}"))
    return out


def cost_section(rows: list[dict], n_train: int = 50_000) -> list[str]:
    """A 240-epoch run's time per timed model from the step timings (no compile), alone and with k sharing."""
    ok = [r for r in rows if r["status"] == "ok" and not r["compile"]]
    if not ok:
        return ["No step timings yet."]
    out = [f"From the step timings above (no compile): one {PAPER_EPOCHS}-epoch run of {n_train:,} images, "
           f"{math.ceil(n_train / ok[0]['batch'])} steps per epoch, and the wall time of the "
           f"{PAPER_RUNS_PER_MODEL} runs of one model in `configs/paper/cifar100_methods.yaml` if every method "
           "cost what CE and DLB cost on average (the two-forward methods cost about DLB's).", "",
           f"| model | runs sharing | CE run | DLB run | {PAPER_RUNS_PER_MODEL} runs, wall |", "| --- | --- | --- | --- | --- |"]
    steps = PAPER_EPOCHS * math.ceil(n_train / ok[0]["batch"])
    for model in dict.fromkeys(r["model"] for r in ok):
        for k in sorted({r["runs"] for r in ok if r["model"] == model}):
            ms = {r["method"]: r["ms_per_step"] for r in ok if r["model"] == model and r["runs"] == k}
            if not {"ce", "dlb"} <= ms.keys():
                continue
            run = {m: steps * ms[m] / 1000 for m in ("ce", "dlb")}
            wall = PAPER_RUNS_PER_MODEL * statistics.mean(run.values()) / k
            out.append(f"| {model} | {k} | {hours(run['ce'])} | {hours(run['dlb'])} | {hours(wall)} |")
    return out


def render(d: Path, smoke: bool) -> str:
    env = _json(d / "gpu_env.json") or {}
    stages = _jsonl(d / "gpu_stages.jsonl")
    steps = _jsonl(d / "gpu_steps.jsonl")
    plan = _json(d / "gpu_accuracy.json")
    hists = {}
    if plan is not None:
        for m in plan["methods"]:
            hists[m] = _jsonl(Path(plan["runs_dir"]) / m / "metrics.jsonl")
        with (d / "gpu_epochs.jsonl").open("w") as f:
            for m, h in hists.items():
                for row in h:
                    f.write(json.dumps({"method": m, **{k: v for k, v in row.items() if k != "test_reliability"}}) + "\n")
    tests = (d / "gpu_tests.txt").read_text().strip() if (d / "gpu_tests.txt").exists() else "Not run yet."
    title = "# GPU campaign" + (" (SMOKE RUN: CPU, tiny sizes; not results)" if smoke else "")
    lines = [title, "",
             f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')} (CUDA {env.get('cuda') or '-'}, "
             f"cuDNN {env.get('cudnn') or '-'}); Python {env.get('python', '?')}; selfkd commit {env.get('commit', '?')}; "
             f"started {env.get('started', '?')}.",
             f"Command: `bash benchmarks/gpu.sh{' --smoke' if smoke else ''}` (every figure below is read from the "
             "files it wrote beside this table).", "",
             "## Stages", "", "| stage | bound s | took s | status |", "| --- | --- | --- | --- |",
             *[f"| {s['stage']} | {s['bound_s']} | {s['took_s']:.0f} | {s['status']} |" for s in stages], "",
             "## CUDA tests (`pytest -k cuda`)", "", "```", tests, "```", "",
             "## Step timings (`benchmarks/gpu_steps.py`)", "",
             "CIFAR-100 shapes (synthetic uint8 32x32 images, 100 classes) on the device, bf16 autocast, "
             "channels_last, SGD; batch = new samples per step (DLB adds as many repeated rows); images/s counts "
             "the rows forwarded, summed over the runs sharing the device; ms/step is the slowest run's; peak MiB "
             "is CUDA's max allocated (CPU: peak RSS); host syncs/step: synchronising calls counted over 3 steps.",
             "", *steps_section(steps), "",
             "## Accuracy: CE and DLB side by side (`benchmarks/gpu_accuracy.py`)", "",
             *accuracy_section(plan, hists), "",
             "## Expected cost of the paper's CIFAR-100 table", "", *cost_section(steps), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    text = render(a.dir, a.smoke)
    tmp = a.dir / ".gpu.md.tmp"
    tmp.write_text(text)
    tmp.replace(a.dir / "gpu.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
