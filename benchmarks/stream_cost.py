"""Loader throughput and memory: in memory vs packed (selfkd.data.packed) vs JPEG streaming, real CIFAR-10 JPEGs.

    python benchmarks/stream_cost.py [--archive ../shared/data/cifar10-jpeg.tar.gz | --src DIR] [--batches 20]
                                     [--scales 1 4] [--workers 0 1 2] [--kinds memory packed stream decode]
                                     [--repeats 3]

Unpacks the archive into a temporary folder (or reads the unpacked ``--src`` folder) and packs it once
(``selfkd pack``, timed), then times ``--batches`` batches of 128 through the trainer's
DataLoader(BatchView(...), batch_size=None) for each path at 1x and 4x the training set and 0, 1 and 2
loader workers: in memory (the decoded set, tiled 4x in RAM), packed (a 4x pack made of distinct copies
of the 1x shard files, so its pages are not shared with the 1x pack) and JPEG streaming (4x: every file
listed four times). The "decode only" rows are the machine's own ceiling for the streaming rows: the same
batches decoded by the same code (``StreamDataset.batch``) in 1 or 2 forked processes with no DataLoader, no
hand-over and no main process to feed, the batches split between them; 2 workers cannot scale better than
these 2 processes do on the same cores. Each row runs in a fresh process, so its memory is its own: the main process's peak
RSS (VmHWM), and at the end RssAnon (the process's own memory), RssFile (mapped file pages, i.e. page
cache the kernel can drop) and the loader workers' RSS (summed, read while they run). "vs 0 workers" is
the row's images/s over the same path and scale with 0 workers (issue 19: JPEG streaming with 2 workers
>= 1.7x on 2 idle cores). With ``--repeats R`` every row runs R times, the rows taken in turn (so slow
and fast spells of a shared machine fall on every row), and the table shows the median images/s and its
range. The packed open time includes checking every shard's sha256. Writes
benchmarks/results/stream_cost.md; measure on an idle machine (the rows compete for the cores).

Packed reads come from the page cache when the pack fits in RAM; for data larger than RAM they come
from disk at its random-read speed (dropping the cache between rows needs root and is not done here).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import command  # noqa: E402


def _workers_rss() -> float:
    """MiB: the summed VmRSS of this process's children (the loader workers while they run)."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
            except OSError:
                pass
    return total


def _sampler(ds):
    """The batches of 128 every row reads (the same draw for the loader and the decode-only rows)."""
    import torch
    from torch.utils.data import BatchSampler, RandomSampler

    return BatchSampler(RandomSampler(range(len(ds)), generator=torch.Generator().manual_seed(0)), 128, False)


def rate(ds, batches: int, workers: int) -> tuple[float, float]:
    """(images/s, the workers' RSS in MiB at the end)."""
    from torch.utils.data import DataLoader

    from selfkd.data import BatchView

    loader = DataLoader(BatchView(ds), sampler=_sampler(ds), batch_size=None, num_workers=workers)
    it = iter(loader)
    next(it)  # workers started
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)[0].shape[0]
    r = n / (time.perf_counter() - t0)
    return r, _workers_rss()


def decode_rate(ds, batches: int, procs: int) -> float:
    """images/s of ``procs`` forked processes decoding the ``batches`` batches between them by ``ds.batch``."""
    todo = [b for _, b in zip(range(batches + 1), _sampler(ds))]
    ds.batch(todo[0])  # warm, as the loader rows' first batch
    todo = todo[1:]
    t0 = time.perf_counter()
    pids = []
    for p in range(procs):
        pid = os.fork()
        if pid == 0:  # child: its share of the batches, then out without running the parent's exit handlers
            code = 0
            try:
                for b in todo[p::procs]:
                    ds.batch(b)
            except BaseException:  # noqa: BLE001 - reported by the exit status
                code = 1
            os._exit(code)
        pids.append(pid)
    for pid in pids:
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]):
            raise SystemExit("a decode process failed")
    return sum(len(b) for b in todo) / (time.perf_counter() - t0)


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


def one(kind: str, root: str, scale: int, workers: int, batches: int, cache: str | None) -> dict:
    """One row, in this (fresh) process."""
    import torch

    from selfkd.data import ArrayDataset, load_dataset

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if kind == "memory":
        ds = load_dataset("imagefolder", root=root, cache_dir=cache).train
        if scale > 1:
            ds = ArrayDataset(ds.images.repeat(scale, 1, 1, 1), ds.labels.repeat(scale), ds.num_classes)
    elif kind == "packed":
        ds = load_dataset("packed", root=root).train
    else:  # stream, decode
        ds = load_dataset("imagefolder", root=root, stream=True).train
        if scale > 1:
            from selfkd.data.stream import StreamDataset

            ds = StreamDataset(ds.files * scale, ds.labels.repeat(scale), ds.num_classes, ds.size)
    open_s = time.perf_counter() - t0
    if kind == "decode":
        r, wrss = decode_rate(ds, batches, workers), 0.0
    else:
        r, wrss = rate(ds, batches, workers)
    return {"images": len(ds), "open_s": open_s, "rate": r, "workers_rss": wrss, **_status()}


KINDS = {"memory": "in memory", "packed": "packed", "stream": "JPEG streaming", "decode": "JPEG decode only"}
DECODE_PROCS = (1, 2)  # the decode-only rows' process counts (the "workers" column)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--archive", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--src", help="an unpacked folder of the archive (train/ and test/) instead of --archive")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--repeats", type=int, default=1, help="runs of every row, taken in turn; the table shows medians")
    p.add_argument("--out", default="benchmarks/results/stream_cost.md")
    p.add_argument("--one", nargs=4, metavar=("KIND", "ROOT", "SCALE", "WORKERS"), help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)  # --one memory: the decoded-image cache folder
    a = p.parse_args(argv)
    if a.one:
        kind, root, scale, workers = a.one
        print(json.dumps(one(kind, root, int(scale), int(workers), a.batches, a.cache)))
        return 0

    def row(kind: str, root: Path, scale: int, workers: int) -> dict:
        res = subprocess.run([sys.executable, __file__, "--batches", str(a.batches), "--cache", str(cache), "--one",
                              kind, str(root), str(scale), str(workers)], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{kind} {scale}x {workers} workers failed:\n{res.stderr}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    from selfkd.data import load_dataset
    from selfkd.data.packed import pack

    pack_s = None
    with tempfile.TemporaryDirectory() as tmp:
        if a.src:
            src = Path(a.src).resolve()
        else:
            src = Path(tmp) / "jpeg"
            with tarfile.open(a.archive) as tar:
                tar.extractall(src, filter="data")
        if not (src / "train").is_dir():  # the archive holds one folder that holds train/ and val/ or test/
            src = next(d for d in src.iterdir() if (d / "train").is_dir())
        cache = Path(tmp) / "cache"
        if "memory" in a.kinds:
            load_dataset("imagefolder", root=src, cache_dir=cache)  # the in-memory rows read this cache
        if "packed" in a.kinds:
            t0 = time.perf_counter()
            pack(src, Path(tmp) / "pack-1")
            pack_s = time.perf_counter() - t0
            for s in a.scales:
                if s > 1:
                    replicate(Path(tmp) / "pack-1", Path(tmp) / f"pack-{s}", s)
        # the unpacked JPEGs, the decoded cache and the packs are dirty pages until written back: write them
        # now, not by the kernel's flusher threads during the first rows (they take a core from the 2-worker rows)
        os.sync()
        keys = [(kind, s, w) for s in a.scales for kind in a.kinds
                for w in (DECODE_PROCS if kind == "decode" else a.workers)]
        runs: dict[tuple, list[dict]] = {k: [] for k in keys}
        for rep in range(a.repeats):
            for kind, s, w in keys:
                root = Path(tmp) / f"pack-{s}" if kind == "packed" else src
                r = row(kind, root, 1 if kind == "packed" else s, w)
                runs[kind, s, w].append(r)
                print(f"[{rep + 1}/{a.repeats}] {KINDS[kind]}, {w} {'processes' if kind == 'decode' else 'workers'}, "
                      f"{s}x: {r['rate']:,.0f} images/s", file=sys.stderr, flush=True)
    rows = []
    for k, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["rate"])
        rows.append((*k, {**rs[len(rs) // 2], "lo": rs[0]["rate"], "hi": rs[-1]["rate"]}))  # the median run's row
    base = {"decode": 1}
    rate0 = {(k, s): r["rate"] for k, s, w, r in rows if w == base.get(k, 0)}
    mem1 = next((r["rate"] for k, s, w, r in rows if k == "memory" and w == 0 and s == a.scales[0]), None)

    def cells(kind: str, s: int, w: int, r: dict) -> str:
        vs0 = f"{r['rate'] / rate0[kind, s]:.2f}" if (kind, s) in rate0 else "-"
        vsmem = f"{r['rate'] / mem1:.2f}" if mem1 else "-"
        spread = f" ({r['lo']:,.0f}-{r['hi']:,.0f})" if a.repeats > 1 else ""
        return (f"| {KINDS[kind]} | {s}x | {w} | {r['images']:,} | {r['rate']:,.0f}{spread} | {vs0} | {vsmem} | "
                f"{r['open_s']:.1f} | "
                f"{r['VmHWM']:,.0f} | {r['RssAnon']:,.0f} | {r['RssFile']:,.0f} | {r['workers_rss']:,.0f} |")

    packed = f" `selfkd pack` of the unpacked JPEGs took {pack_s:.0f} s." if pack_s is not None else ""
    lines = [f"# Loader throughput and memory, CIFAR-10 JPEGs ({rows[0][3]['images'] // a.scales[0]:,} train images at 1x)", "",
             f"Command: `{command(__file__, argv)}`. Batches of 128, uint8 [B, 3, 32, 32] as the trainer gets them "
             f"(DataLoader(BatchView(ds), batch_size=None)), {a.batches} batches per row after the first, each row in a "
             f"fresh process with 1 torch thread.{packed} Memory in MiB: the main process's peak RSS (VmHWM) and, at the "
             "end, RssAnon (its own) and RssFile (mapped file pages: page cache the kernel can drop); workers: the loader "
             "workers' RSS, summed (pages shared with the main process counted in each). Open: seconds to load the data "
             "set (in memory: from its decoded cache; packed: includes the sha256 check of every shard). JPEG decode "
             "only: the same batches decoded by `StreamDataset.batch` in 1 or 2 forked processes without a DataLoader "
             "(the machine's ceiling for the streaming rows); its workers column counts those processes and its "
             "\"vs 0 workers\" is over 1 process; its memory columns are the parent's."
             + (f" Each row ran {a.repeats} times, the rows in turn; images/s is the median (range)." if a.repeats > 1 else ""),
             "", "| path | data | workers | images | images/s | vs 0 workers | vs in memory 1x | open s | peak RSS | "
             "RssAnon | RssFile | workers' RSS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             *[cells(k, s, w, r) for k, s, w, r in rows], ""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
