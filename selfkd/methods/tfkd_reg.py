"""Tf-KD_reg: teacher-free KD from a manually designed "virtual teacher".

Yuan, Tay, Li, Wang, Feng, "Revisiting Knowledge Distillation via Label Smoothing Regularization",
CVPR 2020 (arXiv 1909.11723), Eq. (8)–(9); official code github.com/yuanli2333/Teacher-free-Knowledge-Distillation
(``my_loss_function.py: loss_kd_regularization`` @880a74e).
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.mixing import Mix, MixBlocks, mix_rows
from .base import Method, Params, StepOutput
from .losses import cross_entropy, kd_kl, mixed_log_probs
from .ls import check_share, peaked_target
from .registry import register_method


class TfKDRegParams(Params):
    a: float = Field(0.99, gt=0, le=1, description="virtual teacher's probability on the true class; must exceed 1/K")
    temperature: float = Field(20.0, gt=0, description="teacher temperature T: the teacher is softmax(p^d/T)")
    student_temperature: float = Field(
        1.0, gt=0, description="student temperature T_s (official CIFAR code: 1, no temperature on the student)"
    )
    alpha: float = Field(0.1, ge=0, le=1, description="weight α of the regularisation term; CE gets 1−α")


@register_method
class TfKDReg(Method):
    """Tf-KD_reg, the "virtual teacher" of Yuan et al. (CVPR 2020), with the official code's semantics.

    ``L = (1−α)·CE(z, y) + α·T_s²·KL(softmax(p^d/T) ‖ softmax(z/T_s))``,
    ``p^d[y] = a``, ``p^d[k≠y] = (1−a)/(K−1)``

    * As in the official code, the teacher is a softmax of the *probabilities* p^d divided by T (for
      a=0.99, T=20, K=100 it puts ≈0.0105 on the true class: a nearly uniform teacher), and the
      student has no temperature (``student_temperature=1``; the author confirms this for CIFAR-100,
      issue #3).
    * Defaults are the official ResNet-18 / CIFAR-100 setting: a=0.99, T=20, α=0.1 (the paper's
      ImageNet setting is the same).
    * Reduction: ``batchmean``, no multiplier. The official code multiplies ``nn.KLDivLoss()`` — a mean
      over all N·K elements — by ``multiplier`` m: that equals ``batchmean × m/K``. The official
      ResNet-18/CIFAR-100 run has m=100 and K=100, so it is exactly this loss with α=0.1. Other official
      configs map as ``(1−α)·CE + α·(m/K)·KL``: e.g. MobileNetV2 (α=0.95, T=40, m=1, K=100) is
      ``0.05·CE + 0.0095·KL``, i.e. our loss with α≈0.16 scaled by ≈0.06 (not exactly reachable here).
    * ``T_s²`` (our choice): with a student temperature the term is scaled by ``T_s²`` (the gradient
      flows through the student's softmax only, so ``T_s`` is the temperature whose 1/T_s² gradient
      shrinkage Hinton's factor compensates). It is 1 at the official ``T_s=1``. It comes from
      :func:`~selfkd.methods.losses.kd_kl`, with teacher logits ``T_s·p^d/T``.
    * ``a`` must exceed 1/K (checked at ``setup`` and on every call: ConfigError). Parts ``ce`` and
      ``kd`` (``T_s²·KL``), ``loss = (1−α)·ce + α·kd``. No extra forward pass, no state.
    * **Mixed samples** (mixup/CutMix): CE is mixed, and the virtual teacher ``softmax(p^d(y)/T)``
      becomes ``lam·softmax(p^d(y)/T) + (1−lam)·softmax(p^d(y[index])/T)``.
    * **Distributed** (DDP): per rank; the virtual teacher depends on each row's label only; DDP averages the gradients.
    """

    name = "tfkd-reg"
    formula = ("(1−α)·CE(z, y) + α·T_s²·KL(softmax(p^d/T) ‖ softmax(z/T_s)), "
               "p^d = a on y, (1−a)/(K−1) elsewhere")
    Params = TfKDRegParams
    hp: TfKDRegParams
    supports_mix = True

    def setup(self, *, num_samples: int, num_classes: int, epochs: int) -> None:
        check_share(self.name, self.hp.a, num_classes)

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        hp = self.hp
        k = logits.shape[1]
        check_share(self.name, hp.a, k)
        if mix is None:
            # softmax(teacher / T_s) = softmax(p^d / T): kd_kl applies T_s to both sides and the T_s² factor
            teacher = peaked_target(target, k, hp.a) * (hp.student_temperature / hp.temperature)
        else:
            partner, lam = mix_rows(mix, target.shape[0], target.device)
            own = F.log_softmax(peaked_target(target, k, hp.a) / hp.temperature, dim=1)
            other = F.log_softmax(peaked_target(target.index_select(0, partner), k, hp.a) / hp.temperature, dim=1)
            teacher = mixed_log_probs(own, other, lam) * hp.student_temperature
        ce = cross_entropy(logits, target, mix=mix)
        kd = kd_kl(logits, teacher, hp.student_temperature)
        loss = (1.0 - hp.alpha) * ce + hp.alpha * kd
        return StepOutput(loss, {"ce": ce.detach(), "kd": kd.detach()}, logits, target)
