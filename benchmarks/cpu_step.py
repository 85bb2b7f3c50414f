"""The 1-thread CPU training step of DLB on ResNet-32, CIFAR-sized: where the time goes, images/s, GFLOP/s.

    python benchmarks/cpu_step.py [--steps 20] [--warmup 3] [--repeats 3] [--threads 1] [--no-compile]

Each cell runs in a fresh process through the real ``selfkd`` path (``engine.setup.build`` on a
synthetic CIFAR-10 folder written here, ``Trainer``'s loader, augmentation, DLB batch assembly and
``Trainer._step``), interleaved over ``--repeats`` so that drift in the machine's load hits every cell alike:

* ``variant``: ``current`` is the trainer as it is (the step is unchanged since commit 5996bfb: see
  benchmarks/README.md); ``fused`` swaps in ``torch.optim.SGD(fused=True)``, the one change the profile
  offered, measured but not adopted: it changes the weights of tests/test_golden.py's runs.
* ``forward``: ``eager`` or ``compiled`` (``train.compile``; compilation is timed apart, in warm-up, and
  paid once for both paths through one inductor cache folder).

Reported per cell: images/s (rows forwarded per second: DLB forwards ``2 x batch`` rows per step),
wall and process CPU milliseconds per step (CPU time is steadier than wall time on a shared machine),
and the achieved GFLOP/s of the step. FLOP convention: the model's forward FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-accumulate of the convolutions and
the linear layer; BatchNorm, ReLU, pooling and the loss not counted), and a training step is taken as
3x the forward (the backward ~2x: gradients of the inputs and of the weights). The reference peak is
a 2048x2048 fp32 matmul at the same thread count, measured in the same run (best of 5).

The profile (``torch.profiler`` over ``--profile-steps`` steps after warm-up, eager and compiled
``new``) splits the step's wall time into convolution, BatchNorm, linear/matmul, other ops
(elementwise: ReLU, additions, the loss, the augmentation's gathers), the optimiser (every op under
``Optimizer.step``), the data (the loader's batch) and framework overhead: the wall time left after
the ops' own time (Python, autograd's engine, dispatch). Compiled graphs' fused kernels are profiled
with inductor's ``cpp.enable_kernel_profile`` and count as "fused (inductor)".

Memory (``--sections memory``): the peak resident set (``ru_maxrss`` of the child, from ``os.wait4``) of a
whole 1-epoch run through ``selfkd train``'s path (``train_run``): ResNet-32, DLB, 1 thread, a
3,000-image training subset and 1,000 test images of a synthetic 50,000/10,000 CIFAR-10 folder (the
side-by-side protocol of issue 19), ``old`` (no heap release between training and evaluation, the old
against ``new``, interleaved over ``--repeats``.

Writes ``--results`` (default benchmarks/results/cpu_step.md).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _common import command, median_range  # noqa: E402

CATEGORIES = ("conv", "batchnorm", "linear", "fused (inductor)", "other ops", "optimizer", "data", "overhead")


def fake_cifar(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A cifar-10-batches-py folder of random images with the real pickle layout (5 training batches)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, n: int) -> None:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(d, protocol=4))

    per = -(-n_train // 5)
    for i in range(5):
        dump(f"data_batch_{i + 1}", min(per, n_train - i * per))
    dump("test_batch", n_test)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an ``n x n`` fp32 matmul at ``threads`` threads (best of ``reps``)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def forward_flops(model, image_shape: tuple[int, ...]) -> float:
    """Forward FLOPs of one image (FlopCounterMode: 2 per multiply-accumulate of conv / linear)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, *image_shape))
    model.train(was)
    return float(fc.get_total_flops())


def fused_step(trainer):
    """The trainer's step with torch's fused CPU SGD kernel instead of its default per-tensor loop."""
    import torch

    from selfkd.engine.schedule import lr_lambda

    o = trainer.cfg.optim
    trainer.opt = torch.optim.SGD(trainer.model.parameters(), lr=o.lr, momentum=o.momentum,
                                  nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay, fused=True)
    trainer.sched = torch.optim.lr_scheduler.LambdaLR(
        trainer.opt, lr_lambda(trainer.cfg.schedule, trainer.cfg.train.epochs, trainer.steps_per_epoch, o.lr))
    return trainer._step


def _category(evt, aten_names: set[str]) -> str | None:
    """The category of one profiler event's own time (None: not an op, its time is overhead)."""
    name = evt.name
    p = evt.cpu_parent
    while p is not None:
        if p.name.startswith("Optimizer.step"):
            return "optimizer"
        if p.name == "selfkd.data":
            return "data"
        p = p.cpu_parent
    if "cpp_fused" in name or name.startswith("graph_"):
        return "fused (inductor)"
    if name not in aten_names:
        return None
    if "conv" in name:
        return "conv"
    if "batch_norm" in name:
        return "batchnorm"
    if name in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm"):
        return "linear"
    return "other ops"


def profile_shares(run_steps, steps: int) -> dict[str, float]:
    """Share of the profiled wall time per category (sums to 1)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        run_steps(steps)
        wall_us = (time.perf_counter() - t) * 1e6
    events = list(prof.events())
    aten = {e.name for e in events if e.name.startswith(("aten::", "mkldnn::"))}
    out = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        cat = _category(e, aten)
        if cat is not None:
            out[cat] += e.self_cpu_time_total
    out["overhead"] = max(wall_us - sum(out.values()), 0.0)
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def child(a: argparse.Namespace) -> dict:
    import torch

    from selfkd.engine.config import Config
    from selfkd.engine.setup import build
    from selfkd.engine.trainer import Trainer

    torch.set_num_threads(a.threads)
    compiled = a.forward == "compiled"
    if compiled and a.profile_steps:
        import torch._inductor.config as ind

        ind.cpp.enable_kernel_profile = True  # fused kernels show up in the profile by name
    batches = a.warmup + a.steps + a.profile_steps + 1
    cfg = Config.model_validate({
        "data": {"name": "cifar10", "dir": a.data, "subset": a.batch * batches, "test_subset": 20},
        "model": {"name": a.model}, "method": {"name": "dlb"}, "optim": {"batch_size": a.batch},
        "train": {"epochs": 1, "seed": 0, "device": "cpu", "log": "csv", "compile": compiled,
                  **({"compile_cache": a.compile_cache} if compiled else {})},
    })
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(build(cfg), Path(tmp) / "run", progress=False, log=lambda m: None)
        flops = forward_flops(trainer.model, trainer.setup.train.image_shape)
        step = fused_step(trainer) if a.path == "fused" else trainer._step
        trainer.model.train()
        aug_gen, mix_gen, setup = trainer.gens["augment"], trainer.gens["mix"], trainer.setup

        def augment(raw):
            return trainer._prep(setup.augment(raw, aug_gen))

        it = iter(trainer.loader)

        def run_steps(n: int) -> int:
            from torch.profiler import record_function

            rows = 0
            for _ in range(n):
                with record_function("selfkd.data"):
                    x, y, idx = next(it)
                step(x, y, idx, augment, mix_gen)
                rows += x.shape[0]
            return rows

        t = time.perf_counter()
        run_steps(1 + a.warmup)  # the first step has no repeated rows; compilation happens here
        warm_s = time.perf_counter() - t
        c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        rows = run_steps(a.steps)
        wall = time.perf_counter() - t0
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
        shares = profile_shares(run_steps, a.profile_steps) if a.profile_steps else {}
    return {"path": a.path, "forward": a.forward, "images_per_s": rows / wall, "ms_per_step": 1e3 * wall / a.steps,
            "cpu_ms_per_step": 1e3 * cpu / a.steps, "sys_ms_per_step": 1e3 * (c1.ru_stime - c0.ru_stime) / a.steps,
            "gflops": 3 * flops * rows / wall / 1e9, "forward_mflop_per_image": flops / 1e6,
            "warmup_s": warm_s, "rows_per_step": rows / a.steps, "shares": shares, "torch": torch.__version__}


def memory_child(a: argparse.Namespace) -> dict:
    """One whole run (train_run, as ``selfkd train``); the parent reads this process's ru_maxrss."""
    import torch

    from selfkd.engine import system
    from selfkd.engine.config import build_config
    from selfkd.engine.stages import train_run

    torch.set_num_threads(a.threads)  # from the start, as `selfkd train --threads` with OMP_NUM_THREADS
    if a.path == "old":  # commit 5996bfb: no heap release between the phases
        system.release_memory = lambda: None
    cfg = build_config({"data": {"name": "cifar10", "dir": a.data, "subset": a.mem_train, "test_subset": a.mem_test},
                        "model": {"name": a.model}, "method": {"name": "dlb"}, "optim": {"batch_size": a.batch},
                        "train": {"epochs": 1, "seed": 0, "device": "cpu"}})
    with tempfile.TemporaryDirectory() as tmp:
        s = train_run(cfg, Path(tmp) / "run", progress=False, log=lambda m: None, threads=a.threads)
    return {"path": a.path, "seconds": s["seconds"], "peak_mem_mb_epoch": s["peak_mem_mb"]}


def memory_cell(a: argparse.Namespace, data: Path, path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--section", "memory", "--path", path, "--data", str(data),
           "--model", a.model, "--batch", str(a.batch), "--threads", str(a.threads),
           "--mem-train", str(a.mem_train), "--mem-test", str(a.mem_test)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:  # files: no pipe to fill
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"memory child failed: {err[-2000:]}")
    res = json.loads(out.splitlines()[-1])
    res["max_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--batch", type=int, default=64, help="new samples per step (DLB forwards 2x this)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["current", "fused"], choices=["current", "fused"], help="step section")
    p.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"], help="memory section")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--sections", nargs="+", default=["step", "memory"], choices=["step", "memory"])
    p.add_argument("--mem-train", type=int, default=3000, help="memory section: training images (of 50,000)")
    p.add_argument("--mem-test", type=int, default=1000, help="memory section: test images (of 10,000)")
    p.add_argument("--results", type=Path, default=HERE / "results" / "cpu_step.md")
    for k in ("--child", "--path", "--forward", "--data", "--compile-cache", "--section"):
        p.add_argument(k, help=argparse.SUPPRESS, **({"action": "store_true"} if k == "--child" else {}))
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(memory_child(a) if a.section == "memory" else child(a)))
        return 0

    forwards = ["eager"] if a.no_compile else ["eager", "compiled"]
    cells: dict[tuple[str, str], list[dict]] = {}
    mem: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_cifar(Path(tmp) / "data", a.batch * (a.warmup + a.steps + a.profile_steps + 1), 20)
        if "memory" in a.sections:
            full = fake_cifar(Path(tmp) / "cifar_full", 50000, 10000)
            for r in range(a.repeats):
                for path in a.paths:
                    res = memory_cell(a, full, path)
                    mem.setdefault(path, []).append(res)
                    print(f"memory repeat {r}: {path}: peak RSS {res['max_rss_mib']:.0f} MiB, {res['seconds']:.1f} s", flush=True)
        peak = matmul_peak(a.threads)
        print(f"1-thread fp32 matmul peak: {peak:.1f} GFLOP/s" if a.threads == 1 else f"matmul peak: {peak:.1f} GFLOP/s",
              flush=True)
        for r in range(a.repeats if "step" in a.sections else 0):
            for fwd in forwards:
                for path in a.variants:
                    prof = a.profile_steps if r == 0 else 0  # profiled once, timed every repeat
                    cmd = [sys.executable, __file__, "--child", "--path", path, "--forward", fwd, "--data", str(data),
                           "--compile-cache", str(Path(tmp) / "inductor"), "--model", a.model, "--batch", str(a.batch),
                           "--steps", str(a.steps), "--warmup", str(a.warmup), "--profile-steps", str(prof),
                           "--threads", str(a.threads)]
                    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                    cells.setdefault((fwd, path), []).append(res)
                    print(f"repeat {r}: {fwd} {path}: {res['images_per_s']:.0f} img/s, {res['ms_per_step']:.0f} ms/step "
                          f"({res['cpu_ms_per_step']:.0f} ms CPU), {res['gflops']:.1f} GFLOP/s", flush=True)

    from selfkd.engine.checkpoint import write_text

    lines = ["# CPU step and memory", "", f"Command: `{command(__file__, argv)}`", ""]
    if cells:
        lines += _step_table(a, cells, peak)
    if mem:
        lines += ["", f"## Peak memory of a whole 1-epoch run ({a.model}, DLB, {a.mem_train} train / {a.mem_test} test images, "
                  f"{a.threads} thread(s))", "",
                  "Peak RSS: `ru_maxrss` of the run's process (os.wait4), median (min–max) of "
                  f"{a.repeats} fresh processes. `old`: commit 5996bfb's phases (no heap release).", "",
                  "| path | peak RSS MiB | epoch s |", "|---|---|---|"]
        for path, rs in mem.items():
            lines.append(f"| {path} | {median_range([r['max_rss_mib'] for r in rs])} | {median_range([r['seconds'] for r in rs], '{:.1f}')} |")
    write_text(a.results, "\n".join(lines) + "\n")
    print(f"wrote {a.results}")
    return 0


def _step_table(a: argparse.Namespace, cells: dict[tuple[str, str], list[dict]], peak: float) -> list[str]:
    first = next(iter(cells.values()))[0]
    mf = first["forward_mflop_per_image"]
    lines = [
        f"## The step: DLB on {a.model}, {a.threads} thread{'s' if a.threads != 1 else ''}, batch {a.batch} new + {a.batch} repeated",
        "",
        f"torch {first['torch']}; synthetic 32x32 CIFAR-10 folder, the real build/loader/augmentation/DLB/Trainer._step; "
        f"{a.steps} timed steps after {a.warmup} warm-up steps, median (min–max) of {a.repeats} fresh processes. "
        f"Forward {mf:.1f} MFLOP per image (2 per MAC of conv/linear), a step = 3x forward. "
        f"Reference: fp32 2048x2048 matmul at {a.threads} thread(s): **{peak:.1f} GFLOP/s**. "
        "`fused`: torch.optim.SGD(fused=True), not adopted (other weights than tests/golden.json).",
        "",
        "| forward | variant | images/s | ms/step (wall) | ms/step (CPU) | of which sys | GFLOP/s | of matmul peak | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (fwd, path), rs in cells.items():
        g = [r["gflops"] for r in rs]
        lines.append(f"| {fwd} | {path} | {median_range([r['images_per_s'] for r in rs])} | "
                     f"{median_range([r['ms_per_step'] for r in rs])} | {median_range([r['cpu_ms_per_step'] for r in rs])} | "
                     f"{median_range([r['sys_ms_per_step'] for r in rs])} | {median_range(g, '{:.1f}')} | "
                     f"{100 * sorted(g)[len(g) // 2] / peak:.0f}% | {median_range([r['warmup_s'] for r in rs], '{:.1f}')} |")
    profiled = [(k, rs[0]["shares"]) for k, rs in cells.items() if rs[0]["shares"]]
    if profiled:
        lines += ["", f"Where the step's wall time goes (torch.profiler, {a.profile_steps} steps, first repeat):", "",
                  "| forward | variant | " + " | ".join(CATEGORIES) + " |", "|---|---|" + "---|" * len(CATEGORIES)]
        for (fwd, path), s in profiled:
            lines.append(f"| {fwd} | {path} | " + " | ".join(f"{100 * s[c]:.1f}%" for c in CATEGORIES) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
