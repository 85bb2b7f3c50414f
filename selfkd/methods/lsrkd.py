"""LsrKD: label smoothing as knowledge distillation from a uniform teacher, with a temperature.

Wang, Zhang, Pang, Li, "Extending Label Smoothing Regularization with Self-Knowledge Distillation",
arXiv 2009.05226 (2020); journal version "Revisiting Label Smoothing Regularization with Knowledge
Distillation" (LSR-OS, Appl. Sci. 11(10) 4699, 2021).
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import Tensor

from ..data.mixing import Mix, MixBlocks
from .base import Method, Params, StepOutput
from .losses import cross_entropy, kd_kl
from .registry import register_method


class LsrKDParams(Params):
    alpha: float = Field(0.1, ge=0, le=1, description="weight α of the distillation term; CE gets 1−α")
    temperature: float = Field(4.0, gt=0, description="temperature T of the student's softmax in the KD term")


@register_method
class LsrKD(Method):
    """KD whose teacher is the uniform distribution u (1/K per class), at temperature T.

    ``L = (1−α)·CE(z, y) + α·T²·KL(u ‖ softmax(z/T))``

    * The formula reads "extending LSR to the KD regime and applying a softer temperature" as KD from
      u at temperature T (u is invariant to T, so T only softens the student).
    * Defaults α=0.1, T=4 (our choices; README "Sources"): α=0.1 matches the
      usual ε=0.1 of label smoothing, and at T=1 the loss equals ``ls(form="uniform", epsilon=α)``
      minus the constant ``α·log K``; T=4 is a common KD temperature. For large T the term tends to
      ``α/(2K)·Σ_k (z_k − mean(z))²``, a penalty on the spread of the logits. Tune both.
    * T² comes from :func:`~selfkd.methods.losses.kd_kl` (batchmean). Parts: ``ce`` and ``kd``
      (``T²·KL``), ``loss = (1−α)·ce + α·kd``. No extra forward pass, no state.
    * **Mixed samples** (mixup/CutMix): CE becomes ``lam·CE(z, y) + (1−lam)·CE(z, y[index])``; the
      uniform teacher does not depend on the label and is unchanged.
    * **Distributed** (DDP): per rank; the teacher depends on each row's label only; DDP averages the gradients.
    """

    name = "lsrkd"
    formula = "(1−α)·CE(z, y) + α·T²·KL(u ‖ softmax(z/T)), u = 1/K"
    Params: ClassVar[type[LsrKDParams]] = LsrKDParams
    hp: LsrKDParams
    supports_mix = True

    def teacher_logits(self, logits: Tensor, target: Tensor) -> Tensor:
        """Logits whose softmax at temperature T is the teacher (here: zeros, i.e. uniform)."""
        return logits.detach().float().new_zeros(logits.shape)

    def mixed_teacher_logits(self, logits: Tensor, target: Tensor, mix: Mix | MixBlocks) -> Tensor:
        """Teacher logits for mixed rows; the uniform teacher does not depend on the label."""
        return self.teacher_logits(logits, target)

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        alpha, t = self.hp.alpha, self.hp.temperature
        ce = cross_entropy(logits, target, mix=mix)
        teacher = self.teacher_logits(logits, target) if mix is None else self.mixed_teacher_logits(logits, target, mix)
        kd = kd_kl(logits, teacher, t)
        loss = (1.0 - alpha) * ce + alpha * kd
        return StepOutput(loss, {"ce": ce.detach(), "kd": kd.detach()}, logits, target)
