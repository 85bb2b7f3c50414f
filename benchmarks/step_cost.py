"""Cost of one training step per method at the same rows per step: images/s and peak memory.

Each measurement runs in a fresh subprocess (so peak memory is its own) over a synthetic uint8
data set held in memory, through the real method objects, batch samplers, DataLoader and batched
augmentation. A DLB step holds ``rows/2`` repeated + ``rows/2`` new rows, so it is compared with a
CE step of ``rows`` rows (same per-step work) and reported per *new* sample too.

Peak memory: on CPU, the growth of the process's peak resident set (VmHWM) over its resident set
just before the first step; on CUDA, ``torch.cuda.max_memory_allocated``.

    python benchmarks/step_cost.py --model resnet8 --rows 128
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import command, median_range

HERE = Path(__file__).resolve().parent


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(method: str, model_name: str, rows: int, steps: int, warmup: int, device: str, threads: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from selfkd.data import ArrayDataset, BatchAugment
    from selfkd.methods import Batch, build_method
    from selfkd.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    n = rows * (steps + warmup + 2)
    ds = ArrayDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    m = build_method(method)
    per_step_new = int(rows / (1 + (m.forwards_per_sample - 1)))  # DLB: rows/2 new + rows/2 repeated
    loader = DataLoader(ds, batch_sampler=m.batch_sampler(RandomSampler(ds), per_step_new))
    model = build_model(model_name, 10).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    aug = BatchAugment(4, True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    g = torch.Generator(device=dev).manual_seed(0)
    rss0 = _proc_kib("VmRSS")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seen = 0
    t0 = None
    for i, (x, y, idx) in enumerate(loader):
        if i == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            seen = 0
        if i == warmup + steps:
            break
        x, y = x.to(dev), y.to(dev)
        xa = aug(x, g).contiguous(memory_format=torch.channels_last)
        out = m.train_step(model, Batch(xa, y, idx))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        seen += x.shape[0]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else (_proc_kib("VmHWM") - rss0) / 1024
    return {"method": method, "model": model_name, "rows_per_step": rows, "new_per_step": per_step_new,
            "images_per_s": seen / dt, "new_samples_per_s": per_step_new * steps / dt,
            "ms_per_step": 1000 * dt / steps, "peak_mem_mb": peak, "device": device, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["ce", "dlb"])
    p.add_argument("--model", default="resnet8")
    p.add_argument("--rows", type=int, default=128, help="rows forwarded per step (DLB: half repeated)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=HERE / "results" / "step_cost.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.methods[0], a.model, a.rows, a.steps, a.warmup, a.device, a.threads)))
        return 0

    table: dict[str, list[dict]] = {}
    for r in range(a.repeats):
        for method in a.methods:  # interleaved, so drift in machine load hits every method alike
            cmd = [sys.executable, __file__, "--child", "--methods", method, "--model", a.model, "--rows", str(a.rows),
                   "--steps", str(a.steps), "--warmup", str(a.warmup), "--device", a.device, "--threads", str(a.threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            table.setdefault(method, []).append(res)
            print(f"repeat {r}: {method}: {res['images_per_s']:.0f} img/s, {res['peak_mem_mb']:.0f} MiB", flush=True)

    from selfkd.engine.checkpoint import write_text

    first = next(iter(table.values()))[0]
    lines = [
        f"# Step cost: {', '.join(a.methods)} on {a.model}, {a.rows} rows per step",
        "",
        f"Command: `{command(__file__, argv)}`",
        "",
        f"Device {first['device']}, {a.threads} threads, torch {first['torch']}; synthetic 32x32 uint8 data in memory, "
        f"real samplers/DataLoader/augmentation; {a.steps} timed steps after {a.warmup} warm-up steps; median (min–max) "
        f"of {a.repeats} fresh processes. Peak memory: growth of peak RSS over the RSS before the first step (CPU).",
        "",
        "| method | rows/step | new samples/step | images/s | new samples/s | ms/step | peak memory MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, rs in table.items():
        lines.append(f"| {method} | {rs[0]['rows_per_step']} | {rs[0]['new_per_step']} | "
                     f"{median_range([r['images_per_s'] for r in rs])} | {median_range([r['new_samples_per_s'] for r in rs])} | "
                     f"{median_range([r['ms_per_step'] for r in rs], '{:.1f}')} | {median_range([r['peak_mem_mb'] for r in rs])} |")
    write_text(a.results, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
