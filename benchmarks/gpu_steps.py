"""CE and DLB training-step cost on one GPU (run by benchmarks/gpu.sh; needs CUDA).

Each cell trains ResNet-32 or WRN-20-8 on CIFAR-100 shapes (synthetic uint8 images [N, 3, 32, 32],
100 classes, held on the GPU as with data.on_device) with the trainer's own parts: the method's
batch sampler over a BatchView, BatchAugment (crop + flip) on the device, bf16 autocast,
channels_last, SGD. ``compile`` uses the trainer's torch.compile wrapper (dynamic batch dimension).
Timing: CUDA events over ``--steps`` steps after ``--warmup`` steps, one synchronisation at the end.
Before timing, a few steps run under ``torch.cuda.set_sync_debug_mode("error")``: a step that waits
for the GPU raises there, and the cell says so. "4 runs" starts four processes on the one GPU at
once and reports their summed images/s.

    python benchmarks/gpu_steps.py --out benchmarks/results/gpu_steps.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(model_name: str, method_name: str, compile_: bool, batch: int, steps: int, warmup: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from selfkd.data import ArrayDataset, BatchAugment, BatchView
    from selfkd.nn_utils import DynamicBatch
    from selfkd.methods import Batch, build_method
    from selfkd.models import build_model

    dev = torch.device("cuda")
    torch.manual_seed(0)
    n = batch * (steps + warmup + 8)
    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 100, (n,), generator=g), 100).to(dev)
    aug = BatchAugment(crop_padding=4, flip=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    method = build_method(method_name)
    method.setup(num_samples=n, num_classes=100, epochs=1)
    model = method.prepare_model(build_model(model_name, num_classes=100)).to(dev).to(memory_format=torch.channels_last)
    fwd = DynamicBatch(torch.compile(model)) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sampler = method.batch_sampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(1)), batch)
    loader = iter(DataLoader(BatchView(ds), sampler=sampler, batch_size=None))
    ag = torch.Generator(device=dev).manual_seed(2)
    rows = 0

    def step() -> int:
        x, y_host, idx = next(loader)
        y = y_host.to(dev, non_blocking=True)
        b = Batch(aug(x, ag).contiguous(memory_format=torch.channels_last), y, idx, y_host=y_host)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = method.train_step(fwd, b)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return x.shape[0]

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    syncs = "none"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    except RuntimeError as err:
        syncs = str(err).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        rows += step()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / steps
    return {"model": model_name, "method": method_name, "compile": compile_, "ms_per_step": ms,
            "images_per_s": rows / (ms * steps / 1000), "warmup_s": warm_s, "syncs": syncs,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/gpu_steps.md")
    p.add_argument("--batch", type=int, default=128, help="new samples per step (DLB: plus as many repeated)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--budget", type=float, default=390, help="seconds; cells past it are marked not run")
    p.add_argument("--one", help="internal: run one cell given as JSON and print its result")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(**json.loads(a.one))))
        return 0
    t_start = time.perf_counter()
    rows: list[str] = []
    cells = [(m, meth, c) for m in ("resnet32", "wrn20_8") for meth in ("ce", "dlb") for c in (False, True)]

    def run(spec: dict, k: int) -> list[dict]:
        cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return [json.loads(pr.communicate()[0].strip().splitlines()[-1]) for pr in procs]

    for model, meth, comp in cells:
        spec = {"model_name": model, "method_name": meth, "compile_": comp, "batch": a.batch, "steps": a.steps,
                "warmup": a.warmup}
        for k in (1, 4):
            if time.perf_counter() - t_start > a.budget:
                rows.append(f"| {model} | {meth} | {'on' if comp else 'off'} | {k} | not run (time budget) | | | | |")
                continue
            try:
                res = run(spec, k)
            except Exception as err:  # a cell that fails is reported, the rest still run
                rows.append(f"| {model} | {meth} | {'on' if comp else 'off'} | {k} | failed: {err} | | | | |")
                continue
            ips = sum(r["images_per_s"] for r in res)
            ms = max(r["ms_per_step"] for r in res)
            rows.append(f"| {model} | {meth} | {'on' if comp else 'off'} | {k} | {ips:,.0f} | {ms:.1f} | "
                        f"{max(r['warmup_s'] for r in res):.0f} | {max(r['peak_mib'] for r in res):,.0f} | "
                        f"{res[0]['syncs']} |")
            print(rows[-1], flush=True)
    import torch

    text = "\n".join([
        f"# Training-step cost on one GPU ({torch.cuda.get_device_name()}, torch {torch.__version__})", "",
        f"Command: `bash benchmarks/gpu.sh` (runs `python benchmarks/gpu_steps.py --out {a.out}`). CIFAR-100 shapes, "
        f"synthetic data on the GPU, batch {a.batch} new samples per step, bf16 autocast, channels_last; "
        f"{a.steps} timed steps after {a.warmup} warm-up steps. images/s counts the rows forwarded (DLB: "
        "repeated + new). 'syncs': the first host synchronisation `set_sync_debug_mode('error')` caught "
        "in 3 steps, or none.", "",
        "| model | method | compile | runs | images/s (sum) | ms/step | warm-up s | peak MiB | syncs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
