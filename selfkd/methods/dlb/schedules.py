"""How much DLB trusts its last-mini-batch teacher, step by step or row by row (``DLB(schedule=...)``).

* ``constant``: α, T as given.
* ``linear``: ``α_p = α_0 + (α − α_0)·min(p/R, 1)``, likewise T from ``temperature_start``, with
  ``R = ramp_epochs`` (``α_0 = alpha_start``) and ``p`` the epochs done (counted by DLB's sampler).

The others read the cached teacher logits ``z_prev`` of the repeated rows at T=1,
``p = softmax(z_prev)`` over the last dimension (K classes, or the vocabulary for token logits), and
return tensors on the teacher's device: nothing here waits for the device (no ``.item()``/``float()``).

* ``confidence`` (our rule; DynSDPB, Fu et al. 2024, arXiv 2411.16991, also adapts α and T from the
  model's uncertainty, but its formulas could not be retrieved, so this is not DynSDPB): one pair
  per step. ``c`` = mean over the repeated rows of ``p_y`` (the teacher's probability of the label;
  of the mixed one-hot target for mixed rows; over the non-ignored tokens for token logits), then
  ``α_t = α·c`` and ``T_t = T·(2 − c)``: an unreliable teacher is trusted less and softened more.
* ``entropy`` (per sample): row ``i``'s distillation term is weighted by
  ``w_i = 1 − H(p_i) / log K`` with ``H(p) = −Σ_k p_k log p_k``: 1 for a one-hot teacher, 0 for a
  uniform one. Label-free.
* ``margin`` (per sample): ``w_i = p_i(1) − p_i(2)``, the gap between the teacher's two largest
  probabilities: 1 for a decided teacher, 0 for a tie. Label-free.

With a per-sample weight the distillation term is
``KD = (1/R) Σ_i w_i · T² · KL(softmax(z_prev,i/T) ‖ softmax(z_rep,i/T))`` (the mean is over the R
repeated rows, or over the non-ignored tokens, weighted tokens alike; it is *not* renormalised by
``Σ w``, so an uncertain batch distils less overall); α and T stay as given. The weights are
detached: no gradient flows into the teacher's uncertainty.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...data.mixing import Mix
from ..losses import mix_targets, token_mask
from .params import PER_SAMPLE, DLBParams


def confidence(teacher: Tensor, labels: Tensor, alpha: float, temperature: float,
               mix: Mix | None = None) -> tuple[Tensor, Tensor]:
    """``(α·c, T·(2 − c))`` with ``c`` the teacher's mean probability of the target (module docstring)."""
    probs = teacher.detach().float().softmax(dim=-1)
    if probs.dim() == 3:  # tokens: mean over the non-ignored ones
        keep = token_mask(labels).to(probs.dtype)
        p_true = probs.gather(2, labels.clamp_min(0)[..., None])[..., 0]
        conf = (p_true * keep).sum() / keep.sum().clamp_min(1)
    elif mix is None:
        conf = probs.gather(1, labels[:, None]).mean()
    else:
        conf = (probs * mix_targets(labels, probs.shape[1], mix)).sum(dim=1).mean()
    return alpha * conf, temperature * (2.0 - conf)


def for_step(hp: DLBParams, progress: float, teacher: Tensor, labels: Tensor, mix: Mix | None = None,
             weight: Tensor | None = None) -> tuple[float | Tensor, float | Tensor, Tensor | None]:
    """``(α, T, row weight)`` for a step at ``progress`` epochs under DLB's hyper-parameters ``hp``, given
    the teacher logits of the repeated rows and how those rows were mixed: α and T from the ``linear``
    ramp, :func:`confidence` or as given; the weight from :func:`row_weight` (``entropy``, ``margin``), else None.
    ``weight``: the rows' weights already taken (a top-K cache keeps them from the full logits)."""
    if weight is None and hp.schedule in PER_SAMPLE:
        weight = row_weight(hp.schedule, teacher)
    if hp.schedule == "linear":
        f = min(progress / hp.ramp_epochs, 1.0) if hp.ramp_epochs > 0 else 1.0
        t0 = hp.temperature if hp.temperature_start is None else hp.temperature_start
        return hp.alpha_start + (hp.alpha - hp.alpha_start) * f, t0 + (hp.temperature - t0) * f, weight
    if hp.schedule == "confidence":
        return (*confidence(teacher, labels, hp.alpha, hp.temperature, mix), weight)
    return hp.alpha, hp.temperature, weight


def logged(schedule: str, alpha: float | Tensor, temperature: float | Tensor, weight: Tensor | None,
           mask: Tensor | None) -> dict[str, Tensor]:
    """The parts a step with repeated rows logs of its schedule: α and T (``linear``, ``confidence``) or the
    mean weight over the repeated rows (or their non-ignored tokens, ``mask``) of ``entropy``/``margin``."""
    if schedule in ("linear", "confidence"):
        return {"alpha": torch.as_tensor(alpha, dtype=torch.float32).detach(),
                "temperature": torch.as_tensor(temperature, dtype=torch.float32).detach()}
    if weight is not None:
        return {"weight": (weight * mask).sum() / mask.sum().clamp_min(1) if mask is not None else weight.mean()}
    return {}


def row_weight(kind: str, teacher: Tensor) -> Tensor:
    """Per-row (``[R]``) or per-token (``[R, T]``) weight of the distillation term, in ``[0, 1]``."""
    logp = teacher.detach().float().log_softmax(dim=-1)
    p = logp.exp()
    if kind == "entropy":
        k = teacher.shape[-1]
        h = -(p * logp).sum(dim=-1)
        return (1.0 - h / math.log(k)).clamp(0.0, 1.0) if k > 1 else torch.ones_like(h)
    if kind == "margin":
        top = p.topk(min(2, p.shape[-1]), dim=-1).values
        return top[..., 0] - top[..., 1] if top.shape[-1] == 2 else torch.ones_like(top[..., 0])
    raise ValueError(f"row_weight: unknown per-sample schedule {kind!r} (known: {', '.join(PER_SAMPLE)})")
