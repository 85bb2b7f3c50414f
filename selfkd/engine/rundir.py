"""Run-directory safety: one writer per run (``flock``), only new or empty folders become runs, the
folder is checked writable before any data is loaded, and a resume removes the temp files a killed
atomic write left behind (its own naming pattern only).

Every check raises :class:`~selfkd.errors.SelfKDError` with one line naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import SelfKDError

LOCK = ".lock"
# The files of a run directory; every layer above the engine names them through these constants.
CHECKPOINT = "checkpoint.pt"  # everything needed to continue: model, optimiser, scheduler, RNGs, method state
BEST = "best.pt"  # weights of the best scored epoch
CONFIG = "config.yaml"  # the resolved config
METRICS = "metrics.jsonl"  # one object per epoch
METRICS_CSV = "metrics.csv"
SUMMARY = "summary.json"  # written once the run has finished
TEST_CORRECT = "test_correct.npy"  # per test image (bool, test-set order): the final weights' top-1 correctness
LABEL_NOISE = "label_noise.json"
DATA_INFO = "data.json"  # class names and preprocessing, for `selfkd export`
FAILED = "failed.json"  # a sweep's record of a run that failed
# Files written atomically (:func:`selfkd.atomic.atomic_write`): only temp files of these names are ever removed.
RUN_FILES = (CHECKPOINT, BEST, CONFIG, METRICS, METRICS_CSV, DATA_INFO, SUMMARY, TEST_CORRECT, LABEL_NOISE, FAILED)
# ``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")``: 8 characters from [a-z0-9_]
_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")

_held: dict[Path, list[int]] = {}  # resolved run dir -> [fd, depth]: re-entrant within one process


class RunBusy(SelfKDError):
    """Another process holds the run directory's lock."""


def _key(path: Path) -> Path:
    return Path(os.path.abspath(path))


def try_lock(run_dir: str | Path) -> bool:
    """Take the exclusive lock on ``RUN/.lock`` (creating the folder); False if another process holds it.

    Re-entrant within a process: a sweep holds its run's lock while the trainer takes it again. Release
    with :func:`unlock` as many times as it was taken. The OS drops the lock when the process dies.
    """
    run = _key(Path(run_dir))
    if run in _held:
        _held[run][1] += 1
        return True
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): one process per run, unchecked
        _held[run] = [-1, 1]
        return True
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise SelfKDError(f"{run}: cannot create its lock file ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _held[run] = [fd, 1]
    return True


def unlock(run_dir: str | Path) -> None:
    run = _key(Path(run_dir))
    entry = _held.get(run)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[run]
        if entry[0] >= 0:
            os.close(entry[0])  # closing drops the flock; the file stays (unlinking it would race)


def held(run_dir: str | Path) -> bool:
    return _key(Path(run_dir)) in _held


def depth(run_dir: str | Path) -> int:
    """How many times this process holds the run's lock now (0: not held)."""
    entry = _held.get(_key(Path(run_dir)))
    return entry[1] if entry else 0


@contextlib.contextmanager
def locked(run_dir: str | Path) -> Iterator[None]:
    """Hold the run's lock for the block, or raise :class:`RunBusy` naming the folder."""
    if not try_lock(run_dir):
        raise RunBusy(f"{run_dir}: another selfkd process is writing this run directory (it holds {LOCK}); "
                      "wait for it or choose another directory")
    try:
        yield
    finally:
        unlock(run_dir)


def busy(run_dir: str | Path) -> bool:
    """Whether another process holds the run's lock now (never creates the folder)."""
    run = Path(run_dir)
    if held(run) or not (run / LOCK).exists():
        return False
    if not try_lock(run):
        return True
    unlock(run)
    return False


def foreign_entries(run_dir: Path) -> list[str]:
    """What a folder holds besides a lock file: a run may only start in a new or empty folder."""
    try:
        return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise SelfKDError(f"{run_dir}: cannot list it ({err.strerror or err})") from None


def check_new(run_dir: Path, flag: str = "--out") -> None:
    """``run_dir`` must be missing or an empty folder: a non-empty one is never written into."""
    if run_dir.exists() and not run_dir.is_dir():
        raise SelfKDError(f"{flag} {run_dir}: is a file, not a folder")
    found = foreign_entries(run_dir) if run_dir.is_dir() else []
    if not found:
        return
    if CONFIG in found or CHECKPOINT in found:
        raise SelfKDError(f"{flag} {run_dir}: already holds a run; use --resume {run_dir} or choose another directory")
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise SelfKDError(f"{flag} {run_dir}: folder is not empty ({shown}); a run starts only in a new or empty folder")


def check_no_dangling(path: Path, flag: str = "--out", shown: str | Path | None = None) -> None:
    """``path``, or the missing folder it would be created in, must not be a dangling symbolic link:
    writing there would replace the link (or fail half-way)."""
    anc = Path(os.path.abspath(path))
    while not anc.exists():
        if anc.is_symlink():
            raise SelfKDError(f"{flag} {shown if shown is not None else path}: {anc} is a dangling symbolic link "
                              f"(to {os.readlink(anc)}); remove it or choose another path")
        if anc == anc.parent:
            return
        anc = anc.parent


def check_writable(path: Path, flag: str = "--out") -> None:
    """Fail now, before any data is loaded, if ``path`` (existing or to be created) cannot be written:
    a regular file on the way, no permission, or a read-only file system. An existing folder is judged by
    ``os.access`` (nothing written in it); otherwise a temporary folder is created and removed in the
    deepest existing ancestor, so root's permissions are judged as the kernel judges them."""
    p = Path(os.path.abspath(path))
    check_no_dangling(p, flag, path)
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise SelfKDError(f"{flag} {path}: {anc} is a file, not a folder")
    try:
        if os.statvfs(anc).f_flag & os.ST_RDONLY:
            raise SelfKDError(f"{flag} {path}: {anc} is on a read-only file system")
    except (AttributeError, OSError):  # pragma: no cover - no statvfs: the probe below decides
        pass
    if anc == p:  # an existing folder: ask the kernel without writing, so a refused run changes nothing in it
        if not os.access(anc, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            raise SelfKDError(f"{flag} {path}: cannot write in {anc} (permission denied)")
        return
    try:
        probe = tempfile.mkdtemp(prefix=".selfkd-probe-", dir=anc)
    except OSError as err:
        why = "read-only file system" if err.errno == errno.EROFS else (err.strerror or str(err)).lower()
        raise SelfKDError(f"{flag} {path}: cannot write in {anc} ({why})") from None
    os.rmdir(probe)


def free_bytes(path: Path) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(path: Path, err: OSError) -> SelfKDError:
    """One line for ENOSPC/EDQUOT: the path and the space left on its file system."""
    free = free_bytes(Path(path).parent)
    left = f"{free / 2**20:.1f} MiB free there" if free is not None else "free space unknown"
    what = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on device"
    return SelfKDError(f"cannot write {path}: {what} ({left}); the previous version of the file is intact")


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete the temp files of interrupted atomic writes in ``run_dir``: ``.NAME.XXXXXXXX.tmp`` for the
    run's own file names only (never anything else). Returns the names removed."""
    gone: list[str] = []
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return gone
    for p in entries:
        m = _TMP.match(p.name)
        if m and m.group("name") in RUN_FILES and p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                gone.append(p.name)
    return sorted(gone)
