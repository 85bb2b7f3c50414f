"""Progress of a run: per epoch a bar (:func:`selfkd.progress_bar.progress_bar`) with ETA, loss and images/s
on a terminal, then one log line with the epoch's metrics."""
from __future__ import annotations

from typing import Any, Callable

from ..progress_bar import NoBar, progress_bar

NOISE = ("corrupted_acc", "memorized", "clean_acc")


def _fmt(m: dict[str, Any]) -> str:
    parts = [f"loss {m['train_loss']:.4f}"]
    extra = [f"{k[6:]} {v:.4f}" for k, v in m.items() if k.startswith("train_") and k not in
             ("train_loss", "train_acc", "train_seconds", *(f"train_{n}" for n in NOISE))]
    if extra:
        parts[0] += " (" + ", ".join(extra) + ")"
    parts.append(f"train acc {m['train_acc']:.2f}")
    if "test_acc" in m:  # epochs between evaluations (train.eval_every) have no test metrics
        parts.append(f"test acc {m['test_acc']:.2f}")
        if "test_top5" in m:  # absent with 5 classes or fewer
            parts.append(f"top5 {m['test_top5']:.2f}")
        parts += [f"nll {m['test_nll']:.4f}", f"ece {m['test_ece']:.4f}"]
    parts += [f"{m['images_per_s']:.0f} img/s", f"{m['epoch_seconds']:.1f}s"]
    if "train_memorized" in m:
        parts.insert(2, f"noisy-label fit {m['train_memorized']:.1f}% (true-label acc {m['train_corrupted_acc']:.1f}%)")
    return " | ".join(parts)


class Progress:
    """Context manager. ``enabled=None`` means: a bar only when stderr is a terminal."""

    def __init__(self, total_steps: int, enabled: bool | None, log: Callable[[str], None]):
        self.total_steps = total_steps
        self.enabled = enabled
        self.log = log
        self.bar: Any = NoBar()
        self.epoch = self.epochs = 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        self.bar.close()
        self.bar = NoBar()

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = epoch, epochs
        self._close()
        self.bar = progress_bar(self.total_steps, f"epoch {epoch}/{epochs}", unit="step", enabled=self.enabled)

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        self.bar.n = step
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
        self.bar.refresh()

    def end_epoch(self, m: dict[str, Any]) -> None:
        self._close()
        self.log(f"epoch {self.epoch}/{self.epochs} | " + _fmt(m))
