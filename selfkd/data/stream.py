"""Streaming image folders: data sets larger than memory, decoded per batch in DataLoader workers.

Layouts (``root`` as for ``imagefolder``)::

    root/train/<class>/**/*.jpg  +  root/val/<class>/**/*.jpg   (or test/)      a folder tree
    root/train/*.tar             +  root/val/*.tar              (or test/)      tar shards

A shard is an *uncompressed* tar whose members are ``<class>/<name>.<jpg|jpeg|png|bmp>``; classes are
the sorted class names of the training shards. Only an index is held in memory (per image: where
its bytes are, and its label): a shard is read once at start-up for its member offsets, then every
image is read by one ``seek`` + ``read`` of its bytes. Compressed archives cannot be read that way
and are refused (unpack them, or use the in-memory ``imagefolder``).

:class:`StreamDataset` is map-style, with the same batch interface as :class:`ArrayDataset`
(``batch(indices)`` -> ``(uint8 [B, 3, S, S], labels, indices)``, ``labels`` known up front), so
everything the trainer does with an in-memory data set works unchanged: the method's batch sampler
(DLB, CS-KD pairs, PS-KD indices), per-rank sharding by ``DistributedSampler``, and exact resume
(the sampler position is in the checkpoint; an image's bytes do not depend on when it is read).
With ``data.num_workers > 0`` each batch is decoded (and resized to ``S``) in a worker process;
crop, flip, policies and normalisation then run on the training device, as for in-memory data.

Where the time goes, for small images (32x32 CIFAR JPEGs, cProfile of a worker): PIL's ``Image.open``
parses the JPEG markers in Python, which cost more than libjpeg's decode itself, and ``convert`` /
``asarray`` copy each image twice more; in the main process, each tensor a worker returns is handed
over as a shared-memory file descriptor, one connection to the worker per tensor (~3 per batch).
So a baseline or progressive 8-bit JPEG of the expected size is decoded by ``Image.frombytes(...,
"jpeg", ...)``, the decoder ``Image.open`` would call with the same mode and arguments (the same
pixels, without the Python header parser), into one preallocated ``[B, S, S, 3]`` batch that is
transposed to ``[B, 3, S, S]`` once; anything else (PNG, grey or CMYK JPEGs, other sizes, resizing,
damaged files) takes the ``Image.open`` path. Shard members are read with ``os.pread`` on a file
descriptor the data set keeps open. A worker's batch crosses to the main process by value when it is
small (below ``data.dataset.SHARE_ABOVE`` bytes: a pipe copy is cheaper than handing over a descriptor) and as one
shared-memory tensor otherwise, so the main process only unpickles (``BatchView`` does this for
every split: in memory, packed and streamed).

Errors (DataError, one line): a split with no images or an empty shard, a shard that is not a tar or
ends early (a header or member cut short, no end-of-archive block), members with absolute paths,
``..``, links or devices (refused as the in-memory reader refuses them), an image that cannot be decoded (named by shard and member), images of another size
than the first when no ``image_size`` is given.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ._util import channel_stats, check_member, check_tar_end
from .dataset import DataBundle

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
STATS_IMAGES = 512  # images (evenly spaced) the channel mean/std are computed from
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})  # start-of-frame markers


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


@dataclass(frozen=True)
class _Source:
    """Where each image's bytes are: ``files[i]`` a path, or a (shard, offset, size) triple."""

    files: list[Any]
    labels: np.ndarray  # int64 [N]


def _index_shard(path: Path) -> list[tuple[str, str, int, int]]:
    """(class, member name, data offset, size) of every image member of an uncompressed tar shard."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):  # gzip, bzip2, xz, zstd
        raise DataError(f"{path}: a compressed archive; streaming reads uncompressed .tar shards "
                        "(unpack it, or use the in-memory reader with data.stream=false)")
    out = []
    try:
        with tarfile.open(path, "r:") as tar:
            last = None
            for m in tar:
                rel = check_member(m, str(path))  # absolute, '..', links, devices: refused as in memory
                if m.offset_data + m.size > size:
                    raise DataError(f"{path}: truncated shard (member {m.name} ends past the end of the file)")
                last = m.name
                parts = rel.split("/")
                if not m.isfile() or any(_hidden(p) for p in parts) or not _is_image(parts[-1]):
                    continue
                if len(parts) < 2:
                    raise DataError(f"{path}: member {m.name} is not in a class folder; expected <class>/<image>")
                out.append((parts[0], m.name, m.offset_data, m.size))
            check_tar_end(tar, str(path), last)
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: corrupt or unreadable tar shard ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if not out:
        raise DataError(f"{path}: empty shard (no <class>/<image> members)")
    return out


def _split_items(split_dir: Path) -> list[tuple[str, Any]]:
    """(class, source) of every image in one split: a folder of class folders, or of .tar shards."""
    try:
        entries = sorted(p for p in split_dir.iterdir() if not _hidden(p.name))
    except OSError as e:
        raise DataError(f"{split_dir}: cannot list folder ({e.strerror or e})") from None
    shards = [p for p in entries if p.is_file() and p.name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2"))]
    items: list[tuple[str, Any]] = []
    if shards:
        for s in shards:
            items.extend((cls, (str(s), name, off, n)) for cls, name, off, n in _index_shard(s))
        return items
    for cdir in (p for p in entries if p.is_dir()):
        for dirpath, dirnames, files in os.walk(cdir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            items.extend((cdir.name, os.path.join(dirpath, f)) for f in sorted(files) if _is_image(f) and not _hidden(f))
    if not items:
        raise DataError(f"{split_dir}: no images (expected <class>/<image files> or .tar shards)")
    return items


def find_splits(root: str | os.PathLike) -> tuple[Path, Path]:
    """(train dir, eval dir) of a streaming layout; DataError naming what is missing."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{base}: streaming needs a folder with train/ and val/ or test/ (folders or .tar shards)")
    if not (base / "train").is_dir():
        raise DataError(f"{base}: no train/ folder; expected train/ and val/ or test/ (class folders or .tar shards)")
    for split in ("val", "test"):
        if (base / split).is_dir():
            return base / "train", base / split
    raise DataError(f"{base}: no val/ or test/ folder next to train/")


def tree_bytes(root: str | os.PathLike[str]) -> int:
    """Total size of the files under ``root`` (for choosing streaming automatically)."""
    total = 0
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


MAX_OPEN_SHARDS = 64  # shard descriptors a data set keeps open (per process)


def _read(src: Any, fds: dict[str, int] | None = None) -> bytes:
    """An image file's bytes; a shard member by ``os.pread`` on a descriptor kept in ``fds`` (pread uses no
    file offset, so a descriptor a forked worker inherits is as good as its own)."""
    if isinstance(src, str):
        with open(src, "rb") as f:
            return f.read()
    shard, _, offset, size = src
    try:
        if fds is None:
            with open(shard, "rb") as f:
                return _checked(src, os.pread(f.fileno(), size, offset))
        fd = fds.get(shard)
        if fd is None:
            if len(fds) >= MAX_OPEN_SHARDS:
                _close(fds)
            fd = fds[shard] = os.open(shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return _checked(src, os.pread(fd, size, offset))
    except OSError as e:
        raise DataError(f"{shard}: cannot read member {src[1]} ({e.strerror or e})") from None


def _checked(src: Any, data: bytes) -> bytes:
    if len(data) != src[3]:
        raise DataError(f"{src[0]}: truncated shard (member {src[1]})")
    return data


def _close(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _name(src: Any) -> str:
    return src if isinstance(src, str) else f"{src[0]}:{src[1]}"


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of an 8-bit JPEG's frame header, read as PIL's JPEG plugin reads it
    (the last start-of-frame before the start of scan); None for anything else or anything unusual."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    i, n, frame = 2, len(data), None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0xDA:
            return frame
        if m in _SOF:
            if i + 10 > n or data[i + 4] != 8:
                return None
            frame = ((data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6], data[i + 9])
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def _jpeg_rgb(data: bytes, size: int | None) -> np.ndarray | None:
    """uint8 [H, W, 3] of an RGB 8-bit JPEG of ``size`` x ``size`` (None: any size) by what
    ``Image.open(...).load()`` runs for it (the "jpeg" decoder, mode RGB, rawmode RGB), without its Python
    header parser; None for any other file, or a damaged one (the ``Image.open`` path names the error)."""
    from PIL import Image

    frame = _jpeg_frame(data)
    if frame is None or frame[2] != 3 or (size is not None and frame[:2] != (size, size)):
        return None
    w, h = frame[:2]
    try:
        return np.frombuffer(Image.frombytes("RGB", (w, h), data, "jpeg", "RGB", "").tobytes(), np.uint8).reshape(h, w, 3)
    except Exception:  # noqa: S110 - damaged: the caller's Image.open path names the error
        return None


def _decode_into(src: Any, size: int, out: np.ndarray, fds: dict[str, int] | None = None) -> None:
    """Decode one image into ``out`` (uint8 [size, size, 3]); DataError naming the file."""
    data = _read(src, fds)
    fast = _jpeg_rgb(data, size)
    if fast is not None:
        out[...] = fast
        return
    a = _decode_pil(src, data, size)
    if a.shape[:2] != (size, size):
        raise DataError(f"{_name(src)}: image is {a.shape[1]}x{a.shape[0]}, not {size}x{size}; "
                        "set data.image_size to resize every image")
    out[...] = a


def _decode_pil(src: Any, data: bytes, size: int | None) -> np.ndarray:
    """uint8 [H, W, 3] by ``Image.open``, RGB, resized to ``size`` x ``size`` (bilinear) when given."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB") if im.mode != "RGB" else im.copy()
        if size is not None and rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except Exception as e:  # truncated files, not an image, decompression bombs, ...
        raise DataError(f"{_name(src)}: cannot decode image ({type(e).__name__}: {e})".replace("\n", " ")) from None


def decode(src: Any, size: int | None) -> np.ndarray:
    """uint8 [3, H, W] of one image (RGB), resized to ``size`` x ``size`` (bilinear) when given."""
    return _decode_pil(src, _read(src), size).transpose(2, 0, 1)


class StreamDataset(Dataset):
    """Images read from disk per batch; only the index and the labels are in memory."""

    def __init__(self, files: list[Any], labels: Any, num_classes: int, size: int) -> None:
        self.files = list(files)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).contiguous()
        self.num_classes = num_classes
        self.size = size
        self._fds: dict[str, int] = {}  # open shard descriptors; this object's own, so a rewritten shard is reopened

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}  # descriptors do not travel to spawned workers

    def __del__(self) -> None:
        _close(getattr(self, "_fds", {}))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(uint8 [B, 3, S, S], labels, indices)``; through :class:`BatchView` in a loader worker, one
        object that reaches the main process as ``[images, labels, indices]`` (data.dataset._WorkerBatch)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        s = self.size
        hwc = np.empty((len(idx), s, s, 3), dtype=np.uint8)
        files, fds = self.files, self._fds
        for k, i in enumerate(idx.tolist()):  # decoding is per image by nature; this runs in a loader worker
            _decode_into(files[i], s, hwc[k], fds)
        images = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))  # one transposition per batch
        return torch.from_numpy(images), self.labels[idx], idx

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y, _ = self.batch([i])
        return x[0], y[0], int(i)

    def subset(self, indices: Any) -> StreamDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        return StreamDataset([self.files[i] for i in idx], self.labels[idx], self.num_classes, self.size)

    def with_labels(self, new_labels: Any) -> StreamDataset:
        return StreamDataset(self.files, new_labels, self.num_classes, self.size)

    def __repr__(self) -> str:
        return f"StreamDataset(n={len(self)}, size={self.size}, num_classes={self.num_classes})"


def load_stream(root: str | os.PathLike, image_size: int | None = None) -> DataBundle:
    """A :class:`DataBundle` of two :class:`StreamDataset` splits (see the module docstring)."""
    train_dir, eval_dir = find_splits(root)
    train_items, eval_items = _split_items(train_dir), _split_items(eval_dir)
    classes = sorted({c for c, _ in train_items})
    index = {c: i for i, c in enumerate(classes)}
    for c, src in eval_items:
        if c not in index:
            raise DataError(f"{_name(src)}: class '{c}' is not one of the {len(classes)} classes of {train_dir}")
    size = image_size
    if size is None:
        first = decode(train_items[0][1], None)
        if first.shape[1] != first.shape[2]:
            raise DataError(f"{_name(train_items[0][1])}: images are {first.shape[2]}x{first.shape[1]}, not square; "
                            "set data.image_size to resize them")
        size = int(first.shape[1])
    k = len(classes)
    train = StreamDataset([s for _, s in train_items], [index[c] for c, _ in train_items], k, size)
    test = StreamDataset([s for _, s in eval_items], [index[c] for c, _ in eval_items], k, size)
    step = max(1, len(train) // STATS_IMAGES)
    sample = train.batch(list(range(0, len(train), step))[:STATS_IMAGES])[0].numpy()
    mean, std = channel_stats(sample)
    return DataBundle(name="imagefolder", train=train, test=test, classes=classes, mean=mean, std=std,
                      default_augment={"crop_padding": 4, "flip": True})
