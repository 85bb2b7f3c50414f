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
    * **Distributed** (DDP): per rank. ``[B, K]`` logits, equal rows per rank: DDP's average of the ranks' means
      equals one process on the union batch. Token logits: each rank's mean is over its own tokens, so with
      unequal counts it does not; the Hugging Face integration divides by the ranks' token count, which does.
    """

    name = "ce"
    formula = "CE(z, y)"
    supports_mix = True

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        ce = cross_entropy(logits, target, mix=mix)
        return StepOutput(ce, {"ce": ce.detach()}, logits, target)
