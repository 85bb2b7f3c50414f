"""LsrKD with Teacher Correction (TC): the uniform teacher gets a fixed larger share on the true class.

Wang, Zhang, Pang, Li, arXiv 2009.05226 (2020), "Teacher Correction"; journal version LSR-OS-TC
(Appl. Sci. 11(10) 4699, 2021).
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.mixing import Mix, MixBlocks, mix_rows
from .ls import check_share, peaked_target
from .losses import mixed_log_probs
from .lsrkd import LsrKD, LsrKDParams
from .registry import register_method


class LsrKDTCParams(LsrKDParams):
    a: float = Field(0.9, gt=0, lt=1, description="teacher's share on the true class; must exceed 1/K")
    soften_teacher: bool = Field(
        False,
        description="False (the journal's form): p^c is the target as is, only the student is softened by T; "
        "True: the teacher has logits log p^c and is softened by T like the student (standard KD)",
    )


@register_method
class LsrKDTC(LsrKD):
    """LsrKD whose uniform teacher is corrected towards the true class (Teacher Correction).

    ``L = (1−α)·CE(z, y) + α·T²·KL(p^c_T ‖ softmax(z/T))``, ``p^c[y] = a``, ``p^c[k≠y] = (1−a)/(K−1)``

    * ``p^c_T`` (``soften_teacher``). Default False, the journal version's form (LSR-OS-TC: the
      temperature is applied to the model's output only; the teacher is the corrected uniform
      distribution itself): ``p^c_T = p^c``. The term is then minimal when ``softmax(z/T) = p^c``,
      i.e. at a logit gap of ``T·log(a(K−1)/(1−a))`` between the label and the other classes (T=4, a=0.9:
      17.6 at K=10, 27 at K=100), a far more confident ``softmax(z)`` than p^c: with T > 1 this form
      regularises less than its ``a`` suggests; a smaller ``a`` regularises more. ``soften_teacher=True``
      is standard KD with teacher logits ``log p^c`` softened by T like the student,
      ``p^c_T = softmax(log p^c / T)``, minimal when ``softmax(z) = p^c`` whatever T and K (the uniform
      teacher of ``lsrkd`` is T-invariant, so in both forms ``a → 1/K`` gives back ``lsrkd``).
    * ``a`` must exceed the uniform share 1/K (checked at ``setup`` and on every call: ConfigError).
    * Defaults α=0.1, T=4 (as ``lsrkd``) and a=0.9 (our choices; see README "Sources"): p^c is then the
      off-target label-smoothing label with ε=0.1 (Tf-KD / Zipf's LS code); a=0.9 exceeds 1/K for every
      K ≥ 2, so the default is valid on any data set.
    * Same shape of teacher as ``tfkd-reg``'s virtual teacher, but ``tfkd-reg`` softens the teacher's
      *probabilities* (softmax of p^d/T) and not the student.
    * T² comes from :func:`~selfkd.methods.losses.kd_kl`. Parts ``ce`` and ``kd`` (``T²·KL``),
      ``loss = (1−α)·ce + α·kd``. No extra forward pass, no state.
    * **Mixed samples** (mixup/CutMix): CE is mixed, and the teacher (the distribution at temperature
      T, ``p^c_T``) becomes ``lam·p^c_T(y) + (1−lam)·p^c_T(y[index])``.
    * **Distributed** (DDP): per rank; the teacher depends on each row's label only; DDP averages the gradients.
    """

    name = "lsrkd-tc"
    formula = ("(1−α)·CE(z, y) + α·T²·KL(p^c ‖ softmax(z/T)), p^c = a on y, (1−a)/(K−1) elsewhere "
               "(soften_teacher: softmax(log p^c / T) as teacher)")
    Params = LsrKDTCParams
    hp: LsrKDTCParams

    def setup(self, *, num_samples: int, num_classes: int, epochs: int) -> None:
        check_share(self.name, self.hp.a, num_classes)

    def teacher_logits(self, logits: Tensor, target: Tensor) -> Tensor:
        """Teacher logits for kd_kl (which divides them by T): ``log p^c`` when the teacher is softened,
        else ``T·log p^c`` (its softmax at temperature T is exactly p^c)."""
        k = logits.shape[1]
        check_share(self.name, self.hp.a, k)
        log_p = peaked_target(target, k, self.hp.a).log_()
        return log_p if self.hp.soften_teacher else log_p * self.hp.temperature

    def mixed_teacher_logits(self, logits: Tensor, target: Tensor, mix: Mix | MixBlocks) -> Tensor:
        """``T·log(lam·p^c_T(y) + (1−lam)·p^c_T(y[index]))``: kd_kl's softmax at T gives the mixture."""
        t = self.hp.temperature
        partner, lam = mix_rows(mix, target.shape[0], target.device)
        own = F.log_softmax(self.teacher_logits(logits, target) / t, dim=1)
        other = F.log_softmax(self.teacher_logits(logits, target.index_select(0, partner)) / t, dim=1)
        return mixed_log_probs(own, other, lam) * t
