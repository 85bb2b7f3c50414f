"""Module wrappers the trainer puts around a model, and :func:`unwrap` to reach the model inside.

The trainer hands methods the model it trains through: possibly DistributedDataParallel, then
``torch.compile`` and :class:`DynamicBatch`. A method that copies or inspects the model itself (MrKD's
snapshots, BYOT's exits) calls :func:`unwrap`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class DynamicBatch(nn.Module):
    """A compiled model whose inputs' batch dimension is dynamic from the first call: DLB alternates
    between ``B`` rows (first step) and ``2B`` (the rest), a last batch is short, CS-KD forwards halves:
    one graph serves them all instead of a recompile per new batch size."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if x.shape[0] > 1:
            torch._dynamo.mark_dynamic(x, 0)
        return self.compiled(x, *args, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module inside any nesting of :class:`DynamicBatch`, ``torch.compile``'s wrapper and
    (Distributed)DataParallel; ``model`` itself when it wraps nothing."""
    while True:
        if isinstance(model, DynamicBatch):
            model = model.compiled
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(orig := getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = orig
        else:
            return model
