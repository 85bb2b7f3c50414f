"""Loader throughput and memory: in memory vs packed (selfkd.data.packed) vs JPEG streaming, real CIFAR-10 JPEGs.

    python benchmarks/stream_cost.py [--archive ../shared/data/cifar10-jpeg.tar.gz] [--batches 20] [--scales 1 4]

Unpacks the archive into a temporary folder and packs it once (``selfkd pack``, timed), then times
``--batches`` batches of 128 through the trainer's DataLoader(BatchView(...)) for each path at 1x
and 4x the training set: in memory (the decoded set, tiled 4x in RAM), packed (a 4x pack made of
distinct copies of the 1x shard files, so its pages are not shared with the 1x pack) with 0 and 2
loader workers, and JPEG streaming with 0 and 2 workers (4x: every file listed four times). Each
row runs in a fresh process, so its memory is its own: the main process's peak RSS (VmHWM; loader workers not
counted), and at the end RssAnon
(the process's own memory) and RssFile (mapped file pages, i.e. page cache the kernel can drop).
The packed open time includes checking every shard's sha256. Writes benchmarks/results/stream_cost.md.

Packed reads come from the page cache when the pack fits in RAM; for data larger than RAM they come
from disk at its random-read speed (dropping the cache between rows needs root and is not done here).
"""
from __future__ import annotations

import argparse
import json
import subprocess
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


def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024  # MiB
    return out


def replicate(pack_dir: Path, out: Path, k: int) -> None:
    """A pack of ``k`` distinct copies of ``pack_dir``'s training shards (test split as is)."""
    import shutil

    import numpy as np

    from selfkd.data.packed import MANIFEST, _save

    m = json.loads((pack_dir / MANIFEST).read_text())
    out.mkdir()
    tr = m["splits"]["train"]
    shards = []
    for r in range(k):
        for e in tr["shards"]:
            name = f"train-r{r}-{e['file']}"
            shutil.copyfile(pack_dir / e["file"], out / name)
            shards.append({**e, "file": name})
    labels = np.tile(np.load(pack_dir / tr["labels"]["file"]), k)
    m["splits"]["train"] = {"count": tr["count"] * k, "shards": shards, "labels": _save(out / "train-labels.npy", labels)}
    for e in (*m["splits"]["test"]["shards"], m["splits"]["test"]["labels"]):
        shutil.copyfile(pack_dir / e["file"], out / e["file"])
    (out / MANIFEST).write_text(json.dumps(m))


def one(kind: str, root: str, scale: int, workers: int, batches: int) -> dict:
    """One row, in this (fresh) process."""
    import torch

    from selfkd.data import ArrayDataset, load_dataset

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if kind == "memory":
        ds = load_dataset("imagefolder", root=root, cache_dir=Path(root) / ".cache").train
        if scale > 1:
            ds = ArrayDataset(ds.images.repeat(scale, 1, 1, 1), ds.labels.repeat(scale), ds.num_classes)
    elif kind == "packed":
        ds = load_dataset("packed", root=root).train
    else:
        ds = load_dataset("imagefolder", root=root, stream=True).train
        if scale > 1:
            from selfkd.data.stream import StreamDataset

            ds = StreamDataset(ds.files * scale, ds.labels.repeat(scale), ds.num_classes, ds.size)
    open_s = time.perf_counter() - t0
    r = rate(ds, batches, workers)
    return {"images": len(ds), "open_s": open_s, "rate": r, **_status()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--archive", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    p.add_argument("--out", default="benchmarks/results/stream_cost.md")
    p.add_argument("--one", nargs=4, metavar=("KIND", "ROOT", "SCALE", "WORKERS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        kind, root, scale, workers = a.one
        print(json.dumps(one(kind, root, int(scale), int(workers), a.batches)))
        return 0

    def row(kind: str, root: Path, scale: int, workers: int) -> dict:
        res = subprocess.run([sys.executable, __file__, "--batches", str(a.batches), "--one", kind, str(root),
                              str(scale), str(workers)], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{kind} {scale}x {workers} workers failed:\n{res.stderr}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    from selfkd.data.packed import pack

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "jpeg"
        with tarfile.open(a.archive) as tar:
            tar.extractall(src, filter="data")
        if not (src / "train").is_dir():  # the archive holds one folder that holds train/ and val/ or test/
            src = next(d for d in src.iterdir() if (d / "train").is_dir())
        from selfkd.data import load_dataset

        load_dataset("imagefolder", root=src, cache_dir=src / ".cache")  # the in-memory rows read this cache
        t0 = time.perf_counter()
        pack(src, Path(tmp) / "pack-1")
        pack_s = time.perf_counter() - t0
        for s in a.scales:
            if s > 1:
                replicate(Path(tmp) / "pack-1", Path(tmp) / f"pack-{s}", s)
        rows = []
        for s in a.scales:
            rows.append((f"in memory, {s}x", row("memory", src, s, 0)))
            for w in (0, 2):
                rows.append((f"packed, {w} workers, {s}x", row("packed", Path(tmp) / f"pack-{s}", 1, w)))
            for w in (0, 2):
                rows.append((f"JPEG streaming, {w} workers, {s}x", row("stream", src, s, w)))
    mem1 = next(r["rate"] for k, r in rows if k == f"in memory, {a.scales[0]}x")
    lines = [f"# Loader throughput and memory, CIFAR-10 JPEGs ({rows[0][1]['images']} train images at 1x)", "",
             f"Command: `{command(__file__, argv)}`. Batches of 128, uint8 [B, 3, 32, 32] as the trainer gets them, "
             f"{a.batches} batches per row, each row in a fresh process with 1 torch thread. `selfkd pack` of the "
             f"unpacked JPEGs took {pack_s:.0f} s. Memory in MiB: peak RSS (VmHWM) and, at the end, RssAnon (the "
             "process's own) and RssFile (mapped file pages: page cache the kernel can drop). Open: seconds to load "
             "the data set (in memory: from its decoded cache; packed: includes the sha256 check of every shard).",
             "", "| path | images | images/s | vs in memory 1x | open s | peak RSS | RssAnon | RssFile |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             *[f"| {k} | {r['images']:,} | {r['rate']:,.0f} | {r['rate'] / mem1:.2f} | {r['open_s']:.1f} | "
               f"{r['VmHWM']:,.0f} | {r['RssAnon']:,.0f} | {r['RssFile']:,.0f} |" for k, r in rows], ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
