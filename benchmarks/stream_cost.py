"""Loader throughput: the in-memory imagefolder path vs streaming (selfkd.data.stream), real CIFAR-10 JPEGs.

    python benchmarks/stream_cost.py [--archive ../shared/data/cifar10-jpeg.tar.gz] [--batches 20]

Unpacks the archive into a temporary folder, then times ``--batches`` batches of 128 through the
trainer's DataLoader(BatchView(...)) for: the in-memory data set (decoded once, beforehand; the
one-off decode is reported separately), streaming with 0 and 2 loader workers. Writes
benchmarks/results/stream_cost.md.
"""
from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import command  # noqa: E402


def rate(ds, batches: int, workers: int) -> float:
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from selfkd.data import BatchView

    sampler = BatchSampler(RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0)), 128, False)
    loader = DataLoader(BatchView(ds), sampler=sampler, batch_size=None, num_workers=workers)
    it = iter(loader)
    next(it)  # workers started
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)[0].shape[0]
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    import torch

    from selfkd.data import load_dataset

    p = argparse.ArgumentParser()
    p.add_argument("--archive", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/stream_cost.md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(a.archive) as tar:
            tar.extractall(tmp, filter="data")
        t0 = time.perf_counter()
        mem = load_dataset("imagefolder", root=tmp, cache_dir=Path(tmp) / ".cache")
        decode_s = time.perf_counter() - t0
        st = load_dataset("imagefolder", root=tmp, stream=True)
        rows = [("in memory (decoded once, beforehand)", rate(mem.train, a.batches, 0)),
                ("streaming, 0 workers", rate(st.train, a.batches, 0)),
                ("streaming, 2 workers", rate(st.train, a.batches, 2))]
    lines = [f"# Loader throughput, CIFAR-10 JPEGs ({len(mem.train)} train images)", "",
             f"Command: `{command(__file__, argv)}`. Measured on a shared 2-core machine (other jobs ran "
             "beside it), so the numbers are indicative. Batches of 128, uint8 [B, 3, 32, 32] as the trainer "
             f"gets them; the in-memory path first decoded the whole set in {decode_s:.0f} s (cached afterwards).",
             "", "| path | images/s |", "| --- | --- |", *[f"| {k} | {v:,.0f} |" for k, v in rows], ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
