"""CS-KD: class-wise self-knowledge distillation (Yun, Park, Lee, Shin, CVPR 2020, arXiv 2003.13964).

"Regularizing Class-wise Predictions via Self-knowledge Distillation". Semantics pinned to the
official code (github.com/alinlab/cs-kd, ``datasets.py`` ``PairBatchSampler`` and ``train.py``):

* each step's batch is ``[B anchors | B partners]``: the anchors are the next ``batch_size`` samples
  of the (shuffled) epoch order, and each partner is a random sample of its anchor's class;
* ``L = CE(f(x_anchor), y) + λ · T² · KL(softmax(f(x_partner)/T) ‖ softmax(f(x_anchor)/T))``: the
  anchors are forwarded with gradients, the partners in a second forward under ``torch.no_grad()``;
  cross-entropy is on the anchors only; the KL is a ``batchmean`` over the anchors (the official
  ``KLDivLoss(reduction="sum") · T² / B`` is the same number);
* a short last batch works (``drop_last=False``, as the official sampler).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Sampler

from ..data.mixing import Mix, MixBlocks, Mixer, remix
from ..errors import TrainingError
from .base import (Batch, EpochPlan, Method, Params, PlannedBatchSampler, StepOutput, batch_count, host_equal,
                   host_range)
from .losses import cross_entropy, kd_kl
from .registry import register_method


class _ClassIndex:
    """Dataset indices grouped by class, for drawing same-class partners in one vectorised step."""

    def __init__(self, labels: Tensor | None):
        if labels is None:
            raise TrainingError(
                "CS-KD: batch_sampler needs the training labels to pair samples of the same class: "
                "call cskd.batch_sampler(sampler, batch_size, labels=train_labels)"
            )
        labels = torch.as_tensor(labels)
        bad_type = labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool
        if labels.dim() != 1 or bad_type or labels.numel() == 0:
            raise TrainingError(
                f"CS-KD: labels must be a non-empty 1-D integer tensor (got {labels.dtype} of shape {tuple(labels.shape)})"
            )
        labels = labels.detach().to("cpu", torch.int64)
        if int(labels.min()) < 0:
            raise TrainingError(f"CS-KD: labels must be >= 0 (got {int(labels.min())})")
        self.labels = labels
        self.sorted = torch.argsort(labels, stable=True)  # indices grouped by class, ascending within a class
        self.counts = torch.bincount(labels)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.rank = torch.empty_like(labels)  # position of each index within its class
        self.rank[self.sorted] = torch.arange(len(labels)) - self.starts[labels[self.sorted]]
        self.singleton_classes = int((self.counts == 1).sum())

    def partners(self, anchors: Tensor, generator: torch.Generator, mode: str) -> Tensor:
        if anchors.numel() and int(anchors.max()) >= len(self.labels):
            raise TrainingError(
                f"CS-KD: the sampler yielded index {int(anchors.max())} but only {len(self.labels)} labels were given"
            )
        cls = self.labels[anchors]
        n = self.counts[cls]
        # one draw per *data-set index* (not per position): a sample's partner does not depend on how the
        # epoch order is sharded, so DDP ranks draw exactly the partners one process would
        u = torch.rand(len(self.labels), generator=generator, dtype=torch.float64)[anchors]
        if mode == "other":
            m = (n - 1).clamp_min(1)
            j = torch.minimum((u * m).long(), m - 1)  # uniform in [0, n-1): skip the anchor's own slot
            j = j + (j >= self.rank[anchors]).long()
            j = torch.where(n > 1, j, torch.zeros_like(j))  # a class of one sample: the anchor itself
        else:
            j = torch.minimum((u * n).long(), n - 1)
        return self.sorted[self.starts[cls] + j]


class PairBatchSampler(PlannedBatchSampler):
    """Yields ``[batch_size anchors | one same-class partner per anchor]`` for each step.

    Wraps any sampler of indices (``RandomSampler``, ``DistributedSampler``, ...). Each
    ``__iter__`` is one epoch, from :meth:`CSKD.plan_epoch`: the wrapped sampler's order and all the
    epoch's partners are drawn once, at its start, and kept in the method's state, so a run resumes
    mid-epoch exactly. ``labels`` go to :meth:`CSKD.set_train_labels`.
    """

    owner = "CS-KD"

    def __init__(self, cskd: "CSKD", sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool,
                 labels: Tensor | None):
        super().__init__(sampler, batch_size, drop_last)
        self.cskd = cskd
        cskd.set_train_labels(labels)

    def __iter__(self) -> Iterator[list[int]]:
        order, partners, start = self.cskd.plan_epoch(self.sampler, self.batch_size, self.drop_last)
        bs = self.batch_size
        for b in range(start, batch_count(len(order), bs, self.drop_last)):
            yield torch.cat([order[b * bs : (b + 1) * bs], partners[b * bs : (b + 1) * bs]]).tolist()


class CSKDParams(Params):
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of the distillation term")
    lam: float = Field(1.0, ge=0, description="weight λ of the class-wise distillation term (official --lamda)")
    partner: Literal["other", "any"] = Field(
        "other",
        description="other: a different sample of the anchor's class (paper); any: any sample of the class, "
        "the anchor included (official random.choice)",
    )
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the generator that draws the partners")


@register_method
class CSKD(Method):
    """Class-wise self-knowledge distillation (Yun et al., CVPR 2020).

    ``L = CE(z_a, y) + λ · T² · KL(softmax(z_p/T) ‖ softmax(z_a/T))``

    * ``z_a``: logits of the anchors (with gradients); ``z_p``: logits of their same-class partners,
      from a second forward pass under ``torch.no_grad()`` (official); in train mode, so BatchNorm
      updates its running statistics with both halves, as in the official code.
    * Defaults T=4, λ=1 (official CIFAR/TinyImageNet; the README uses λ=3 for CUB-200).
    * ``batch_size`` counts the *anchors*, as the official ``--batch-size`` does: a step loads
      ``2·batch_size`` images. Every sample is forwarded twice per epoch on average, once without
      backward (``forwards_per_sample`` = 2,
      ``backwards_per_sample`` = 1).

    Use the sampler from :meth:`batch_sampler` (it needs ``labels``). The loss checks that the batch
    has an even row count and that the partners carry their anchors' labels. In a plain loop,
    ``cskd(model(x), y)`` on the whole ``[anchors | partners]`` batch also works (one joint forward;
    the partner rows are detached, so they get no gradient).

    More (cost, state, mixing, distributed): ``docs/methods.md``, section ``cskd``.
    """

    name = "cskd"
    own_forward = True
    formula = "CE(z_a, y) + λ·T²·KL(softmax(z_p/T) ‖ softmax(z_a/T))"
    Params = CSKDParams
    hp: CSKDParams
    supports_mix = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._gen = torch.Generator().manual_seed(self.hp.seed)
        self._classes: _ClassIndex | None = None  # the training labels by class, from set_train_labels
        self._labels: Tensor | None = None  # the training labels (CPU int64)
        self.plan = EpochPlan()  # the epoch's anchor order and the batches of it consumed
        self._partners: Tensor | None = None  # the partner of each anchor in ``plan.order``
        self.steps = 0

    @property
    def forwards_per_sample(self) -> float:
        return 2.0

    @property
    def backwards_per_sample(self) -> float:
        return 1.0  # the partners' forward is no-grad

    def batch_sampler(
        self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool = False,
        labels: Tensor | None = None,
    ) -> PairBatchSampler:
        """``batch_size`` anchors per step, followed by one same-class partner each."""
        return PairBatchSampler(self, sampler, batch_size, drop_last, labels)

    def set_train_labels(self, labels: Tensor | None) -> None:
        """The training labels (1-D integers, indexed like the data set): the partners are drawn from
        them and the loss checks each pair against them on the CPU. :meth:`batch_sampler` sets them."""
        self._classes = _ClassIndex(labels)
        self._labels = self._classes.labels

    def plan_epoch(self, sampler: Iterable[int], batch_size: int, drop_last: bool) -> tuple[Tensor, Tensor, int]:
        """``(anchor order, partners, first batch)`` of the epoch a batch sampler starts: the rest of a
        resumed epoch (after :meth:`load_state_dict`), else ``sampler``'s order with one partner per
        anchor drawn now from this method's generator (needs :meth:`set_train_labels`)."""
        new = not self.plan.resuming(batch_size, drop_last)
        if new and self._classes is None:
            raise TrainingError("CS-KD: no training labels to pair samples of the same class: call "
                                "cskd.set_train_labels(labels) or cskd.batch_sampler(..., labels=train_labels)")
        order, start = self.plan.begin(sampler, batch_size, drop_last)
        if new:
            assert self._classes is not None  # checked above
            self._partners = self._classes.partners(order, self._gen, self.hp.partner)
        assert self._partners is not None  # drawn now, or loaded with the resumed epoch's order
        return order, self._partners, start

    # -- training ----------------------------------------------------------------------------
    def _check_pairs(self, rows: int, target: Tensor, index: Tensor | None, host: Tensor | None = None) -> int:
        if rows % 2 or rows == 0 or target.shape[0] != rows:
            raise TrainingError(
                f"CS-KD: a batch must be [anchors | partners] with an even, equal number of logits and labels "
                f"(got {rows} rows and {target.shape[0]} labels); build the DataLoader with "
                "batch_sampler=cskd.batch_sampler(sampler, batch_size, labels=train_labels)"
            )
        b = rows // 2
        labels = self._labels
        if index is not None and labels is not None and index.device.type == "cpu" and index.shape[0] == rows:
            # the sampler's labels, looked up on the CPU: no device synchronisation per step
            lo, hi = host_range(index)
            if hi >= len(labels) or lo < 0:
                raise TrainingError(f"CS-KD: batch index out of range for {len(labels)} training labels")
            pair_labels = labels[index]
            ok = host_equal(pair_labels[:b], pair_labels[b:])
        elif host is not None and host.shape[0] == rows:
            ok = host_equal(host[:b], host[b:])
        else:  # device labels only (a plain loop): one synchronisation
            ok = torch.equal(target[:b], target[b:])
        if not ok:
            raise TrainingError(
                "CS-KD: the partner rows' labels differ from their anchors'; the second half of each batch must "
                "be same-class partners (use cskd.batch_sampler and do not reorder or relabel rows)"
            )
        return b

    def mix(self, batch: Batch, mixer: Mixer, generator: torch.Generator) -> Batch:
        """Mix the anchors among themselves; the partners with the same permutation, lam and box."""
        rows = batch.x.shape[0]
        if rows % 2 or rows == 0:
            raise TrainingError(f"CS-KD: a batch must be [anchors | partners] with an even row count (got {rows})")
        b = rows // 2
        anchors, m = mixer(batch.x[:b], generator)
        partners = remix(batch.x[b:], m)
        return replace(batch, x=torch.cat([anchors, partners]), mix=MixBlocks([(0, m), (b, m)], rows))

    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        b = self._check_pairs(batch.x.shape[0], batch.y, batch.index, batch.y_host)
        z_anchor = model(batch.x[:b])
        with torch.no_grad():
            z_partner = model(batch.x[b:])
        return self._loss(z_anchor, z_partner, batch.y[:b], self._anchor_mix(batch.mix, b))

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        """``logits``/``target`` hold the whole batch ``[anchors | partners]``; partner rows are detached.
        ``mix``: the batch's MixBlocks (as :meth:`mix` makes it) or the anchors' Mix."""
        b = self._check_pairs(logits.shape[0], target, index, target if target.device.type == "cpu" else None)
        return self._loss(logits[:b], logits[b:].detach(), target[:b], self._anchor_mix(mix, b))

    @staticmethod
    def _anchor_mix(mix: Mix | MixBlocks | None, b: int) -> Mix | None:
        if mix is None or isinstance(mix, Mix):
            if mix is not None and mix.index.shape[0] != b:
                raise TrainingError(f"CS-KD: the anchors' Mix covers {mix.index.shape[0]} rows, not the {b} anchors")
            return mix
        try:
            m = mix.block(0)
        except KeyError:
            raise TrainingError("CS-KD: batch.mix has no block for the anchors (rows 0..B-1)") from None
        if m.index.shape[0] != b:
            raise TrainingError(f"CS-KD: the anchors' Mix covers {m.index.shape[0]} rows, not the {b} anchors")
        return m

    def _loss(self, z_anchor: Tensor, z_partner: Tensor, y: Tensor, mix: Mix | None = None) -> StepOutput:
        ce = cross_entropy(z_anchor, y, mix=mix)
        kd = kd_kl(z_anchor, z_partner, self.hp.temperature)
        loss = ce + self.hp.lam * kd
        if self.plan.order is not None:
            self.plan.position += 1
        self.steps += 1
        return StepOutput(loss, {"ce": ce.detach(), "kd": kd.detach()}, z_anchor, y)

    def resumes_at(self) -> int | None:
        return self.plan.resumes_at()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The partner generator, and the sampler's position (epoch order, partners, consumed batches)."""
        state: dict[str, Any] = {"steps": self.steps, "generator": self._gen.get_state(), **self.plan.state_dict()}
        if self.plan.order is not None:
            assert self._partners is not None  # drawn with every order
            state["partners"] = self._partners.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        required = ("steps", "generator", "position", *(("order", "partners") if {"order", "partners"} & set(state) else ()))
        self.check_state(state, ("steps", "generator", "position", "order", "partners"), required)
        self.steps = int(state["steps"])
        self._gen.set_state(state["generator"].to("cpu", torch.uint8))
        self.plan.load_state_dict(state)
        self._partners = None if self.plan.order is None else state["partners"].to("cpu", torch.int64)
