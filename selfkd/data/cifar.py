"""CIFAR-10 / CIFAR-100 in the standard python-pickle layout, and their download.

Layouts read (``root`` may also point directly at the inner folder)::

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}          (fine labels, ``fine_label_names``)

The pickles were written by Python 2. They are read with a restricted unpickler that admits only the
globals a numpy array needs, so a tampered file cannot run code. Files re-written by Python 3 at
protocol 2 spell bytes as ``_codecs.encode(text, "latin1")`` and ``b""`` as ``bytes()``: both are
admitted through checked stand-ins that build bytes from a string and do nothing else.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..progress_bar import progress_bar
from ._util import channel_stats, replace_dir, safe_extract
from .dataset import ArrayDataset, DataBundle

# Canonical sources (Krizhevsky's page). Tests point download_cifar at a loopback server instead.
SOURCES: dict[str, dict[str, str]] = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "filename": "cifar-10-python.tar.gz",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "filename": "cifar-100-python.tar.gz",
    },
}


@dataclass(frozen=True)
class _Layout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


LAYOUTS = {
    "cifar10": _Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                       "batches.meta", "labels", "label_names", 10),
    "cifar100": _Layout("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names", 100),
}

_PIXELS = 3 * 32 * 32


def _layout(name: str) -> _Layout:
    if name not in LAYOUTS:
        raise ConfigError(f"unknown CIFAR data set {name!r}; expected one of: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


# --- restricted unpickling ------------------------------------------------------------------------

def _np_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as _reconstruct_1x
        return _reconstruct_1x
    return _reconstruct


def _latin1_bytes(text: Any = None, encoding: Any = None, *rest: Any) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it: a str and 'latin1' -> bytes; nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1") or rest:
        raise pickle.UnpicklingError("_codecs.encode is admitted only as encode(str, 'latin1')")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as protocol 2 writes ``b""``; any argument (``bytes(10**12)``) is refused."""
    if args:
        raise pickle.UnpicklingError("bytes is admitted only without arguments")
    return b""


_ALLOWED = {
    ("_codecs", "encode"): lambda: _latin1_bytes,
    ("__builtin__", "bytes"): lambda: _empty_bytes,
    ("builtins", "bytes"): lambda: _empty_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers (dict, list, tuple, str, bytes, numbers) and numpy arrays; any other
    global raises DataError naming the file and the refused global. ``encoding="bytes"`` because the
    files come from Python 2 (their ``str`` keys load as ``bytes``)."""

    def __init__(self, file: Any, display: str) -> None:
        super().__init__(file, encoding="bytes")
        self._display = display

    def find_class(self, module: str, name: str) -> Any:
        get = _ALLOWED.get((module, name))
        if get is None:
            raise DataError(f"{self._display}: refused to unpickle '{module}.{name}' "
                            "(only plain containers and numpy arrays are allowed)")
        return get()

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._display}: refused to unpickle a persistent id "
                        "(only plain containers and numpy arrays are allowed)")


def load_pickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; every failure is a one-line DataError."""
    display = str(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, display).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{display}: file not found") from None
    except OSError as e:
        raise DataError(f"{display}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, ValueError, ...
        raise DataError(f"{display}: not a valid CIFAR pickle ({type(e).__name__}: {e})".replace("\n", " ")) from None


def _get(d: dict, key: str, display: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    found = ", ".join(sorted(repr(k.decode() if isinstance(k, bytes) else k) for k in d)[:8])
    raise DataError(f"{display}: missing key '{key}' (found: {found or 'nothing'})")


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            return x.decode("latin-1")
    return str(x)


# --- loading --------------------------------------------------------------------------------------

def find_folder(name: str, root: str | os.PathLike) -> Path:
    """The folder holding the pickles: ``root/<folder>`` or ``root`` itself when it is that folder."""
    lay = _layout(name)
    root = Path(root).expanduser()
    inner = root / lay.folder
    if inner.is_dir():
        return inner
    if root.name == lay.folder or (root / lay.meta).is_file():
        return root
    return inner


def _missing_message(name: str, root: Path, folder: Path, file: str) -> str:
    lay = _layout(name)
    if not root.exists():
        return (f"{name}: data folder {root} does not exist; expected {lay.folder}/{file} under it "
                "(pass --download / download=True to fetch it)")
    where = f"{lay.folder}/{file} under {root}" if folder != root else f"{file} in {root}"
    return f"{name}: expected {where}; pass --download / download=True to fetch it"


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle(path)
    display = str(path)
    if not isinstance(d, dict):
        raise DataError(f"{display}: expected a pickled dict, got {type(d).__name__}")
    data = _get(d, "data", display)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{display}: 'data' is a {got}; expected a uint8 array of shape (N, {_PIXELS})")
    labels = _get(d, label_key, display)
    try:
        lab = np.asarray(labels)
    except Exception:  # pragma: no cover - defensive
        lab = np.asarray([], dtype=object)
    if lab.ndim != 1 or lab.shape[0] != data.shape[0] or not np.issubdtype(lab.dtype, np.integer):
        raise DataError(f"{display}: '{label_key}' should be {data.shape[0]} integers (one per row of 'data'), "
                        f"got {lab.dtype} of shape {lab.shape}")
    lab = lab.astype(np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        bad = int(lab.min()) if lab.min() < 0 else int(lab.max())
        raise DataError(f"{display}: label {bad} in '{label_key}' is out of range [0, {num_classes})")
    return data, lab


def _read_split(folder: Path, files: tuple[str, ...], lay: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_batch(folder / f, lay.label_key, lay.num_classes) for f in files]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    # rows are the R, G and B planes of a 32x32 image, each row-major
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
    return images, torch.from_numpy(labels)


def load_cifar(name: str, root: str | os.PathLike) -> DataBundle:
    """Load CIFAR-10 or CIFAR-100 (fine labels) from the pickle layout under ``root``."""
    lay = _layout(name)
    root_p = Path(root).expanduser()
    folder = find_folder(name, root_p)
    for f in lay.files:
        if not (folder / f).is_file():
            raise DataError(_missing_message(name, root_p, folder, f))
    meta = load_pickle(folder / lay.meta)
    if not isinstance(meta, dict):
        raise DataError(f"{folder / lay.meta}: expected a pickled dict, got {type(meta).__name__}")
    names = _get(meta, lay.names_key, str(folder / lay.meta))
    if not isinstance(names, (list, tuple)) or len(names) != lay.num_classes:
        got = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataError(f"{folder / lay.meta}: '{lay.names_key}' should list {lay.num_classes} class names, got {got}")
    classes = [_text(x) for x in names]
    tr_x, tr_y = _read_split(folder, lay.train, lay)
    te_x, te_y = _read_split(folder, lay.test, lay)
    mean, std = channel_stats(tr_x.numpy())
    return DataBundle(
        name=name,
        train=ArrayDataset(tr_x, tr_y, lay.num_classes),
        test=ArrayDataset(te_x, te_y, lay.num_classes),
        classes=classes, mean=mean, std=std,
        default_augment={"crop_padding": 4, "flip": True},
    )


# --- download -------------------------------------------------------------------------------------

def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _complete(folder: Path, lay: _Layout) -> bool:
    return folder.is_dir() and all((folder / f).is_file() and (folder / f).stat().st_size > 0 for f in lay.files)


def _fetch(url: str, dest: Path, timeout: float) -> str:
    """Stream ``url`` into ``dest`` (already created), returning the md5 of what was written."""
    import urllib.error
    import urllib.request

    h = hashlib.md5(usedforsecurity=False)
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - https or a test's loopback
    except urllib.error.HTTPError as e:
        raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except Exception as e:  # URLError, timeouts, refused connections, malformed URLs, ...
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {url}: {reason}".replace("\n", " ")) from None
    with resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = progress_bar(total, os.path.basename(url), unit="B", unit_scale=True)
        got = 0
        try:
            with open(dest, "wb") as out:
                while True:
                    try:
                        block = resp.read(1 << 20)
                    except Exception as e:  # connection reset, timeout, IncompleteRead, ...
                        raise DataError(f"cannot download {url}: {type(e).__name__}: {e}".replace("\n", " ")) from None
                    if not block:
                        break
                    try:
                        out.write(block)
                    except OSError as e:
                        raise DataError(f"cannot write {dest}: {e.strerror or e}") from None
                    h.update(block)
                    got += len(block)
                    bar.update(len(block))
        finally:
            bar.close()
    if total is not None and got != total:
        raise DataError(f"cannot download {url}: connection closed after {got} of {total} bytes")
    return h.hexdigest()


def download_cifar(name: str, root: str | os.PathLike, url: str | None = None, md5: str | None = None,
                   timeout: float = 60.0) -> Path:
    """Make sure ``root/<folder>`` holds the CIFAR pickles; return that folder.

    Nothing happens if the files are already there. An archive already at ``root/<filename>`` with the
    right md5 is used instead of downloading. Otherwise the archive is fetched with urllib into a
    temporary file in ``root``, its md5 checked (mismatch: DataError with both checksums, the file
    removed), unpacked with member checks into a temporary folder in ``root`` and renamed into place;
    the temporary archive is then removed. ``url``/``md5`` override :data:`SOURCES` (tests).
    """
    lay = _layout(name)
    src = SOURCES[name]
    url = url or src["url"]
    md5 = (md5 or src["md5"]).lower()
    root_p = Path(root).expanduser()
    final = root_p / lay.folder
    if _complete(final, lay):
        return final
    try:
        root_p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data folder {root_p}: {e.strerror or e}") from None

    local = root_p / src["filename"]
    tmp_archive: Path | None = None
    workdir: Path | None = None
    try:
        if local.is_file() and _md5_file(local) == md5:
            archive = local
        else:
            fd, tmp = tempfile.mkstemp(dir=root_p, prefix=f".{src['filename']}.", suffix=".part")
            os.close(fd)
            tmp_archive = archive = Path(tmp)
            got = _fetch(url, tmp_archive, timeout)
            if got != md5:
                raise DataError(f"{url}: checksum mismatch: expected md5 {md5}, got {got} (download removed)")
        workdir = Path(tempfile.mkdtemp(dir=root_p, prefix=f".{lay.folder}.extract-"))
        try:
            with tarfile.open(archive, "r:*") as tar:
                safe_extract(tar, workdir, url if archive is tmp_archive else str(archive))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{url}: cannot unpack the archive ({type(e).__name__}: {e})") from None
        extracted = workdir / lay.folder
        if not _complete(extracted, lay):
            missing = [f for f in lay.files if not (extracted / f).is_file()]
            raise DataError(f"{url}: the archive lacks {lay.folder}/{missing[0] if missing else ''}; "
                            "expected the standard python-pickle layout")
        replace_dir(extracted, final)
    finally:
        if tmp_archive is not None:
            tmp_archive.unlink(missing_ok=True)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return final
