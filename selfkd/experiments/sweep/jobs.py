"""``run_jobs``: one sweep in several processes that share its runs."""
from __future__ import annotations

import multiprocessing
import os
import queue
import sys
from typing import Any, Callable

from ...errors import ConfigError, SelfKDError
from .runner import _result, run_sweep
from .spec import _flag, check_paths, check_root, plan


# ---------------------------------------------------------------------------------------------
# several processes
def _job(k: int, path: str, out: str | None, threads: int, lines: Any, explicit: int | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        result = run_sweep(path, progress=False, out=out, log=lambda m: lines.put(("line", k, m)), threads=explicit)
    except KeyboardInterrupt:
        lines.put(("line", k, "interrupted"))
        return
    except SelfKDError as err:
        lines.put(("error", k, str(err)))
        return
    lines.put(("done", k, {key: result[key] for key in ("finished", "resumed", "failed")}))


def run_jobs(path: str, jobs: int, *, threads: int | None = None, out: str | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the sweep in ``jobs`` processes sharing its runs (one claim per run, see the module docstring),
    each with ``threads`` torch threads (default: the cores divided among the jobs). Their lines come
    back prefixed ``[job k]``. Returns :func:`run_sweep`'s dict, counts summed over the jobs, statuses
    read back from disk; a job that hit a configuration error counts as one failure."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: expected a positive number of processes")
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    sweep = plan(path, out=out)  # every error a user can fix surfaces before a process starts
    check_root(sweep, _flag(path, sweep, out))
    check_paths(sweep)
    before = sum(r.status == "finished" for r in sweep.runs)
    explicit = threads
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    say(f"sweep {sweep.out}: {len(sweep.runs)} runs, {before} already finished; {jobs} jobs x {threads} thread"
        f"{'s' if threads != 1 else ''}")
    ctx = multiprocessing.get_context("spawn")  # no forked torch state; works wherever the CLI does
    lines = ctx.Queue()
    # not daemonic: a job may start processes of its own (the image decoder's pool)
    procs = [ctx.Process(target=_job, args=(k, path, out, threads, lines, explicit)) for k in range(1, jobs + 1)]
    counts = {"finished": 0, "resumed": 0, "skipped": before, "failed": 0, "elsewhere": 0, "pending": 0}
    answered: set[int] = set()
    try:
        for p in procs:
            p.start()
        live = len(procs)
        while live:
            try:
                kind, k, body = lines.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # a job died without a word (killed): what it left is on disk
                continue
            if kind == "line":
                say(f"[job {k}] {body}")
                continue
            answered.add(k)
            live -= 1
            if kind == "error":
                say(f"[job {k}] error: {body}")
                counts["failed"] += 1
            else:
                for key, n in body.items():
                    counts[key] += n
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    for k, p in enumerate(procs, start=1):
        if k not in answered:  # crashed or killed: its traceback went to stderr; its run resumes next time
            say(f"[job {k}] died (exit code {p.exitcode})")
            counts["failed"] += 1
    final = plan(path, out=out)
    done = sum(r.status == "finished" for r in final.runs)
    say(f"sweep {final.out}: {done} of {len(final.runs)} runs finished; this time {counts['finished']} trained, "
        f"{counts['resumed']} resumed, {counts['failed']} failed")
    return _result(final, counts)
