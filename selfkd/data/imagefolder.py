"""Image-folder data sets (ImageFolder / TinyImageNet layouts), from a folder or a tar archive.

Layouts read (``root`` may also hold exactly one folder that holds them)::

    root/train/<class>/**/*.{jpg,jpeg,png,bmp}           classes: sorted folder names of train/
    root/val/<class>/**/*   or   root/test/<class>/**/*    (val/ is used when both exist)
    root/val/images/*.JPEG + root/val/val_annotations.txt  (TinyImageNet's own val layout)

Nested folders below a class folder are searched too, which covers TinyImageNet's
``train/<wnid>/images/*.JPEG``. Files and folders whose name starts with ``.`` (and ``__MACOSX``) are
skipped; other non-image files are ignored.

``root`` may be a ``.tar.gz``/``.tgz``/``.tar``/``.tar.bz2``/``.tar.xz`` archive of that layout. The
archive is read as a stream and its images decoded from memory: nothing is extracted to disk (on
these machines writing 60,000 small files takes 10-40 s, longer than decoding them). Members with
absolute paths, ``..`` or links are refused all the same.

Decoded images are cached as an ``.npz`` in ``cache_dir`` (default ``$XDG_CACHE_HOME/selfkd`` or
``~/.cache/selfkd``), keyed by a hash of (resolved path, file count, total size, newest mtime,
image_size): a second load reads one file. Beyond ``PARALLEL_THRESHOLD`` files, decoding uses a pool
of ``min(usable CPUs, 8)`` processes. Decoding prints one line on stderr when it is done (how many
images, how long, which cache file), with a progress bar while it runs when stderr is a terminal.

With ``subset=N`` only the images the run uses are kept: the class-stratified draw of
:func:`selfkd.data.split.stratified_subset` (the same indices as ``train.subset(...)`` of the whole
set) and the test split (or its ``test_subset`` draw). They are read from the whole-set cache when
that exists, else decoded and cached per split and draw, in files named after the whole-set cache
(``...-train-subset500-seed0.npz``, ``...-test.npz``, ``...-test-subset200-seed0.npz``), so the draws
of a sweep share one decoded test split.

``mean``/``std`` are always the whole training set's, bit for bit the values a load without
``subset`` gives (the convention of torchvision and the DLB code, and what every earlier run used):
from the whole-set cache when it exists, else from ``...-stats.json`` beside the caches. That file is
made by the first subset load: every training image is decoded once (RGB JPEGs by the "jpeg" decoder
without ``Image.open``'s Python header parser, as :mod:`selfkd.data.stream` does: the same pixels)
into an array that is dropped afterwards, and ``channel_stats``'s exact per-channel histograms of it
are written, with the mean/std they give, a sha256 of the contents and the name of the cache it
belongs to (atomically). Later loads, other draws and seeds included, decode only their draw. A
statistics file that is damaged, edited, made for another cache or that disagrees with the training
images is recomputed and overwritten with a warning naming it, as a damaged cache is re-decoded.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tarfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import ConfigError, DataError
from ..progress_bar import progress_bar
from ._util import (channel_hist, channel_stats, check_image_size, check_member, check_tar_end, hist_stats,
                    resolve_cache_dir, warn)
from .dataset import ArrayDataset, DataBundle
from .split import stratified_subset
from .stream import _jpeg_rgb

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ANNOTATIONS = "val_annotations.txt"
CACHE_VERSION = 1
STATS_FORMAT = "selfkd-imagefolder-stats"  # the "format" of a statistics file (see _load_stats), version 1
PARALLEL_THRESHOLD = 2000
NOTICE_S = 1.0  # a decode that took longer says so on stderr; a shorter one is not worth a line (nor in front of an error)
MIN_CHUNK, MAX_CHUNK = 64, 1000  # images per task sent to a decoding process
MAX_WORKERS = 8


def _skip(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class _Tree:
    """Relative POSIX paths of a folder tree or an archive, and where each file's bytes come from."""

    def __init__(self, label: str, archive: bool) -> None:
        self.label = label
        self.archive = archive
        self.files: dict[str, Any] = {}  # rel -> absolute path (folder) or bytes (archive) or None
        self._subdirs: dict[str, set[str]] = {"": set()}
        self._files_in: dict[str, list[str]] = {}

    def add_dir(self, rel: str) -> None:
        parent = ""
        for part in rel.split("/") if rel else []:
            cur = f"{parent}/{part}" if parent else part
            self._subdirs.setdefault(parent, set()).add(part)
            self._subdirs.setdefault(cur, set())
            parent = cur

    def add_file(self, rel: str, src: Any) -> None:
        d, _, name = rel.rpartition("/")
        self.add_dir(d)
        if rel not in self.files:  # a tar may hold a name twice (appended): the last copy wins
            self._files_in.setdefault(d, []).append(name)
        self.files[rel] = src

    def subdirs(self, rel: str) -> list[str]:
        return sorted(self._subdirs.get(rel, ()))

    def is_dir(self, rel: str) -> bool:
        return rel in self._subdirs

    def images_under(self, rel: str) -> list[str]:
        """Image files below folder ``rel`` (any depth), sorted."""
        out: list[str] = []
        stack = [rel]
        while stack:
            d = stack.pop()
            out.extend(f"{d}/{n}" for n in self._files_in.get(d, ()) if _is_image(n))
            stack.extend(f"{d}/{s}" for s in self._subdirs.get(d, ()))
        return sorted(out)

    def display(self, rel: str) -> str:
        return f"{self.label}:{rel}" if self.archive else str(Path(self.label) / rel)

    def read_text(self, rel: str) -> str:
        src = self.files[rel]
        try:
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
        except OSError as e:
            raise DataError(f"{self.display(rel)}: cannot read ({e.strerror or e})") from None
        return data.decode("utf-8", errors="replace")


# --- listing ---------------------------------------------------------------------------------------

def _scan_folder(root: Path) -> tuple[_Tree, list[Any]]:
    """List train/, val/ and test/ below the layout's base folder; return the tree and a fingerprint."""
    base = root
    if not (root / "train").is_dir():
        try:
            kids = sorted(p for p in root.iterdir() if not _skip(p.name) and (p / "train").is_dir())
        except OSError as e:
            raise DataError(f"{root}: cannot list folder ({e.strerror or e})") from None
        if len(kids) != 1:
            several = f"; several folders hold a train/: {', '.join(k.name for k in kids)}" if kids else ""
            raise DataError(f"{root}: expected train/<class>/<images> and val/ or test/ in it (ImageFolder layout){several}")
        base = kids[0]
    tree = _Tree(str(base), archive=False)
    count = total = 0
    newest = 0
    seen: set[tuple[int, int]] = set()
    stack = [(split, base / split) for split in ("test", "val", "train") if (base / split).is_dir()]
    while stack:
        rel, path = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:  # a symlink loop
                continue
            seen.add((st.st_dev, st.st_ino))
            newest = max(newest, st.st_mtime_ns)
            tree.add_dir(rel)
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"{path}: cannot list folder ({e.strerror or e})") from None
        for entry in entries:
            if _skip(entry.name):
                continue
            r = f"{rel}/{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append((r, Path(entry.path)))
                elif entry.is_file(follow_symlinks=True):
                    fst = entry.stat(follow_symlinks=True)
                    count += 1
                    total += fst.st_size
                    newest = max(newest, fst.st_mtime_ns)
                    tree.add_file(r, entry.path)
            except OSError as err:
                raise DataError(f"{entry.path}: cannot read ({err.strerror or err})") from None
    return tree, [str(base.resolve()), count, total, newest]


def _read_archive(path: Path) -> _Tree:
    """Read the members of a tar archive into memory (images and annotation files only)."""
    label = str(path)
    tree = _Tree(label, archive=True)
    try:
        with tarfile.open(path, "r:*") as tar:
            last = None
            for m in tar:
                rel = check_member(m, label)
                last = m.name
                if not rel or any(_skip(p) for p in rel.split("/")):
                    continue
                if m.isdir():
                    tree.add_dir(rel)
                    continue
                name = rel.rpartition("/")[2]
                if _is_image(name) or name == ANNOTATIONS:
                    f = tar.extractfile(m)
                    tree.add_file(rel, f.read() if f is not None else b"")
                else:
                    tree.add_file(rel, None)
            check_tar_end(tar, label, last)  # cut short at a member boundary: members would be missing
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{label}: cannot read archive ({type(e).__name__}: {e})".replace("\n", " ")) from None
    return tree


# --- layout ----------------------------------------------------------------------------------------

def _resolve(tree: _Tree) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]], str]:
    """classes, train (rel, label), eval (rel, label), eval split name."""
    base = ""
    if "train" not in tree.subdirs(""):
        cands = [d for d in tree.subdirs("") if "train" in tree.subdirs(d)]
        if len(cands) != 1:
            raise DataError(f"{tree.label}: expected train/<class>/<images> and val/ or test/ in it (ImageFolder layout)")
        base = cands[0]

    def j(*parts: str) -> str:
        return "/".join(p for p in (base, *parts) if p)

    classes = tree.subdirs(j("train"))
    if not classes:
        raise DataError(f"{tree.display(j('train'))}: no class folders; expected train/<class>/<image files>")
    index = {c: i for i, c in enumerate(classes)}
    train: list[tuple[str, int]] = []
    for c in classes:
        imgs = tree.images_under(j("train", c))
        if not imgs:
            raise DataError(f"{tree.display(j('train', c))}: class folder has no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        train.extend((p, index[c]) for p in imgs)

    subs = tree.subdirs(base)
    split = "val" if "val" in subs else "test" if "test" in subs else None
    if split is None:
        raise DataError(f"{tree.display(base) if base else tree.label}: no val/ or test/ folder next to train/; "
                        "expected val/<class>/<images> or test/<class>/<images>")
    ann = j(split, ANNOTATIONS)
    if ann in tree.files:
        evals = _tiny_val(tree, ann, j(split, "images"), split, index)
    else:
        evals = []
        ecls = tree.subdirs(j(split))
        if not ecls:
            raise DataError(f"{tree.display(j(split))}: no class folders; expected {split}/<class>/<image files>")
        for c in ecls:
            if c not in index:
                shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
                raise DataError(f"{tree.display(j(split, c))}: class '{c}' is not one of the {len(classes)} "
                                f"classes of train/ ({shown})")
            imgs = tree.images_under(j(split, c))
            if not imgs:
                raise DataError(f"{tree.display(j(split, c))}: class folder has no images")
            evals.extend((p, index[c]) for p in imgs)
    return classes, train, evals, split


def _tiny_val(tree: _Tree, ann: str, images_dir: str, split: str, index: dict[str, int]) -> list[tuple[str, int]]:
    """TinyImageNet's val layout: images/*.JPEG labelled by val_annotations.txt (name, wnid, box)."""
    images = set(tree.images_under(images_dir))
    out: list[tuple[str, int]] = []
    listed: set[str] = set()
    for lineno, line in enumerate(tree.read_text(ann).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            raise DataError(f"{tree.display(ann)}: line {lineno}: expected '<file>\\t<class>[\\t<box>]', "
                            f"got {line.strip()[:60]!r}")
        name, wnid = parts[0].strip(), parts[1].strip()
        rel = f"{images_dir}/{name}"
        if wnid not in index:
            raise DataError(f"{tree.display(ann)}: line {lineno}: class '{wnid}' is not a class of train/")
        if rel not in images:
            raise DataError(f"{tree.display(ann)}: line {lineno}: no image {split}/images/{name}")
        if rel not in listed:
            listed.add(rel)
            out.append((rel, index[wnid]))
    unlisted = sorted(images - listed)
    if unlisted:
        raise DataError(f"{tree.display(unlisted[0])}: image not listed in {split}/{ANNOTATIONS}")
    if not out:
        raise DataError(f"{tree.display(ann)}: lists no images")
    return sorted(out, key=lambda t: (t[1], t[0]))


# --- decoding --------------------------------------------------------------------------------------

def _decode_one(src: Any, size: int | None) -> np.ndarray:
    """uint8 [H, W, 3] of one image (path or bytes), resized to ``size`` x ``size`` when given."""
    from PIL import Image

    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        rgb = im.convert("RGB")
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)  # Pillow's bilinear antialiases
    return np.asarray(rgb, dtype=np.uint8)


def _decode_fast(src: Any, size: int | None) -> np.ndarray:
    """The pixels of :func:`_decode_one`, without ``Image.open``'s Python header parser for an RGB 8-bit
    JPEG that needs no resizing: the "jpeg" decoder it would run, with the same arguments (as
    :mod:`selfkd.data.stream` decodes); anything else, or a file that fails, by :func:`_decode_one`."""
    data = src if isinstance(src, bytes) else Path(src).read_bytes()
    fast = _jpeg_rgb(data, size)
    return fast if fast is not None else _decode_one(data, size)


def _decode_chunk(task: tuple) -> tuple:
    """Worker: decode (display, path-or-bytes) items to RGB; the task is (items, size) or (items, size,
    fast), fast to decode by :func:`_decode_fast`. ("ok", sizes, [n,3,H,W] or None when the sizes
    differ) or ("error", display, message) for the first file that fails."""
    items, size = task[:2]
    fast = len(task) > 2 and task[2]
    arrays: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    for display, src in items:
        try:
            a = _decode_fast(src, size) if fast else _decode_one(src, size)
        except Exception as e:  # UnidentifiedImageError, truncated files, decompression bombs, ...
            return ("error", display, f"{type(e).__name__}: {e}".replace("\n", " "))
        arrays.append(a)
        sizes.append((a.shape[0], a.shape[1]))
    if len(set(sizes)) == 1:
        return ("ok", sizes, np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))
    return ("ok", sizes, None)


def _worker_count() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def _mp_context() -> Any:
    # fork is fast and safe here: the workers only use PIL and numpy, never torch or threads.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _decode_all(items: list[tuple[str, Any]], image_size: int | None, desc: str, done: str | None = None,
                fast: bool = False) -> np.ndarray:
    """[n, 3, H, W] of ``items`` in order; then ``done`` (formatted with the seconds taken), if any, on stderr.
    ``fast``: decode by :func:`_decode_fast` (the same pixels)."""
    n = len(items)
    t0 = time.perf_counter()
    workers = _worker_count() if n > PARALLEL_THRESHOLD else 1
    chunk = max(MIN_CHUNK, min(MAX_CHUNK, math.ceil(n / (workers * 4))))
    tasks = [(items[s : s + chunk], image_size, fast) for s in range(0, n, chunk)]
    bar = progress_bar(n, desc, unit="img")
    out: np.ndarray | None = None
    ref: tuple[int, int] | None = None
    pos = 0

    def take(res: tuple) -> None:
        nonlocal out, ref, pos
        if res[0] == "error":
            raise DataError(f"{res[1]}: cannot decode image ({res[2]})")
        _, sizes, arr = res
        if ref is None:
            ref = sizes[0]
            out = np.empty((n, 3, *ref), dtype=np.uint8)
        for k, s in enumerate(sizes):
            if s != ref:
                raise DataError(f"{items[pos + k][0]}: image is {s[1]}x{s[0]} but {items[0][0]} is {ref[1]}x{ref[0]}; "
                                "all images must share one size, or pass image_size (--image-size) to resize them")
        assert out is not None  # made with ref, above
        out[pos : pos + len(sizes)] = arr
        pos += len(sizes)
        bar.update(len(sizes))

    try:
        if workers == 1:
            for t in tasks:
                take(_decode_chunk(t))
        else:
            with warnings.catch_warnings():  # Python >= 3.12 warns about fork() in threaded processes
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                ex = concurrent.futures.ProcessPoolExecutor(workers, mp_context=_mp_context())
                try:
                    for res in ex.map(_decode_chunk, tasks):
                        take(res)
                except concurrent.futures.process.BrokenProcessPool as e:
                    raise DataError(f"{desc}: an image-decoding worker process died ({e})") from None
                finally:
                    ex.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    assert out is not None
    took = time.perf_counter() - t0
    if done is not None and took >= NOTICE_S:
        print(done.format(seconds=took), file=sys.stderr, flush=True)
    return out


# --- cache -----------------------------------------------------------------------------------------

_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classes", "mean", "std", "split")


def _cache_path(cache_dir: Path, name: str, fingerprint: list[Any], image_size: int | None) -> Path:
    key = hashlib.sha256(json.dumps([CACHE_VERSION, *fingerprint, image_size]).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40] or "data"
    return cache_dir / f"imagefolder-{slug}-{key}.npz"


def _load_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in _CACHE_KEYS}
        for s in ("train", "test"):
            im, lab = d[f"{s}_images"], d[f"{s}_labels"]
            if im.dtype != np.uint8 or im.ndim != 4 or lab.dtype != np.int64 or lab.shape != (im.shape[0],):
                raise ValueError(f"bad {s} arrays")
        return d
    except Exception as e:  # a damaged or foreign file: decode again and overwrite it
        warn(f"ignoring unreadable cache {path} ({type(e).__name__}: {e})")
        return None


def _save_cache(path: Path, d: dict[str, np.ndarray]) -> None:
    try:
        # numpy's stub types **kwds like its allow_pickle: bool; d holds arrays only
        atomic_write(path, lambda f: np.savez(f, **d))  # type: ignore[arg-type]
    except OSError as e:
        warn(f"could not write the decoded-image cache {path} ({e.strerror or e}); the next load decodes again")


# --- entry point -----------------------------------------------------------------------------------

def _is_archive(p: Path) -> bool:
    return p.name.lower().endswith(ARCHIVE_SUFFIXES)


def _part_path(cpath: Path, split: str, n: int | None, seed: int) -> Path:
    """The cache file of one split's draw, named after the whole-set cache ``cpath``."""
    tag = split if n is None else f"{split}-subset{n}-seed{seed}"
    return cpath.with_name(f"{cpath.name[:-len('.npz')]}-{tag}.npz")


def _load_part(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in ("images", "labels", "classes", "split")}
        im, lab = d["images"], d["labels"]
        if im.dtype != np.uint8 or im.ndim != 4 or lab.dtype != np.int64 or lab.shape != (im.shape[0],):
            raise ValueError("bad arrays")
        return d
    except Exception as e:  # a damaged or foreign file: decode again and overwrite it
        warn(f"ignoring unreadable cache {path} ({type(e).__name__}: {e})")
        return None


def _stats_path(cpath: Path) -> Path:
    """The statistics file of the whole-set cache ``cpath``: the whole training set's mean/std."""
    return cpath.with_name(f"{cpath.name[:-len('.npz')]}-stats.json")


def _stats_payload(cpath: Path, hist: np.ndarray, shape: tuple[int, ...]) -> dict[str, Any]:
    """What a statistics file holds (``sha256`` aside): the exact per-channel histograms of the training
    images and the mean/std :func:`hist_stats` makes of them (``channel_stats``'s own two steps)."""
    mean, std = hist_stats(hist)
    return {"format": STATS_FORMAT, "version": 1, "cache": cpath.name, "train_images": int(shape[0]),
            "image_shape": [int(x) for x in shape[1:]], "hist": hist.tolist(), "mean": list(mean), "std": list(std)}


def _digest(payload: dict[str, Any]) -> str:
    body = {k: v for k, v in payload.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _load_stats(path: Path, cpath: Path, shape: tuple[int, ...] | None = None,
                n_train: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from the statistics file ``path`` of the whole-set cache ``cpath``, or None when it is
    missing, damaged, edited (its digest), made for another cache, or disagrees with the training
    images' ``shape`` [C, H, W] or count: such a file is recomputed and overwritten, with a warning, as
    the caches are (the numbers are always those of the training images, never a stale file's)."""
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or d.get("format") != STATS_FORMAT or d.get("version") != 1:
            raise ValueError(f"not a version-1 {STATS_FORMAT} file")
        if d.get("cache") != cpath.name:
            raise ValueError(f"made for {d.get('cache')!r}, not {cpath.name}")
        if d.get("sha256") != _digest(d):
            raise ValueError("its sha256 does not match its contents (edited?)")
        hist = np.array(d["hist"], dtype=np.int64)
        n, chw = d["train_images"], d["image_shape"]
        if hist.shape != (3, 256) or (hist < 0).any() or not (isinstance(n, int) and n >= 1) \
                or not (isinstance(chw, list) and len(chw) == 3 and chw[0] == 3):
            raise ValueError("bad histogram, image count or image shape")
        if shape is not None and chw != list(shape):
            raise ValueError(f"images of shape {chw}, but the cached training images are {list(shape)}")
        if n_train is not None and n != n_train:
            raise ValueError(f"{n} training images, but the data set has {n_train}")
        if (hist.sum(axis=1) != n * chw[1] * chw[2]).any():
            raise ValueError("the histograms do not count every pixel")
        if d != {**_stats_payload(cpath, hist, (n, *chw)), "sha256": d["sha256"]}:
            raise ValueError("its mean/std are not those of its histograms")
        return tuple(d["mean"]), tuple(d["std"])
    except Exception as e:
        warn(f"ignoring statistics file {path} ({type(e).__name__}: {e}); recomputing it from the training images")
        return None


def _save_stats(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps({**payload, "sha256": _digest(payload)}, sort_keys=True) + "\n"
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:
        warn(f"could not write the statistics file {path} ({e.strerror or e}); the next load decodes the training set again")


def _square(images: np.ndarray, first: str) -> None:
    h, w = images.shape[2:]
    if h != w:
        raise DataError(f"{first}: images are {w}x{h}, not square; pass image_size (--image-size) to resize them")


def _bundle(classes: list[str], train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            mean: Any, std: Any) -> DataBundle:
    k = len(classes)
    return DataBundle(
        name="imagefolder",
        train=ArrayDataset(torch.from_numpy(train[0]), torch.from_numpy(train[1]), k),
        test=ArrayDataset(torch.from_numpy(test[0]), torch.from_numpy(test[1]), k),
        classes=classes,
        mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std),
        default_augment={"crop_padding": 4, "flip": True},
    )


def _draw(labels: np.ndarray, n: int | None, seed: int, split: str) -> np.ndarray:
    """Indices of a split's draw (all of them when ``n`` is None), as ``stratified_subset`` gives them."""
    if n is None:
        return np.arange(len(labels))
    key, name = ("data.subset", "training") if split == "train" else ("data.test_subset", "test")
    return stratified_subset(torch.from_numpy(labels), n, seed, key, name).numpy()


def load_imagefolder(root: str | os.PathLike | None, image_size: int | None = None,
                     cache_dir: str | os.PathLike | None = None, subset: int | None = None,
                     test_subset: int | None = None, subset_seed: int = 0) -> DataBundle:
    """Load an image-folder data set (a folder or a tar archive). See the module docstring.

    ``subset`` / ``test_subset`` / ``subset_seed``: the bundle holds only those class-stratified draws
    (:func:`selfkd.data.split.stratified_subset`); with ``subset`` only their pixels are decoded and kept,
    and ``mean``/``std`` stay the whole training set's (see the module docstring)."""
    if root is None:
        raise ConfigError("imagefolder needs a root (--data-dir): a folder with train/ and val/ or test/, or a .tar.gz of it")
    image_size = check_image_size(image_size)
    root_p = Path(root).expanduser()
    if not root_p.exists():
        raise DataError(f"imagefolder root {root_p} does not exist; expected a folder with train/<class>/ and "
                        "val/ or test/, or a .tar.gz of it")
    cdir = resolve_cache_dir(cache_dir)

    tree: _Tree | None = None
    if root_p.is_file():
        if not (_is_archive(root_p) or tarfile.is_tarfile(root_p)):
            raise DataError(f"{root_p}: not a folder or a tar archive ({', '.join(ARCHIVE_SUFFIXES)})")
        st = root_p.stat()
        fingerprint: list[Any] = [str(root_p.resolve()), 1, st.st_size, st.st_mtime_ns]
    else:
        tree, fingerprint = _scan_folder(root_p)
    cpath = _cache_path(cdir, root_p.name, fingerprint, image_size)
    if subset is not None and not cpath.is_file():
        return _load_draws(root_p, tree, cpath, image_size, subset, test_subset, subset_seed)
    d = _load_cache(cpath)
    if d is None:
        if tree is None:
            tree = _read_archive(root_p)
        classes, train, evals, split = _resolve(tree)
        items = [(tree.display(rel), tree.files[rel]) for rel, _ in (*train, *evals)]
        images = _decode_all(items, image_size, f"decoding {root_p.name}",
                             f"imagefolder: decoded the {len(items):,} images of {root_p.name} in {{seconds:.1f}} s "
                             f"(the next load reads them from {cpath})")
        _square(images, items[0][0])
        ntr = len(train)
        mean, std = channel_stats(images[:ntr])
        d = {
            "train_images": images[:ntr], "train_labels": np.array([y for _, y in train], dtype=np.int64),
            "test_images": images[ntr:], "test_labels": np.array([y for _, y in evals], dtype=np.int64),
            "classes": np.array(classes, dtype=str), "mean": np.array(mean), "std": np.array(std),
            "split": np.array(split),
        }
        _save_cache(cpath, d)
    classes = [str(c) for c in d["classes"].tolist()]
    if subset is None and test_subset is None:
        return _bundle(classes, (d["train_images"], d["train_labels"]), (d["test_images"], d["test_labels"]),
                       d["mean"], d["std"])
    tr = _draw(d["train_labels"], subset, subset_seed, "train")
    te = _draw(d["test_labels"], test_subset, subset_seed, "test")
    train_x = np.ascontiguousarray(d["train_images"][tr])
    return _bundle(classes, (train_x, d["train_labels"][tr]),
                   (np.ascontiguousarray(d["test_images"][te]), d["test_labels"][te]), d["mean"], d["std"])


def _load_draws(root_p: Path, tree: _Tree | None, cpath: Path, image_size: int | None, subset: int,
                test_subset: int | None, seed: int) -> DataBundle:
    """The training draw and the test split (or its draw) from their own cache files, decoding only the
    images of the parts that are not cached yet (no whole-set cache exists), normalised with the whole
    training set's mean/std: from the statistics file, else computed once from all training images
    (decoded by :func:`_decode_fast` into an array that is dropped afterwards; none of them is cached)."""
    start = time.perf_counter()
    want = {"train": subset, "test": test_subset}
    paths = {s: _part_path(cpath, s, n, seed) for s, n in want.items()}
    parts = {s: _load_part(p) for s, p in paths.items()}
    missing = [s for s in want if parts[s] is None]
    listing = None
    said = ""
    if missing:
        if tree is None:
            tree = _read_archive(root_p)
        listing = classes, train, evals, split = _resolve(tree)
        listed = {"train": train, "test": evals}
        chosen = {}
        for s in missing:
            labels = np.array([y for _, y in listed[s]], dtype=np.int64)
            idx = _draw(labels, want[s], seed, s)
            chosen[s] = ([listed[s][i] for i in idx.tolist()], labels[idx])
        items = [(tree.display(rel), tree.files[rel]) for s in missing for rel, _ in chosen[s][0]]
        total = len(train) + len(evals)
        what = " and ".join(
            (f"data.subset={subset} of the {len(train):,} training images" if s == "train" else
             f"the {len(evals):,} test images" if test_subset is None else
             f"data.test_subset={test_subset} of the {len(evals):,} test images") for s in missing)
        t0 = time.perf_counter()
        images = _decode_all(items, image_size, f"decoding {root_p.name}")
        _square(images, items[0][0])
        said = (f"{len(items):,} of the {total:,} images of {root_p.name} ({what}) in "
                f"{time.perf_counter() - t0:.1f} s (cached in {paths[missing[0]].parent})")
        pos = 0
        for s in missing:
            n = len(chosen[s][1])
            part = {"images": images[pos : pos + n], "labels": chosen[s][1],
                    "classes": np.array(classes, dtype=str), "split": np.array(split)}
            parts[s] = part
            pos += n
            _save_cache(paths[s], part)
    tr, te = parts["train"], parts["test"]
    assert tr is not None and te is not None
    classes = [str(c) for c in tr["classes"].tolist()]
    if classes != [str(c) for c in te["classes"].tolist()] or tr["images"].shape[1:] != te["images"].shape[1:]:
        raise DataError(f"{paths['train']} and {paths['test']}: cached parts of {root_p} disagree (classes or image "
                        "size); delete them to decode again")
    spath = _stats_path(cpath)
    stats = _load_stats(spath, cpath, tr["images"].shape[1:], None if listing is None else len(listing[1]))
    if stats is None:
        if listing is None:
            if tree is None:
                tree = _read_archive(root_p)
            listing = _resolve(tree)
        assert tree is not None  # read whenever listing is
        t0 = time.perf_counter()
        items = [(tree.display(rel), tree.files[rel]) for rel, _ in listing[1]]
        every = _decode_all(items, image_size, f"statistics of {root_p.name}", fast=True)
        if every.shape[1:] != tr["images"].shape[1:]:
            raise DataError(f"{paths['train']}: cached images of {root_p} are not the size of its training images "
                            "now; delete it to decode again")
        hist = channel_hist(every)  # channel_stats(every) is hist_stats(channel_hist(every)): the same floats
        payload = _stats_payload(cpath, hist, every.shape)
        del every
        _save_stats(spath, payload)
        stats = tuple(payload["mean"]), tuple(payload["std"])
        why = (f"once for the whole training set's mean/std in {time.perf_counter() - t0:.1f} s "
               f"(only the statistics are kept: {spath.name})")
        said = (f"{said}, and all {len(items):,} training images {why}" if said else
                f"the {len(items):,} training images of {root_p.name} {why}; the drawn images are from their cache")
    elif said:
        said += f"; mean/std: the whole training set's, from {spath.name}"
    if said and time.perf_counter() - start >= NOTICE_S:
        print(f"imagefolder: decoded {said}", file=sys.stderr, flush=True)
    return _bundle(classes, (tr["images"], tr["labels"]), (te["images"], te["labels"]), *stats)
