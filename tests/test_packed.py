"""Packed data (selfkd pack): same images as the in-memory reader, memory-mapped shards, checks, training."""
import io
import json
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from selfkd.cli import main
from selfkd.data import BatchView, load_dataset
from selfkd.data.packed import load_packed, pack
from selfkd.engine import checkpoint as ckpt
from selfkd.engine.config import build_config
from selfkd.engine.stages import train_run
from selfkd.engine.trainer import TIMING_KEYS
from selfkd.errors import ConfigError, DataError


def image(seed: int, fmt: str, size: int = 8) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def tree(root: Path, n: int = 5, size: int = 8) -> Path:
    """train/{cat,dog}/ with n images each (JPEG and PNG mixed), val/ with 2 each."""
    for split, count in (("train", n), ("val", 2)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(count):
                fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
                (d / f"{i:03d}.{ext}").write_bytes(image(hash((split, c, i)) % 1000, fmt, size))
    return root


def targz(root: Path, dst: Path) -> Path:
    with tarfile.open(dst, "w:gz") as tar:
        for split in ("train", "val"):
            tar.add(root / split, arcname=f"data/{split}")
    return dst


def test_pack_round_trip_is_the_in_memory_decode_bit_for_bit(tmp_path):
    root = tree(tmp_path / "t")
    for size in (None, 6):
        mem = load_dataset("imagefolder", root=root, image_size=size, cache_dir=tmp_path / "cache")
        for k, src in enumerate((root, targz(root, tmp_path / f"t{size}.tar.gz"))):
            out = tmp_path / f"p{size}-{k}"
            m = pack(src, out, image_size=size, shard_images=3)
            assert len(m["splits"]["train"]["shards"]) == 4 and len(m["splits"]["test"]["shards"]) == 2
            p = load_dataset("packed", root=out, image_size=size)
            assert p.classes == mem.classes == ["cat", "dog"] and p.mean == mem.mean and p.std == mem.std
            assert p.image_size == (size or 8) and p.channels == 3 and p.default_augment == mem.default_augment
            for a, b in ((p.train, mem.train), (p.test, mem.test)):
                x, y, idx = a.batch(list(range(len(b))))
                assert torch.equal(x, b.images) and torch.equal(y, b.labels) and idx.tolist() == list(range(len(b)))
            x, y, idx = p.train.batch([9, -1, 0, 4, 3])  # across shards, out of order, negative
            assert torch.equal(x, mem.train.images[[9, 9, 0, 4, 3]]) and idx.tolist() == [9, 9, 0, 4, 3]
    sub = p.train.subset([7, 2, 5]).with_labels([1, 1, 0])
    x, y, _ = sub.batch([2, 0])
    assert torch.equal(x, mem.train.images[[5, 7]]) and y.tolist() == [0, 1]
    with pytest.raises(IndexError, match="out of range"):
        p.train.batch([10])


def test_workers_read_per_rank_shards_from_the_maps(tmp_path):
    pack(tree(tmp_path / "t"), tmp_path / "p", shard_images=4)
    ds = load_packed(tmp_path / "p").train
    ds.batch([0])  # maps opened here are not pickled: workers open their own
    assert all(isinstance(m, np.memmap) and m.mode == "r" for m in ds._maps)  # shards mapped, not read into memory
    assert pickle.loads(pickle.dumps(ds))._maps is None
    seen = []
    for r in range(2):
        sampler = DistributedSampler(range(len(ds)), num_replicas=2, rank=r, shuffle=True, seed=0)
        loader = DataLoader(BatchView(ds), sampler=BatchSampler(sampler, 2, False), batch_size=None, num_workers=2)
        for x, y, idx in loader:
            assert torch.equal(x, ds.batch(idx)[0]) and torch.equal(y, ds.labels[idx])
            seen += idx.tolist()
    assert sorted(seen) == list(range(10))


def _train_err(capsys, data_dir, *extra):
    code = main(["train", "--data", "packed", "--data-dir", str(data_dir), "--model", "cnn_small", "--epochs", "1",
                 "--out", str(data_dir.parent / "run"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("selfkd: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (data_dir.parent / "run").exists()
    return err


def test_bad_shards_are_one_line_errors(tmp_path, capsys):
    root = tree(tmp_path / "t", n=3)
    good = tmp_path / "good"
    pack(root, good, shard_images=4)
    m = json.loads((good / "packed.json").read_text())
    shard = good / m["splits"]["train"]["shards"][0]["file"]
    data = shard.read_bytes()

    shard.write_bytes(data[:-5])
    err = _train_err(capsys, good)
    assert "truncated shard" in err and str(shard) in err
    shard.write_bytes(data[:40])
    assert "truncated or not a .npy shard" in _train_err(capsys, good)
    edited = bytearray(data)
    edited[-1] ^= 1
    shard.write_bytes(bytes(edited))
    assert "checksum mismatch" in _train_err(capsys, good)
    other = tmp_path / "other"
    pack(root, other, image_size=6, shard_images=4)
    shard.write_bytes((other / shard.name).read_bytes())  # a shard of another pack (6x6 images)
    err = _train_err(capsys, good)
    assert "foreign shard" in err and "[4, 3, 6, 6]" in err and "[4, 3, 8, 8]" in err
    shard.write_bytes(data)
    assert "image_size=5" in _train_err(capsys, good, "--image-size", "5")
    (good / "packed.json").unlink()
    assert "not a packed data set (no packed.json)" in _train_err(capsys, good)


def test_pack_cli_refuses_a_folder_with_files_and_leaves_nothing_half_written(tmp_path, capsys):
    root = tree(tmp_path / "t", n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def cli(*args):
        capsys.readouterr()
        code = main(["pack", *args])
        got = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=got.out, stderr=got.err)

    res = cli(str(root), "--out", str(out))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "folder holds other files (notes.txt)" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (root / "train" / "cat" / "001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    res = cli(str(root), "--out", str(tmp_path / "new"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "001.jpg: cannot decode image" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t"]  # no pack, no temporary folder left
    (root / "train" / "cat" / "001.jpg").write_bytes(image(1, "JPEG"))
    (out / "notes.txt").unlink()
    res = cli(str(root), "--out", str(out))  # an empty folder is fine
    assert res.returncode == 0 and "4 train / 4 test images" in res.stdout, res.stderr
    assert out.stat().st_mode & 0o777 == (tmp_path / "t").stat().st_mode & 0o777  # not mkdtemp's private 0700
    with pytest.raises(DataError, match="folder holds other files"):
        pack(root, out)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_training_on_packed_data_is_the_in_memory_run_and_resumes_exactly(tmp_path):
    root = tree(tmp_path / "t", n=12)
    pack(root, tmp_path / "p", shard_images=7)

    def cfg(data):
        return build_config({"data": data, "model": {"name": "cnn_small"}, "method": {"name": "dlb"},
                             "optim": {"batch_size": 5}, "train": {"epochs": 2, "device": "cpu", "seed": 3}})

    quiet = lambda m: None  # noqa: E731
    train_run(cfg({"name": "imagefolder", "dir": str(root), "stream": False, "cache_dir": str(tmp_path / "c")}),
              tmp_path / "mem", progress=False, log=quiet)
    packed = cfg({"name": "packed", "dir": str(tmp_path / "p")})
    train_run(packed, tmp_path / "packed", progress=False, log=quiet)
    a, b = ckpt.load(tmp_path / "mem" / "checkpoint.pt")["model"], ckpt.load(tmp_path / "packed" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(tmp_path / "mem") == _metrics(tmp_path / "packed")

    def stop(msg):
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(packed, tmp_path / "run", progress=False, log=stop)
    train_run(packed, tmp_path / "run", resume=True, progress=False, log=quiet)
    c = ckpt.load(tmp_path / "run" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], c[k]) for k in a) and _metrics(tmp_path / "run") == _metrics(tmp_path / "mem")


def test_packed_config_errors():
    with pytest.raises(ConfigError, match="packed needs data.dir"):
        load_dataset("packed")
    with pytest.raises(DataError, match="no such folder"):
        load_dataset("packed", root="/nonexistent/pack")
