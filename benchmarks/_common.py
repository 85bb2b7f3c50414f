"""What the benchmark scripts share: the command line they record and the median (min–max) cells."""
from __future__ import annotations

import shlex
import statistics
import sys
from pathlib import Path


def command(script: str, argv: list[str] | None) -> str:
    """The command that made a results file, as one would type it from the repository root."""
    args = argv if argv is not None else sys.argv[1:]
    return f"python benchmarks/{Path(script).name} {' '.join(shlex.quote(x) for x in args)}".strip()


def median_range(vals: list[float], fmt: str = "{:.0f}") -> str:
    """``median (min–max)``; just the value when there is one."""
    text = fmt.format(statistics.median(vals))
    return text if len(vals) == 1 else f"{text} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"
