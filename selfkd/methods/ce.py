"""Plain cross-entropy: the baseline every self-distillation method is measured against."""
from __future__ import annotations

from torch import Tensor

from ..data.mixing import Mix, MixBlocks
from .base import Method, StepOutput
from .losses import cross_entropy
from .registry import register_method


@register_method
class CE(Method):
    """Cross-entropy with hard labels. ``L = CE(z, y)``. No hyper-parameters.

    * **Mixed samples** (mixup/CutMix, ``batch.mix``): ``lam·CE(z, y) + (1−lam)·CE(z, y[index])``.
    * **Distributed** (DDP): per rank; DDP averages the gradients, which equals one process on the union batch.
    """

    name = "ce"
    formula = "CE(z, y)"
    supports_mix = True

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        ce = cross_entropy(logits, target, mix=mix)
        return StepOutput(ce, {"ce": ce.detach()}, logits, target)
