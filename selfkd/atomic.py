"""The one atomic writer: a file is written whole or not at all, and is on disk once the call returns."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write`` on ``.NAME.XXXXXXXX.tmp`` beside ``path`` (binary), fsync it and rename it onto ``path``.

    Readers see the old file or the complete new one. On any failure the temp file is removed and the
    error propagates unchanged (callers translate OSErrors into their own messages). A kill between
    the two steps can leave the temp file: :func:`selfkd.engine.rundir.remove_leftovers` knows its name.
    """
    path = Path(path)
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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
