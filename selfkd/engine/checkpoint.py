"""Atomic writes and safe loads: nothing is ever half-written, checkpoints load with weights_only."""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ..errors import SelfKDError


def _atomic(path: Path, write) -> None:
    """Write through ``.NAME.XXXXXXXX.tmp`` beside ``path`` and rename it into place (see
    :func:`selfkd.engine.rundir.remove_leftovers` for what a kill can leave behind)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes 0600 files; give results the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_cause(err)  # torch.save wraps a full disk in a RuntimeError of its zip writer
        if cause is not None:
            raise _write_error(path, cause) from None
        raise


def _os_cause(err: BaseException | None) -> OSError | None:
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _write_error(path: Path, err: OSError) -> SelfKDError:
    from .rundir import disk_full

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(path, err)
    why = "read-only file system" if err.errno == errno.EROFS else (err.strerror or str(err))
    return SelfKDError(f"cannot write {path}: {why}")


def write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def write_new(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path``, which must not exist: written in full under a temp name, then
    hard-linked into place, which fails if anything (a file, a link) took the name meanwhile, so of
    two writers one wins and the other gets a SelfKDError. File systems without hard links:
    ``O_EXCL`` creation, then the bytes."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as err:
        raise _write_error(p, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            os.link(tmp, p)
        except FileExistsError:
            raise SelfKDError(f"cannot write {p}: it exists already (another process wrote it meanwhile); "
                              "nothing was replaced") from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise _write_error(p, err) from None
            try:
                out = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                raise SelfKDError(f"cannot write {p}: it exists already (another process wrote it meanwhile); "
                                  "nothing was replaced") from None
            with os.fdopen(out, "wb") as f:
                f.write(data)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save(path: str | Path, obj: dict[str, Any]) -> None:
    import torch

    _atomic(Path(path), lambda f: torch.save(obj, f))


_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code on load); every failure is one line."""
    import torch

    p = Path(path)
    try:
        if p.is_file() and p.stat().st_size == 0:
            raise SelfKDError(f"checkpoint {p}: empty file (0 bytes); it was never written completely")
        state = torch.load(p, map_location="cpu", weights_only=True)
    except SelfKDError:
        raise
    except FileNotFoundError:
        raise SelfKDError(f"checkpoint {p}: not found") from None
    except PermissionError:
        raise SelfKDError(f"checkpoint {p}: cannot read it (permission denied)") from None
    except Exception as err:  # corrupt file or disallowed global
        text = str(err)
        m = _GLOBAL.search(text)
        if m:
            raise SelfKDError(f"checkpoint {p}: refused to load global '{m.group(1)}' (weights_only=True admits "
                              "only tensors and plain containers)") from None
        inner = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        first = inner.group(1) if inner else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        first = first[:120]
        raise SelfKDError(f"checkpoint {p}: not a readable checkpoint ({type(err).__name__}"
                          f"{': ' + first if first else ''})") from None
    if not isinstance(state, dict):
        raise SelfKDError(f"checkpoint {p}: expected a dict of state, got {type(state).__name__}")
    return state
