"""``run_sweep``: train a planned sweep's runs in this process (claiming each, skipping finished ones, recording failures)."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ...errors import SelfKDError
from ...engine import checkpoint as ckpt
from ...engine import rundir
from ...engine.config import save_yaml
from ...engine.rundir import CHECKPOINT, CONFIG, FAILED
from ...progress_bar import progress_bar
from .spec import RUNS, Run, SPEC, Sweep, _busy, _failure, _flag, _mark, _status, check_paths, check_root, plan


# ---------------------------------------------------------------------------------------------
# claims: one process per run
def _claim(run_dir: Path) -> bool:
    """Take the run's exclusive lock (``RUN/.lock``); False if another process holds it."""
    return rundir.try_lock(run_dir)


def _refresh(sweep: Sweep, own: Run | None) -> None:
    """Statuses from disk for the runs this process is not training (other processes may be)."""
    for r in sweep.runs:
        if r is own:
            continue
        r.status = _status(r.dir)
        if r.status != "finished" and _busy(r.dir):
            r.status = "running"
        r.error = _failure(r.dir) if r.status == "failed" else None


# ---------------------------------------------------------------------------------------------
# running
_EPOCH = re.compile(r"^epoch (\d+)/(\d+)")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _failures() -> tuple[type[BaseException], ...]:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (SelfKDError, OSError, oom) if oom is not None else (SelfKDError, OSError)


def run_sweep(path: str, *, only_plan: bool = False, progress: bool | None = None,
              log: Callable[[str], None] | None = None, out: str | None = None,
              threads: int | None = None) -> dict[str, Any]:
    """Run (or with ``only_plan`` just list) the sweep in ``path``; see the module docstring.

    ``out`` replaces the file's ``out`` (relative to the current directory). ``progress=None``: a bar
    over runs when stderr is a terminal, plain lines otherwise. Returns ``{"out", "total", "finished",
    "resumed", "skipped", "failed", "pending", "runs": {name: {"dir", "axes", "status"[, "error"]}}}``:
    ``finished`` counts runs trained from scratch now, ``resumed`` runs continued and finished now,
    ``skipped`` runs finished before, ``pending`` (with ``only_plan``) runs still to do. The CLI exits
    non-zero when ``failed`` > 0. ``elsewhere`` counts runs another process was training. ``threads``:
    torch threads for every run (default: a new run takes torch's count, a resumed one its recorded count).
    """
    sweep = plan(path, out=out)
    check_root(sweep, _flag(path, sweep, out))
    if not only_plan:
        check_paths(sweep)
        _mark(sweep.out)
    counts = {"finished": 0, "resumed": 0, "skipped": 0, "failed": 0, "elsewhere": 0, "pending": 0}
    total = len(sweep.runs)
    use_bar = sys.stderr.isatty() if progress is None else progress
    bar = None

    def say(msg: str) -> None:
        if log is not None:
            log(msg)
        elif bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    done_before = sum(r.status == "finished" for r in sweep.runs)
    if only_plan:
        return _list_plan(sweep, counts, say)
    _write_plan(sweep)
    say(f"sweep {sweep.out}: {total} run{'s' if total != 1 else ''}, {done_before} already finished, "
        f"{sum(r.status == 'unfinished' for r in sweep.runs)} to resume")
    if use_bar:
        bar = progress_bar(total, "sweep", unit="run", enabled=True, initial=done_before, leave=True)
    current: Run | None = None
    try:
        for k, r in enumerate(sweep.runs, start=1):
            if r.status == "finished":
                counts["skipped"] += 1
                continue
            if not _claim(r.dir):
                counts["elsewhere"] += 1
                say(f"[{k}/{total}] {r.name}: running in another process")
                if bar is not None:
                    bar.update(1)
                continue
            current = r
            try:
                _train_one(sweep, r, k, counts, bar, say, threads)
            finally:
                rundir.unlock(r.dir)
            current = None
    except KeyboardInterrupt:
        _refresh(sweep, current)
        if current is not None and current.status == "running":
            current.status = "interrupted"
        ckpt.write_json(sweep.out / RUNS, sweep.table())
        if bar is not None:
            bar.close()
            bar = None
        say(f"sweep {sweep.out}: interrupted; run it again to resume")
        raise
    finally:
        if bar is not None:
            bar.close()
            bar = None
    say(f"sweep {sweep.out}: {counts['finished']} finished, {counts['resumed']} resumed, "
        f"{counts['skipped']} skipped, {counts['failed']} failed"
        + (f", {counts['elsewhere']} running in another process" if counts["elsewhere"] else ""))
    return _result(sweep, counts)


def _list_plan(sweep: Sweep, counts: dict[str, int], say: Callable[[str], None]) -> dict[str, Any]:
    """``--plan``: every run and its status; nothing is written."""
    total = len(sweep.runs)
    done_before = sum(r.status == "finished" for r in sweep.runs)
    counts["skipped"] = done_before
    counts["pending"] = total - done_before
    say(f"sweep {sweep.out}: {total} run{'s' if total != 1 else ''} ({done_before} finished, "
        f"{sum(r.status == 'unfinished' for r in sweep.runs)} to resume)")
    for r in sweep.runs:
        say(f"  {r.name}  [{r.status}{': ' + r.error if r.error else ''}]")
    return _result(sweep, counts)


def _write_plan(sweep: Sweep) -> None:
    """The resolved spec, every run's config (so a report lists runs not started yet) and runs.json."""
    spec_path = sweep.out / SPEC
    if spec_path.resolve() == sweep.path.resolve():  # never overwrite the sweep file itself
        spec_path = sweep.out / "sweep.resolved.yaml"
    ckpt.write_text(spec_path, yaml.safe_dump(sweep.spec(), sort_keys=False))
    for r in sweep.runs:
        if not (r.dir / CONFIG).exists():
            ckpt.write_text(r.dir / CONFIG, save_yaml(r.cfg))
    ckpt.write_json(sweep.out / RUNS, sweep.table())


def _train_one(sweep: Sweep, r: Run, k: int, counts: dict[str, int], bar: Any, say: Callable[[str], None],
               threads: int | None = None) -> None:
    """Train (or resume) one run whose claim this process holds; record its status."""
    from ...engine.stages import train_run

    tag = f"[{k}/{len(sweep.runs)}] {r.name}"
    if _status(r.dir) == "finished":  # another process finished it after this one planned
        r.status = "finished"
        counts["skipped"] += 1
        if bar is not None:
            bar.update(1)
        return
    resume = (r.dir / CHECKPOINT).exists()
    (r.dir / FAILED).unlink(missing_ok=True)
    _refresh(sweep, r)
    r.status, r.error = "running", None
    ckpt.write_json(sweep.out / RUNS, sweep.table())
    if bar is not None:
        bar.set_postfix_str(f"{r.name}{' (resuming)' if resume else ''}")
    else:
        say(f"{tag}: {'resuming' if resume else 'starting'}")

    def collect(msg: str) -> None:
        m = _EPOCH.match(msg)
        if m and bar is not None:
            bar.set_postfix_str(f"{r.name} epoch {m.group(1)}/{m.group(2)}")

    t0 = time.perf_counter()
    try:
        # resume=True: the folder holds the config.yaml this sweep wrote; a checkpoint, if any, is continued
        summary = train_run(r.cfg, r.dir, resume=True, progress=False, log=collect, threads=threads)
    except _failures() as err:
        r.status, r.error = "failed", _one_line(err)
        ckpt.write_json(r.dir / FAILED, {"error": r.error, "seconds": time.perf_counter() - t0})
        counts["failed"] += 1
        say(f"{tag}: FAILED: {r.error}")
    else:
        r.status = "finished"
        counts["resumed" if resume else "finished"] += 1
        say(f"{tag}: last acc {summary['last_acc']:.2f} | best acc {summary['best_acc']:.2f} | "
            f"{time.perf_counter() - t0:.1f}s")
    if bar is not None:
        bar.update(1)
    _refresh(sweep, r)
    ckpt.write_json(sweep.out / RUNS, sweep.table())


def _result(sweep: Sweep, counts: dict[str, int]) -> dict[str, Any]:
    return {"out": str(sweep.out), "total": len(sweep.runs), **counts, "runs": sweep.table()["runs"]}
