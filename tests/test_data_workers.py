"""Issue 19: loader workers hand each batch over as one object (data.dataset._WorkerBatch) for in-memory
and packed data too, and give exactly the batches of 0 workers: same batches, same order, per rank."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

import selfkd
from selfkd.data import ArrayDataset, BatchView, dataset
from selfkd.data.dataset import _WorkerBatch
from selfkd.data.packed import load_packed, pack
from selfkd.engine import checkpoint as ckpt
from selfkd.engine.config import build_config
from selfkd.engine.stages import train_run
from selfkd.engine.trainer import TIMING_KEYS


def _tree(root, n=9, size=8):
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 3)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _datasets(tmp_path):
    g = torch.Generator().manual_seed(0)
    mem = ArrayDataset(torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8, generator=g),
                       torch.randint(0, 4, (37,), generator=g), 4)
    pack(_tree(tmp_path / "t"), tmp_path / "p", shard_images=5)
    packed = load_packed(tmp_path / "p").train
    return {"memory": mem, "packed": packed, "memory subset": mem.subset(list(range(3, 30, 2))),
            "packed subset": packed.subset([17, 0, 5, 9, 3, 11, 12])}


def _batches(ds, batch_sampler, workers):
    loader = DataLoader(BatchView(ds), sampler=batch_sampler, batch_size=None, num_workers=workers,
                        generator=torch.Generator().manual_seed(5))
    return list(loader)


def _samplers(n):
    yield "random", lambda: BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(1)), 4, False)
    yield "dlb", lambda: selfkd.DLB().batch_sampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(2)), 3)
    for r in range(2):
        yield f"rank {r}", lambda r=r: BatchSampler(DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=True,
                                                                       seed=0, drop_last=False), 2, False)


@pytest.mark.parametrize("share_above", ["default", 0])  # by value (small batches) and as one shared tensor
def test_two_workers_give_exactly_the_batches_of_zero(tmp_path, monkeypatch, share_above):
    if share_above != "default":
        monkeypatch.setattr(dataset, "SHARE_ABOVE", share_above)
    for name, ds in _datasets(tmp_path).items():
        for sname, make in _samplers(len(ds)):
            want, got = _batches(ds, make(), 0), _batches(ds, make(), 2)
            assert len(got) == len(want) > 1, (name, sname)
            for w, g in zip(want, got):
                assert type(g) is type(w) is list and len(g) == len(w) == 3, (name, sname)  # the default collate's list
                for a, b in zip(w, g):
                    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (name, sname)
                assert g[0].is_contiguous()
                assert torch.equal(g[0], ds.batch(g[2])[0]) and torch.equal(g[1], ds.labels[g[2]])


def test_a_worker_batch_pickles_as_one_object():
    """What a worker sends: the images as one array (or one shared tensor), labels and indices by value."""
    import pickle
    from multiprocessing.reduction import ForkingPickler  # what the worker queue pickles with

    import torch.multiprocessing  # noqa: F401 (registers torch's reductions: tensors as shared storage)

    x, y, idx = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4), torch.tensor([1, 0]), torch.tensor([7, 2])
    assert b"rebuild_storage" in bytes(ForkingPickler.dumps(x))  # a tensor as is: a shared-memory descriptor
    data = bytes(ForkingPickler.dumps(_WorkerBatch(x.numpy(), y, idx)))
    out = pickle.loads(data)
    assert type(out) is list and [t.dtype for t in out] == [torch.uint8, torch.int64, torch.int64]
    assert torch.equal(out[0], x) and torch.equal(out[1], y) and torch.equal(out[2], idx)
    assert b"rebuild_storage" not in data  # no shared-memory descriptors below SHARE_ABOVE


def test_training_with_two_workers_is_bit_identical_and_resumes_exactly(tmp_path):
    pack(_tree(tmp_path / "t", n=6), tmp_path / "p", shard_images=5)

    def cfg(workers):
        return build_config({"data": {"name": "packed", "dir": str(tmp_path / "p"), "num_workers": workers},
                             "model": {"name": "cnn_small"}, "method": {"name": "dlb"},
                             "optim": {"batch_size": 4}, "train": {"epochs": 2, "device": "cpu", "seed": 3}})

    quiet = lambda m: None  # noqa: E731
    train_run(cfg(0), tmp_path / "w0", progress=False, log=quiet)
    train_run(cfg(2), tmp_path / "w2", progress=False, log=quiet)

    def stop(msg):
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg(2), tmp_path / "r", progress=False, log=stop)
    train_run(cfg(2), tmp_path / "r", resume=True, progress=False, log=quiet)

    def metrics(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    a = ckpt.load(tmp_path / "w0" / "checkpoint.pt")["model"]
    for run in ("w2", "r"):
        b = ckpt.load(tmp_path / run / "checkpoint.pt")["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
        assert metrics(tmp_path / run) == metrics(tmp_path / "w0"), run
