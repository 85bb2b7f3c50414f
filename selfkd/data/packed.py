"""Packed data sets: decoded, fixed-size uint8 images in ``.npy`` shards, read by memory map.

``pack(src, out)`` decodes an image folder or a tar archive of one (the ``imagefolder`` layouts, same
order, same decode and resize as the in-memory reader) into ``out``::

    out/packed.json                  manifest: classes, image shape, mean/std, per-file sha256 and size
    out/train-00000.npy ...          uint8 [n, 3, S, S] per shard (NumPy's .npy format)
    out/train-labels.npy             int64 [N]
    out/test-00000.npy ... test-labels.npy

Shards are plain ``.npy`` files (any NumPy can read them; ``np.load(f, mmap_mode="r")`` maps them),
so a batch is a gather from mapped pages: no decoding, no per-image Python. Only one shard of
decoded images is in memory while packing (from a folder; an archive's compressed bytes are read
into memory first, as the in-memory reader does).

Written atomically: everything goes into a temporary folder next to ``out`` that is renamed onto
``out`` when complete, so ``out`` is either absent or a whole pack. ``out`` must not exist or be an
empty folder. Checked on open (:func:`load_packed`), before any training step: each file's size,
``.npy`` header (dtype, shape) and sha256 against the manifest. Hashing reads every shard once at
disk speed; an error names the file and what is wrong (truncated, foreign, edited).

:class:`PackedDataset` has the batch interface of :class:`ArrayDataset` (``batch(indices)`` ->
``(uint8 [B, C, S, S], labels, indices)``), so the trainer's samplers, per-rank sharding and exact
resume work unchanged. It pickles as file paths, so loader workers map the shards themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ._util import channel_hist, check_image_size, hist_stats
from .dataset import DataBundle

MANIFEST = "packed.json"
FORMAT, VERSION = "selfkd-packed", 1
SHARD_MB = 512  # default shard size when packing
SPLITS = ("train", "test")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _save(path: Path, a: np.ndarray) -> dict[str, Any]:
    with open(path, "wb") as f:
        np.save(f, a, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "count": int(a.shape[0]), "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DataError(f"{out}: exists and is not a folder; pack into a new or empty folder")
    if out.is_dir():
        try:
            names = sorted(os.listdir(out))
        except OSError as e:
            raise DataError(f"{out}: cannot list folder ({e.strerror or e})") from None
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise DataError(f"{out}: folder holds other files ({shown}); pack into a new or empty folder")


def pack(src: str | os.PathLike, out: str | os.PathLike, image_size: int | None = None,
         shard_images: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pack the image folder or archive ``src`` into the new folder ``out``; returns the manifest.

    ``image_size`` resizes as ``load_dataset("imagefolder", image_size=...)`` does; ``shard_images``
    is the number of images per shard (default: about ``SHARD_MB`` MiB per shard)."""
    from . import imagefolder as imf

    size = check_image_size(image_size)
    if shard_images is not None and (isinstance(shard_images, bool) or not isinstance(shard_images, int) or shard_images < 1):
        raise ConfigError(f"shard_images: expected a positive integer, got {shard_images!r}")
    src_p, out_p = Path(src).expanduser(), Path(out).expanduser()
    if not src_p.exists():
        raise DataError(f"{src_p}: does not exist; expected a folder with train/<class>/ and val/ or test/, or a tar of it")
    _check_out(out_p)
    if src_p.is_file():
        if not (imf._is_archive(src_p) or tarfile.is_tarfile(src_p)):
            raise DataError(f"{src_p}: not a folder or a tar archive ({', '.join(imf.ARCHIVE_SUFFIXES)})")
        tree = imf._read_archive(src_p)
    else:
        tree, _ = imf._scan_folder(src_p)
    classes, train, evals, split = imf._resolve(tree)
    say = log or (lambda m: None)

    first = imf._decode_chunk(([(tree.display(train[0][0]), tree.files[train[0][0]])], size))
    if first[0] == "error":
        raise DataError(f"{first[1]}: cannot decode image ({first[2]})")
    h, w = first[1][0]
    if h != w:
        raise DataError(f"{tree.display(train[0][0])}: images are {w}x{h}, not square; pass --image-size to resize them")
    shape = (3, h, w)
    per = shard_images or max(1, SHARD_MB * 2**20 // int(np.prod(shape)))

    out_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_p.parent, prefix=f".{out_p.name}.part-"))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private (0700); the pack gets a folder's usual mode
        hist = np.zeros((3, 256), dtype=np.int64)
        splits: dict[str, Any] = {}
        for name, items in (("train", train), ("test", evals)):
            shards = []
            for k, s in enumerate(range(0, len(items), per)):
                part = [(tree.display(rel), tree.files[rel]) for rel, _ in items[s : s + per]]
                imgs = imf._decode_all(part, size, f"packing {name} shard {k}")
                if imgs.shape[1:] != shape:
                    raise DataError(f"{part[0][0]}: image is {imgs.shape[3]}x{imgs.shape[2]} but "
                                    f"{tree.display(train[0][0])} is {w}x{h}; all images must share one size, "
                                    "or pass --image-size to resize them")
                if name == "train":
                    hist += channel_hist(imgs)
                shards.append(_save(tmp / f"{name}-{k:05d}.npy", imgs))
                say(f"{name}: {s + len(part)}/{len(items)} images")
                del imgs
            labels = _save(tmp / f"{name}-labels.npy", np.array([y for _, y in items], dtype=np.int64))
            splits[name] = {"count": len(items), "shards": shards, "labels": labels}
        mean, std = hist_stats(hist)
        manifest = {"format": FORMAT, "version": VERSION, "source": str(src_p.resolve()),
                    "image_size": size, "eval_split": split, "classes": classes, "image_shape": list(shape),
                    "mean": list(mean), "std": list(std), "splits": splits}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _check_out(out_p)  # still new or empty: nothing was written there meanwhile
        if out_p.is_dir():
            out_p.rmdir()
        os.replace(tmp, out_p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --- reading ---------------------------------------------------------------------------------------

def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
    except FileNotFoundError:
        raise DataError(f"{path}: missing shard; the pack is incomplete (repack with `selfkd pack`)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror or e})") from None
    except (ValueError, EOFError, SyntaxError) as e:
        raise DataError(f"{path}: truncated or not a .npy shard ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if fortran:
        raise DataError(f"{path}: foreign shard (Fortran-ordered array); not written by `selfkd pack`")
    return tuple(shape), dtype


def _check_file(root: Path, entry: dict[str, Any], shape: tuple[int, ...], dtype: Any, verify: bool) -> Path:
    path = root / entry["file"]
    got_shape, got_dtype = _header(path)
    want = (int(entry["count"]), *shape)
    if got_dtype != np.dtype(dtype) or got_shape != want:
        raise DataError(f"{path}: foreign shard: holds {got_dtype} {list(got_shape)}, this pack's {MANIFEST} "
                        f"expects {np.dtype(dtype)} {list(want)} (another data set, image size or pack)")
    n = path.stat().st_size
    if n < int(entry["bytes"]):
        raise DataError(f"{path}: truncated shard ({n} of {entry['bytes']} bytes); repack with `selfkd pack`")
    if n > int(entry["bytes"]):
        raise DataError(f"{path}: shard has {n} bytes, {MANIFEST} says {entry['bytes']}: changed after packing; repack")
    if verify and _sha256(path) != entry["sha256"]:
        raise DataError(f"{path}: checksum mismatch (sha256 differs from {MANIFEST}): the shard was edited after "
                        "packing or comes from another pack; repack with `selfkd pack`")
    return path


def _manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise DataError(f"packed data {root}: not a folder; make one with `selfkd pack SRC --out {root}`")
    path = root / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{root}: not a packed data set (no {MANIFEST}); make one with `selfkd pack SRC --out DIR`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise DataError(f"{path}: {FORMAT} version {m.get('version')!r}; this selfkd reads version {VERSION}")
    try:
        shape = tuple(int(x) for x in m["image_shape"])
        classes = [str(c) for c in m["classes"]]
        for s in SPLITS:
            sp = m["splits"][s]
            if sum(int(e["count"]) for e in sp["shards"]) != int(sp["count"]) or int(sp["labels"]["count"]) != int(sp["count"]):
                raise ValueError(f"{s}: shard counts do not add up to {sp['count']}")
            for entry in (*sp["shards"], sp["labels"]):
                if Path(entry["file"]).name != entry["file"]:
                    raise ValueError(f"file {entry['file']!r} is not a plain name")
        m["mean"], m["std"] = [float(x) for x in m["mean"]], [float(x) for x in m["std"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    if len(shape) != 3 or not classes:
        raise DataError(f"{path}: malformed manifest (image_shape {list(shape)}, {len(classes)} classes)")
    return m


class PackedDataset(Dataset):
    """Images gathered per batch from memory-mapped ``.npy`` shards; labels held in memory."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], counts: list[int], labels: Any, num_classes: int,
                 shape: tuple[int, int, int], rows: np.ndarray | None = None) -> None:
        self.paths, self.counts = [str(p) for p in paths], [int(c) for c in counts]
        self.starts = np.cumsum([0, *self.counts]).astype(np.int64)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).contiguous()
        self.num_classes = int(num_classes)
        c, h, w = (int(x) for x in shape)
        self.shape = (c, h, w)
        self.rows = rows  # global shard rows of this (sub)set; None: all, in order
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # workers map the files themselves

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.load(p, mmap_mode="r", allow_pickle=False) for p in self.paths]
        return self._maps

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shape

    def batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        n = len(self)
        a = idx.numpy()
        if a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < -n or hi >= n:
                raise IndexError(f"index {lo if lo < -n else hi} out of range for a data set of {n} samples")
            if lo < 0:
                idx = torch.where(idx < 0, idx + n, idx)
                a = idx.numpy()
        rows = a if self.rows is None else self.rows[a]
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        maps = self._open()
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            local = rows[where] - self.starts[s]
            order = np.argsort(local, kind="stable")  # ascending offsets: sequential page reads
            out[where[order]] = maps[s][local[order]]
        return torch.from_numpy(out), self.labels[idx], idx

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y, idx = self.batch([i])
        return x[0], y[0], int(idx[0])

    def subset(self, indices: Any) -> PackedDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise DataError(f"subset: indices must lie in [0, {n})")
        a = np.where(idx.numpy() < 0, idx.numpy() + n, idx.numpy())
        rows = a if self.rows is None else self.rows[a]
        return PackedDataset(self.paths, self.counts, self.labels[torch.from_numpy(a)], self.num_classes, self.shape,
                             rows.astype(np.int64))

    def with_labels(self, new_labels: Any) -> PackedDataset:
        from .dataset import _check_labels

        labels = _check_labels(new_labels, len(self), self.num_classes, "with_labels")
        return PackedDataset(self.paths, self.counts, labels, self.num_classes, self.shape, self.rows)

    def __repr__(self) -> str:
        return f"PackedDataset(n={len(self)}, shape={self.shape}, num_classes={self.num_classes}, shards={len(self.paths)})"


def load_packed(root: str | os.PathLike, image_size: int | None = None, verify: bool = True) -> DataBundle:
    """A :class:`DataBundle` of two :class:`PackedDataset` splits; every file is checked first (see the
    module docstring). ``image_size`` must be None or the packed size (packs are not resized)."""
    base = Path(root).expanduser()
    m = _manifest(base)
    c, h, w = (int(x) for x in m["image_shape"])  # three: _manifest checked
    shape = (c, h, w)
    size = check_image_size(image_size)
    if size is not None and (size, size) != shape[1:]:
        raise ConfigError(f"data.image_size={size}: {base} was packed at {shape[2]}x{shape[1]}; drop --image-size "
                          f"or repack with `selfkd pack SRC --out DIR --image-size {size}`")
    k = len(m["classes"])
    parts = {}
    for s in SPLITS:
        sp = m["splits"][s]
        paths = [_check_file(base, e, shape, np.uint8, verify) for e in sp["shards"]]
        lpath = _check_file(base, sp["labels"], (), np.int64, verify)
        labels = np.load(lpath, allow_pickle=False)
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise DataError(f"{lpath}: label out of range [0, {k}) for the {k} classes of {base / MANIFEST}")
        parts[s] = PackedDataset(paths, [e["count"] for e in sp["shards"]], torch.from_numpy(labels), k, shape)
    return DataBundle(name="packed", train=parts["train"], test=parts["test"], classes=list(m["classes"]),
                      mean=tuple(m["mean"]), std=tuple(m["std"]), default_augment={"crop_padding": 4, "flip": True})
