"""Learning-rate schedules as a per-step multiplier for ``LambdaLR``.

``multistep`` changes the rate at epoch boundaries (as the official DLB code's MultiStepLR does);
``cosine`` decays per step to ``min_lr``; linear warmup over ``warmup_epochs`` applies to all.
The multiplier is a closure (not an object) so LambdaLR's state_dict holds only counters.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

from .config import ScheduleCfg


def lr_lambda(cfg: ScheduleCfg, epochs: int, steps_per_epoch: int, base_lr: float) -> Callable[[int], float]:
    total = epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    milestones = list(cfg.milestones)
    floor = cfg.min_lr / base_lr

    def factor(step: int) -> float:
        w = (step + 1) / warm if step < warm else 1.0
        if cfg.kind == "multistep":
            return w * cfg.gamma ** bisect.bisect_right(milestones, step // steps_per_epoch)
        if cfg.kind == "cosine":
            progress = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
            return w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        return w

    return factor
