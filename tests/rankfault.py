"""Test-only plugin (``selfkd --import rankfault train ... --nproc 2``): one rank fails in the middle of
training, as ``SELFKD_RANK_FAULT=RANK:HOW:STEP`` says: rank RANK, at its global step STEP (counted from
1 over the whole run), is SIGKILLed (``kill``), raises ``RuntimeError: injected fault at step STEP``
(``raise``) or selfkd's own one-line ``TrainingError: injected error at step STEP`` (``error``), or sleeps
60 s first (``sleep``: in Python code, not a collective, when torchrun's SIGTERM comes). Several faults:
comma-separated. Unset (a resume re-importing it, recorded in config.yaml) or on another rank: a no-op."""
import os
import signal
import time

from selfkd.engine.trainer import Trainer
from selfkd.errors import TrainingError

FAULTS = [(f + "::").split(":")[:3] for f in os.environ.get("SELFKD_RANK_FAULT", "").split(",") if f]
real_step = Trainer._step


def _step(self, *args, **kw):
    for rank_, how, step in FAULTS:
        if self.rank == int(rank_) and self.global_step + 1 == int(step):
            if how == "sleep":
                time.sleep(60)
                continue
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "error":
                raise TrainingError(f"injected error at step {step}")
            raise RuntimeError(f"injected fault at step {step}")
    return real_step(self, *args, **kw)


Trainer._step = _step
