"""DLB: Self-Distillation from the Last Mini-Batch (Shen et al., CVPR 2022, arXiv 2203.16172).

Semantics pinned to the official code (github.com/Meta-knowledge-Lab/DLB, dlb.py @8949a46):

* each step's batch is ``[repeated rows | new rows]``; the repeated rows are the previous step's
  new samples, fetched again from the Dataset, so a random augmentation gives them a fresh view;
* ``L = CE(all rows) + α · T² · KL(softmax(z_prev/T) ‖ softmax(z_rep/T))``, the KL averaged over the
  repeated rows (``batchmean``). ``z_prev`` are the logits the model produced for those samples one
  step earlier (before that step's update), detached; only the current forward gets gradients;
* the first step has no repeated rows; the state carries across epoch boundaries (the official
  code initialises it once, before epoch 0); a short last batch works.

``batch_size`` counts the *new* samples per step, as the official ``--batch_size`` does: a step
holds up to ``batch_size`` repeated rows plus ``batch_size`` new ones, so the paper's mini-batch of
``n`` rows is ``batch_size = n/2``. Every sample is forwarded twice per epoch.

Only the last step's logits (``batch_size x K``) and labels are kept. Beside the class:
:mod:`~selfkd.methods.dlb_schedules` (α and T over training, per-row weights),
:mod:`~selfkd.methods.dlb_mixing` (DLB with mixup/CutMix) and :mod:`~selfkd.methods.dlb_cache`
(batch layouts, the cache, the checks of the repeated rows, token logits and dynamic padding).

**Distributed** (DDP): shard first, then pair. The sampler wraps this rank's ``DistributedSampler``,
so each rank's batch is ``[this rank's previous new rows | this rank's new rows]``: the repeated rows
sit on the rank that holds their cached logits, and no logits cross ranks. ``DistributedSampler``
pads every rank to the same sample count, so all ranks have equal row counts at every step (none
blocks the gradient all-reduce on a short batch). The loss per rank is the one above; DDP averages
the gradients, which equals one process whose batch is the union of the ranks' batches (``[every
rank's repeated | every rank's new]``, CE a mean over all rows, KL a batchmean over all repeated
rows). The cache, the order and the position are per-rank state, saved for every rank.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.utils.data import Sampler

from ..data.mixing import Mix, MixBlocks, Mixer
from . import dlb_mixing, dlb_schedules
from .base import Batch, Method, Params, PlannedBatchSampler, StepOutput
from .dlb_cache import LastBatch, Layout, check_batch
from .losses import cross_entropy, kd_kl
from .registry import register_method

__all__ = ["DLB", "DLBBatchSampler", "DLBParams", "Layout"]


class DLBBatchSampler(PlannedBatchSampler):
    """Yields ``[previous step's new indices | batch_size new indices]`` for each step.

    Wraps any sampler of indices (``RandomSampler``, ``DistributedSampler``, ...). Each
    ``__iter__`` is one epoch, laid out by :meth:`DLB.plan_epoch`: the wrapped sampler's order is
    drawn once and kept (method state), so the position within the epoch is saved and restored exactly.
    """

    owner = "DLB"

    def __init__(self, dlb: "DLB", sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool):
        super().__init__(sampler, batch_size, drop_last)
        self.dlb = dlb

    def __iter__(self) -> Iterator[list[int]]:
        for layout in self.dlb.plan_epoch(self.sampler, self.batch_size, self.drop_last):
            yield layout.indices()


class DLBParams(Params):
    temperature: float = Field(3.0, gt=0, description="softmax temperature T of the distillation term")
    alpha: float = Field(1.0, ge=0, description="weight α of the distillation term")
    repeat_fraction: float = Field(
        1.0, gt=0, le=1, description="fraction of the previous step's new samples that repeat"
    )
    ce_rows: Literal["all", "new"] = Field("all", description="rows that receive cross-entropy")
    carry_over: bool = Field(True, description="the first step of an epoch repeats the last step of the previous one")
    forward: Literal["joint", "split"] = Field(
        "joint",
        description="joint: one forward over [repeated|new] (paper); split: new then repeated (official code, "
        "BatchNorm sees two batches)",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="ε of label smoothing in the CE term (ε/K on every class)")
    schedule: Literal["constant", "linear", "confidence", "entropy", "margin"] = Field(
        "constant", description="alpha/T over training: constant, linear ramp, confidence (α·c, T·(2−c) per step); "
        "or a per-row weight of the distillation term from the teacher's uncertainty: entropy, margin "
        "(see selfkd.methods.dlb_schedules)"
    )
    ramp_epochs: float = Field(0.0, ge=0, description="linear: epochs over which alpha and T move to their final values")
    alpha_start: float = Field(0.0, ge=0, description="linear: alpha at the start of the ramp")
    temperature_start: float | None = Field(None, gt=0, description="linear: T at the start of the ramp (None: T)")
    padding_side: Literal["right", "left"] = Field(
        "right", description="token logits [B, T, V]: where the collator pads, to align a repeated row's positions "
        "with its cached ones when its padded length changed",
    )

    @field_validator("schedule", mode="before")
    @classmethod
    def _renamed(cls, v: Any) -> Any:
        if v in dlb_schedules.RENAMED:
            raise ValueError(f"schedule {v!r} was renamed {dlb_schedules.RENAMED[v]!r} (it is our own rule, not DynSDPB's)")
        return v


@register_method
class DLB(Method):
    """Self-Distillation from the Last Mini-Batch (Shen et al., CVPR 2022).

    ``L = CE(z_all, y_all) + α · T² · KL(softmax(z_prev/T) ‖ softmax(z_rep/T))``

    * ``z_rep``: this step's logits for the repeated rows (the previous step's new samples, freshly
      augmented); ``z_prev``: the logits the model gave those samples one step earlier, detached.
    * Defaults T=3, α=1 (the values third-party ports use; the official script has no defaults).
    * ``ce_rows="new"`` puts cross-entropy on the new rows only (each sample gets CE once per epoch).
    * ``forward="split"`` reproduces the official code's two forward passes (new rows, then repeated
      rows): the same loss of the logits, but BatchNorm normalises each half with its own batch
      statistics and updates its running statistics twice per step. ``joint`` (default): the paper's.
    * ``label_smoothing=ε``: CE targets ``(1−ε)·onehot + ε/K`` (PyTorch's); the distillation term is unchanged.
    * ``schedule``: α and T over training (``constant``, ``linear``, ``confidence``) or a per-row weight of the
      distillation term (``entropy``, ``margin``): :mod:`~selfkd.methods.dlb_schedules`.
    * Mixed samples (:meth:`mix`): the repeated rows re-apply the previous step's mixing
      (:mod:`~selfkd.methods.dlb_mixing`). Token logits ``[B, T, V]``: a per-token ``T²·KL`` averaged over
      the repeated rows' non-ignored tokens, re-aligned under dynamic padding (:mod:`~selfkd.methods.dlb_cache`).

    Use the sampler from :meth:`batch_sampler`: the loss checks each batch against the layout that
    :meth:`plan_epoch` gave the sampler, and the repeated rows' labels against the cached ones, on CPU tensors.
    """

    name = "dlb"
    formula = "CE(z, y) + α·T²·KL(softmax(z_prev/T) ‖ softmax(z_rep/T))"
    Params = DLBParams
    supports_mix = True
    temperature = property(lambda self: self.hp.temperature)
    alpha = property(lambda self: self.hp.alpha)
    steps = property(lambda self: self._track.steps)
    _cache_logits = property(lambda self: self._track.logits)  # read by tests and tools
    _last_mix = property(lambda self: self._track.mix)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._track = LastBatch()  # the sampler's layouts, the epoch position and the last step's logits

    @property
    def runs_on_logits(self) -> bool:
        return self.hp.forward == "joint"  # split: two forwards of its own

    @property
    def forwards_per_sample(self) -> float:
        return 1.0 + self.hp.repeat_fraction

    def resumes_at(self) -> int | None:
        return self._track.resumes_at()

    def repeat_count(self, n_prev: int) -> int:
        """How many of the previous step's ``n_prev`` new samples repeat."""
        return int(math.floor(self.hp.repeat_fraction * n_prev + 0.5))

    def batch_sampler(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool = False,
                      labels: Tensor | None = None) -> DLBBatchSampler:
        """``batch_size`` new samples per step, preceded by the previous step's new samples."""
        return DLBBatchSampler(self, sampler, batch_size, drop_last)

    def plan_epoch(self, sampler: Iterable[int], batch_size: int, drop_last: bool) -> Iterator[Layout]:
        """One epoch of batch layouts (the rest of a resumed one, else a new pass over ``sampler``), each
        queued for :meth:`loss` as it is yielded: what :class:`DLBBatchSampler` turns into indices."""
        return self._track.plan(sampler, batch_size, drop_last, self.repeat_count, self.hp.carry_over)

    def mix(self, batch: Batch, mixer: Mixer, generator: torch.Generator) -> Batch:
        """New rows: mixed among themselves; repeated rows: the previous step's mixing re-applied."""
        self.check_mix(mixer)
        return dlb_mixing.mix_batch(batch, self._track.peek(), self._track.mix, mixer, generator)

    def check_mix(self, mixer: Mixer) -> None:
        """Mixing needs ``repeat_fraction=1`` (the previous block's permutation is re-applied whole)."""
        dlb_mixing.check_mixer(self.hp.repeat_fraction, mixer)

    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        r = self._track.peek().repeat
        if self.hp.forward == "split" and r > 0:
            z_new = model(batch.x[r:])
            logits = torch.cat([model(batch.x[:r]), z_new])
        else:
            logits = model(batch.x)
        return self.loss(logits, batch.y, index=batch.index, mix=batch.mix, target_host=batch.y_host)

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None, target_host: Tensor | None = None) -> StepOutput:
        """``target_host``: the same labels on the CPU (the trainer's ``batch.y_host``); with it, or with
        CPU ``target`` and ``index``, the layout checks read no device value."""
        hp, track = self.hp, self._track
        layout = track.peek()
        host = check_batch(layout, logits, target, target_host, mix)
        r = layout.repeat
        rep_mix, new_mix = dlb_mixing.split_mix(mix, r, r + layout.new, track.mix)
        alpha, parts = hp.alpha, {}
        if r > 0:
            teacher, mask = track.teacher(layout, logits, target, host, index, hp.padding_side)
            alpha, temp, weight = dlb_schedules.for_step(hp, layout.progress, teacher, target[:r], rep_mix)
            kd = kd_kl(logits[:r], teacher, temp, mask=mask, weight=weight)
            parts = dlb_schedules.logged(hp.schedule, alpha, temp, weight, mask)
        else:
            kd = logits.float().sum() * 0.0
        ce_from = r if hp.ce_rows == "new" else 0
        ce = cross_entropy(logits[ce_from:], target[ce_from:], hp.label_smoothing, mix=new_mix if ce_from else mix)
        track.commit(layout, logits[r:], (host if host is not None else target)[r:], new_mix)  # the next teacher
        return StepOutput(ce + alpha * kd, {"ce": ce.detach(), "kd": kd.detach(), **parts}, logits, target)

    def state_dict(self) -> dict[str, Any]:
        """Cached logits and labels, the sampler's position (epoch order + consumed batches) and the
        last step's Mix (how its new rows were mixed)."""
        return self._track.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._track.load_state_dict(state)
