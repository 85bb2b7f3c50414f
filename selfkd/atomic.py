"""The one atomic writer: a file is written whole or not at all, and is on disk once the call returns."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Callable

Writer = Callable[[IO[bytes]], object]
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)


def _staged(path: Path, write: Writer) -> Path:
    """``write`` into ``.NAME.XXXXXXXX.tmp`` beside ``path`` (binary), fsynced, with the usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes 0600 files; give results the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write: Writer) -> None:
    """Call ``write`` on a temp file beside ``path``, fsync it and rename it onto ``path``.

    Readers see the old file or the complete new one. On any failure the temp file is removed and the
    error propagates unchanged (callers translate OSErrors into their own messages). A kill between
    the two steps can leave the temp file: :func:`selfkd.engine.rundir.remove_leftovers` knows its name.
    """
    path = Path(path)
    tmp = _staged(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_new(path: str | os.PathLike, write: Writer) -> None:
    """As :func:`atomic_write`, but ``path`` must not exist: the complete temp file is hard-linked into
    place, which raises FileExistsError if anything (a file, a link) took the name meanwhile, so of two
    writers one wins. File systems without hard links: ``O_EXCL`` creation, then the bytes again."""
    path = Path(path)
    tmp = _staged(path, write)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as err:
            if err.errno not in _NO_LINKS:
                raise
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
                write(f)
    finally:
        tmp.unlink(missing_ok=True)
