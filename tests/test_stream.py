"""Streaming image folders: same images as the in-memory reader, tar shards, errors, loader workers."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from selfkd.data import BatchView, load_dataset
from selfkd.data.stream import load_stream
from selfkd.errors import ConfigError, DataError


def png(seed: int, size: int = 8) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def tree(root: Path, n: int = 5) -> Path:
    for split, count in (("train", n), ("val", 2)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(count):
                (d / f"{i:03d}.png").write_bytes(png(hash((split, c, i)) % 1000))
    return root


def shards(src: Path, dst: Path, per_shard: int = 3) -> Path:
    """The same images as tar shards of ``per_shard`` members (<class>/<file>)."""
    return shards_of(src, dst, per_shard, "*/*.png")


def test_streamed_batches_are_the_in_memory_images(tmp_path):
    root = tree(tmp_path / "t")
    mem = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "cache")
    for src in (root, shards(root, tmp_path / "s")):
        st = load_dataset("imagefolder", root=src, stream=True)
        assert len(st.train) == len(mem.train) == 10 and len(st.test) == 4 and st.classes == ["cat", "dog"]
        x, y, idx = st.train.batch([3, 0, 9])
        assert torch.equal(x, mem.train.images[[3, 0, 9]]) and torch.equal(y, mem.train.labels[[3, 0, 9]])
        assert idx.tolist() == [3, 0, 9] and torch.equal(st.test.labels, mem.test.labels)
        assert st.image_size == 8 and st.channels == 3
        assert np.allclose(st.mean, mem.mean) and np.allclose(st.std, mem.std)


def test_workers_decode_per_rank_shards(tmp_path):
    st = load_stream(shards(tree(tmp_path / "t"), tmp_path / "s"), image_size=6)
    seen = []
    for r in range(2):
        sampler = DistributedSampler(range(len(st.train)), num_replicas=2, rank=r, shuffle=True, seed=0)
        from torch.utils.data import BatchSampler

        loader = DataLoader(BatchView(st.train), sampler=BatchSampler(sampler, 2, False), batch_size=None, num_workers=2)
        for x, y, idx in loader:
            assert x.shape == (len(idx), 3, 6, 6) and x.dtype == torch.uint8
            assert torch.equal(y, st.train.labels[idx])
            seen += idx.tolist()
    assert sorted(seen) == list(range(10))


def test_stream_errors_are_one_line(tmp_path):
    root = tree(tmp_path / "t", n=2)
    s = shards(root, tmp_path / "s")
    (s / "train" / "empty.tar").write_bytes(b"")  # not even a tar header
    with pytest.raises(DataError, match="empty.tar: (corrupt|empty)"):
        load_stream(s)
    (s / "train" / "empty.tar").unlink()
    with tarfile.open(s / "train" / "zz-empty.tar", "w") as tar:
        info = tarfile.TarInfo("README.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="zz-empty.tar: empty shard"):
        load_stream(s)
    (s / "train" / "zz-empty.tar").unlink()
    with tarfile.open(s / "train" / "zz-bad.tar", "w") as tar:
        data = b"not a png at all"
        info = tarfile.TarInfo("cat/bad.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"zz-bad.tar:cat/bad.png: cannot decode image"):
        load_stream(s)  # the channel statistics read it (small sets are read whole)
    with tarfile.open(tmp_path / "gz.tar.gz", "w:gz") as tar:
        tar.add(root / "train" / "cat", arcname="cat")
    (s / "train" / "zz-bad.tar").unlink()
    (tmp_path / "gz.tar.gz").rename(s / "train" / "zz.tar.gz")
    with pytest.raises(DataError, match="uncompressed .tar shards"):
        load_stream(s)
    with pytest.raises(DataError, match="no val/ or test/"):
        (tmp_path / "only" / "train" / "a").mkdir(parents=True)
        load_stream(tmp_path / "only")
    with pytest.raises(ConfigError, match="only imagefolder data can be streamed"):
        load_dataset("digits", stream=True)


def test_auto_streams_above_the_size(tmp_path):
    root = tree(tmp_path / "t")
    from selfkd.data.stream import StreamDataset

    assert isinstance(load_dataset("imagefolder", root=root, stream="auto", stream_above_mb=0.001).train, StreamDataset)
    assert not isinstance(load_dataset("imagefolder", root=root, stream="auto", cache_dir=tmp_path / "c").train,
                          StreamDataset)


def _cuts(shard: Path) -> dict[str, int]:
    """Byte counts to cut ``shard`` to: every way a tar can end early."""
    with tarfile.open(shard) as tar:
        second = tar.getmembers()[1]
    end = second.offset_data + -(-second.size // 512) * 512  # where the third header starts
    return {"60%": int(shard.stat().st_size * 0.6), "inside a header": second.offset + 100,
            "inside member data": second.offset_data + 10, "at a member boundary": end}


def test_a_shard_that_ends_early_is_one_line_naming_it(tmp_path):
    s = shards(tree(tmp_path / "t", n=3), tmp_path / "s")
    shard = s / "train" / "train-000.tar"
    whole = shard.read_bytes()
    assert len(load_stream(s).train) == 6
    for how, n in _cuts(shard).items():
        shard.write_bytes(whole[:n])
        with pytest.raises(DataError, match=rf"^{shard}: (truncated|corrupt)") as e:
            load_stream(s)
        assert "\n" not in str(e.value), how
    shard.write_bytes(whole[:_cuts(shard)["at a member boundary"]] + b"\x07" * 512)  # garbage, not a header
    with pytest.raises(DataError, match=rf"^{shard}: corrupt tar header at byte"):
        load_stream(s)


def test_the_in_memory_reader_refuses_a_tar_cut_at_a_member_boundary(tmp_path):
    root = tree(tmp_path / "t", n=3)
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="t")
    whole = archive.read_bytes()
    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
    archive.write_bytes(whole[: last.offset])  # the last image's header and data gone
    with pytest.raises(DataError, match=rf"^{archive}: truncated tar \(it ends after member"):
        load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("kind", ["dotdot", "symlink", "hardlink"])
def test_unsafe_members_are_refused_by_both_readers_alike(tmp_path, kind):
    root = tree(tmp_path / "t", n=2)
    s = shards(root, tmp_path / "s")
    info = tarfile.TarInfo({"dotdot": "../cat/evil.png", "symlink": "cat/link.png", "hardlink": "cat/hard.png"}[kind])
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "cat/000.png"
    data = png(7) if kind == "dotdot" else b""
    info.size = len(data)
    shard = s / "train" / "train-000.tar"
    with tarfile.open(shard, "a") as tar:
        tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="t")
        tar.addfile(info, io.BytesIO(data))
    why = {"dotdot": r"path with '\.\.'", "symlink": "links are not allowed", "hardlink": "links are not allowed"}[kind]
    with pytest.raises(DataError, match=rf"^{shard}: refusing archive member '{info.name}' \({why}\)"):
        load_stream(s)
    with pytest.raises(DataError, match=rf"^{archive}: refusing archive member '{info.name}' \({why}\)"):
        load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "cache")


def _jpegs(root: Path) -> list[str]:
    """JPEGs of every kind the fast path must decode exactly as ``Image.open`` does, or leave to it."""
    rng = np.random.default_rng(7)
    kinds = {"base": {}, "prog": {"progressive": True}, "444": {"subsampling": 0}, "q30": {"quality": 30}}
    names = []
    for split, n in (("train", 2), ("val", 1)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                for k, opts in kinds.items():
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}-{k}.jpg", **opts)
                    names.append(f"{split}/{c}/{i}-{k}.jpg")
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(d / f"{i}-gray.jpg")
                Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "CMYK").save(d / f"{i}-cmyk.jpg")
    return names


def test_jpeg_batches_are_image_open_pixels_in_main_and_in_workers(tmp_path, monkeypatch):
    """Issue 19: RGB JPEGs of the data set's size skip Image.open (same decoder, same pixels), the rest
    takes it; a worker's batch reaches the main process as the in-process batch does, by value or shared."""
    from torch.utils.data import BatchSampler, SequentialSampler

    from selfkd.data import dataset, stream

    root = tmp_path / "t"
    _jpegs(root)
    mem = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "cache")  # Image.open + convert("RGB")
    opened = []
    real = stream._decode_pil
    monkeypatch.setattr(stream, "_decode_pil", lambda src, data, size: opened.append(src) or real(src, data, size))
    monkeypatch.setattr(stream, "MAX_OPEN_SHARDS", 2)  # 5 training shards: kept descriptors are closed and reopened
    for src in (root, shards_of(root, tmp_path / "s")):
        st = load_dataset("imagefolder", root=src, stream=True).train
        assert [Path(stream._name(f)).name for f in st.files][:6] == ["0-444.jpg", "0-base.jpg", "0-cmyk.jpg",
                                                                        "0-gray.jpg", "0-prog.jpg", "0-q30.jpg"]
        opened.clear()
        x, y, idx = st.batch(list(range(len(st))))
        assert torch.equal(x, mem.train.images) and torch.equal(y, mem.train.labels)
        assert sorted(Path(stream._name(f)).name for f in opened) == sorted(["0-cmyk.jpg", "0-gray.jpg", "1-cmyk.jpg",
                                                                             "1-gray.jpg"] * 2)  # the rest skipped it
        for share_above in (dataset.SHARE_ABOVE, 0):  # small batches by value; above the limit in shared memory
            monkeypatch.setattr(dataset, "SHARE_ABOVE", share_above)  # the handover is dataset._WorkerBatch
            for workers in (0, 2):
                loader = DataLoader(BatchView(st), sampler=BatchSampler(SequentialSampler(st), 5, False),
                                    batch_size=None, num_workers=workers)
                got = list(loader)
                assert all(type(b) is list and len(b) == 3 for b in got)  # what the default collate gives
                assert torch.equal(torch.cat([b[0] for b in got]), mem.train.images)
                assert torch.equal(torch.cat([b[1] for b in got]), mem.train.labels)
                assert torch.cat([b[2] for b in got]).tolist() == list(range(len(st)))


def shards_of(src: Path, dst: Path, per_shard: int = 5, pattern: str = "*/*") -> Path:
    """Every file of ``src``'s splits matching ``pattern`` as tar shards (<class>/<file>)."""
    for split in ("train", "val"):
        files = sorted(p for p in (src / split).glob(pattern) if p.is_file())
        (dst / split).mkdir(parents=True)
        for s in range(0, len(files), per_shard):
            with tarfile.open(dst / split / f"{split}-{s // per_shard:03d}.tar", "w") as tar:
                for f in files[s : s + per_shard]:
                    tar.add(f, arcname=f"{f.parent.name}/{f.name}")
    return dst
