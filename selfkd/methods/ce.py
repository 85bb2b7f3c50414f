"""Plain cross-entropy: the baseline every self-distillation method is measured against."""
from __future__ import annotations

from torch import Tensor

from .base import Method, StepOutput
from .losses import cross_entropy
from .registry import register


@register
class CE(Method):
    """Cross-entropy with hard labels. ``L = CE(z, y)``. No hyper-parameters."""

    name = "ce"
    formula = "CE(z, y)"

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None) -> StepOutput:
        ce = cross_entropy(logits, target)
        return StepOutput(ce, {"ce": ce.detach()}, logits, target)
