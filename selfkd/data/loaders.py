"""``load_dataset``: one entry point for every data set the trainer knows."""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ._util import channel_stats, check_image_size, default_cache_dir
from .dataset import ArrayDataset, DataBundle, resize_uint8
from .split import sklearn_split, stratified_subset

KNOWN_DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "packed")

DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0


def load_digits() -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to 0..255 and rounded).

    The split is fixed: ``train_test_split(test_size=0.25, stratify=y, random_state=0)`` over the
    sample indices, giving 1347 training and 450 test images in that function's (shuffled) order.
    The CSV is read from scikit-learn's folder and the split computed by :func:`sklearn_split`, without
    importing scikit-learn.
    """
    spec = importlib.util.find_spec("sklearn")  # a top-level package: found, not imported
    roots = spec.submodule_search_locations if spec else None
    path = Path(roots[0]) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if path is None or not path.is_file():
        raise DataError("digits: scikit-learn's digits.csv.gz was not found (pip install scikit-learn)")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    x = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    y = table[:, -1].astype(np.int64)
    tr, te = sklearn_split(y, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
    mean, std = channel_stats(x[tr])
    return DataBundle(
        name="digits",
        train=ArrayDataset(torch.from_numpy(np.ascontiguousarray(x[tr])), torch.from_numpy(y[tr]), 10),
        test=ArrayDataset(torch.from_numpy(np.ascontiguousarray(x[te])), torch.from_numpy(y[te]), 10),
        classes=[str(i) for i in range(10)], mean=mean, std=std,
        default_augment={"crop_padding": 1, "flip": False},
    )


def _resized(bundle: DataBundle, size: int | None) -> DataBundle:
    """Array data sets at another square size (bilinear, antialiased); statistics recomputed."""
    if size is None or size == bundle.image_size:
        return bundle
    src_train, src_test = bundle.train, bundle.test
    assert isinstance(src_train, ArrayDataset) and isinstance(src_test, ArrayDataset)  # digits and CIFAR load as arrays
    k = src_train.num_classes
    train = ArrayDataset(resize_uint8(src_train.images, size), src_train.labels, k)
    test = ArrayDataset(resize_uint8(src_test.images, size), src_test.labels, k)
    mean, std = channel_stats(train.images.numpy())
    return DataBundle(bundle.name, train, test, bundle.classes, mean, std, dict(bundle.default_augment))


STREAM_ABOVE_MB = 4096.0


def _readable(path: Path, what: str) -> None:
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        raise DataError(f"{what} {path}: cannot read it (permission denied)") from None
    except OSError as err:
        raise DataError(f"{what} {path}: cannot read it ({err.strerror or err})") from None


def check_root(name: str, root: str | os.PathLike | None, download: bool = False) -> None:
    """Cheap checks of where a data set would be read from (exists, readable), without loading it:
    the sweep runs them once per distinct root before any run starts. Raises DataError/ConfigError."""
    key = name.strip().lower() if isinstance(name, str) else None
    if key in ("cifar10", "cifar100"):
        from .cifar import LAYOUTS

        data_root = Path(root).expanduser() if root is not None else default_cache_dir() / "datasets"
        if data_root.exists():
            _readable(data_root, f"{key}: data folder")
        elif not download:
            raise DataError(f"{key}: data folder {data_root} does not exist; expected {LAYOUTS[key].folder}/ under "
                            "it (pass --download / download=True to fetch it)")
    elif key == "imagefolder":
        if root is None:
            raise ConfigError("imagefolder needs a root (--data-dir): a folder with train/ and val/ or test/, "
                              "or a .tar.gz of it")
        p = Path(root).expanduser()
        if not p.exists():
            raise DataError(f"imagefolder root {p} does not exist; expected a folder with train/<class>/ and "
                            "val/ or test/, or a .tar.gz of it")
        _readable(p, "imagefolder root")
    elif key == "packed":
        if root is None:
            raise ConfigError("packed needs data.dir (--data-dir): a folder written by `selfkd pack`")
        p = Path(root).expanduser()
        if not p.is_dir():
            raise DataError(f"packed data {p}: no such folder; make one with `selfkd pack SRC --out {p}`")
        _readable(p, "packed data")


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = False,
                 image_size: int | None = None, cache_dir: str | os.PathLike | None = None,
                 stream: bool | str = False, stream_above_mb: float = STREAM_ABOVE_MB, subset: int | None = None,
                 test_subset: int | None = None, subset_seed: int = 0) -> DataBundle:
    """Load a data set by name into memory.

    - ``digits``: scikit-learn's 8x8 digits, bundled (``root``, ``download`` and ``cache_dir`` unused).
    - ``cifar10`` / ``cifar100``: the python-pickle layout under ``root`` (default
      ``<cache dir>/datasets``); ``download=True`` fetches it first when missing.
    - ``imagefolder``: ``root`` is a folder (or tar archive) with ``train/`` and ``val/`` or ``test/``;
      decoded images are cached in ``cache_dir`` (default ``$XDG_CACHE_HOME/selfkd``).
    - ``packed``: ``root`` is a folder written by :func:`selfkd.data.packed.pack` (``selfkd pack``),
      memory-mapped, checked (sizes, headers, sha256) on load; ``image_size`` must be None or its size.

    ``image_size`` resizes to a square of that side (bilinear, antialiased); ``None`` keeps the
    native size. Unknown names and bad option values raise ConfigError, bad data DataError.

    ``stream`` (imagefolder only): ``True`` reads images from disk per batch
    (:mod:`selfkd.data.stream`, folder trees or uncompressed .tar shards) instead of decoding them
    all into memory; ``"auto"`` streams a folder whose files exceed ``stream_above_mb`` MiB.

    ``subset`` / ``test_subset`` keep fixed class-stratified draws of ``n`` training / test samples
    (:func:`selfkd.data.split.stratified_subset`, seeded by ``subset_seed``), in index order. The
    statistics stay those of the whole training set, bit for bit, for every data set; in-memory
    ``imagefolder`` with ``subset`` keeps only the drawn images' pixels (:mod:`.imagefolder`).
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in KNOWN_DATASETS:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(KNOWN_DATASETS)}")
    for k, v in (("subset", subset), ("test_subset", test_subset)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ConfigError(f"data.{k}: expected a positive integer or None, got {v!r}")
    if subset is None and test_subset is None and subset_seed != 0:
        raise ConfigError("data.subset_seed has no effect without data.subset or data.test_subset")
    draws = {"subset": subset, "test_subset": test_subset, "subset_seed": subset_seed}
    bundle, drawn = _load(key, root, download, image_size, cache_dir, stream, stream_above_mb, draws)
    if drawn:
        return bundle
    train, test = bundle.train, bundle.test
    if subset is not None:
        train = train.subset(stratified_subset(train.labels, subset, subset_seed))
    if test_subset is not None:
        test = test.subset(stratified_subset(test.labels, test_subset, subset_seed, "data.test_subset", "test"))
    return dataclasses.replace(bundle, train=train, test=test)


def _load(key: str, root: str | os.PathLike | None, download: bool, image_size: int | None,
          cache_dir: str | os.PathLike | None, stream: bool | str, stream_above_mb: float,
          draws: dict[str, Any]) -> tuple[DataBundle, bool]:
    """The bundle, and whether the subset draws are applied already (in-memory imagefolder decodes only them)."""
    size = check_image_size(image_size)
    if stream is True and key != "imagefolder":
        raise ConfigError(f"data.stream=true: only imagefolder data can be streamed (got data.name={key}, which fits in memory)")
    check_root(key, root, download)
    if key == "digits":
        return _resized(load_digits(), size), False
    if key in ("cifar10", "cifar100"):
        from .cifar import download_cifar, load_cifar

        data_root = Path(root).expanduser() if root is not None else default_cache_dir() / "datasets"
        if download:
            download_cifar(key, data_root)
        return _resized(load_cifar(key, data_root), size), False
    if key == "packed":
        if download:
            raise ConfigError("download: only cifar10 and cifar100 can be downloaded; packed data is read from data.dir")
        from .packed import load_packed

        assert root is not None  # check_root: packed needs data.dir
        return load_packed(root, image_size=size), False
    if download:
        raise ConfigError("download: only cifar10 and cifar100 can be downloaded; imagefolder reads a local folder or archive")
    if stream not in (True, False, "auto"):
        raise ConfigError(f"data.stream: expected true, false or auto (got {stream!r})")
    if stream == "auto" and root is not None and Path(root).expanduser().is_dir():
        from .stream import tree_bytes

        stream = tree_bytes(Path(root).expanduser()) > stream_above_mb * 2**20
    if stream is True:
        if root is None:
            raise ConfigError("data.stream: needs data.dir (--data-dir), a folder with train/ and val/ or test/")
        from .stream import load_stream

        return load_stream(root, image_size=size), False
    from .imagefolder import load_imagefolder

    return load_imagefolder(root, image_size=size, cache_dir=cache_dir, **draws), True
