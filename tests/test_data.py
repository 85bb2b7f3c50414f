"""Tests of selfkd.data: loaders (digits, CIFAR pickles, download, image folders), augmentation, noise.

Everything runs offline: CIFAR pickles, tarballs and image trees are written by the tests, downloads
come from a loopback HTTP server. One test reads the real CIFAR-10 JPEG archive when it exists.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from selfkd.data import (SOURCES, ArrayDataset, BatchAugment, DataBundle, apply_label_noise, download_cifar,
                         load_dataset)
from selfkd.data import imagefolder as imagefolder_mod
from selfkd.data._util import channel_stats, default_cache_dir
from selfkd.data.noise import CIFAR10_CLASSES
from selfkd.errors import ConfigError, DataError

REAL_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
if not REAL_ARCHIVE.exists():
    REAL_ARCHIVE = Path("/work/shared/data/cifar10-jpeg.tar.gz")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ==================================================================================================
# ArrayDataset, load_dataset basics, digits
# ==================================================================================================

def test_array_dataset_items_and_collate():
    imgs = torch.arange(5 * 1 * 2 * 2, dtype=torch.uint8).view(5, 1, 2, 2)
    ds = ArrayDataset(imgs, torch.tensor([0, 1, 2, 1, 0]), num_classes=3)
    assert len(ds) == 5
    x, y, i = ds[3]
    assert torch.equal(x, imgs[3]) and int(y) == 1 and i == 3
    assert ds[-1][2] == 4  # the index returned is the real one
    with pytest.raises(IndexError):
        ds[5]
    xb, yb, ib = next(iter(DataLoader(ds, batch_size=4)))
    assert (xb.dtype, yb.dtype, ib.dtype) == (torch.uint8, torch.int64, torch.int64)
    assert xb.shape == (4, 1, 2, 2) and ib.tolist() == [0, 1, 2, 3]


def test_array_dataset_with_labels_validates():
    ds = ArrayDataset(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]), num_classes=3)
    new = ds.with_labels(torch.tensor([2, 2, 1, 0], dtype=torch.int32))
    assert new.images is ds.images and new.labels.dtype == torch.int64 and new.labels.tolist() == [2, 2, 1, 0]
    assert ds.labels.tolist() == [0, 1, 2, 0]
    with pytest.raises(DataError, match=r"shape \(4,\)"):
        ds.with_labels(torch.tensor([0, 1]))
    with pytest.raises(DataError, match="label 3 out of range"):
        ds.with_labels(torch.tensor([0, 1, 3, 0]))
    with pytest.raises(DataError, match="integer"):
        ds.with_labels(torch.zeros(4))
    with pytest.raises(DataError, match="uint8"):
        ArrayDataset(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.int64))
    sub = ds.subset(torch.tensor([3, 1]))
    assert sub.labels.tolist() == [0, 1] and sub.num_classes == 3


def test_unknown_dataset_and_bad_options():
    with pytest.raises(ConfigError) as e:
        load_dataset("imagenet")
    msg = one_line(e)
    assert "imagenet" in msg and all(k in msg for k in ("digits", "cifar10", "cifar100", "imagefolder"))
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(ConfigError, match="imagefolder needs a root"):
        load_dataset("imagefolder")


def test_digits():
    b = load_dataset("digits")
    assert isinstance(b, DataBundle)
    assert (len(b.train), len(b.test)) == (1347, 450)
    assert b.train.images.shape == (1347, 1, 8, 8) and b.test.images.shape == (450, 1, 8, 8)
    assert b.train.images.dtype == torch.uint8 and b.train.labels.dtype == torch.int64
    assert b.train.images.is_contiguous()
    assert (b.num_classes, b.channels, b.image_size) == (10, 1, 8)
    assert b.classes == [str(i) for i in range(10)]
    assert b.default_augment == {"crop_padding": 1, "flip": False}
    assert int(b.train.images.max()) == 255 and int(b.train.images.min()) == 0
    # stratified: every class within one sample of its share
    for split, n in ((b.train, 1347), (b.test, 450)):
        counts = torch.bincount(split.labels, minlength=10)
        from sklearn.datasets import load_digits
        full = np.bincount(load_digits().target, minlength=10)
        assert (counts - torch.from_numpy(full * n / 1797)).abs().max() <= 1
    # scaling x * 255 / 16 rounded: every value is one of the 17 levels
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.unique(b.train.images).tolist()) <= levels
    assert len(b.mean) == 1 and 0 < b.mean[0] < 1 and 0 < b.std[0] < 1
    m, s = channel_stats(b.train.images.numpy())
    assert b.mean == pytest.approx(m) and b.std == pytest.approx(s)
    # the same split every time
    assert torch.equal(load_dataset("digits").train.labels, b.train.labels)
    big = load_dataset("digits", image_size=16)
    assert big.train.images.shape == (1347, 1, 16, 16) and big.image_size == 16


def test_digits_are_scikit_learns_images_and_split_without_importing_it():
    """load_digits reads scikit-learn's CSV itself and draws train_test_split's split with its own code:
    the same images in the same order as scikit-learn gives, and scikit-learn is not imported."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from selfkd.data.split import sklearn_split

    d = load_digits()
    x = np.rint(d.images.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    tr, te = train_test_split(np.arange(1797), test_size=0.25, stratify=d.target, random_state=0)
    b = load_dataset("digits")
    assert np.array_equal(b.train.images.numpy(), x[tr]) and np.array_equal(b.test.images.numpy(), x[te])
    assert np.array_equal(b.train.labels.numpy(), d.target[tr]) and np.array_equal(b.test.labels.numpy(), d.target[te])
    # the split itself on label sets with ties in the remainders, odd sizes, unequal classes, other seeds
    gen = np.random.default_rng(0)
    for n, k, frac, seed in ((50, 3, 0.3, 1), (101, 7, 0.25, 5), (37, 2, 0.5, 0), (200, 10, 0.17, 42)):
        y = np.concatenate([np.arange(k), np.arange(k), gen.integers(0, k, n - 2 * k)])
        want = train_test_split(np.arange(n), test_size=frac, stratify=y, random_state=seed)
        got = sklearn_split(y, frac, seed)
        assert all(np.array_equal(w, g) for w, g in zip(want, got)), (n, k, frac, seed)
    code = "import sys; from selfkd.data import load_dataset; load_dataset('digits'); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_digits_without_scikit_learns_file_is_one_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)  # scikit-learn not installed
    with pytest.raises(DataError, match=r"^digits: scikit-learn's digits.csv.gz was not found \(pip install scikit-learn\)$"):
        load_dataset("digits")


def test_default_cache_dir_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "selfkd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "selfkd"


# ==================================================================================================
# CIFAR pickles
# ==================================================================================================

class Py2Pickler(pickle._Pickler):
    """Writes protocol 2 the way Python 2's cPickle wrote the real CIFAR files: ``str``/``bytes`` as
    BINSTRING (loaded back as bytes with encoding="bytes") and numpy's ``_reconstruct`` under the
    given module name (``numpy.core.multiarray`` in the real files)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, f, np_module="numpy.core.multiarray"):
        super().__init__(f, protocol=2)
        self.np_module = np_module

    def save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + self.np_module.encode() + b"\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_dump(obj, path: Path, np_module="numpy.core.multiarray") -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, np_module).dump(obj)


def write_cifar10(root: Path, per_batch: int = 3, n_test: int = 4, seed: int = 0) -> dict:
    """A tiny cifar-10-batches-py folder with the real keys; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {"train_data": [], "train_labels": []}
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        py2_dump({b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data,
                  b"filenames": [f"img_{i}_{k}.png".encode() for k in range(per_batch)]}, folder / f"data_batch_{i}")
        out["train_data"].append(data)
        out["train_labels"] += labels
    data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n_test)]
    py2_dump({b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data,
              b"filenames": [f"t_{k}.png".encode() for k in range(n_test)]}, folder / "test_batch")
    py2_dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch,
              b"num_vis": 3072}, folder / "batches.meta")
    out["train_data"] = np.concatenate(out["train_data"])
    out["test_data"], out["test_labels"] = data, labels
    return out


def write_cifar100(root: Path, n_train: int = 6, n_test: int = 3) -> dict:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        py2_dump({b"filenames": [b"f"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                  b"coarse_labels": [v // 5 for v in fine], b"data": data}, folder / split, "numpy._core.multiarray")
        out[split] = (data, fine)
    py2_dump({b"fine_label_names": [f"class{k:02d}".encode() for k in range(100)],
              b"coarse_label_names": [f"super{k}".encode() for k in range(20)]}, folder / "meta")
    return out


def test_py2_pickler_writes_real_layout(tmp_path):
    """The fixture really is Python-2 style: bytes keys, no _codecs global, numpy.core global."""
    import pickletools

    py2_dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]}, tmp_path / "p")
    raw = (tmp_path / "p").read_bytes()
    assert raw[:2] == b"\x80\x02"
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    assert "SHORT_BINSTRING" in ops and "BINUNICODE" not in ops
    assert b"_codecs" not in raw and b"numpy.core.multiarray\n_reconstruct" in raw


def test_cifar10_pickles_load(tmp_path):
    exp = write_cifar10(tmp_path)
    b = load_dataset("cifar10", root=tmp_path)
    assert (len(b.train), len(b.test)) == (15, 4)
    assert b.train.images.shape == (15, 3, 32, 32) and b.train.images.dtype == torch.uint8
    assert b.train.labels.tolist() == exp["train_labels"] and b.test.labels.tolist() == exp["test_labels"]
    assert b.classes == list(CIFAR10_CLASSES)
    assert (b.num_classes, b.channels, b.image_size) == (10, 3, 32)
    assert b.default_augment == {"crop_padding": 4, "flip": True}
    # rows are R, G, B planes, each 32x32 row-major
    d = exp["train_data"]
    img = b.train.images.numpy()
    for k, c, r, col in ((0, 0, 0, 0), (4, 1, 5, 7), (14, 2, 31, 30), (7, 2, 0, 31)):
        assert img[k, c, r, col] == d[k, c * 1024 + r * 32 + col]
    assert np.array_equal(img, d.reshape(-1, 3, 32, 32))
    assert np.array_equal(b.test.images.numpy(), exp["test_data"].reshape(-1, 3, 32, 32))
    assert len(b.mean) == 3 and len(b.std) == 3
    assert b.mean == pytest.approx(tuple(d.reshape(-1, 3, 1024).mean(axis=(0, 2)) / 255))
    # root may point straight at the folder
    b2 = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py")
    assert torch.equal(b2.train.images, b.train.images)


def test_cifar100_pickles_load(tmp_path):
    exp = write_cifar100(tmp_path)
    b = load_dataset("cifar100", root=tmp_path)
    assert (len(b.train), len(b.test), b.num_classes) == (6, 3, 100)
    assert b.classes[:2] == ["class00", "class01"]
    assert b.train.labels.tolist() == exp["train"][1]
    assert np.array_equal(b.test.images.numpy(), exp["test"][0].reshape(-1, 3, 32, 32))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload, refused", [("system", ".system'"), ("eval", "builtin__.eval'")])
def test_malicious_pickle_is_refused(tmp_path, payload, refused):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = _Evil(marker) if payload == "system" else _EvilEval()
    target = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    py2_dump({b"data": evil, b"labels": []}, target)  # bytes keys as in the real files: no _codecs global
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    msg = one_line(e)
    assert "data_batch_1" in msg and "refused to unpickle" in msg and refused in msg, msg
    assert not marker.exists()


def test_python3_protocol2_pickles_are_admitted_as_plain_data(tmp_path):
    """Python 3 at protocol 2 spells bytes as _codecs.encode(str, 'latin1') and b'' as bytes(): plain data,
    admitted through checked stand-ins; the arrays come back identical to the Python 2 files'."""
    ref = write_cifar10(tmp_path / "py2")
    folder = tmp_path / "py3" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (tmp_path / "py2" / "cifar-10-batches-py").iterdir():
        with open(f, "rb") as fh:
            obj = pickle.load(fh, encoding="bytes")
        obj[b"batch_label"] = b""  # written as bytes() at protocol 2
        (folder / f.name).write_bytes(pickle.dumps(obj, protocol=2))
    assert b"_codecs\nencode" in (folder / "test_batch").read_bytes()
    got = load_dataset("cifar10", root=tmp_path / "py3")
    assert torch.equal(got.train.images.reshape(len(got.train), -1), torch.from_numpy(ref["train_data"]))
    assert got.test.labels.tolist() == ref["test_labels"]


@pytest.mark.parametrize("payload", [("_codecs", "encode", ("x", "zlib_codec")), ("builtins", "bytes", (10 ** 9,))])
def test_codecs_and_bytes_stand_ins_refuse_anything_else(tmp_path, payload):
    module, name, args = payload
    write_cifar10(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    body = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple, without PROTO and STOP
    target.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + b"R.")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    assert "test_batch" in one_line(e) and "admitted only" in one_line(e)


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path / "nope")
    msg = one_line(e)
    assert str(tmp_path / "nope") in msg and "download" in msg

    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    msg = one_line(e)
    assert "cifar-10-batches-py/data_batch_1" in msg and str(tmp_path) in msg and "--download" in msg

    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="cifar-10-batches-py/test_batch"):
        load_dataset("cifar10", root=tmp_path)

    py2_dump({b"labels": [0, 1], b"data": np.zeros((2, 3000), np.uint8)}, folder / "test_batch")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    msg = one_line(e)
    assert "test_batch" in msg and "(N, 3072)" in msg and "(2, 3000)" in msg

    py2_dump({b"labels": [0, 1, 2], b"data": np.zeros((2, 3072), np.uint8)}, folder / "test_batch")
    with pytest.raises(DataError, match="test_batch: 'labels' should be 2 integers"):
        load_dataset("cifar10", root=tmp_path)

    py2_dump({b"labels": [0, 10], b"data": np.zeros((2, 3072), np.uint8)}, folder / "test_batch")
    with pytest.raises(DataError, match=r"label 10 .*out of range \[0, 10\)"):
        load_dataset("cifar10", root=tmp_path)

    py2_dump({b"labels": [0, 1]}, folder / "test_batch")
    with pytest.raises(DataError, match="test_batch: missing key 'data'"):
        load_dataset("cifar10", root=tmp_path)

    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="test_batch: not a valid CIFAR pickle"):
        load_dataset("cifar10", root=tmp_path)


# ==================================================================================================
# Download from a loopback server
# ==================================================================================================

def cifar10_tarball(tmp_path: Path, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    src = tmp_path / "src"
    write_cifar10(src, per_batch=2, n_test=2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        for info in extra or []:
            data = b"evil" if info.isfile() else None
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """Serve a folder on 127.0.0.1 (free port) from a background thread; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _listing(p: Path) -> list[str]:
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


def test_download_cifar_from_loopback(tmp_path, http_dir):
    served, base = http_dir
    blob = cifar10_tarball(tmp_path)
    (served / "cifar-10-python.tar.gz").write_bytes(blob)
    md5 = hashlib.md5(blob).hexdigest()
    root = tmp_path / "root"
    folder = download_cifar("cifar10", root, url=f"{base}/cifar-10-python.tar.gz", md5=md5)
    assert folder == root / "cifar-10-batches-py"
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # no temp files left
    b = load_dataset("cifar10", root=root)
    assert (len(b.train), len(b.test)) == (10, 2)
    # already present: nothing fetched (the URL is dead)
    assert download_cifar("cifar10", root, url="http://127.0.0.1:9/none", md5="0" * 32) == folder


def test_load_dataset_download_uses_sources(tmp_path, http_dir, monkeypatch):
    served, base = http_dir
    blob = cifar10_tarball(tmp_path)
    (served / "c10.tgz").write_bytes(blob)
    monkeypatch.setitem(SOURCES["cifar10"], "url", f"{base}/c10.tgz")
    monkeypatch.setitem(SOURCES["cifar10"], "md5", hashlib.md5(blob).hexdigest())
    b = load_dataset("cifar10", root=tmp_path / "r", download=True)
    assert len(b.train) == 10


def test_download_checksum_mismatch_leaves_nothing(tmp_path, http_dir):
    served, base = http_dir
    blob = cifar10_tarball(tmp_path)
    (served / "c.tar.gz").write_bytes(blob)
    root = tmp_path / "root"
    with pytest.raises(DataError) as e:
        download_cifar("cifar10", root, url=f"{base}/c.tar.gz", md5="0" * 32)
    msg = one_line(e)
    assert "0" * 32 in msg and hashlib.md5(blob).hexdigest() in msg and "c.tar.gz" in msg
    assert _listing(root) == []


def test_download_network_errors_name_the_url(tmp_path, http_dir):
    _, base = http_dir
    with pytest.raises(DataError) as e:
        download_cifar("cifar10", tmp_path / "r", url=f"{base}/missing.tar.gz", md5="0" * 32)
    assert f"{base}/missing.tar.gz" in one_line(e) and "404" in str(e.value)
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/c.tar.gz"
    with pytest.raises(DataError) as e:
        download_cifar("cifar10", tmp_path / "r", url=url, md5="0" * 32, timeout=5)
    assert url in one_line(e)
    assert _listing(tmp_path / "r") == []


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize("member, why", [
    (_member("../evil"), ".."),
    (_member("cifar-10-batches-py/../../evil"), ".."),
    (_member("/tmp/selfkd-evil-abs"), "absolute"),
    (_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "../../etc/passwd"), "link"),
])
def test_download_rejects_unsafe_tarball(tmp_path, http_dir, member, why):
    served, base = http_dir
    blob = cifar10_tarball(tmp_path, extra=[member])
    (served / "c.tar.gz").write_bytes(blob)
    root = tmp_path / "root"
    with pytest.raises(DataError) as e:
        download_cifar("cifar10", root, url=f"{base}/c.tar.gz", md5=hashlib.md5(blob).hexdigest())
    msg = one_line(e)
    assert member.name in msg and why in msg, msg
    assert _listing(root) == []
    assert not (tmp_path / "evil").exists() and not Path("/tmp/selfkd-evil-abs").exists()


# ==================================================================================================
# Image folders
# ==================================================================================================

def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_tree(root: Path, counts: dict[str, int], splits=("train", "test"), size=(8, 8), ext=".png", seed=0) -> dict:
    """train/<class>/<k><ext> (and the other splits); returns {relative path: array}."""
    rng = np.random.default_rng(seed)
    made = {}
    for split in splits:
        for c, n in counts.items():
            for k in range(n):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                rel = f"{split}/{c}/{k:03d}{ext}"
                _save(root / rel, arr)
                made[rel] = arr
    return made


def test_imagefolder_loads_png_exactly(tmp_path):
    root = tmp_path / "data"
    made = make_tree(root, {"zebra": 3, "apple": 2, "mango": 4})
    b = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "cache")
    assert b.classes == ["apple", "mango", "zebra"]
    assert (len(b.train), len(b.test), b.num_classes, b.channels, b.image_size) == (9, 9, 3, 3, 8)
    assert b.train.labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert b.default_augment == {"crop_padding": 4, "flip": True}
    # samples are ordered by (class, path): the 3rd is mango/000.png
    assert np.array_equal(b.train.images[2].numpy(), made["train/mango/000.png"].transpose(2, 0, 1))
    assert np.array_equal(b.test.images[8].numpy(), made["test/zebra/002.png"].transpose(2, 0, 1))
    tr = np.stack([made[f"train/{c}/{k:03d}.png"] for c, n in (("apple", 2), ("mango", 4), ("zebra", 3))
                   for k in range(n)]).astype(np.float64) / 255
    assert b.mean == pytest.approx(tuple(tr.mean(axis=(0, 1, 2))))
    assert b.std == pytest.approx(tuple(tr.std(axis=(0, 1, 2))))


def test_imagefolder_jpeg_gray_nested_and_val(tmp_path):
    root = tmp_path / "data"
    make_tree(root, {"a": 2, "b": 2}, splits=("train",), ext=".jpg")
    _save(root / "train/b/deeper/extra.JPEG", np.full((8, 8), 200, np.uint8))  # gray, nested, upper-case
    (root / "train/b/notes.txt").write_text("ignored")
    (root / "train/a/.hidden.jpg").write_bytes(b"not an image")  # hidden files are skipped
    make_tree(root, {"b": 1}, splits=("val",), ext=".bmp")
    b = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "cache")
    assert b.train.labels.tolist() == [0, 0, 1, 1, 1] and b.test.labels.tolist() == [1]
    assert b.train.images.shape == (5, 3, 8, 8)
    assert np.all(np.abs(b.train.images[4].numpy().astype(int) - 200) <= 2)  # gray -> RGB


def test_imagefolder_errors(tmp_path):
    cache = tmp_path / "cache"
    root = tmp_path / "d1"
    make_tree(root, {"a": 2, "b": 2}, ext=".jpg")
    bad = root / "train/b/001.jpg"
    bad.write_bytes(os.urandom(300))
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", root=root, cache_dir=cache)
    assert str(bad) in one_line(e) and "cannot decode" in str(e.value)

    root = tmp_path / "d2"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("imagefolder", root=root, cache_dir=cache)
    (root / "train/empty").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", root=root, cache_dir=cache)
    assert str(root / "train/empty") in one_line(e) and "no images" in str(e.value)

    root = tmp_path / "d3"
    make_tree(root, {"a": 1}, splits=("train",))
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", root=root, cache_dir=cache)
    assert "val/ or test/" in one_line(e)

    make_tree(root, {"zz": 1}, splits=("test",))
    with pytest.raises(DataError, match="class 'zz' is not one of the 1 classes"):
        load_dataset("imagefolder", root=root, cache_dir=cache)

    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "missing", cache_dir=cache)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder or a tar archive"):
        load_dataset("imagefolder", root=tmp_path / "file.txt", cache_dir=cache)
    with pytest.raises(ConfigError, match="download"):
        load_dataset("imagefolder", root=tmp_path / "d3", download=True, cache_dir=cache)


def test_imagefolder_sizes_and_resize(tmp_path):
    root = tmp_path / "data"
    make_tree(root, {"a": 2, "b": 2})
    odd = root / "train/b/001.png"
    _save(odd, np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c")
    msg = one_line(e)
    assert str(odd) in msg and "12x10" in msg and "image_size" in msg
    b = load_dataset("imagefolder", root=root, image_size=6, cache_dir=tmp_path / "c")
    assert b.train.images.shape == (4, 3, 6, 6) and b.image_size == 6


def test_tinyimagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    wnids = ["n02", "n01"]
    for w in wnids:
        for k in range(2):
            _save(root / f"train/{w}/images/{w}_{k}.JPEG", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        (root / f"train/{w}/{w}_boxes.txt").write_text("boxes\n")
    ann = []
    for k, w in enumerate(["n02", "n01", "n02"]):
        _save(root / f"val/images/val_{k}.JPEG", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        ann.append(f"val_{k}.JPEG\t{w}\t0\t0\t7\t7")
    (root / "val/val_annotations.txt").write_text("\n".join(ann) + "\n")
    _save(root / "test/images/test_0.JPEG", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))  # unlabelled
    b = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c")
    assert b.classes == ["n01", "n02"]
    assert b.train.labels.tolist() == [0, 0, 1, 1] and b.test.labels.tolist() == [0, 1, 1]

    (root / "val/val_annotations.txt").write_text("\n".join(ann[:2]) + "\n")
    with pytest.raises(DataError, match="val_2.JPEG: image not listed in val/val_annotations.txt"):
        load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c")
    (root / "val/val_annotations.txt").write_text("\n".join([*ann, "val_9.JPEG\tn01"]) + "\n")
    with pytest.raises(DataError, match="line 4: no image val/images/val_9.JPEG"):
        load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c")


def _tar_gz(src: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=arcname)
    return dest


def test_imagefolder_archive_and_cache(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_tree(root, {"cat": 3, "dog": 2}, ext=".jpg")
    archive = _tar_gz(root, tmp_path / "data.tar.gz", "mydata")  # one top-level folder, as archives often have
    cache = tmp_path / "cache"
    a = load_dataset("imagefolder", root=archive, cache_dir=cache)
    f = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "cache2")
    assert a.classes == f.classes == ["cat", "dog"]
    assert torch.equal(a.train.images, f.train.images) and torch.equal(a.test.labels, f.test.labels)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].endswith(".npz")  # nothing extracted, no temp files left

    # second load: straight from the cache, neither the archive nor an image is read
    def boom(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(imagefolder_mod, "_read_archive", boom)
    monkeypatch.setattr(imagefolder_mod, "_decode_all", boom)
    t0 = time.perf_counter()
    again = load_dataset("imagefolder", root=archive, cache_dir=cache)
    assert time.perf_counter() - t0 < 1.0
    assert torch.equal(again.train.images, a.train.images) and again.mean == a.mean and again.classes == a.classes
    load_dataset("imagefolder", root=root, cache_dir=tmp_path / "cache2")  # folders hit their cache too
    monkeypatch.undo()

    # a changed tree is a new key
    _save(root / "train/dog/new.jpg", np.zeros((8, 8, 3), np.uint8))
    assert len(load_dataset("imagefolder", root=root, cache_dir=tmp_path / "cache2").train) == 6
    # a damaged cache file is ignored and rewritten
    only = next(cache.iterdir())
    only.write_bytes(b"junk")
    with pytest.warns(RuntimeWarning, match="ignoring unreadable cache"):
        fixed = load_dataset("imagefolder", root=archive, cache_dir=cache)
    assert torch.equal(fixed.train.images, a.train.images)
    # the default cache dir follows XDG_CACHE_HOME at call time
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_dataset("imagefolder", root=archive)
    assert len(list((tmp_path / "xdg" / "selfkd").glob("imagefolder-*.npz"))) == 1


def test_imagefolder_archive_rejects_unsafe_members(tmp_path):
    buf = tmp_path / "evil.tar.gz"
    with tarfile.open(buf, "w:gz") as tar:
        info = tarfile.TarInfo("../train/a/x.png")
        png = io.BytesIO()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
        info.size = len(png.getvalue())
        tar.addfile(info, io.BytesIO(png.getvalue()))
    with pytest.raises(DataError, match=r"refusing archive member '\.\./train/a/x\.png'"):
        load_dataset("imagefolder", root=buf, cache_dir=tmp_path / "c")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b" + os.urandom(100))
    with pytest.raises(DataError, match="broken.tar.gz"):
        load_dataset("imagefolder", root=tmp_path / "broken.tar.gz", cache_dir=tmp_path / "c")


def test_imagefolder_process_pool_matches_serial(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_tree(root, {"a": 12, "b": 12}, ext=".jpg")
    serial = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c1")
    monkeypatch.setattr(imagefolder_mod, "PARALLEL_THRESHOLD", 10)
    monkeypatch.setattr(imagefolder_mod, "_worker_count", lambda: 2)
    monkeypatch.setattr(imagefolder_mod, "MIN_CHUNK", 5)  # several tasks, reassembled in order
    pooled = load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c2")
    assert torch.equal(serial.train.images, pooled.train.images)
    assert torch.equal(serial.test.images, pooled.test.images)
    (root / "test/b/005.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="005.jpg: cannot decode image"):
        load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c2")


def _jpeg_tar(path: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """An uncompressed tar of real 8x8 JPEGs: data/<split>/<class>/<k>.jpg."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for split, per_class in counts.items():
            for c, n in per_class.items():
                for k in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"data/{split}/{c}/{k:03d}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def _counting_decoders(monkeypatch) -> tuple[list, list]:
    """Record every image imagefolder decodes in this process: by _decode_one (the pixels it keeps) and by
    _decode_fast (the statistics pass; a file it hands on to _decode_one is recorded in both)."""
    pixels: list = []
    stats: list = []
    real_one, real_fast = imagefolder_mod._decode_one, imagefolder_mod._decode_fast
    monkeypatch.setattr(imagefolder_mod, "NOTICE_S", 0.0)  # these tiny decodes say what they did too

    def one(src, size):
        pixels.append(src)
        return real_one(src, size)

    def fast(src, size):
        stats.append(src)
        return real_fast(src, size)

    monkeypatch.setattr(imagefolder_mod, "_decode_one", one)
    monkeypatch.setattr(imagefolder_mod, "_decode_fast", fast)
    return pixels, stats


def _f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_imagefolder_says_what_it_decoded_only_when_it_took_a_while(tmp_path, monkeypatch, capsys):
    """A decode shorter than NOTICE_S prints nothing (so a bad-input error stays the only line); a longer one
    prints one line."""
    archive = _jpeg_tar(tmp_path / "imgs.tar", {"train": {"cat": 4, "dog": 4}, "val": {"cat": 2, "dog": 2}})
    monkeypatch.setattr(imagefolder_mod, "NOTICE_S", 3600.0)
    load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "a")
    load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "b", subset=4)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(imagefolder_mod, "NOTICE_S", 0.0)
    load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "c")
    load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "d", subset=4)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(x.startswith("imagefolder: decoded ") for x in err), err


def test_imagefolder_subset_decodes_only_its_images_and_says_so(tmp_path, monkeypatch, capsys):
    """Issue 18: data.subset decodes the drawn training images and the test split, no more; the draw is
    the one the whole set gives (stratified_subset over the same labels), and one line says what was decoded.
    Normalisation stays the whole training set's, bit for bit: the first load decodes every training image
    once for the statistics (kept in a small file, the pixels dropped), later draws only their own images."""
    from selfkd.data.split import stratified_subset
    from selfkd.engine.config import build_config
    from selfkd.engine.setup import build

    archive = _jpeg_tar(tmp_path / "imgs.tar", {"train": {"cat": 20, "dog": 14, "emu": 16}, "val": {"cat": 4, "dog": 3, "emu": 5}})
    decoded, for_stats = _counting_decoders(monkeypatch)
    full = load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "full")
    assert len(decoded) == 62 and for_stats == [] and "decoded the 62 images of imgs.tar" in capsys.readouterr().err
    want = full.train.subset(stratified_subset(full.train.labels, 12, 1))
    want_test = full.test.subset(stratified_subset(full.test.labels, 6, 1, "data.test_subset", "test"))

    decoded.clear()
    sub = load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "c", subset=12, test_subset=6, subset_seed=1)
    err = capsys.readouterr().err
    assert len(decoded) == 12 + 6  # the pixels kept: the draws
    assert len(for_stats) == 50  # the statistics pass: every training image once, by the fast decoder
    assert err.count("\n") == 1 and err.startswith("imagefolder: decoded 18 of the 62 images of imgs.tar "
                                                  "(data.subset=12 of the 50 training images and data.test_subset=6 "
                                                  "of the 12 test images) in "), err
    assert ", and all 50 training images once for the whole training set's mean/std in " in err, err
    assert torch.equal(sub.train.images, want.images) and torch.equal(sub.train.labels, want.labels)
    assert torch.equal(sub.test.images, want_test.images) and torch.equal(sub.test.labels, want_test.labels)
    assert sub.classes == full.classes and sub.default_augment == full.default_augment
    # the whole training set's statistics, bit for bit, not the subset's own
    assert torch.equal(_f64(sub.mean), _f64(full.mean)) and torch.equal(_f64(sub.std), _f64(full.std))
    assert (sub.mean, sub.std) == (full.mean, full.std) != channel_stats(want.images.numpy())
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(names) == 3 and names[0].endswith("-stats.json") and names[1].endswith("-test-subset6-seed1.npz") \
        and names[2].endswith("-train-subset12-seed1.npz"), names  # no pixels cached for the statistics
    assert f"(only the statistics are kept: {names[0]})" in err

    # again: from the cache, nothing decoded, nothing said
    decoded.clear()
    for_stats.clear()
    again = load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "c", subset=12, test_subset=6, subset_seed=1)
    assert decoded == [] and for_stats == [] and capsys.readouterr().err == ""
    assert torch.equal(again.train.images, want.images) and (again.mean, again.std) == (sub.mean, sub.std)
    # a run through the trainer's setup (the whole test split): a bigger draw, its own images only
    cfg = build_config({"data": {"name": "imagefolder", "dir": str(archive), "cache_dir": str(tmp_path / "c"),
                                 "subset": 30, "subset_seed": 1}, "model": {"name": "cnn_small"}})
    s = build(cfg)
    err = capsys.readouterr().err
    assert len(decoded) == 30 + 12 and for_stats == [] and "decoded 42 of the 62 images" in err
    assert err.count("\n") == 1 and f"; mean/std: the whole training set's, from {names[0]}" in err, err
    want30 = full.train.subset(stratified_subset(full.train.labels, 30, 1))
    assert torch.equal(s.train.images, want30.images) and torch.equal(s.test.images, full.test.images)
    assert s.data_info["mean"] == list(full.mean) and s.data_info["std"] == list(full.std)
    # with the whole set cached the draw comes from that cache: the same images and statistics, nothing decoded
    decoded.clear()
    cached = load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "full", subset=12, test_subset=6, subset_seed=1)
    assert decoded == [] and for_stats == [] and capsys.readouterr().err == ""
    assert torch.equal(cached.train.images, sub.train.images) and torch.equal(cached.test.images, sub.test.images)
    assert (cached.mean, cached.std) == (sub.mean, sub.std)
    with pytest.raises(ConfigError, match=r"data.subset=51 exceeds the 50 training images"):
        load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "c", subset=51)
    with pytest.raises(ConfigError, match="data.subset_seed has no effect"):
        load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "c", subset_seed=2)


def test_imagefolder_subset_statistics_file_is_checked_and_recomputed(tmp_path, monkeypatch, capsys):
    """The whole training set's mean/std of a subset run: an exact histogram file beside the caches.
    A missing, damaged, edited or foreign file is recomputed (a warning names it), with the same numbers;
    the statistics pass through the process pool gives them too; a bad training image outside the draw
    fails the load as the whole-set load fails."""
    import json

    from selfkd.data._util import channel_hist

    archive = _jpeg_tar(tmp_path / "imgs.tar", {"train": {"cat": 20, "dog": 14, "emu": 16}, "val": {"cat": 4, "dog": 3, "emu": 5}})
    full = load_dataset("imagefolder", root=archive, cache_dir=tmp_path / "full")
    decoded, for_stats = _counting_decoders(monkeypatch)
    c = tmp_path / "c"
    load_dataset("imagefolder", root=archive, cache_dir=c, subset=12)
    capsys.readouterr()
    (spath,) = c.glob("*-stats.json")
    d = json.loads(spath.read_text())
    assert d["cache"] == spath.name.replace("-stats.json", ".npz") and (d["train_images"], d["image_shape"]) == (50, [3, 8, 8])
    assert np.array_equal(np.array(d["hist"]), channel_hist(full.train.images.numpy()))
    assert (tuple(d["mean"]), tuple(d["std"])) == (full.mean, full.std)
    assert [p.name for p in c.iterdir() if p.name.startswith(".")] == []  # written whole (atomic), no temp left
    good = spath.read_text()

    def reload(warning: str | None) -> DataBundle:
        decoded.clear()
        for_stats.clear()
        if warning is None:
            b = load_dataset("imagefolder", root=archive, cache_dir=c, subset=12)
        else:
            with pytest.warns(RuntimeWarning, match=f"ignoring statistics file {spath} \\({warning}.*recomputing it"):
                b = load_dataset("imagefolder", root=archive, cache_dir=c, subset=12)
        err = capsys.readouterr().err
        assert decoded == [] and len(for_stats) == 50  # the draw is cached: only the statistics pass
        assert err.count("\n") == 1 and err.startswith("imagefolder: decoded the 50 training images of imgs.tar once for "
                                                      "the whole training set's mean/std in ") and \
            err.endswith(f"(only the statistics are kept: {spath.name}); the drawn images are from their cache\n"), err
        assert (b.mean, b.std) == (full.mean, full.std) and spath.read_text() == good  # rewritten as it was
        return b

    spath.unlink()
    reload(None)
    edited = dict(d, mean=[d["mean"][0] + 1e-9, *d["mean"][1:]])
    spath.write_text(json.dumps(edited))
    reload("ValueError: its sha256 does not match its contents")
    spath.write_text("{not json")
    reload("JSONDecodeError")
    load_dataset("imagefolder", root=archive, cache_dir=c, image_size=8, subset=12)  # another cache: another file
    capsys.readouterr()
    (other,) = set(c.glob("*-stats.json")) - {spath}
    spath.write_text(other.read_text())
    reload("ValueError: made for 'imagefolder-imgs.tar-")
    # the statistics pass through the process pool: the same histograms, the same file
    monkeypatch.setattr(imagefolder_mod, "PARALLEL_THRESHOLD", 10)
    monkeypatch.setattr(imagefolder_mod, "_worker_count", lambda: 2)
    monkeypatch.setattr(imagefolder_mod, "MIN_CHUNK", 5)
    spath.unlink()
    pooled = load_dataset("imagefolder", root=archive, cache_dir=c, subset=12)
    assert (pooled.mean, pooled.std) == (full.mean, full.std) and spath.read_text() == good
    # every training image is decoded for the statistics, so a bad one fails the load as the whole-set load does
    root = tmp_path / "tree"
    make_tree(root, {"a": 6, "b": 6}, ext=".jpg")
    (root / "train/b/005.jpg").write_bytes(b"garbage")
    for sub in (None, 2):
        with pytest.raises(DataError, match="005.jpg: cannot decode image"):
            load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c3", subset=sub)


def test_imagefolder_fast_decoder_gives_the_same_pixels(tmp_path, monkeypatch):
    """_decode_fast (the statistics pass) is _decode_one's pixels: RGB JPEGs by the jpeg decoder itself,
    grey JPEGs, PNGs and resized images handed on to _decode_one."""
    rng = np.random.default_rng(3)
    srcs = []
    for mode, fmt in (("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG")):
        buf = io.BytesIO()
        shape = (8, 8, 3) if mode == "RGB" else (8, 8)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format=fmt)
        srcs.append(buf.getvalue())
    prog = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(prog, format="JPEG", progressive=True)
    srcs.append(prog.getvalue())
    (tmp_path / "x.jpg").write_bytes(srcs[0])
    srcs.append(str(tmp_path / "x.jpg"))
    for src in srcs:
        for size in (None, 8, 5):
            a, b = imagefolder_mod._decode_fast(src, size), imagefolder_mod._decode_one(src, size)
            assert a.dtype == np.uint8 and a.shape == b.shape and np.array_equal(a, b)
    handed_on = []
    real = imagefolder_mod._decode_one
    monkeypatch.setattr(imagefolder_mod, "_decode_one", lambda src, size: handed_on.append(size) or real(src, size))
    for src in srcs:
        for size in (None, 8, 5):
            imagefolder_mod._decode_fast(src, size)
    assert len(handed_on) == 3 * 1 + 2 * 3  # RGB JPEGs (3 sources) only when resized (size 5); grey JPEG and PNG always


def test_load_dataset_draws_subsets_of_every_data_set_as_before():
    """Other data sets: the draw applied to the whole set, whose statistics stay."""
    from selfkd.data.split import stratified_subset

    full = load_dataset("digits")
    sub = load_dataset("digits", subset=40, test_subset=20, subset_seed=3)
    assert torch.equal(sub.train.images, full.train.images[stratified_subset(full.train.labels, 40, 3)])
    assert torch.equal(sub.test.labels, full.test.labels[stratified_subset(full.test.labels, 20, 3, "data.test_subset", "test")])
    assert (sub.mean, sub.std) == (full.mean, full.std)
    with pytest.raises(ConfigError, match="data.test_subset: expected a positive integer"):
        load_dataset("digits", test_subset=0)


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("selfkd-real-cache")


@pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason="the CIFAR-10 JPEG archive is not on this machine")
def test_real_cifar10_jpeg_archive(real_cache):
    t0 = time.perf_counter()
    b = load_dataset("imagefolder", root=REAL_ARCHIVE, cache_dir=real_cache)
    first = time.perf_counter() - t0
    assert (len(b.train), len(b.test)) == (50_000, 10_000)
    assert b.classes == list(CIFAR10_CLASSES) and (b.channels, b.image_size) == (3, 32)
    assert torch.bincount(b.train.labels).tolist() == [5000] * 10
    assert torch.bincount(b.test.labels).tolist() == [1000] * 10
    assert b.mean == pytest.approx((0.491, 0.482, 0.447), abs=0.01)
    # the second load reads the cache and decodes no image (a wall-clock bound here failed under load)
    import PIL.Image

    def no_decode(*a, **k):
        raise AssertionError("the cached load decoded an image")

    real_open, PIL.Image.open = PIL.Image.open, no_decode
    try:
        t0 = time.perf_counter()
        again = load_dataset("imagefolder", root=REAL_ARCHIVE, cache_dir=real_cache)
        cached = time.perf_counter() - t0
    finally:
        PIL.Image.open = real_open
    assert torch.equal(again.test.images, b.test.images) and torch.equal(again.train.labels, b.train.labels)
    print(f"real CIFAR-10 JPEG archive: first load {first:.1f} s, cached load {cached:.2f} s")


@pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason="the CIFAR-10 JPEG archive is not on this machine")
def test_real_cifar10_jpeg_subset_keeps_the_whole_sets_statistics(real_cache, tmp_path):
    """data.subset=500 without the whole-set cache: the fast decoder's statistics pass over the 50,000
    training images gives the whole-set load's mean/std bit for bit, and the draw is the whole set's."""
    from selfkd.data.split import stratified_subset

    full = load_dataset("imagefolder", root=REAL_ARCHIVE, cache_dir=real_cache)
    sub = load_dataset("imagefolder", root=REAL_ARCHIVE, cache_dir=tmp_path, subset=500)
    assert torch.equal(_f64(sub.mean), _f64(full.mean)) and torch.equal(_f64(sub.std), _f64(full.std))
    want = full.train.subset(stratified_subset(full.train.labels, 500, 0))
    assert torch.equal(sub.train.images, want.images) and torch.equal(sub.train.labels, want.labels)
    assert torch.equal(sub.test.images, full.test.images)


# ==================================================================================================
# BatchAugment
# ==================================================================================================

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _batch(b=64, c=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def _ref_window(x: torch.Tensor, p: int, oy: int, ox: int, flip: bool) -> torch.Tensor:
    """Slow reference for one image [C, H, W]: zero-pad by p, take the window at (oy, ox), flip."""
    c, h, w = x.shape
    padded = torch.zeros((c, h + 2 * p, w + 2 * p), dtype=x.dtype)
    padded[:, p : p + h, p : p + w] = x
    win = padded[:, oy : oy + h, ox : ox + w]
    return win.flip(-1) if flip else win


def _unnormalize(y: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((y * s + m) * 255).round().to(torch.uint8)


def test_normalize_and_identity():
    x = _batch()
    aug = BatchAugment(crop_padding=0, flip=False, mean=MEAN, std=STD)
    y = aug.normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape and y.is_contiguous()
    ref = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), y)
    assert torch.equal(x, _batch())  # the input is untouched


def _match(x: torch.Tensor, out_u8: torch.Tensor, p: int, flips: tuple[bool, ...]):
    """For every sample, the (oy, ox, flip) whose reference window equals the output (or fail)."""
    found = []
    for i in range(x.shape[0]):
        hits = [(oy, ox, f) for oy in range(2 * p + 1) for ox in range(2 * p + 1) for f in flips
                if torch.equal(_ref_window(x[i], p, oy, ox, f), out_u8[i])]
        assert hits, f"sample {i} is not a shifted window of the padded image"
        found.append(hits[0])
    return found


def test_crop_is_an_exact_shifted_window():
    x = _batch(b=96)
    p = 2
    aug = BatchAugment(crop_padding=p, flip=False, mean=MEAN, std=STD)
    out = aug(x, torch.Generator().manual_seed(1))
    found = _match(x, _unnormalize(out), p, (False,))
    offsets = {(oy, ox) for oy, ox, _ in found}
    assert len(offsets) > 10  # rows get different offsets
    assert {oy for oy, _, _ in found} == set(range(2 * p + 1)) == {ox for _, ox, _ in found}  # the whole range
    # padded pixels are zero in the raw image, i.e. -mean/std after normalisation
    assert any(oy != p or ox != p for oy, ox in offsets)


def test_flip_flips_and_combines_with_crop():
    x = _batch(b=64)
    out = BatchAugment(crop_padding=0, flip=True, mean=MEAN, std=STD)(x, torch.Generator().manual_seed(2))
    u = _unnormalize(out)
    flipped = [bool(torch.equal(u[i], x[i].flip(-1))) for i in range(len(x))]
    kept = [bool(torch.equal(u[i], x[i])) for i in range(len(x))]
    assert all(a != b for a, b in zip(flipped, kept))
    assert 10 < sum(flipped) < 54
    both = BatchAugment(crop_padding=1, flip=True, mean=MEAN, std=STD)(x, torch.Generator().manual_seed(3))
    found = _match(x, _unnormalize(both), 1, (False, True))
    assert {f for _, _, f in found} == {False, True}


def test_augment_reproducible_and_channels_last():
    x = _batch(b=32)
    aug = BatchAugment(crop_padding=4, flip=True, mean=MEAN, std=STD)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(7)
    first, second = aug(x, g), aug(x, g)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances
    before = torch.get_rng_state()
    aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)  # never the global RNG
    xcl = x.contiguous(memory_format=torch.channels_last)
    ycl = aug(xcl, torch.Generator().manual_seed(7))
    assert ycl.is_contiguous(memory_format=torch.channels_last) and torch.equal(ycl, a)
    ncl = aug.normalize(xcl)
    assert ncl.is_contiguous(memory_format=torch.channels_last) and torch.equal(ncl, aug.normalize(x))


def test_augment_gray_and_loader_batch():
    b = load_dataset("digits")
    aug = BatchAugment(**b.default_augment, mean=b.mean, std=b.std)
    x, y, idx = next(iter(DataLoader(b.train, batch_size=16)))
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == (16, 1, 8, 8) and out.dtype == torch.float32


def test_augment_bad_input():
    with pytest.raises(ConfigError, match="crop_padding"):
        BatchAugment(crop_padding=-1, flip=False, mean=MEAN, std=STD)
    with pytest.raises(ConfigError, match="std"):
        BatchAugment(crop_padding=0, flip=False, mean=MEAN, std=(0.2, 0.0, 0.3))
    with pytest.raises(ConfigError, match="mean/std"):
        BatchAugment(crop_padding=0, flip=False, mean=MEAN, std=(0.2,))
    aug = BatchAugment(crop_padding=1, flip=True, mean=MEAN, std=STD)
    with pytest.raises(DataError, match="uint8"):
        aug(torch.zeros(2, 3, 4, 4), torch.Generator())
    with pytest.raises(DataError, match="channels"):
        aug(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.Generator())
    with pytest.raises(ConfigError, match="Generator"):
        aug(_batch(b=2), None)


# ==================================================================================================
# Label noise
# ==================================================================================================

def _balanced(k=10, per=100):
    return torch.arange(k).repeat_interleave(per)


def test_symmetric_noise_exact():
    y = _balanced()
    clean = y.clone()
    n = apply_label_noise(y, 10, "symmetric", 0.3, seed=0)
    assert torch.equal(y, clean) and n is not y and n.dtype == y.dtype
    changed = n != y
    assert int(changed.sum()) == 300  # round(0.3 * 1000), and none drawn equal to the original
    assert set(n[changed].tolist()) == set(range(10))
    pairs = {(a, b) for a, b in zip(y[changed].tolist(), n[changed].tolist())}
    assert len(pairs) > 60  # the new label is drawn from all the other classes
    assert int((apply_label_noise(y[:7], 10, "symmetric", 0.5, seed=1) != y[:7]).sum()) == round(0.5 * 7)


def test_asymmetric_noise_cifar10_mapping():
    rng = np.random.default_rng(0)
    order = list(CIFAR10_CLASSES)
    rng.shuffle(order)  # the mapping follows names, not positions
    y = _balanced(per=50)
    n = apply_label_noise(y, 10, "asymmetric", 0.4, seed=3, classes=order)
    moved = {}
    for src, dst in zip(y.tolist(), n.tolist()):
        if src != dst:
            moved[(order[src], order[dst])] = moved.get((order[src], order[dst]), 0) + 1
    assert moved == {("truck", "automobile"): 20, ("bird", "airplane"): 20, ("deer", "horse"): 20,
                     ("cat", "dog"): 20, ("dog", "cat"): 20}


def test_asymmetric_fallback_and_pairflip():
    y = _balanced(k=5, per=20)
    for kind, classes in (("pairflip", None), ("asymmetric", None), ("asymmetric", list("abcde"))):
        n = apply_label_noise(y, 5, kind, 0.25, seed=0, classes=classes)
        changed = n != y
        assert int(changed.sum()) == 25
        assert torch.equal(n[changed], (y[changed] + 1) % 5)
        assert torch.bincount(y[changed], minlength=5).tolist() == [5] * 5  # per class, exactly


def test_noise_determinism_and_validation():
    y = _balanced()
    torch.manual_seed(0)
    a = apply_label_noise(y, 10, "symmetric", 0.2, seed=5)
    torch.manual_seed(123)
    np.random.seed(7)
    b = apply_label_noise(y, 10, "symmetric", 0.2, seed=5)
    c = apply_label_noise(y, 10, "symmetric", 0.2, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    before = torch.get_rng_state()
    apply_label_noise(y, 10, "pairflip", 0.2, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(apply_label_noise(y, 10, "none", 0.5, seed=0), y)
    assert torch.equal(apply_label_noise(y, 10, "symmetric", 0.0, seed=0), y)
    for rate in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError) as e:
            apply_label_noise(y, 10, "symmetric", rate, seed=0)
        assert repr(rate) in one_line(e)
    with pytest.raises(ConfigError, match="'flip'"):
        apply_label_noise(y, 10, "flip", 0.1, seed=0)
    with pytest.raises(DataError, match="out of range"):
        apply_label_noise(y, 5, "symmetric", 0.1, seed=0)
