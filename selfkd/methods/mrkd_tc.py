"""MrKD with Teacher Correction (TC): the snapshot teacher gets a fixed larger share on the true class.

Wang, Zhang, Pang, Li, arXiv 2009.05226 (2020): TC "manually sets a constant larger proportion for
the right class" of the teacher, for LsrKD and MrKD alike. The form of the correction and ``a`` are
our choices (class docstring; README "Sources"), both knobs.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data.mixing import Mix, MixBlocks, mix_rows
from .losses import kd_kl, mixed_log_probs
from .mrkd import MrKD, MrKDParams
from .registry import register_method


def corrected_log_probs(teacher: Tensor, target: Tensor, temperature: float, a: float,
                        correction: str = "mix") -> Tensor:
    """``log p_tc`` (float32, finite for ``a < 1``), computed in log space.

    * ``mix``: ``p_tc = a·onehot(y) + (1−a)·softmax(teacher/T)``;
    * ``floor``: where ``softmax(teacher/T)[y] < a``, the true class gets exactly ``a`` and the
      other classes share ``1−a`` in their teacher proportions; other rows are unchanged.
    """
    ls = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    y = target.view(-1, 1)
    ls_y = ls.gather(1, y)
    log_a = math.log(a) if a > 0 else -math.inf
    log_rest = math.log1p(-a)
    if correction == "mix":
        out = ls + log_rest
        return out.scatter_(1, y, torch.logaddexp(torch.full_like(ls_y, log_a), ls_y + log_rest))
    others = ls.scatter(1, y, -math.inf).logsumexp(dim=1, keepdim=True)  # log(1 − p[y]), stable
    out = (ls - others + log_rest).scatter_(1, y, log_a)
    return torch.where(ls_y < log_a, out, ls)


class MrKDTCParams(MrKDParams):
    a: float = Field(0.5, ge=0, lt=1, description="share of the true class in the corrected teacher")
    correction: Literal["mix", "floor"] = Field(
        "mix",
        description="mix: p_tc = a·onehot(y) + (1−a)·p_teacher; floor: p_tc[y] = max(a, p_teacher[y]), the other "
        "classes rescaled in their teacher proportions",
    )


@register_method
class MrKDTC(MrKD):
    """MrKD whose snapshot teacher is corrected towards the true class (Teacher Correction).

    ``L = CE(z, y) + α · T² · KL(p_tc ‖ softmax(z/T))``, ``p_tc = a·onehot(y) + (1−a)·softmax(z_b/T)``

    * Everything else is :class:`~selfkd.methods.mrkd.MrKD`: snapshots, interval, ensemble, KA (applied
      to the logits before the correction), cost, state, and no teacher (CE only) until the first
      snapshot exists.
    * ``correction="mix"`` (default) moves a share ``a`` of the mass onto the true class, so ``p_tc[y] ≥ a``
      and a correct teacher only gets more confident. ``correction="floor"`` raises ``p[y]`` to ``a`` where
      it is below ``a`` and rescales the other classes to ``1−a`` in their teacher proportions (with the
      uniform teacher of ``lsrkd-tc`` this is exactly its ``p^c``); rows with ``p[y] ≥ a`` are unchanged.
    * The corrected teacher is already a distribution: it is not re-softened, its logits are ``T·log p_tc``
      so that :func:`~selfkd.methods.losses.kd_kl` (which divides by T) sees exactly ``p_tc``. ``a`` < 1
      keeps every ``log p_tc`` finite.
    * Default ``a=0.5`` (our choice): half of the teacher is the label, half the
      snapshot. ``a=0`` is ``mrkd``.
    * **Mixed samples** (mixup/CutMix): as ``mrkd`` (snapshots on the same mixed input, CE mixed, KA
      per ``ka_mixed``); the corrected teacher of a mixed row is ``lam·p_tc(y) + (1−lam)·p_tc(y[index])``
      (both from the row's own snapshot logits): with ``mix`` that is
      ``a·(lam·onehot(y) + (1−lam)·onehot(y[index])) + (1−a)·softmax(z_b/T)``, the correction towards the
      mixed one-hot.
    * **Distributed** (DDP): per rank; the teacher is a function of the snapshot, replicated as in ``mrkd``; DDP averages the gradients.
    """

    name = "mrkd-tc"
    formula = "CE(z, y) + α·T²·KL(a·onehot(y) + (1−a)·softmax(z_b/T) ‖ softmax(z/T)), z_b: past snapshots"
    Params = MrKDTCParams
    hp: MrKDTCParams

    def distill(self, logits: Tensor, teacher: Tensor, target: Tensor,
                mix: Mix | MixBlocks | None = None) -> Tensor:
        t = self.hp.temperature
        log_p = corrected_log_probs(teacher, target, t, self.hp.a, self.hp.correction)
        if mix is not None:
            partner, lam = mix_rows(mix, target.shape[0], target.device)
            other = corrected_log_probs(teacher, target.index_select(0, partner), t, self.hp.a, self.hp.correction)
            log_p = mixed_log_probs(log_p, other, lam)
        return kd_kl(logits, log_p * t, t)
