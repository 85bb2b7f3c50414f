"""selfkd methods on a user's ``LightningModule`` (``pip install selfkd[lightning]``).

    kd = SelfKD(selfkd.DLB(), num_classes=10)

    class Net(L.LightningModule):
        def __init__(self, kd):
            super().__init__(); self.kd = kd; self.body = ...
        def train_dataloader(self):
            return self.kd.loader(train_set, batch_size=64)        # batches (x, y, index)
        def training_step(self, batch, i):
            x, y, index = batch
            return self.kd.loss(self.body(x), y, index)

    L.seed_everything(0)
    L.Trainer(max_epochs=30, callbacks=[kd]).fit(Net(kd))       # or max_steps=...

Why a callback: it owns everything Lightning must drive without touching the module's own hooks
(set-up, per-epoch schedules, checkpoint state), so it composes with any module, a mixin's
``super()`` chains and other callbacks; the module keeps its forward and only swaps its loss and its
loader for the callback's.

* :meth:`SelfKD.loader` builds the DataLoader from ``method.batch_sampler`` (DLB's ``[repeated | new]``
  batches) over an index sampler seeded per epoch. The batch sampler follows the ``BatchSampler``
  API (``cls(sampler, batch_size, drop_last)``), so Lightning's ``use_distributed_sampler`` swaps the
  index sampler for its ``DistributedSampler`` under DDP and the method's batches are built on each
  rank's shard. Order: epoch ``e`` is ``randperm(n)`` drawn from ``seed + e``, ``seed`` being
  ``seed_everything``'s (``PL_GLOBAL_SEED``, 0 when unset) unless ``loader(seed=...)`` names one;
  Lightning's ``DistributedSampler`` draws the same permutation and gives rank ``r`` its entries
  ``r::world``, so the union of the shards is the one-process order (when ``world`` divides ``n``).
* :meth:`SelfKD.loss` is ``method.loss(logits, y, index=...)``; the parts are logged as ``selfkd/<part>``.
* length: ``method.setup(num_samples, num_classes, epochs)`` runs once, at ``on_train_start``, where
  Lightning knows the batches per epoch: ``epochs`` is ``max_epochs``, or from ``max_steps``
  ``ceil(max_steps / ceil(batches per epoch / accumulate_grad_batches))`` (the smaller when both are
  set), so the methods' per-epoch schedules run over the fit Lightning will run.
  ``method.on_epoch_start(current_epoch, epochs)`` runs before every training epoch and
  ``method.on_epoch_end()`` after it (PS-KD makes its memory the same on every rank there).
* state: the callback's ``state_dict`` (Lightning checkpoints hold it) is every rank's
  ``method.state_dict()`` (gathered across ranks), and ``fit(ckpt_path=...)`` gives each rank back its
  own. The loader is resumable in Lightning's terms (``state_dict``/``load_state_dict``: the epoch and
  the batches it has handed out), so a fit resumed from a mid-epoch checkpoint continues with the
  epoch's next batch: samplers that keep their position as method state (DLB, CS-KD) continue by
  themselves, the others skip the batches done. Lightning restores no random generator: a module or
  data set that draws from the global RNG (dropout, augmentation) resumes with another stream.

Methods whose step runs forward passes of their own (CS-KD's partners, DDGSD's second view, BYOT's
exits) need the model inside the step: use ``method.train_step`` in your ``training_step`` with a
:class:`~selfkd.methods.Batch`, or selfkd's trainer; :meth:`SelfKD.loss` refuses them.
"""
from __future__ import annotations

import math
import os
from typing import Any

from . import require

require("lightning", "lightning")

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from ..methods import Method  # noqa: E402

__all__ = ["SelfKD", "SeededShuffle"]


def global_seed() -> int:
    """``seed_everything``'s seed, as Lightning's ``DistributedSampler`` reads it (``PL_GLOBAL_SEED``; 0 when unset)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class SeededShuffle(RandomSampler):
    """A permutation per epoch from ``seed + epoch`` (``set_epoch``), so any epoch's order can be replayed.
    A ``RandomSampler`` for Lightning's eyes: under DDP it is replaced by a shuffling ``DistributedSampler``."""

    def __init__(self, data_source: Any, seed: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


class _WithIndex(Dataset):
    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple:
        item = self.data[i]
        return (*item, i) if isinstance(item, (tuple, list)) else (item, i)


class _MethodBatchSampler(BatchSampler):
    """``method.batch_sampler(sampler, batch_size, drop_last)`` behind the plain ``BatchSampler`` signature; the
    method, labels and an explicit seed are class attributes (see :meth:`SelfKD.loader`), so Lightning can
    rebuild it on another sampler. Tracks the epoch it iterates and the batches the loader handed out of it
    (:class:`_Loader`'s state)."""

    method: Method
    labels: torch.Tensor | None = None
    seed: int | None = None  # loader(seed=...): also given to the DistributedSampler Lightning puts in

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool = False):
        if self.seed is not None and not isinstance(sampler, SeededShuffle) and hasattr(sampler, "seed"):
            sampler.seed = self.seed  # Lightning's DistributedSampler is seeded from PL_GLOBAL_SEED
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.inner = self.method.batch_sampler(sampler, batch_size, drop_last, labels=self.labels)
        self.epoch = 0
        self.handed = 0  # batches of this epoch the loader has given the fit loop
        self.resume: tuple[int, int] | None = None  # (epoch, batches) from a checkpoint, for the next __iter__

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        # runs at the first batch, after Lightning's set_epoch and the callback's method state
        epoch = getattr(self.sampler, "epoch", 0)
        resume, self.resume = self.resume, None
        at = self.method.resumes_at()  # the method's own sampler continues its epoch by itself
        skip = 0
        if at is None and resume is not None and resume[0] == epoch and 0 < resume[1] < len(self):
            skip = resume[1]
        self.epoch, self.handed = epoch, at if at is not None and 0 <= at < len(self) else skip
        it = iter(self.inner)
        for _ in range(skip):  # index lists only: the skipped samples are not loaded
            next(it)
        yield from it


class _Loader(DataLoader):
    """A DataLoader with ``state_dict``/``load_state_dict``, which Lightning saves in its checkpoints and
    restores before the first batch of a resumed fit (what makes a loader resumable to Lightning)."""

    batch_sampler: _MethodBatchSampler  # always: SelfKD.loader builds it with one

    def __iter__(self):
        batches = self.batch_sampler
        for batch in super().__iter__():
            batches.handed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch being iterated and the batches of it handed out (equal on every DDP rank)."""
        return {"epoch": int(self.batch_sampler.epoch), "batches": int(self.batch_sampler.handed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != {"epoch", "batches"}:
            raise ConfigError(f"SelfKD loader state: expected keys epoch and batches (got {sorted(state)})")
        self.batch_sampler.resume = (int(state["epoch"]), int(state["batches"]))


class SelfKD(Callback):
    """Runs a selfkd ``method`` in a Lightning fit (see the module docstring)."""

    def __init__(self, method: Method, num_classes: int, log_parts: bool = True):
        if not isinstance(method, Method):
            raise ConfigError(f"SelfKD: method must be a selfkd Method (got {type(method).__name__})")
        self.method, self.num_classes, self.log_parts = method, int(num_classes), log_parts
        self._module: Any = None
        self._trainer: Any = None
        self._num_samples: int | None = None
        self._epochs = 0
        self._ready = False
        self._pending: dict[str, Any] | None = None

    # -- what the module calls --------------------------------------------------------------
    def loader(self, dataset: Any, batch_size: int, *, seed: int | None = None, labels: torch.Tensor | None = None,
               drop_last: bool = False, **loader_kwargs: Any) -> DataLoader:
        """The training DataLoader: items ``(x, y)`` of ``dataset`` come as batches ``(x, y, index)``.
        ``seed``: the shuffle's (default: ``seed_everything``'s, as under DDP). ``labels`` (per sample) serve
        class-aware samplers."""
        if any(k in loader_kwargs for k in ("batch_sampler", "sampler", "shuffle")):
            raise ConfigError("SelfKD.loader: the method builds the batches; do not pass sampler, batch_sampler or shuffle")
        self._num_samples = len(dataset)
        attrs = {"method": self.method, "labels": labels, "seed": None if seed is None else int(seed)}
        cls = type("MethodBatchSampler", (_MethodBatchSampler,), attrs)
        batches = cls(SeededShuffle(dataset, global_seed() if seed is None else seed), batch_size, drop_last)
        return _Loader(_WithIndex(dataset), batch_sampler=batches, **loader_kwargs)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if not self.method.runs_on_logits:
            raise ConfigError(f"SelfKD.loss: method '{self.method.name}' runs forward passes of its own; call "
                              f"method.train_step(model, Batch(x, y, index)) in training_step instead")
        if not self._ready:
            raise ConfigError("SelfKD.loss: the method is set up when the fit starts; pass the callback to the "
                              "Trainer (callbacks=[kd]) and call loss in training_step")
        out = self.method.loss(logits, target, index=index)
        if self.log_parts and self._module is not None:
            for k, v in out.parts.items():
                self._module.log(f"selfkd/{k}", v, on_step=True, on_epoch=True, batch_size=target.shape[0])
        return out.loss

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._module = pl_module
        self._trainer = trainer
        if stage != "fit":
            return
        epochs, steps = trainer.max_epochs, trainer.max_steps
        if epochs == 0 or steps == 0:
            raise ConfigError(f"SelfKD: the Trainer trains no step (max_epochs={epochs}, max_steps={steps}); "
                              f"give max_epochs >= 1 or max_steps >= 1")
        if (epochs is None or epochs < 0) and steps < 0:
            raise ConfigError(f"SelfKD: the Trainer has no limit (max_epochs={epochs}, max_steps={steps}); the "
                              f"methods' schedules need one: give max_epochs >= 1 or max_steps >= 1")

    def _fit_epochs(self, trainer: Any) -> int:
        """The epochs the fit runs: ``max_epochs``, or as many as ``max_steps`` optimizer steps take (the
        smaller when both are set; an epoch's steps are its batches over ``accumulate_grad_batches``)."""
        limits = [trainer.max_epochs] if trainer.max_epochs is not None and trainer.max_epochs >= 1 else []
        if trainer.max_steps >= 1:
            per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
            limits.append(math.ceil(trainer.max_steps / per_epoch))
        return min(limits)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # here Lightning knows each rank's batches per epoch (sharding and limit_train_batches included)
        self._epochs = self._fit_epochs(trainer)
        if self._ready:
            return
        if self._num_samples is None:
            raise ConfigError("SelfKD: train_dataloader must return kd.loader(dataset, batch_size) (the method "
                              "builds the batches)")
        self.method.setup(num_samples=self._num_samples, num_classes=self.num_classes, epochs=self._epochs)
        self._ready = True
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.method.on_epoch_start(min(trainer.current_epoch, self._epochs - 1), self._epochs)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.method.on_epoch_end()  # e.g. PS-KD: one memory on every rank (collective), before checkpoints

    def state_dict(self) -> dict[str, Any]:
        state = self.method.state_dict()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, state)
            return {"method": self.method.name, "ranks": ranks}
        return {"method": self.method.name, "ranks": [state]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method.name:
            raise ConfigError(f"SelfKD: the checkpoint holds method '{state.get('method')}', this fit runs "
                              f"'{self.method.name}'")
        if self._ready:
            self._load(state)
        else:  # the method is set up at on_train_start, after Lightning restores callbacks
            self._pending = state

    def _load(self, state: dict[str, Any]) -> None:
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        ranks = state["ranks"]
        if len(ranks) != world:
            raise ConfigError(f"SelfKD: the checkpoint holds the method state of {len(ranks)} ranks, this fit has {world}")
        self.method.load_state_dict(ranks[rank])
