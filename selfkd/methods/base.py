"""The method contract: one object per self-distillation method.

A method turns a model and a batch into a loss with named parts. It may own state (cached logits,
per-sample memories, model snapshots); that state is first-class: ``state_dict()`` /
``load_state_dict()`` and it is saved in every checkpoint.

Two ways in:

* plain loops call the method on logits: ``loss = method(model(x), y)``;
* the reference trainer calls :meth:`Method.train_step`, which runs the forward pass(es) the
  method needs (DLB's split forward, extra views, teachers) and returns a :class:`StepOutput`.

Hyper-parameters are a pydantic model (``Params``) that forbids unknown names; the class
docstring holds the formula, the paper and the defaults.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn
from torch.utils.data import BatchSampler, Sampler

from ..data.mixing import Mix, MixBlocks, Mixer
from ..errors import ConfigError, TrainingError, integer


class Params(BaseModel):
    """Base of every method's hyper-parameters: unknown names are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Batch:
    """One training step's inputs, already on the training device.

    ``x`` is the augmented float input; ``raw`` the uint8 images before augmentation and
    ``augment`` the batched augmentation, for methods that need another view of the same images.
    ``index`` (dataset indices) and ``y_host`` (the labels) are the loader's CPU tensors: methods run
    their batch-layout checks on them, so a step never waits for the device to answer a check.
    """

    x: Tensor
    y: Tensor
    index: Tensor | None = None
    raw: Tensor | None = None
    augment: Callable[[Tensor], Tensor] | None = None
    mix: Mix | MixBlocks | None = None  # set when the rows of ``x`` are mixtures (mixup/CutMix)
    y_host: Tensor | None = None  # the labels on the CPU, as the loader gave them


@dataclass
class StepOutput:
    """A step's loss (with grad), its named parts (detached scalars) and the rows it scored.

    ``terms`` (token logits, methods that define :meth:`Method.token_counts`): the loss as a sum of terms
    with grad, keyed as ``token_counts`` keys them, each a mean over its own tokens; an integration that
    averages over several batches (Hugging Face's accumulation window and ranks) rescales each by its
    share of that term's tokens. None: the loss is one term, a mean over the non-ignored tokens."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    target: Tensor | None = None
    terms: dict[str, Tensor] | None = None


def format_validation_error(owner: str, err: ValidationError) -> str:
    """One line naming the offending key and what was expected."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{owner}: unknown key {key!r}"  # repr: a key with control characters stays one line
    msg = first["msg"].removeprefix("Value error, ")
    if not key:  # a check across keys: the message names them
        return f"{owner}: {msg}"
    return f"{owner}: {key}: {msg} (got {first.get('input')!r})"


class Method:
    """Base class. Subclasses set ``name``, ``Params``, ``formula`` and implement :meth:`loss`."""

    name: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    #: the method defines the targets of mixed rows (``batch.mix``); others refuse mixup/CutMix
    supports_mix: ClassVar[bool] = False
    #: ``train_step`` runs forward passes of its own (partners, a second view, exits, a teacher): an
    #: integration that only hands over the model's logits (Hugging Face, Lightning) cannot run it
    own_forward: ClassVar[bool] = False
    #: a CE teacher of the same config is trained first (``RUN/teacher``) unless ``teacher`` is given
    needs_teacher: ClassVar[bool] = False
    #: the model must expose ``features(x)`` and ``stage_channels`` (multi-exit methods; not ``cnn_small``)
    needs_stages: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        try:
            self.hp: Params = self.Params(**params)  # a subclass redeclares ``hp: ItsParams`` for the type checker
        except ValidationError as err:
            known = ", ".join(self.Params.model_fields) or "none"
            msg = format_validation_error(f"method '{self.name}'", err)
            if "unknown key" in msg:
                msg += f"; known hyper-parameters: {known}"
            raise ConfigError(msg) from None

    @property
    def runs_on_logits(self) -> bool:
        """Whether ``loss(logits, target, index=...)`` is the whole method (no forward design of its own)."""
        return not type(self).own_forward

    # -- cost accounting -------------------------------------------------------------------
    @property
    def forwards_per_sample(self) -> float:
        """Forward passes per training sample per epoch (for equal-compute comparisons), no-grad ones (a
        teacher's, a partner's, a snapshot's) included."""
        return 1.0

    @property
    def backwards_per_sample(self) -> float:
        """Backward passes per training sample per epoch: the forwards that carry a gradient (a no-grad
        forward counts in :attr:`forwards_per_sample` only)."""
        return self.forwards_per_sample

    def passes(self, epochs: int) -> tuple[float, float]:
        """``(forward, backward)`` passes per training sample over the ``epochs`` epochs trained so far
        (what ``summary.json`` reports as ``forward_passes`` / ``backward_passes``)."""
        return self.forwards_per_sample * epochs, self.backwards_per_sample * epochs

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, *, num_samples: int, num_classes: int, epochs: int) -> None:
        """Called once before training with the training-set size, class count and epoch count
        (per-sample memories, schedules). Plain loops that use such a method call it themselves."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Return the model to train, e.g. wrapped with auxiliary exits. Anything trainable the
        method adds belongs in that wrapper, so it moves to the device, is optimised and is saved
        with the model. Default: unchanged."""
        return model

    # -- data --------------------------------------------------------------------------------
    def batch_sampler(
        self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool = False,
        labels: Tensor | None = None,
    ) -> BatchSampler | PlannedBatchSampler:
        """Batches of dataset indices. Methods that shape their batches override this;
        ``labels`` (the training labels, indexed like the data set) serve class-aware samplers."""
        return BatchSampler(sampler, batch_size, drop_last)

    def token_counts(self, targets: list[Tensor]) -> list[dict[str, Tensor]] | None:
        """For token labels (``[B, T]``, -100 ignored): how many tokens each term of :meth:`loss` averages over,
        for each of the next ``len(targets)`` batches the loss will get (their labels, in loader order; the
        batches the sampler has yielded and the loss has not consumed). Keys as in ``StepOutput.terms``, the
        first the cross-entropy term. None (default): the loss is one term, a mean over the non-ignored tokens."""
        return None

    def resumes_at(self) -> int | None:
        """After ``load_state_dict``: the batch of the current epoch at which this method's own batch sampler
        continues by itself (its position is method state, as DLB's), or None when the sampler replays its
        epoch from the start (a loop that skips batches on resume must then skip them itself)."""
        return None

    def mix(self, batch: Batch, mixer: Mixer, generator: torch.Generator) -> Batch:
        """Mix the batch (mixup/CutMix) the way this method's targets need. Default: the whole batch,
        with one permutation and coefficient; ``batch.mix`` records it for the loss."""
        self.check_mix_support()
        self.check_mix(mixer)
        x, mix = mixer(batch.x, generator)
        return replace(batch, x=x, mix=mix)

    # -- training ----------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each epoch (schedules, memories); ``epoch`` counts from 0."""

    def on_epoch_end(self) -> None:
        """Called by the trainer after each epoch's last step, before the checkpoint (e.g. PS-KD makes
        its memory the same on every rank here). Default: nothing."""

    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        """Run the forward pass(es) this method needs and return the loss. A mixed batch
        (``batch.mix``) is passed on as ``loss(..., mix=batch.mix)``, for methods with ``supports_mix``."""
        if batch.mix is None:
            return self.loss(model(batch.x), batch.y, index=batch.index)
        self.check_mix_support()
        return self.loss(model(batch.x), batch.y, index=batch.index, mix=batch.mix)

    def check_mix_support(self) -> None:
        if not type(self).supports_mix:
            raise TrainingError(f"method '{self.name}' does not define targets for mixed samples (mixup/CutMix)")

    def check_mix(self, mixer: Mixer) -> None:
        """Raise ConfigError if these hyper-parameters cannot be combined with ``mixer`` (checked when a
        batch is mixed; a trainer may call it up front). Default: any mixer."""

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None, *,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        raise NotImplementedError

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        """Plain-loop entry point: the scalar loss to call ``backward()`` on."""
        out = self.loss(logits, target)
        self.last_parts = out.parts
        return out.loss

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state, ())

    def check_state(self, state: dict[str, Any], known: Iterable[str], required: Iterable[str] = ()) -> None:
        """ConfigError unless every key of ``state`` (a checkpoint's method state) is ``known`` and every
        ``required`` one is there: what each ``load_state_dict`` checks first."""
        known = sorted(known)
        unknown, missing = sorted(set(state) - set(known)), sorted(set(required) - set(state))
        if unknown and not known:
            raise ConfigError(f"method '{self.name}' has no state but the checkpoint holds {unknown}")
        if unknown or missing:
            what = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
            raise ConfigError(f"method '{self.name}' state: {what}; expected keys {known}")

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.hp.model_dump().items())
        return f"{self.name}({args})"


def as_index_tensor(indices: Iterable[int] | Iterator[int]) -> Tensor:
    return torch.as_tensor(list(indices), dtype=torch.int64)


class PlannedBatchSampler(Sampler[list[int]]):
    """A method's batch sampler around any sampler of indices (``RandomSampler``,
    ``DistributedSampler``, ...): the method plans each epoch's batches (its order and position are
    method state); subclasses turn that plan into batches of indices in ``__iter__``."""

    owner = "method"  # names the method in the batch_size error

    def __init__(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool):
        self.sampler = sampler
        self.batch_size = integer(batch_size, f"{self.owner} batch_size", 1)
        self.drop_last = drop_last

    def __len__(self) -> int:
        # as torch's BatchSampler: Sampler declares no __len__ (it is optional), a sized sampler has one
        return batch_count(len(self.sampler), self.batch_size, self.drop_last)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the wrapped sampler (e.g. ``DistributedSampler``)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class EpochPlan:
    """The sample order of a method's current epoch and how many of its batches the loss consumed: drawn
    once per epoch from the wrapped sampler, saved with the method, so a resumed run continues it exactly
    (DLB's and CS-KD's samplers)."""

    def __init__(self) -> None:
        self.order: Tensor | None = None  # the current epoch's sample order
        self.position = 0  # batches of ``order`` consumed
        self.epoch = -1  # passes started over the data
        self.resume = False  # continue ``order`` at ``position`` on the next :meth:`begin`

    def resuming(self, batch_size: int, drop_last: bool) -> bool:
        """Whether the next :meth:`begin` continues the loaded epoch (else it draws a new order)."""
        return (self.resume and self.order is not None
                and self.position < batch_count(len(self.order), batch_size, drop_last))

    def begin(self, sampler: Iterable[int], batch_size: int, drop_last: bool) -> tuple[Tensor, int]:
        """``(order, first batch)`` of the epoch a batch sampler starts: the rest of a resumed one, else a
        new pass over ``sampler``."""
        order = self.order
        if order is not None and self.resuming(batch_size, drop_last):
            start = self.position
        else:
            order = self.order = as_index_tensor(sampler)
            self.position, start = 0, 0
            self.epoch += 1
        self.resume = False
        return order, start

    def resumes_at(self) -> int | None:
        return self.position if self.resume and self.order is not None else None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"position": self.position}
        if self.order is not None:
            state["order"] = self.order.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``position`` and, when saved, ``order``; the next :meth:`begin` continues that epoch."""
        self.position = int(state["position"])
        order = state.get("order")
        self.order = None if order is None else order.to("cpu", torch.int64)
        self.resume = self.order is not None


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``batch_size`` in an epoch of ``n`` samples (a short last one unless ``drop_last``)."""
    return n // batch_size if drop_last else -(-n // batch_size)


def host_equal(a: Tensor, b: Tensor) -> bool:
    """Exact equality of two CPU tensors, in numpy: a host-side check that cannot read a device
    value (``.numpy()`` refuses CUDA tensors), so batch-layout checks cost no synchronisation."""
    return tuple(a.shape) == tuple(b.shape) and bool(np.array_equal(a.numpy(), b.numpy()))


def host_range(t: Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty CPU integer tensor, in numpy (see :func:`host_equal`)."""
    a = t.numpy()
    return int(a.min()), int(a.max())
