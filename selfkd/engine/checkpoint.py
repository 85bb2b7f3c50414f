"""Atomic writes and safe loads: nothing is ever half-written, checkpoints load with weights_only."""
from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any

from ..atomic import atomic_write, create_new
from ..errors import SelfKDError


def _atomic(path: Path, write) -> None:
    """:func:`selfkd.atomic.atomic_write`, with a failed write's OSError as one line naming ``path``
    (see :func:`selfkd.engine.rundir.remove_leftovers` for what a kill can leave behind)."""
    try:
        atomic_write(path, write)
    except BaseException as err:
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
    """Write ``data`` to ``path``, which must not exist (:func:`selfkd.atomic.create_new`): of two writers
    one wins and the other gets a SelfKDError; nothing is ever replaced."""
    p = Path(path)
    try:
        create_new(p, lambda f: f.write(data))
    except FileExistsError:
        raise SelfKDError(f"cannot write {p}: it exists already (another process wrote it meanwhile); "
                          "nothing was replaced") from None
    except OSError as err:
        raise _write_error(p, err) from None


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_array(path: str | Path, arr: Any) -> None:
    """A numpy array as ``.npy`` (no pickles)."""
    import numpy as np

    _atomic(Path(path), lambda f: np.save(f, arr, allow_pickle=False))


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
