"""The DLB method and its batch sampler (the package docstring has the semantics)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from ...data.mixing import Mix, MixBlocks, Mixer
from ..base import Batch, EpochPlan, Method, PlannedBatchSampler, StepOutput
from ...errors import ConfigError
from ..losses import cross_entropy, kd_kl, kd_kl_topk, token_mask
from ..registry import register_method
from . import mixing, schedules
from .cache import KEYS, LastBatch, Layout, Layouts, check_batch, plan_layouts
from .params import PER_SAMPLE, DLBParams


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
      distillation term (``entropy``, ``margin``): :mod:`~selfkd.methods.dlb.schedules`.
    * Mixed samples (:meth:`mix`): the repeated rows re-apply the previous step's mixing
      (:mod:`~selfkd.methods.dlb.mixing`). Token logits ``[B, T, V]``: a per-token ``T²·KL`` averaged over
      the repeated rows' non-ignored tokens, re-aligned under dynamic padding (:mod:`~selfkd.methods.dlb.cache`).
    * The cache (``B·K``, or ``B·T·V`` float32 for tokens): ``cache_dtype`` bfloat16/float16 halves it;
      ``cache_topk=K`` keeps each row's K largest logits and the tail's mass, and the distillation term is
      ``T²·KL`` over K+1 buckets (:func:`~selfkd.methods.losses.kd_kl_topk`; ``K = V`` is the full cache
      exactly; T must stay fixed). Rounding bound and sources: docs/methods.md.

    Use the sampler from :meth:`batch_sampler`: the loss checks each batch against the layout that
    :meth:`plan_epoch` gave the sampler, and the repeated rows' labels against the cached ones, on CPU tensors.
    """

    name = "dlb"
    formula = "CE(z, y) + α·T²·KL(softmax(z_prev/T) ‖ softmax(z_rep/T))"
    Params = DLBParams
    hp: DLBParams
    supports_mix = True
    temperature = property(lambda self: self.hp.temperature)
    alpha = property(lambda self: self.hp.alpha)
    steps = property(lambda self: self.last.steps)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.layouts = Layouts()  # planned by the sampler, consumed by the loss
        self.plan = EpochPlan()  # the epoch's order and position
        hp = self.hp
        self.last = LastBatch(hp.cache_dtype, hp.cache_topk, hp.temperature)  # the last step's new rows: the next teacher

    @property
    def runs_on_logits(self) -> bool:
        return self.hp.forward == "joint"  # split: two forwards of its own

    @property
    def forwards_per_sample(self) -> float:
        return 1.0 + self.hp.repeat_fraction

    def resumes_at(self) -> int | None:
        return self.plan.resumes_at()

    def repeat_count(self, n_prev: int) -> int:
        """How many of the previous step's ``n_prev`` new samples repeat."""
        return int(math.floor(self.hp.repeat_fraction * n_prev + 0.5))

    def batch_sampler(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool = False,
                      labels: Tensor | None = None) -> DLBBatchSampler:
        """``batch_size`` new samples per step, preceded by the previous step's new samples."""
        return DLBBatchSampler(self, sampler, batch_size, drop_last)

    def plan_epoch(self, sampler: Iterable[int], batch_size: int, drop_last: bool) -> Iterator[Layout]:
        """One epoch of batch layouts (the rest of a resumed one, else a new pass over ``sampler``), each
        put in :attr:`layouts` for :meth:`loss` as it is yielded: what :class:`DLBBatchSampler` turns into indices."""
        return plan_layouts(self.plan, self.last, self.layouts, sampler, batch_size, drop_last, self.repeat_count,
                    self.hp.carry_over)

    def mix(self, batch: Batch, mixer: Mixer, generator: torch.Generator) -> Batch:
        """New rows: mixed among themselves; repeated rows: the previous step's mixing re-applied."""
        self.check_mix(mixer)
        return mixing.mix_batch(batch, self.layouts.next(), self.last.mix, mixer, generator)

    def check_mix(self, mixer: Mixer) -> None:
        """Mixing needs ``repeat_fraction=1`` (the previous block's permutation is re-applied whole)."""
        mixing.check_mixer(self.hp.repeat_fraction, mixer)

    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        r = self.layouts.next().repeat
        if self.hp.forward == "split" and r > 0:
            z_new = model(batch.x[r:])
            logits = torch.cat([model(batch.x[:r]), z_new])
        else:
            logits = model(batch.x)
        return self.loss(logits, batch.y, index=batch.index, mix=batch.mix, target_host=batch.y_host)

    def token_counts(self, targets: list[Tensor]) -> list[dict[str, Tensor]]:
        """Per pending batch: the tokens the CE term averages over (``ce``: every non-ignored one, or the new
        rows' with ``ce_rows="new"``) and the distillation term (``kd``: the repeated rows' non-ignored ones)."""
        out = []
        for layout, y in zip(self.layouts.ahead(len(targets)), targets):
            r = layout.repeat
            out.append({"ce": token_mask(y[r if self.hp.ce_rows == "new" else 0:]).sum(), "kd": token_mask(y[:r]).sum()})
        return out

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None, target_host: Tensor | None = None) -> StepOutput:
        """``target_host``: the same labels on the CPU (the trainer's ``batch.y_host``); with it, or with
        CPU ``target`` and ``index``, the layout checks read no device value."""
        hp, last = self.hp, self.last
        layout = self.layouts.next()
        host = check_batch(layout, logits, target, target_host, mix)
        if hp.cache_topk is not None and hp.cache_topk > logits.shape[-1]:
            raise ConfigError(f"method 'dlb': cache_topk={hp.cache_topk} is larger than the logits' last dimension "
                              f"V={logits.shape[-1]}: expected 1 <= cache_topk <= {logits.shape[-1]}")
        r = layout.repeat
        rep_mix, new_mix = mixing.split_mix(mix, r, r + layout.new, last.mix)
        alpha: float | Tensor = hp.alpha  # a tensor under the confidence schedule
        parts: dict[str, Tensor] = {}
        if r > 0:
            t = last.teacher(layout, logits, target, host, index, hp.padding_side)
            mask = t.mask
            alpha, temp, weight = schedules.for_step(hp, layout.progress, t.logits, target[:r], rep_mix, weight=t.weight)
            if t.index is None:
                kd = kd_kl(logits[:r], t.logits, temp, mask=mask, weight=weight)
            else:  # T is fixed with a top-K cache (DLBParams), the temperature of the cached tail
                kd = kd_kl_topk(logits[:r], t.logits, t.index, t.tail, temp, mask=mask, weight=weight)
            parts = schedules.logged(hp.schedule, alpha, temp, weight, mask)
        else:
            kd = logits.float().sum() * 0.0
        ce_from = r if hp.ce_rows == "new" else 0
        ce = cross_entropy(logits[ce_from:], target[ce_from:], hp.label_smoothing, mix=new_mix if ce_from else mix)
        self.layouts.pop()
        # a top-K cache cannot give the per-sample weights later: they are taken from the full logits now
        keep = (schedules.row_weight(hp.schedule, logits[r:])
                if hp.cache_topk is not None and hp.schedule in PER_SAMPLE else None)
        last.commit(layout, logits[r:], (host if host is not None else target)[r:], new_mix, keep)  # the next teacher
        self.plan.position = layout.position + 1
        return StepOutput(ce + alpha * kd, {"ce": ce.detach(), "kd": kd.detach(), **parts}, logits, target,
                          terms={"ce": ce, "kd": alpha * kd})

    def state_dict(self) -> dict[str, Any]:
        """Cached logits and labels, the sampler's position (epoch order + consumed batches) and the
        last step's Mix (how its new rows were mixed)."""
        state = {**self.last.state_dict(), **self.plan.state_dict(), "epoch": self.plan.epoch}
        return {k: state[k] for k in KEYS if k in state}  # in the order of earlier checkpoints

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state, KEYS, required=("steps", "prev_new", "position", "epoch"))
        self.layouts.clear()
        self.last.load_state_dict(state)
        self.plan.load_state_dict(state)
        self.plan.epoch = int(state["epoch"])

    @property
    def cached_logits(self) -> Tensor | None:
        """The last step's new rows' logits (detached, in ``cache_dtype``; with ``cache_topk`` their K largest,
        in vocabulary order): the next step's teacher."""
        return self.last.logits

    @property
    def cache_bytes(self) -> int:
        """Bytes of the cached teacher (logits; with ``cache_topk`` also indices, tail and weights)."""
        return self.last.nbytes

    @property
    def last_mix(self) -> Mix | None:
        """How the last step's new rows were mixed (None: not mixed)."""
        return self.last.mix
