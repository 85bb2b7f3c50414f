"""CE and DLB training-step cost on one GPU (stage 2 of benchmarks/gpu.sh; ``--device cpu`` for its smoke run).

Each cell trains a model (default ResNet-32 and WRN-20-8) on CIFAR-100 shapes (synthetic uint8 images
[N, 3, 32, 32], 100 classes, held on the device as with data.on_device) with the trainer's own parts:
the method's batch sampler over a BatchView, BatchAugment (crop + flip) on the device, bf16 autocast,
channels_last, SGD. ``compile`` uses the trainer's torch.compile wrapper (dynamic batch dimension).
Timing: CUDA events (CPU: perf_counter) over ``--steps`` steps after ``--warmup`` steps, one
synchronisation at the end. Host syncs per step: 3 more steps counted before timing, on CUDA under
``torch.cuda.set_sync_debug_mode("warn")`` (each synchronising CUDA call warns once), on the CPU with
tests/syncs.py's dispatch counter (the operations that would synchronise on a GPU). "k runs" starts k
processes on the one device at once and reports their summed images/s.

Each cell is appended to ``--out`` (JSON lines) as soon as it ends, so a run cut off at its time
bound keeps the cells it finished; cells not started within ``--budget`` seconds are recorded as not
run, a cell still running at the budget's end is killed and recorded as cut off.

    python benchmarks/gpu_steps.py --out benchmarks/results/gpu_steps.jsonl
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(model_name: str, method_name: str, compile_: bool, batch: int, steps: int, warmup: int,
        device: str = "cuda", backend: str = "inductor") -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from selfkd.data import ArrayDataset, BatchAugment, BatchView
    from selfkd.nn_utils import DynamicBatch
    from selfkd.methods import Batch, build_method
    from selfkd.models import build_model

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    n = batch * (steps + warmup + 8)
    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 100, (n,), generator=g), 100).to(dev)
    aug = BatchAugment(crop_padding=4, flip=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    method = build_method(method_name)
    method.setup(num_samples=n, num_classes=100, epochs=1)
    model = method.prepare_model(build_model(model_name, num_classes=100)).to(dev).to(memory_format=torch.channels_last)
    fwd = DynamicBatch(torch.compile(model, backend=backend)) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sampler = method.batch_sampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(1)), batch)
    loader = iter(DataLoader(BatchView(ds), sampler=sampler, batch_size=None))
    ag = torch.Generator(device=dev).manual_seed(2)

    def step() -> int:
        x, y_host, idx = next(loader)
        y = y_host.to(dev, non_blocking=True)
        b = Batch(aug(x, ag).contiguous(memory_format=torch.channels_last), y, idx, y_host=y_host)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = method.train_step(fwd, b)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return x.shape[0]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    counted, where = 3, ""
    if cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(counted):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        hits = [w for w in caught if "synchroniz" in str(w.message)]
        syncs = len(hits)
        where = f"{Path(hits[0].filename).name}:{hits[0].lineno}" if hits else ""
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from syncs import SyncCounter

        with SyncCounter() as c:
            for _ in range(counted):
                step()
        syncs = len(c.calls)
        where = c.calls[0][1] if c.calls else ""
    sync()
    rows = 0
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            rows += step()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / steps
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        t1 = time.perf_counter()
        for _ in range(steps):
            rows += step()
        ms = (time.perf_counter() - t1) * 1000 / steps
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS
    return {"ms_per_step": ms, "images_per_s": rows / (ms * steps / 1000), "warmup_s": warm_s,
            "syncs_per_step": syncs / counted, "sync_where": where, "peak_mib": peak}


def cells(models: list[str], methods: list[str], compiles: list[bool], runs: list[int]) -> list[tuple]:
    """Most informative first, so a budget cut drops the least: every model and method without compile
    (1 run, then k), then with compile (its cache is warm after the first cell of a model)."""
    return [(model, meth, comp, k) for comp in compiles for k in runs for model in models for meth in methods]


def run_cell(spec: dict, k: int, deadline: float) -> list[dict]:
    """k processes of one cell at once; raises TimeoutError (after killing them) past ``deadline``."""
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(k)]
    out = []
    try:
        for pr in procs:
            so, se = pr.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            if pr.returncode != 0:
                tail = (se.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"exit {pr.returncode}: {tail[:160]}")
            out.append(json.loads(so.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        raise TimeoutError from None
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/gpu_steps.jsonl", help="JSON lines, one per cell (appended)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", nargs="+", default=["resnet32", "wrn20_8"])
    p.add_argument("--methods", nargs="+", default=["ce", "dlb"])
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the smoke run uses eager)")
    p.add_argument("--runs", nargs="+", type=int, default=[1, 4], help="processes sharing the device per cell")
    p.add_argument("--batch", type=int, default=64, help="new samples per step (DLB: plus as many repeated); "
                   "64 is the DLB recipe's")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--budget", type=float, default=140, help="seconds for all cells")
    p.add_argument("--one", help="internal: run one cell given as JSON and print its result")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(**json.loads(a.one))))
        return 0
    deadline = time.perf_counter() + a.budget
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    for model, meth, comp, k in cells(a.models, a.methods, [c == "on" for c in a.compile], a.runs):
        spec = {"model_name": model, "method_name": meth, "compile_": comp, "batch": a.batch, "steps": a.steps,
                "warmup": a.warmup, "device": a.device, "backend": a.compile_backend}
        row = {"model": model, "method": meth, "compile": comp, "runs": k, "batch": a.batch, "steps": a.steps,
               "device": a.device}
        t0 = time.perf_counter()
        if t0 >= deadline:
            row["status"] = "not run (time bound)"
        else:
            try:
                res = run_cell(spec, k, deadline)
            except TimeoutError:
                row["status"] = "cut off (time bound)"
            except Exception as err:  # a cell that fails is reported, the rest still run
                row["status"] = f"failed: {err}"
                failed += 1
            else:
                row.update(status="ok", images_per_s=sum(r["images_per_s"] for r in res),
                           ms_per_step=max(r["ms_per_step"] for r in res),
                           warmup_s=max(r["warmup_s"] for r in res), peak_mib=max(r["peak_mib"] for r in res),
                           syncs_per_step=max(r["syncs_per_step"] for r in res),
                           sync_where=next((r["sync_where"] for r in res if r["sync_where"]), ""))
            row["wall_s"] = time.perf_counter() - t0
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
