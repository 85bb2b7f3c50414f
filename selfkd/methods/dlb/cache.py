"""DLB's hand-over from its batch sampler to its loss (:class:`Layouts`) and its cache of the last step's logits.

:func:`plan_layouts` lays out one epoch of batches ``[repeated | new]`` (a :class:`Layout` per batch,
put in :class:`Layouts` as the sampler yields it); the loss consumes the layouts in order (:meth:`Layouts.next`),
takes the repeated rows' teacher from the cache (:meth:`LastBatch.teacher`) and makes its new rows' logits the
next step's teacher (:meth:`LastBatch.commit`). Only the last step's logits, labels and Mix are kept; they,
the epoch order and the position are method state.

The checks compare CPU tensors (the loader's indices and labels, ``batch.y_host``), so a step never
waits for the device; device labels alone (a plain loop) cost one synchronisation.

Token logits (``[B, T, V]`` with ``[B, T]`` labels, -100 ignored): the cache holds the new rows'
``[B, T, V]`` logits (float32: ``B·T·V·4`` bytes). With dynamic padding a repeated row may come back
padded to another length: its cached logits are re-laid by position (``padding_side``: ``right``
aligns the first positions, ``left`` the last; :func:`~selfkd.methods.losses.align_tokens`) and the
labels must then agree token by token, else TrainingError. ``[B, K]`` logits are unchanged.

What is cached (``DLB(cache_dtype=..., cache_topk=...)``; :attr:`LastBatch.nbytes` counts it), per row
(``[B, K]``) or token (``[B, T, V]``), with ``V`` the last dimension and ``s`` the bytes of ``cache_dtype``:

* full (default): the ``V`` logits in ``cache_dtype``, ``V·s`` bytes (float32: 4, bfloat16/float16: 2);
  the teacher is the rounded logits upcast to float32; every schedule reads it as before;
* ``cache_topk=K``: the ``K`` largest logits (``cache_dtype``), their vocabulary indices (int32) and the
  tail's log-mass at T (float32), ``K·(s + 4) + 4`` bytes, and the distillation term is
  :func:`~selfkd.methods.losses.kd_kl_topk` over ``K+1`` buckets (``K = V``: equal to the full cache).
  The tail's mass is taken at the distillation temperature, so T must not move during training (the
  ``confidence`` schedule and a ``linear`` T ramp are refused); the ``entropy``/``margin`` weights are
  computed from the full float32 logits when they are cached (4 more bytes), as the full cache would give them.

float16 holds ``|z| <= 65504``: larger logits are clamped to that before the cast (a logit that large is
saturated at any usual T); bfloat16 has float32's range.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...data.mixing import Mix, MixBlocks, mix_from_state, mix_state
from ...errors import ConfigError, TrainingError
from ..base import EpochPlan, batch_count, host_equal
from ..losses import align_tokens, token_mask, topk_logits

#: the keys of DLB's state_dict (the last three only with ``cache_topk``)
KEYS = ("steps", "prev_new", "position", "epoch", "order", "cache_logits", "cache_labels", "last_mix",
        "cache_index", "cache_tail", "cache_weight")
#: ``cache_dtype`` names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Layout:
    """How the sampler built one batch: ``repeat`` leading rows, then ``new`` rows."""

    repeat: int
    new: int
    position: int  # index of this batch within its epoch
    new_index: Tensor  # dataset indices of the new rows
    progress: float  # epochs done when this batch starts: pass number + position / batches per pass
    repeat_index: Tensor  # dataset indices of the repeated rows (the previous batch's new ones)

    def indices(self) -> list[int]:
        """The batch's dataset indices, ``[repeated | new]``."""
        return torch.cat([self.repeat_index, self.new_index]).tolist()


class Layouts:
    """The layouts DLB's sampler has yielded and its loss has not consumed yet, oldest first: the one link
    between the two (a DataLoader may prefetch, so the sampler runs ahead of the loss)."""

    def __init__(self) -> None:
        self._queue: deque[Layout] = deque()

    def put(self, layout: Layout) -> None:
        self._queue.append(layout)

    def next(self) -> Layout:
        """The layout of the batch the loss consumes next."""
        if not self._queue:
            raise TrainingError(
                "DLB: no batch layout is pending: build the DataLoader with "
                "batch_sampler=dlb.batch_sampler(sampler, batch_size) and call dlb once per batch"
            )
        return self._queue[0]

    def ahead(self, n: int) -> list[Layout]:
        """The layouts of the next ``n`` batches the loss consumes, oldest first (not consumed)."""
        if len(self._queue) < n:
            raise TrainingError(f"DLB: {n} batches fetched but {len(self._queue)} batch layouts pending: build the "
                                "DataLoader with batch_sampler=dlb.batch_sampler(sampler, batch_size)")
        return [self._queue[i] for i in range(n)]

    def pop(self) -> Layout:
        """Consume :meth:`next`."""
        layout = self.next()
        self._queue.popleft()
        return layout

    def clear(self) -> None:
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)


@dataclass
class Teacher:
    """The repeated rows' cached teacher on the step's device: ``logits`` float32 (the full logits, or the
    top-K values with their ``index`` and the ``tail``'s log-mass), ``mask`` the token mask (None for
    ``[B, K]``) and ``weight`` the per-row weights cached with a top-K teacher (None otherwise)."""

    logits: Tensor
    mask: Tensor | None
    index: Tensor | None = None
    tail: Tensor | None = None
    weight: Tensor | None = None


class LastBatch:
    """The last consumed step: its new rows (dataset indices, logits, labels, Mix), the teacher of the next.

    ``dtype``/``topk``/``temperature``: how the logits are cached (module docstring)."""

    def __init__(self, dtype: str = "float32", topk: int | None = None, temperature: float = 1.0) -> None:
        self.dtype, self.topk, self.temperature = DTYPES[dtype], topk, temperature
        self.prev_new = torch.empty(0, dtype=torch.int64)  # last consumed new rows
        self.steps = 0  # steps consumed
        self.logits: Tensor | None = None  # the last step's new rows' logits (detached; top-K: their K largest)
        self.index: Tensor | None = None  # top-K: the vocabulary indices of ``logits`` (int32)
        self.tail: Tensor | None = None  # top-K with K < V: the tail's log-mass at ``temperature`` (float32)
        self.weight: Tensor | None = None  # top-K: per-row weights of a per-sample schedule (float32)
        self.labels: Tensor | None = None  # and their labels
        self.mix: Mix | None = None  # how those rows were mixed (None: not mixed)

    @property
    def nbytes(self) -> int:
        """Bytes the cached teacher holds (logits, indices, tail, weights; labels not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.logits, self.index, self.tail, self.weight)
                   if t is not None)

    def teacher(self, layout: Layout, logits: Tensor, target: Tensor, host: Tensor | None, index: Tensor | None,
                padding_side: str) -> Teacher:
        """The cached teacher of the ``layout.repeat`` repeated rows on ``logits``' device, once those rows
        are checked to be the cached samples with their labels."""
        r = layout.repeat
        cached = self.logits
        if cached is None or cached.shape[0] < r:
            raise TrainingError(f"DLB: {r} repeated rows but only {0 if cached is None else cached.shape[0]} cached logits")
        labels = host if host is not None else target
        cached_labels = self.labels
        assert cached_labels is not None  # cached with the logits
        if cached_labels.device != labels.device:  # a plain loop switched between host and device labels
            cached_labels = cached_labels.to(labels.device)
        extra = [self.index, self.tail, self.weight]
        if logits.dim() == 3:  # tokens: re-lay the cache at the current positions (dynamic padding)
            teacher, same_rows = align_tokens(cached[:r], cached_labels[:r], labels[:r], padding_side)
            extra = [None if x is None else align_tokens(x[:r], cached_labels[:r], labels[:r], padding_side)[0]
                     for x in extra]
            mask = token_mask(target[:r])
            same = bool(same_rows)  # on the host with host labels: no device sync
        else:
            teacher, mask = cached[:r], None
            extra = [None if x is None else x[:r] for x in extra]
            same = (host_equal(cached_labels[:r], labels[:r]) if labels.device.type == "cpu"
                    else torch.equal(cached_labels[:r], labels[:r]))  # device labels only: one sync
        if not same:
            raise TrainingError(
                "DLB: the labels of the repeated rows differ from the previous step's new rows; "
                "the loader must not reorder or relabel samples (use dlb.batch_sampler, shuffle=False)"
                + (f"; token rows are aligned with padding_side={padding_side!r}" if mask is not None else "")
            )
        if index is not None and not host_equal(self.prev_new[:r], index[:r].cpu()):
            raise TrainingError("DLB: the repeated rows are not the previous step's new samples")
        dev = logits.device
        at, tail, weight = (None if x is None else x.to(dev) for x in extra)
        return Teacher(teacher.to(dev).float(), mask, at, tail, weight)

    def commit(self, layout: Layout, logits: Tensor, labels: Tensor, mix: Mix | None,
               weight: Tensor | None = None) -> None:
        """The consumed step's new rows (their logits, labels and Mix) become the next step's teacher;
        ``weight``: the per-row weights to keep with a top-K teacher."""
        z = logits.detach().float()
        if self.topk is not None:
            z, index, self.tail = topk_logits(z, self.topk, self.temperature)
            self.index = index.to(torch.int32)
            self.weight = None if weight is None else weight.detach().float()
        if self.dtype == torch.float16:
            z = z.clamp(-FLOAT16_MAX, FLOAT16_MAX)
        self.logits = z.to(self.dtype)
        self.labels = labels.detach().clone()
        self.mix = mix
        self.prev_new = layout.new_index
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps, "prev_new": self.prev_new.clone()}
        if self.logits is not None:
            assert self.labels is not None  # cached with the logits
            state["cache_logits"] = self.logits.cpu().clone()
            state["cache_labels"] = self.labels.cpu().clone()
            for key, x in (("cache_index", self.index), ("cache_tail", self.tail), ("cache_weight", self.weight)):
                if x is not None:
                    state[key] = x.cpu().clone()
        if self.mix is not None:
            state["last_mix"] = mix_state(self.mix)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        logits, index = state.get("cache_logits"), state.get("cache_index")
        if logits is not None:
            self.check_cache(logits, index)
        self.steps = int(state["steps"])
        self.prev_new = state["prev_new"].to(torch.int64)
        self.logits, self.index = logits, index
        self.tail, self.weight = state.get("cache_tail"), state.get("cache_weight")
        self.labels = state.get("cache_labels")
        last = state.get("last_mix")
        self.mix = None if last is None else mix_from_state(last)

    def check_cache(self, logits: Tensor, index: Tensor | None) -> None:
        """ConfigError unless a checkpoint's cache was made with this ``cache_dtype`` and ``cache_topk``."""
        name = {v: k for k, v in DTYPES.items()}
        saved = (name.get(logits.dtype, str(logits.dtype)), None if index is None else index.shape[-1])
        if saved != (name[self.dtype], self.topk):
            raise ConfigError(f"method 'dlb' state: the checkpoint's cache has cache_dtype={saved[0]}, "
                              f"cache_topk={saved[1]} but this DLB has cache_dtype={name[self.dtype]}, "
                              f"cache_topk={self.topk}")


def plan_layouts(epoch: EpochPlan, last: LastBatch, layouts: Layouts, sampler: Iterable[int], batch_size: int,
         drop_last: bool, repeat_count: Callable[[int], int], carry_over: bool) -> Iterator[Layout]:
    """One epoch of layouts: the rest of a resumed epoch, else a new pass over ``sampler``'s order (drawn
    once, kept for an exact resume). Each layout is put in ``layouts`` as it is yielded."""
    layouts.clear()  # layouts of an abandoned iterator were never consumed
    order, start = epoch.begin(sampler, batch_size, drop_last)
    prev = last.prev_new if carry_over or start > 0 else torch.empty(0, dtype=torch.int64)
    n = batch_count(len(order), batch_size, drop_last)
    for b in range(start, n):
        new = order[b * batch_size : (b + 1) * batch_size]
        rep = prev[: repeat_count(len(prev))]
        layout = Layout(len(rep), len(new), b, new, epoch.epoch + b / n, rep)
        layouts.put(layout)
        yield layout
        prev = new


def check_batch(layout: Layout, logits: Tensor, target: Tensor, target_host: Tensor | None,
                mix: Mix | MixBlocks | None) -> Tensor | None:
    """The batch's labels on the host (None: only device labels were given), once the batch is checked
    to have the rows ``layout`` planned and logits ``[B, K]`` or ``[B, T, V]`` that fit the labels."""
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
    return host
