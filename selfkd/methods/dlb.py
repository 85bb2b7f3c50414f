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

Only the last step's logits (``batch_size x K``) and labels are kept.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.utils.data import Sampler

from ..data.mixing import (Mix, MixBlocks, Mixer, mix_from_state, mix_state, mixed_cross_entropy,
                           remix)
from ..errors import ConfigError, TrainingError
from . import dlb_schedules
from .base import Batch, Method, Params, StepOutput, host_equal
from .losses import align_tokens, cross_entropy, kd_kl, token_mask
from .registry import register


@dataclass(frozen=True)
class Layout:
    """How the sampler built one batch: ``repeat`` leading rows, then ``new`` rows."""

    repeat: int
    new: int
    position: int  # index of this batch within its epoch
    new_index: Tensor  # dataset indices of the new rows
    progress: float  # epochs done when this batch starts: pass number + position / batches per pass


class _Track:
    """State shared by the sampler (producer of layouts) and the loss (consumer)."""

    def __init__(self) -> None:
        self.pending: deque[Layout] = deque()
        self.order: Tensor | None = None  # the current epoch's sample order
        self.position = 0  # batches of ``order`` consumed by the loss
        self.prev_new = torch.empty(0, dtype=torch.int64)  # last consumed new rows
        self.resume = False  # continue ``order`` at ``position`` on the next __iter__
        self.epoch = -1  # passes started over the data (drives the alpha/T schedules)


class DLBBatchSampler(Sampler[list[int]]):
    """Yields ``[previous step's new indices | batch_size new indices]`` for each step.

    Wraps any sampler of indices (``RandomSampler``, ``DistributedSampler``, ...). Each
    ``__iter__`` is one epoch: the wrapped sampler's order is drawn once and kept so that the
    position within the epoch can be saved and restored exactly.
    """

    def __init__(self, dlb: "DLB", sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"DLB batch_size must be a positive integer (got {batch_size!r})")
        self.dlb = dlb
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the wrapped sampler (e.g. ``DistributedSampler``)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        track = self.dlb._track
        track.pending.clear()  # layouts of an abandoned iterator were never consumed
        if track.resume and track.order is not None and track.position < self._batches(track.order):
            order, start = track.order, track.position
        else:
            order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.int64)
            start = 0
            track.order, track.position = order, 0
            track.epoch += 1
        track.resume = False
        carry = self.dlb.hp.carry_over or start > 0
        prev = track.prev_new if carry else torch.empty(0, dtype=torch.int64)
        n = self._batches(order)
        for b in range(start, n):
            new = order[b * self.batch_size : (b + 1) * self.batch_size]
            rep = prev[: self.dlb.repeat_count(len(prev))]
            track.pending.append(Layout(len(rep), len(new), b, new, track.epoch + b / n))
            yield torch.cat([rep, new]).tolist()
            prev = new

    def _batches(self, order: Tensor) -> int:
        n = len(order)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


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
    @field_validator("schedule", mode="before")
    @classmethod
    def _renamed(cls, v: Any) -> Any:
        if v in dlb_schedules.RENAMED:
            raise ValueError(f"schedule {v!r} was renamed {dlb_schedules.RENAMED[v]!r} (it is our own rule, not DynSDPB's)")
        return v

    padding_side: Literal["right", "left"] = Field(
        "right", description="token logits [B, T, V]: where the collator pads, to align a repeated row's positions "
        "with its cached ones when its padded length changed",
    )


@register
class DLB(Method):
    """Self-Distillation from the Last Mini-Batch (Shen et al., CVPR 2022).

    ``L = CE(z_all, y_all) + α · T² · KL(softmax(z_prev/T) ‖ softmax(z_rep/T))``

    * ``z_rep``: this step's logits for the repeated rows (the previous step's new samples, freshly
      augmented); ``z_prev``: the logits the model gave those samples one step earlier, detached.
    * Defaults T=3, α=1 (the values third-party ports use; the official script has no defaults).
    * ``ce_rows="new"`` puts cross-entropy on the new rows only (each sample gets CE once per epoch).
    * ``forward="split"`` reproduces the official code's two forward passes (new rows, then repeated
      rows): the loss is the same function of the logits, but BatchNorm normalises each half with its
      own batch statistics and updates its running statistics twice per step. ``joint`` (default) is
      the paper's single mini-batch.
    * ``label_smoothing=ε`` combines DLB with label smoothing: the CE term uses targets
      ``(1−ε)·onehot + ε/K`` (PyTorch's form); the distillation term is unchanged.
    * ``schedule`` moves α and T over training (progress ``p`` = epochs done, counted by the sampler):

      - ``constant``: α, T as given;
      - ``linear``: ``α_p = α_0 + (α − α_0)·min(p/R, 1)``, likewise T from ``temperature_start``, with
        ``R = ramp_epochs`` (``α_0 = alpha_start``);
      - ``confidence`` (our rule, not DynSDPB's (Fu et al. 2024; README "Sources"); ``dynamic`` is
        its old name, now an error): per step, ``c`` = the cached teacher's
        mean probability of the true label on the repeated rows (at T=1); ``α_t = α·c`` and
        ``T_t = T·(2 − c)``: an unreliable early teacher is trusted less and softened more;
      - ``entropy`` / ``margin``: per repeated row ``i`` a weight ``w_i`` of its distillation term from
        the teacher's uncertainty on it, ``1 − H(p_i)/log K`` or ``p_i(1) − p_i(2)``;
        ``KD = (1/R) Σ_i w_i·T²·KL_i`` (formulas in :mod:`~selfkd.methods.dlb_schedules`).

    * **Mixed samples** (mixup/CutMix, :meth:`mix`): the new rows are mixed among themselves (a
      permutation of the new rows only, a fresh lam and CutMix box); the repeated rows re-apply the
      previous step's mixing of those same samples (same permutation within the block, same lam, same
      box) to their fresh views, so the teacher (the cached logits of the mixed input seen one step
      earlier) and the student see the same two images in the same proportion; the KL is unchanged.
      CE on every row is mixed per row, ``lam_i·CE(z_i, y_i) + (1−lam_i)·CE(z_i, y[index_i])`` (the
      repeated block with the previous lam, the new block with the fresh one; ``ce_rows`` and
      ``label_smoothing`` apply as usual). ``schedule="confidence"``: the teacher's confidence ``c`` is its
      mean probability of the mixed one-hot target. The last step's Mix is method state
      (``state_dict``), so a resumed run mixes identically. With ``repeat_fraction < 1`` the repeated
      rows are a prefix of the previous block and its permutation cannot be re-applied: mixing then
      raises ConfigError. ``batch.mix`` is a :class:`~selfkd.data.mixing.MixBlocks`
      ``[(0, previous Mix), (r, new Mix)]`` (a plain Mix on a step without repeated rows).

    * **Token logits** (``[B, T, V]`` with ``[B, T]`` labels, -100 ignored: token classification,
      language modelling): CE is the mean over the non-ignored tokens of the CE rows; the distillation
      term is a per-token ``T²·KL`` averaged over the non-ignored tokens of the repeated rows (every
      token weighs the same, see :mod:`~selfkd.methods.losses`). The cache holds the new rows' ``[B, T, V]``
      logits (float32: ``B·T·V·4`` bytes). With dynamic padding a repeated row may come back padded to
      another length: its cached logits are re-laid by position (``padding_side``: ``right`` aligns the
      first positions, ``left`` the last) and the labels must then agree token by token, else
      TrainingError. Mixing is not defined for tokens. ``[B, K]`` logits are unchanged.

    Use the sampler from :meth:`batch_sampler`; the loss checks that each batch has the layout the
    sampler produced, and that the repeated rows carry the labels of the cached ones. The checks
    compare CPU tensors (the loader's indices and labels, ``batch.y_host``), so a step never waits
    for the device; ``schedule="confidence"`` keeps α and T as device tensors for the same reason
    (``entropy``/``margin`` their row weights).

    * **Distributed** (DDP): shard first, then pair. The sampler wraps this rank's
      ``DistributedSampler``, so each rank's batch is ``[this rank's previous new rows | this rank's
      new rows]``: the repeated rows sit on the rank that holds their cached logits, and no logits
      cross ranks. ``DistributedSampler`` pads every rank to the same sample count, so all ranks
      have equal row counts at every step (none blocks the gradient all-reduce on a short batch).
      The loss per rank is the one above; DDP averages the gradients, which equals one process
      whose batch is the union of the ranks' batches (``[every rank's repeated | every rank's
      new]``, CE a mean over all rows, KL a batchmean over all repeated rows). The cache, the order
      and the position are per-rank state, saved for every rank.
    """

    name = "dlb"
    formula = "CE(z, y) + α·T²·KL(softmax(z_prev/T) ‖ softmax(z_rep/T))"
    Params = DLBParams
    supports_mix = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._track = _Track()
        self._cache_logits: Tensor | None = None
        self._cache_labels: Tensor | None = None
        self._last_mix: Mix | None = None  # how the last consumed step's new rows were mixed (None: not mixed)
        self.steps = 0

    @property
    def temperature(self) -> float:
        return self.hp.temperature

    @property
    def alpha(self) -> float:
        return self.hp.alpha

    @property
    def runs_on_logits(self) -> bool:
        return self.hp.forward == "joint"  # split: two forwards of its own

    @property
    def forwards_per_sample(self) -> float:
        return 1.0 + self.hp.repeat_fraction

    def resumes_at(self) -> int | None:
        t = self._track
        return t.position if t.resume and t.order is not None else None

    def repeat_count(self, n_prev: int) -> int:
        return int(math.floor(self.hp.repeat_fraction * n_prev + 0.5))

    def batch_sampler(
        self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool = False,
        labels: Tensor | None = None,
    ) -> DLBBatchSampler:
        """``batch_size`` new samples per step, preceded by the previous step's new samples."""
        return DLBBatchSampler(self, sampler, batch_size, drop_last)

    # -- mixing ------------------------------------------------------------------------------
    def mix(self, batch: Batch, mixer: Mixer, generator: torch.Generator) -> Batch:
        """New rows: mixed among themselves with a fresh draw; repeated rows: the previous step's
        mixing of the same samples, re-applied to their fresh views (see the class docstring)."""
        self.check_mix(mixer)
        layout = self._peek()
        r, rows = layout.repeat, layout.repeat + layout.new
        if batch.x.shape[0] != rows:
            raise TrainingError(
                f"DLB: the sampler built a batch of {rows} rows ({r} repeated + {layout.new} new) but mix got "
                f"{batch.x.shape[0]}"
            )
        new_x, new_mix = mixer(batch.x[r:], generator)
        if r == 0:
            return replace(batch, x=new_x, mix=new_mix)
        prev = self._last_mix
        if prev is None:  # the previous step was not mixed: neither was its teacher's input
            prev = Mix(index=torch.arange(r, device=batch.x.device), lam=1.0, kind="none")
        if prev.index.shape[0] != r:
            raise TrainingError(f"DLB: {r} repeated rows but the previous step mixed {prev.index.shape[0]} new rows")
        rep_x = remix(batch.x[:r], prev)
        return replace(batch, x=torch.cat([rep_x, new_x]), mix=MixBlocks([(0, prev), (r, new_mix)], rows))

    def check_mix(self, mixer: Mixer) -> None:
        """Mixing needs ``repeat_fraction=1`` (the previous block's permutation is re-applied whole)."""
        if self.hp.repeat_fraction < 1 and getattr(mixer, "name", None) != "none":
            raise ConfigError(
                f"method 'dlb': repeat_fraction: mixing (augment.mix) needs repeat_fraction=1, so that the repeated "
                f"rows are the whole previous block and its mixing can be re-applied (got {self.hp.repeat_fraction})"
            )

    def _split_mix(self, mix: Mix | MixBlocks | None, r: int, rows: int) -> tuple[Mix | None, Mix | None]:
        """(mix of the repeated rows, mix of the new rows) from a batch's mix."""
        if mix is None:
            return None, None
        if isinstance(mix, Mix):
            if r != 0 or mix.index.shape[0] != rows:
                raise TrainingError(
                    f"DLB: a single Mix of {mix.index.shape[0]} rows cannot describe a batch of {r} repeated and "
                    f"{rows - r} new rows; use dlb.mix (MixBlocks [(0, previous Mix), ({r}, new Mix)])"
                )
            return None, mix
        try:
            rep, new = (mix.block(0) if r else None), mix.block(r)
        except KeyError:
            raise TrainingError(f"DLB: batch.mix must have blocks at rows 0 (repeated) and {r} (new)") from None
        if mix.rows != rows or new.index.shape[0] != rows - r or (rep is not None and rep.index.shape[0] != r):
            raise TrainingError("DLB: batch.mix does not match the batch layout (repeated | new rows)")
        last = self._last_mix
        if rep is not None and last is not None and (rep.kind, rep.lam, rep.box) != (last.kind, last.lam, last.box):
            raise TrainingError("DLB: the repeated rows were not mixed as the previous step's new rows; use dlb.mix")
        return rep, new

    # -- training ----------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        layout = self._peek()
        r = layout.repeat
        if self.hp.forward == "split" and r > 0:
            z_new = model(batch.x[r:])
            z_rep = model(batch.x[:r])
            logits = torch.cat([z_rep, z_new])
        else:
            logits = model(batch.x)
        return self.loss(logits, batch.y, index=batch.index, mix=batch.mix, target_host=batch.y_host)

    def _peek(self) -> Layout:
        if not self._track.pending:
            raise TrainingError(
                "DLB: no batch layout is pending: build the DataLoader with "
                "batch_sampler=dlb.batch_sampler(sampler, batch_size) and call dlb once per batch"
            )
        return self._track.pending[0]

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None, target_host: Tensor | None = None) -> StepOutput:
        """``target_host``: the same labels on the CPU (the trainer's ``batch.y_host``); with it, or with
        CPU ``target`` and ``index``, the layout checks read no device value."""
        layout = self._peek()
        host = target_host if target_host is not None else (target if target.device.type == "cpu" else None)
        if host is not None and host.shape[0] != target.shape[0]:
            raise TrainingError(f"DLB: target_host has {host.shape[0]} labels but target {target.shape[0]}")
        r, rows = layout.repeat, layout.repeat + layout.new
        if logits.shape[0] != rows or target.shape[0] != rows:
            raise TrainingError(
                f"DLB: the sampler built a batch of {rows} rows ({r} repeated + {layout.new} new) but the loss got "
                f"{logits.shape[0]} logits and {target.shape[0]} labels; pass the whole batch, in loader order"
            )
        if logits.dim() == 3 and mix is not None:
            raise TrainingError("DLB: mixing (mixup/CutMix) is not defined for token logits [B, T, V]")
        if logits.dim() not in (2, 3) or target.shape != logits.shape[:-1]:
            raise TrainingError(f"DLB: expected logits [B, K] with labels [B] or [B, T, V] with labels [B, T] "
                                f"(got {tuple(logits.shape)} and {tuple(target.shape)})")
        rep_mix, new_mix = self._split_mix(mix, r, rows)
        alpha, temp = self.hp.alpha, self.hp.temperature
        weight = None
        if r > 0:
            cached = self._cache_logits
            if cached is None or cached.shape[0] < r:
                raise TrainingError(f"DLB: {r} repeated rows but only {0 if cached is None else cached.shape[0]} cached logits")
            labels = host if host is not None else target
            cached_labels = self._cache_labels
            if cached_labels.device != labels.device:  # a plain loop switched between host and device labels
                cached_labels = cached_labels.to(labels.device)
            if logits.dim() == 3:  # tokens: re-lay the cache at the current positions (dynamic padding)
                teacher, same = align_tokens(cached[:r], cached_labels[:r], labels[:r], self.hp.padding_side)
                mask = token_mask(target[:r])
                same = bool(same)  # on the host with host labels: no device sync
            else:
                teacher, mask = cached[:r], None
                same = (host_equal(cached_labels[:r], labels[:r]) if labels.device.type == "cpu"
                        else torch.equal(cached_labels[:r], labels[:r]))  # device labels only: one sync
            if not same:
                raise TrainingError(
                    "DLB: the labels of the repeated rows differ from the previous step's new rows; "
                    "the loader must not reorder or relabel samples (use dlb.batch_sampler, shuffle=False)"
                    + (f"; token rows are aligned with padding_side={self.hp.padding_side!r}" if mask is not None else "")
                )
            if index is not None and not host_equal(self._track.prev_new[:r], index[:r].cpu()):
                raise TrainingError("DLB: the repeated rows are not the previous step's new samples")
            teacher = teacher.to(logits.device)
            alpha, temp = self.schedule_values(layout.progress, teacher, target[:r], rep_mix)
            weight = dlb_schedules.row_weight(self.hp.schedule, teacher) if self.hp.schedule in dlb_schedules.PER_SAMPLE else None
            kd = kd_kl(logits[:r], teacher, temp, mask=mask, weight=weight)
        else:
            kd = logits.float().sum() * 0.0
        ce_from = r if self.hp.ce_rows == "new" else 0
        if mix is None:
            ce = cross_entropy(logits[ce_from:], target[ce_from:], self.hp.label_smoothing)
        elif ce_from:
            ce = mixed_cross_entropy(logits[r:], target[r:], new_mix, self.hp.label_smoothing)
        else:
            ce = mixed_cross_entropy(logits, target, mix, self.hp.label_smoothing)
        loss = ce + alpha * kd

        # commit: the new rows' logits become the next step's teacher
        self._track.pending.popleft()
        self._cache_logits = logits[r:].detach().float()
        self._cache_labels = (host if host is not None else target)[r:].detach().clone()
        self._last_mix = new_mix
        self._track.prev_new = layout.new_index
        self._track.position = layout.position + 1
        self.steps += 1
        parts = {"ce": ce.detach(), "kd": kd.detach()}
        if self.hp.schedule in ("linear", "confidence") and r > 0:
            parts.update(alpha=torch.as_tensor(alpha, dtype=torch.float32).detach(),
                         temperature=torch.as_tensor(temp, dtype=torch.float32).detach())
        elif weight is not None:
            parts["weight"] = (weight * mask).sum() / mask.sum().clamp_min(1) if mask is not None else weight.mean()
        return StepOutput(loss, parts, logits, target)

    def schedule_values(self, progress: float, teacher: Tensor, labels: Tensor,
                        mix: Mix | None = None) -> tuple[float | Tensor, float | Tensor]:
        """(α, T) for a step at ``progress`` epochs, given the teacher logits of the repeated rows (and
        how those rows were mixed)."""
        hp = self.hp
        if hp.schedule == "linear":
            f = min(progress / hp.ramp_epochs, 1.0) if hp.ramp_epochs > 0 else 1.0
            t0 = hp.temperature if hp.temperature_start is None else hp.temperature_start
            return hp.alpha_start + (hp.alpha - hp.alpha_start) * f, t0 + (hp.temperature - t0) * f
        if hp.schedule == "confidence":
            return dlb_schedules.confidence(teacher, labels, hp.alpha, hp.temperature, mix)
        return hp.alpha, hp.temperature

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Cached logits and labels, the sampler's position (epoch order + consumed batches) and the
        last step's Mix (how its new rows were mixed)."""
        t = self._track
        state: dict[str, Any] = {"steps": self.steps, "prev_new": t.prev_new.clone(), "position": t.position,
                                 "epoch": t.epoch}
        if t.order is not None:
            state["order"] = t.order.clone()
        if self._cache_logits is not None:
            state["cache_logits"] = self._cache_logits.cpu().clone()
            state["cache_labels"] = self._cache_labels.cpu().clone()
        if self._last_mix is not None:
            state["last_mix"] = mix_state(self._last_mix)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {"steps", "prev_new", "position", "epoch", "order", "cache_logits", "cache_labels", "last_mix"}
        unknown = set(state) - known
        if unknown:
            raise ConfigError(f"DLB state: unknown keys {sorted(unknown)}")
        t = self._track
        t.pending.clear()
        self.steps = int(state["steps"])
        t.prev_new = state["prev_new"].to(torch.int64)
        t.position = int(state["position"])
        t.epoch = int(state["epoch"])
        t.order = state.get("order")
        t.resume = t.order is not None
        self._cache_logits = state.get("cache_logits")
        self._cache_labels = state.get("cache_labels")
        last = state.get("last_mix")
        self._last_mix = None if last is None else mix_from_state(last)
