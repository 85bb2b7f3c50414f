"""The one progress bar: tqdm on stderr when stderr is a terminal, otherwise an object that does nothing."""
from __future__ import annotations

import sys
from typing import Any


def stderr_is_tty() -> bool:
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class NoBar:
    """What :func:`progress_bar` returns when no bar is shown."""

    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(msg: str, file: Any = None) -> None:
        print(msg, file=file or sys.stderr, flush=True)


def progress_bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool | None = None,
                 unit_scale: bool = False, initial: int = 0, leave: bool = False) -> Any:
    """A tqdm bar on stderr; ``enabled=None``: only when stderr is a terminal (checked now)."""
    if not (stderr_is_tty() if enabled is None else enabled):
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but never required
        return NoBar()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, leave=leave,
                dynamic_ncols=True, file=sys.stderr)
