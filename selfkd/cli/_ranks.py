"""A rank of ``selfkd train --nproc N`` or ``torchrun`` that dies: one line that says which rank, how, what the
run directory holds and the ``--resume`` command, instead of the survivors' gloo tracebacks.

Who says it, once: a rank whose own code raised says it itself, before it leaves (and records it in the
rendezvous store, :func:`selfkd.distributed.record_failure`); a rank killed by a signal cannot, so the
``--nproc`` launcher says it from the exit status, and under torchrun the lowest surviving rank, from the
dead rank's process on this machine. The survivors, whose collectives fail because a peer is gone, print
nothing else and exit with :data:`EXIT_PEER`.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

EXIT_PEER = 3  # this rank stopped because another one failed
NPROC_ENV = "SELFKD_NPROC"  # set by the --nproc launcher: it reports signal deaths itself
NO_ERROR = "no error from it: killed by a signal, e.g. SIGKILL or out of memory"


def _run_of(a: Any) -> Path | None:
    run = getattr(a, "resume", None) or getattr(a, "out", None)
    return Path(run) if run else None


def _epoch(path: Path) -> str:
    import torch

    try:  # mmap: the model's tensors are not read
        return f" (epoch {int(torch.load(path, map_location='cpu', weights_only=True, mmap=True)['epoch'])})"
    except Exception:
        return ""


def _resume(run: Path, world: int) -> str:
    cmd = f"selfkd train --resume {shlex.quote(str(run))}"
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # the --nproc launcher, or ranks started by hand
        return f"{cmd} --nproc {world}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    if local == world:
        return f"torchrun --nproc_per_node={world} -m {cmd}"
    return f"torchrun --nnodes={world // local} --nproc_per_node={local} (and this run's rendezvous options) -m {cmd}"


def line(a: Any, who: str, world: int) -> str:
    """``selfkd: WHO; RUN holds the last checkpoint (epoch N); resume: COMMAND``."""
    run = _run_of(a)
    if run is None:
        return f"selfkd: {who}"
    if (run / "checkpoint.pt").is_file():
        where = f"{run} holds the last checkpoint{_epoch(run / 'checkpoint.pt')}"
    elif (run / "teacher" / "checkpoint.pt").is_file():
        where = f"{run} holds the CE teacher's last checkpoint{_epoch(run / 'teacher' / 'checkpoint.pt')}"
    elif (run / "config.yaml").is_file():
        where = f"{run} has no checkpoint yet (the resume starts at epoch 1)"
    else:
        return f"selfkd: {who}; nothing was written to {run} yet: run the same command again"
    return f"selfkd: {who}; {where}; resume: {_resume(run, world)}"


def say(text: str) -> None:
    """``text`` on stderr in one write: torchrun's agent logs into the same pipe at the same moment."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (text + "\n").encode(errors="backslashreplace"))


def failure_text(err: BaseException) -> str:
    """``err`` in one line: a selfkd error's message, else ``Type: first line``."""
    from ..errors import SelfKDError

    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= 300 else text[:297] + "..."  # torch's messages can run to kilobytes
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, SelfKDError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def record(err: BaseException) -> None:
    """Before this rank's sockets close: what it failed with, for the peers that see them close."""
    from .. import distributed
    from ..errors import SelfKDError

    group = distributed.joined()
    if group is None:
        return
    if distributed.peer_lost(err):
        distributed.record_lost()
        if not os.environ.get(NPROC_ENV):  # torchrun stops the survivors as soon as it sees a rank end: the line first
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    quiet = isinstance(err, SelfKDError) and group[0] != 0  # main() prints rank 0's only: a peer says this one
    distributed.record_failure(failure_text(err), reported=not quiet)


def rank_failure(a: Any, err: Exception) -> int | None:
    """The exit status after one line (or none) for ``err`` in a rank of several; None: not such a rank."""
    if "torch" not in sys.modules:
        return None
    from .. import distributed

    group = distributed.joined()
    if group is None:
        return None
    me, world = group
    if not distributed.peer_lost(err):  # this rank's own failure (a bug, a resource): it says so itself
        say(line(a, f"rank {me} failed ({failure_text(err)}; --debug shows the traceback)", world))
        return 1
    launcher = bool(os.environ.get(NPROC_ENV))
    dead: dict[int, str] = {}
    try:
        records = distributed.failures()
        if not records and not launcher:
            dead = distributed.dead_peers()
    except Exception:  # the store is gone with its host: rank 0, unless torchrun's agent holds it
        records = {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            dead = {0: NO_ERROR}
    unsaid = {r: how for r, (said, how) in records.items() if not said}
    if (records or launcher) and not unsaid:
        return EXIT_PEER  # the failed rank said it itself, or the launcher says which rank a signal killed
    if min(set(range(world)) - set(records) - set(dead), default=me) != me:
        return EXIT_PEER  # the lowest surviving rank reports
    if unsaid:
        who = f"rank {min(unsaid)} failed ({unsaid[min(unsaid)]})"
    elif dead:
        who = f"rank {min(dead)} died ({dead[min(dead)] or NO_ERROR})"
    elif isinstance(err, distributed.Stopped):  # no rank ended: the job itself was stopped (a scheduler, a user)
        who = "the ranks were stopped by SIGTERM"
    else:
        who = f"a collective failed: another rank is gone or unreachable ({failure_text(err)})"
    say(line(a, who, world))
    return EXIT_PEER


def launcher_report(a: Any, codes: list[int], order: list[int]) -> int:
    """After ``--nproc``'s ranks ended with ``codes``, failures seen in ``order``: one line for a rank killed by
    a signal (the others said theirs); the first failed rank's exit status (128 + N for signal N)."""
    if not order:
        return 0
    first = next((r for r in order if codes[r] != EXIT_PEER), order[0])
    code = codes[first]
    world = len(codes)
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
        say(line(a, f"rank {first} died ({how})", world))
        return 128 - code
    if code == EXIT_PEER:
        say(line(a, "the ranks lost each other (a collective failed on every rank)", world))
    return code
