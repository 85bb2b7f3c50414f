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

    L.Trainer(max_epochs=30, callbacks=[kd]).fit(Net(kd))

Why a callback: it owns everything Lightning must drive without touching the module's own hooks
(set-up, per-epoch schedules, checkpoint state), so it composes with any module, a mixin's
``super()`` chains and other callbacks; the module keeps its forward and only swaps its loss and its
loader for the callback's.

* :meth:`SelfKD.loader` builds the DataLoader from ``method.batch_sampler`` (DLB's ``[repeated | new]``
  batches) over an index sampler seeded per epoch. The batch sampler follows the ``BatchSampler``
  API (``cls(sampler, batch_size, drop_last)``), so Lightning's ``use_distributed_sampler`` swaps the
  index sampler for its ``DistributedSampler`` under DDP and the method's batches are built on each
  rank's shard (one process: every epoch's order is ``randperm`` from ``seed + epoch``).
* :meth:`SelfKD.loss` is ``method.loss(logits, y, index=...)``; the parts are logged as ``selfkd/<part>``.
* state: the callback's ``state_dict`` (Lightning checkpoints hold it) is every rank's
  ``method.state_dict()`` (gathered across ranks), and ``fit(ckpt_path=...)`` gives each rank back its
  own: a resumed fit continues the method exactly (tested from epoch-end checkpoints, which is
  what Lightning resumes exactly).
* ``method.setup`` runs once, when the loader is built (it knows the data set's size);
  ``method.on_epoch_start(current_epoch, max_epochs)`` before every training epoch and
  ``method.on_epoch_end()`` after it (PS-KD makes its memory the same on every rank there).

Methods whose step runs forward passes of their own (CS-KD's partners, DDGSD's second view, BYOT's
exits) need the model inside the step: use ``method.train_step`` in your ``training_step`` with a
:class:`~selfkd.methods.Batch`, or selfkd's trainer; :meth:`SelfKD.loss` refuses them.
"""
from __future__ import annotations

from typing import Any

from . import require

L = require("lightning", "lightning")

import torch  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from ..methods import Method  # noqa: E402

__all__ = ["SelfKD", "SeededShuffle"]


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
    method and labels are class attributes (see :meth:`SelfKD.loader`), so Lightning can rebuild it on
    another sampler."""

    method: Method
    labels: torch.Tensor | None = None

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool = False):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.inner = self.method.batch_sampler(sampler, batch_size, drop_last, labels=self.labels)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        return iter(self.inner)


class SelfKD(L.pytorch.Callback):
    """Runs a selfkd ``method`` in a Lightning fit (see the module docstring)."""

    def __init__(self, method: Method, num_classes: int, log_parts: bool = True):
        if not isinstance(method, Method):
            raise ConfigError(f"SelfKD: method must be a selfkd Method (got {type(method).__name__})")
        self.method, self.num_classes, self.log_parts = method, int(num_classes), log_parts
        self._module: Any = None
        self._ready = False
        self._pending: dict[str, Any] | None = None

    # -- what the module calls --------------------------------------------------------------
    def loader(self, dataset: Any, batch_size: int, *, seed: int = 0, labels: torch.Tensor | None = None,
               drop_last: bool = False, **loader_kwargs: Any) -> DataLoader:
        """The training DataLoader: items ``(x, y)`` of ``dataset`` come as batches ``(x, y, index)``.
        ``labels`` (per sample) serve class-aware samplers."""
        if any(k in loader_kwargs for k in ("batch_sampler", "sampler", "shuffle")):
            raise ConfigError("SelfKD.loader: the method builds the batches; do not pass sampler, batch_sampler or shuffle")
        if not self._ready:
            epochs = self._trainer_epochs()
            self.method.setup(num_samples=len(dataset), num_classes=self.num_classes, epochs=epochs)
            self._ready = True
            if self._pending is not None:
                self._load(self._pending)
                self._pending = None
        cls = type("MethodBatchSampler", (_MethodBatchSampler,), {"method": self.method, "labels": labels})
        batches = cls(SeededShuffle(dataset, seed), batch_size, drop_last)
        return DataLoader(_WithIndex(dataset), batch_sampler=batches, **loader_kwargs)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if not self.method.runs_on_logits:
            raise ConfigError(f"SelfKD.loss: method '{self.method.name}' runs forward passes of its own; call "
                              f"method.train_step(model, Batch(x, y, index)) in training_step instead")
        out = self.method.loss(logits, target, index=index)
        if self.log_parts and self._module is not None:
            for k, v in out.parts.items():
                self._module.log(f"selfkd/{k}", v, on_step=True, on_epoch=True, batch_size=target.shape[0])
        return out.loss

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._module = pl_module
        self._trainer = trainer

    def _trainer_epochs(self) -> int:
        trainer = getattr(self, "_trainer", None)
        epochs = getattr(trainer, "max_epochs", None)
        if epochs is None or epochs < 1:
            raise ConfigError("SelfKD: the Trainer needs max_epochs >= 1 (the methods' schedules run over epochs)")
        return int(epochs)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.method.on_epoch_start(trainer.current_epoch, self._trainer_epochs())

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
        else:  # the method is set up when the loader is built, after Lightning restores callbacks
            self._pending = state

    def _load(self, state: dict[str, Any]) -> None:
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        ranks = state["ranks"]
        if len(ranks) != world:
            raise ConfigError(f"SelfKD: the checkpoint holds the method state of {len(ranks)} ranks, this fit has {world}")
        self.method.load_state_dict(ranks[rank])
