"""Label smoothing (LSR; Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016).

Also home of the small helpers the label-smoothing family shares (``lsrkd``, ``lsrkd-tc``,
``tfkd-reg``): the "peaked" target with share ``a`` on the true class and ``(1−a)/(K−1)`` on every
other class, and the check that such a share really favours the true class.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..data.mixing import Mix, MixBlocks, mix_rows
from ..errors import ConfigError
from .base import Method, Params, StepOutput
from .losses import cross_entropy, soft_cross_entropy
from .registry import register_method


def peaked_target(target: Tensor, num_classes: int, a: float) -> Tensor:
    """Rows with ``a`` on the true class and ``(1−a)/(K−1)`` on each other class (float32)."""
    off = (1.0 - a) / (num_classes - 1)
    q = torch.full((target.shape[0], num_classes), off, dtype=torch.float32, device=target.device)
    return q.scatter_(1, target.view(-1, 1), a)


def check_share(method: str, a: float, num_classes: int, key: str = "a") -> None:
    """``a`` must exceed the uniform share ``1/K`` (else the teacher does not favour the true class)."""
    if not a > 1.0 / num_classes:
        raise ConfigError(
            f"method '{method}': {key}: must be greater than 1/K = 1/{num_classes} = {1.0 / num_classes:.4g} "
            f"for {num_classes} classes (got {a!r})"
        )


class LSParams(Params):
    epsilon: float = Field(0.1, ge=0, lt=1, description="smoothing mass ε taken from the true class")
    form: Literal["uniform", "offtarget"] = Field(
        "uniform",
        description="uniform: ε/K on every class (PyTorch label_smoothing=ε, Szegedy et al.); "
        "offtarget: 1−ε on the true class, ε/(K−1) on every other class (Tf-KD and Zipf's LS code)",
    )


@register_method
class LS(Method):
    """Label smoothing: cross-entropy against a smoothed one-hot target.

    ``L = −Σ_k q_k log softmax(z)_k = (1−ε)·CE(z, y) + ε·H(v, softmax(z))``

    * ``form="uniform"`` (default): ``v = u`` (1/K on every class), so ``q = (1−ε)·onehot + ε/K``: the
      true class keeps ``1−ε+ε/K``. Identical to ``F.cross_entropy(z, y, label_smoothing=ε)`` and to
      Szegedy et al.'s ``q' = (1−ε)δ + ε·u``.
    * ``form="offtarget"``: ``v`` is uniform over the K−1 *other* classes, so ``q`` is ``1−ε`` on the
      true class and ``ε/(K−1)`` elsewhere: the form of the Tf-KD code (``loss_label_smoothing``) and the
      Zipf's LS code (``label_smooth_loss``), both with ε=0.1. For K classes,
      ``offtarget(ε) = uniform(ε·K/(K−1))``.
    * Default ε=0.1. Parts: ``ce`` (hard-label CE) and ``smooth`` (``H(v, softmax(z))``), with
      ``loss = (1−ε)·ce + ε·smooth``.
    * **Mixed samples** (mixup/CutMix): the target ``q(y)`` becomes ``lam·q(y) + (1−lam)·q(y[index])``;
      since the loss is linear in the target, ``ce`` is the mixed CE and, with ``offtarget``, ``v`` is
      ``lam·v(y) + (1−lam)·v(y[index])`` (the uniform ``v`` does not depend on the label: unchanged).
    * **Distributed** (DDP): per rank; the targets depend on each row's label only; DDP averages the gradients.
    """

    name = "ls"
    formula = "(1−ε)·CE(z, y) + ε·H(v, softmax(z)); v = 1/K (uniform) or 1/(K−1) off the target (offtarget)"
    Params = LSParams
    hp: LSParams
    supports_mix = True

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        eps = self.hp.epsilon
        k = logits.shape[1]
        if self.hp.form == "uniform":
            v = torch.full_like(logits, 1.0 / k, dtype=torch.float32)
        else:
            v = peaked_target(target, k, 0.0)  # 0 on the true class, 1/(K−1) elsewhere
            if mix is not None:
                partner, lam = mix_rows(mix, target.shape[0], target.device)
                v_other = peaked_target(target.index_select(0, partner), k, 0.0)
                v = v * lam[:, None] + v_other * (1.0 - lam[:, None])
        ce = cross_entropy(logits, target, mix=mix)
        smooth = soft_cross_entropy(logits, v)
        loss = (1.0 - eps) * ce + eps * smooth
        return StepOutput(loss, {"ce": ce.detach(), "smooth": smooth.detach()}, logits, target)
