"""Small helpers shared by the loaders: cache location, archive member checks and per-channel statistics
(atomic writes: :mod:`selfkd.atomic`; progress bars: :mod:`selfkd.progress_bar`). Nothing here runs at
import time."""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import ConfigError, DataError


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/selfkd`` or ``~/.cache/selfkd``, read when called (never at import)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "selfkd"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory ``src`` onto ``dst`` (same file system), replacing any old ``dst``."""
    trash = None
    if dst.exists() or dst.is_symlink():
        trash = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
        os.replace(dst, trash / "old")
    os.replace(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def check_member(member: tarfile.TarInfo, archive: str) -> str:
    """The member's normalised relative POSIX name; DataError for absolute paths, ``..``, links and
    anything that is neither a regular file nor a directory."""
    name = member.name
    p = PurePosixPath(name)
    if name.startswith(("/", "\\")) or p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: refusing archive member '{name}' (absolute path)")
    if ".." in p.parts:
        raise DataError(f"{archive}: refusing archive member '{name}' (path with '..')")
    if member.issym() or member.islnk():
        raise DataError(f"{archive}: refusing archive member '{name}' (links are not allowed)")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refusing archive member '{name}' (not a regular file or folder)")
    parts = [x for x in p.parts if x not in ("", ".")]
    return "/".join(parts)


def check_tar_end(tar: tarfile.TarFile, archive: str, last: str | None) -> None:
    """After iterating every member: the archive must go on with its end-of-archive block (512 zero
    bytes) where the next header would be. tarfile stops silently at a header cut short, at a missing
    end and at garbage after a member; a tar so cut may have lost members, so each is a DataError."""
    after = f"after member {last}" if last else "before its first member"
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(512)
    if len(block) == 512 and block.count(0) == 512:
        return
    if len(block) == 512:
        raise DataError(f"{archive}: corrupt tar header at byte {tar.offset} ({after})")
    if block:
        raise DataError(f"{archive}: truncated tar (it ends inside the header {after})")
    raise DataError(f"{archive}: truncated tar (it ends {after} without the end-of-archive blocks; "
                    "members may be missing)")


def safe_extract(tar: tarfile.TarFile, dest: Path, archive: str) -> None:
    """Extract every member of ``tar`` below ``dest`` after checking each with :func:`check_member`
    (and tarfile's own ``filter="data"`` where this Python has it)."""
    members = tar.getmembers()
    for m in members:
        check_member(m, archive)
    try:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python without extraction filters; members were checked above
            tar.extractall(dest, members=members)
    except tarfile.TarError as e:  # FilterError and friends
        raise DataError(f"{archive}: refusing to extract ({type(e).__name__}: {e})") from None


def channel_hist(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per-channel counts of the 256 values of uint8 images [N, C, H, W]: int64 [C, 256], exact."""
    c = images.shape[1]
    hist = np.zeros((c, 256), dtype=np.int64)
    for s in range(0, images.shape[0], chunk):
        block = images[s : s + chunk]
        for k in range(c):
            hist[k] += np.bincount(np.ascontiguousarray(block[:, k]).reshape(-1), minlength=256)
    return hist


def hist_stats(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel, in [0, 1] units, from :func:`channel_hist` counts (summed over parts)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum(axis=1).astype(np.float64)
    mean = (hist @ v) / n
    var = (hist @ (v * v)) / n - mean * mean
    # a constant channel would make normalisation divide by zero: floor std at one grey level
    std = np.maximum(np.sqrt(np.maximum(var, 0.0)), 1.0 / 255.0)
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images [N, C, H, W], in [0, 1] units.

    Exact: per-channel histograms of the 256 values are accumulated in int64 and combined in float64,
    in chunks, so no float copy of the data set is ever made. A constant channel gets std 1/255."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"cannot compute statistics of an image array of shape {tuple(images.shape)}")
    return hist_stats(channel_hist(images, chunk))


def warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def check_image_size(image_size: object) -> int | None:
    """None, or a positive int; ConfigError otherwise."""
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ConfigError(f"image_size: expected a positive integer or None, got {image_size!r}")
    return int(image_size)


def draw_device(who: str, x: torch.Tensor, generator: torch.Generator) -> torch.device:
    """The device to draw on: ``x``'s when the generator lives there, else the CPU generator's."""
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"{who}: expected a torch.Generator, got {type(generator).__name__}")
    g, d = generator.device, x.device
    if g.type == d.type and (g.index is None or d.index is None or g.index == d.index):
        return d
    if g.type == "cpu":
        return g
    raise ConfigError(f"{who}: the generator is on {g} but the batch is on {d}; use a generator on {d} or on cpu")
