"""DDGSD: data-distortion guided self-distillation (Xu & Liu, AAAI 2019).

"Data-Distortion Guided Self-Distillation for Deep Neural Networks". No official code was
released; the paper trains one network on two differently distorted (augmented) views of each
image with cross-entropy on both views, a symmetric KL between the two views' predictions, and an
MMD term between the two views' features.

Here:

* view 1 is the trainer's augmented batch ``batch.x``; view 2 a fresh augmentation of the same raw
  images, ``batch.augment(batch.raw)`` (the trainer's own augmentation and generator, so runs are
  reproducible);
* ``L = CE(z1, y) + CE(z2, y) + λ·T²·[KL(softmax(z2/T) ‖ softmax(z1/T)) + KL(softmax(z1/T) ‖ softmax(z2/T))]``,
  in each KL the target side detached (each view is the teacher of the other), each KL a
  ``batchmean`` over the B images;
* the MMD term is dropped: DLB's first author (GitHub ``yiqings``, KD_Lib issue #127) notes that
  the KL alone is what matters, and our models expose logits only, not the features MMD needs.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..data.mixing import Mix, MixBlocks, remix
from ..errors import TrainingError
from .base import Batch, Method, Params, StepOutput, host_equal
from .losses import cross_entropy, kd_kl
from .registry import register_method


class DDGSDParams(Params):
    temperature: float = Field(3.0, gt=0, description="softmax temperature T of the view-consistency KL")
    lam: float = Field(1.0, ge=0, description="weight λ of the symmetric KL between the two views")
    ce_views: Literal["sum", "mean"] = Field(
        "sum", description="sum: CE(z1,y) + CE(z2,y) (paper); mean: their average, the scale of one CE"
    )
    forward: Literal["joint", "split"] = Field(
        "joint",
        description="joint: one forward over [view 1 | view 2] (BatchNorm sees 2B rows); split: one forward per "
        "view (BatchNorm normalises each view separately)",
    )


@register_method
class DDGSD(Method):
    """Data-distortion guided self-distillation (Xu & Liu, AAAI 2019), without the MMD term.

    ``L = CE(z1, y) + CE(z2, y) + λ·T²·[KL(softmax(z2/T) ‖ softmax(z1/T)) + KL(softmax(z1/T) ‖ softmax(z2/T))]``

    * ``z1``, ``z2``: logits of two independent augmentations of the same images; in each KL the
      teacher side is detached, so each view is pulled towards the other and gets gradients only as
      the student.
    * Defaults λ=1, T=3 (T our choice, see README "Sources"): T=3 matches DLB (which is DDGSD's
      two-view consistency shifted by one step), so the two compare at equal settings;
      ``temperature=1`` is the plain-softmax KL.

    Plain loop: ``ddgsd(model(torch.cat([aug(x), aug(x)])), y)``; ``loss`` takes the ``2B`` logits
    ``[view 1 | view 2]`` and the ``B`` labels (or ``2B`` labels, both halves equal: checked on the
    CPU when the labels are there; the trainer passes ``B`` labels, so its steps check nothing on the
    device).

    More (cost, state, mixing, distributed): ``docs/methods.md``, section ``ddgsd``.
    """

    name = "ddgsd"
    own_forward = True
    formula = (
        "CE(z1,y) + CE(z2,y) + λ·T²·[KL(softmax(z2/T) ‖ softmax(z1/T)) + KL(softmax(z1/T) ‖ softmax(z2/T))]"
    )
    Params = DDGSDParams
    hp: DDGSDParams
    supports_mix = True

    @property
    def forwards_per_sample(self) -> float:
        return 2.0

    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        if batch.raw is None or batch.augment is None:
            raise TrainingError(
                "DDGSD needs the raw images and the augmentation to draw a second view: Batch(raw=..., augment=...)"
            )
        v2 = batch.augment(batch.raw)
        if v2.shape != batch.x.shape:
            raise TrainingError(
                f"DDGSD: the second view has shape {tuple(v2.shape)} but the first {tuple(batch.x.shape)}"
            )
        if batch.mix is not None:
            if not isinstance(batch.mix, Mix):
                raise TrainingError("DDGSD: batch.mix must be the Mix of the first view (one block)")
            v2 = remix(v2, batch.mix)
        if self.hp.forward == "split":
            logits = torch.cat([model(batch.x), model(v2)])
        else:
            logits = model(torch.cat([batch.x, v2]))
        return self.loss(logits, batch.y, index=batch.index, mix=batch.mix)

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        """``logits`` = ``[view 1 | view 2]`` (2B rows); ``target`` = B labels, or 2B with equal halves;
        ``mix``: the mixing of the B rows of each view (the same for both)."""
        rows = logits.shape[0]
        if rows % 2 or rows == 0:
            raise TrainingError(
                f"DDGSD: logits must hold two views of the same B images, [view 1 | view 2] (got {rows} rows)"
            )
        b = rows // 2
        if target.shape[0] == rows:
            same = (host_equal(target[:b], target[b:]) if target.device.type == "cpu"
                    else torch.equal(target[:b], target[b:]))  # 2B device labels (plain loops only): one sync
            if not same:
                raise TrainingError("DDGSD: with 2B labels, both halves (the two views) must carry the same labels")
            y = target[:b]
        elif target.shape[0] == b:
            y = target
        else:
            raise TrainingError(
                f"DDGSD: {rows} logits (two views of {b} images) need {b} or {rows} labels (got {target.shape[0]})"
            )
        z1, z2 = logits[:b], logits[b:]
        ce = cross_entropy(z1, y, mix=mix) + cross_entropy(z2, y, mix=mix)
        if self.hp.ce_views == "mean":
            ce = ce / 2
        t = self.hp.temperature
        kd = kd_kl(z1, z2, t) + kd_kl(z2, z1, t)
        loss = ce + self.hp.lam * kd
        return StepOutput(loss, {"ce": ce.detach(), "kd": kd.detach()}, logits, torch.cat([y, y]))
