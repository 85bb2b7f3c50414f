"""What a run logs besides ``metrics.jsonl``: ``metrics.csv`` (one row per epoch, always) and TensorBoard
event files under ``RUN/tb`` (``train.log``: ``tensorboard``, or ``auto`` when tensorboard is installed).

TensorBoard scalars:

* per step, every ``train.log_every`` steps (where the trainer reads the loss anyway, so logging adds no
  device sync): ``step/loss`` and ``step/<part>`` (means over the steps since the last point),
  ``step/lr``, ``step/images_per_s`` (forward passes in images, as the epoch's);
* per epoch: ``epoch/<key>`` for every scalar of the epoch's metrics (``train_loss`` and parts,
  ``train_acc``, ``test_acc``, ``test_ece``, ``test_nll``, ``lr``, ``images_per_s``, ...).

Every scalar is at the global step (the epoch's last step for ``epoch/*``; ``epoch/epoch`` tells which
epoch). A resumed run purges the events written after its checkpoint (``purge_step``), so curves never
hold a step twice.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, SelfKDError
from . import checkpoint as ckpt
from . import rundir

CSV = rundir.METRICS_CSV
TB = "tb"


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The plain numbers of a metrics row (nested values such as ``test_reliability`` left out)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Every epoch's scalars, columns in order of first appearance (a part absent in a row stays empty);
    integers stay integers. Units: README, section "metrics.csv"."""
    cols: list[str] = []
    rows = [{k: v for k, v in h.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for h in history]
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
    ckpt.write_text(path, buf.getvalue())


def _cell(v: int | float) -> str:
    """An int as written (``epoch`` is ``3``, not ``3.0``); a float at full precision (``repr``), NaN as ``nan``."""
    if isinstance(v, int):
        return str(v)
    return "nan" if math.isnan(v) else repr(float(v))


def check(mode: str) -> None:
    """ConfigError now (before a run writes anything) if ``mode`` needs what is not installed."""
    if mode == "tensorboard" and not _tensorboard_available():
        raise ConfigError("train.log=tensorboard: tensorboard is not installed; install it with: "
                          "pip install selfkd[tensorboard]")


def check_dir(run_dir: Path, mode: str) -> None:
    """When ``mode`` writes event files: ``RUN/tb`` must be a folder this process can write (or one it can
    create), checked now; otherwise the writer thread fails later with a traceback after training began."""
    if not (mode == "tensorboard" or (mode == "auto" and _tensorboard_available())):
        return
    try:
        rundir.check_writable(Path(run_dir) / TB, "TensorBoard folder")
    except SelfKDError as err:
        raise SelfKDError(f"{err}; train.log={mode} writes event files there (train.log=csv does not)") from None


class RunLogs:
    """The trainer's extra sinks; ``step`` at log points, ``epoch`` after each finished epoch."""

    def __init__(self, run_dir: Path, mode: str, *, purge_step: int | None = None):
        self.dir = Path(run_dir)
        self.writer = None
        check(mode)
        if mode == "tensorboard" or (mode == "auto" and _tensorboard_available()):
            check_dir(self.dir, mode)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / TB), purge_step=purge_step)
        self._last: dict[str, tuple[float, int]] = {}

    def start_epoch(self) -> None:
        self._last = {}

    def step(self, global_step: int, sums: dict[str, torch.Tensor], counts: dict[str, int], lr: float,
             images_per_s: float) -> None:
        if self.writer is None:
            return
        for k, v in sums.items():
            total, n = float(v), counts[k]
            t0, n0 = self._last.get(k, (0.0, 0))
            if n > n0:
                self.writer.add_scalar(f"step/{k}", (total - t0) / (n - n0), global_step)
            self._last[k] = (total, n)
        self.writer.add_scalar("step/lr", lr, global_step)
        self.writer.add_scalar("step/images_per_s", images_per_s, global_step)

    def points(self, global_step: int, values: dict[str, float]) -> None:
        """``step/<key>`` for values the caller has on the host already (the HF Trainer's logged window means)."""
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"step/{k}", v, global_step)

    def epoch(self, global_step: int, row: dict[str, Any]) -> None:
        """The finished epoch's scalars at its last global step; flushed (the trainer calls this before the
        checkpoint, and a resume purges from the checkpoint's step + 1)."""
        if self.writer is not None:
            for k, v in scalars(row).items():
                self.writer.add_scalar(f"epoch/{k}", v, global_step)
            self.writer.flush()

    def __enter__(self) -> "RunLogs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
