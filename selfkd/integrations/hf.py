"""selfkd methods inside the Hugging Face ``Trainer`` (``pip install selfkd[hf]``).

    from selfkd.integrations.hf import SelfKDTrainer
    trainer = SelfKDTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                            method=selfkd.DLB(temperature=3, alpha=1))
    trainer.train()                                   # or train(resume_from_checkpoint=True)

What the subclass changes, and nothing else:

* **loss**: ``compute_loss`` runs the model without ``labels`` and hands its ``logits`` to
  ``method.loss(logits, labels, index=...)``: ``[B, K]`` for sequence classification, ``[B, T, V]``
  with ``[B, T]`` labels (-100 ignored) for token classification; ``causal_lm=True`` shifts them
  (logit ``t`` predicts label ``t+1``, as the models' own loss). Evaluation (the model in eval mode)
  scores plain cross-entropy, so a method's state only moves on training steps. The method's
  parts are logged beside ``loss`` as ``selfkd/<part>`` (means over the logging window).
* **reduction**: token labels reduce as the Trainer reduces a model's own token loss (``num_items_in_batch``):
  a token weighs ``1/N``, ``N`` the non-ignored tokens of the whole gradient-accumulation window, summed
  over the ranks with ``args.average_tokens_across_devices`` (the default), so accumulation and ranks train as
  one process on the union batch (tested); DLB's distillation term is averaged alike over the window's
  repeated tokens on every rank (``Method.token_counts``; a method without it is taken as one mean over the
  non-ignored tokens, CE's form). ``[B]`` labels keep a mean per batch, divided by the accumulation steps, as
  the Trainer does for a model that takes no loss kwargs.
* **data**: the training loader's batches come from ``method.batch_sampler`` (DLB's
  ``[repeated | new]`` batches) over a ``DistributedSampler`` seeded with ``args.data_seed`` (else
  ``args.seed``) and re-shuffled per epoch (one process: one replica; several: below). Every example carries its
  dataset index to the loss (PS-KD's memory, DLB's checks), any collator pads as it likes (DLB
  re-aligns a repeated row padded to another length).
* **state**: ``method.state_dict()`` is saved in every checkpoint folder (``selfkd_method.pt``, one
  file per rank in multi-process runs: ``selfkd_method_rank{r}.pt``) and loaded by
  ``train(resume_from_checkpoint=...)``; a resumed run continues the method exactly (tested: equal
  weights to the uninterrupted run).
* **set-up**: ``method.setup(num_samples, num_classes, epochs)`` once (``num_classes``: the model
  config's ``num_labels``; pass ``num_classes=`` otherwise), ``method.on_epoch_start`` and
  ``method.on_epoch_end`` per epoch.
* **several processes** (``torchrun``; DDP, tested on CPU with gloo): each rank's ``DistributedSampler``
  draws its shard of every epoch (the shards are disjoint; ``DistributedSampler`` pads the last one) and
  the method batches that shard by itself: DLB's batch on rank ``r`` is ``[rank r's previous new rows |
  rank r's new rows]``, so cached logits never cross ranks. Accelerate places this loader's batches on the
  device without sharding them (``prepare_data_loader`` for one process: a shard would deal the batches out
  again and hold back those not ``batch_size`` long), so ``accelerator_config``
  ``split_batches``/``dispatch_batches`` are refused. DDP averages the gradients: with equal row counts per
  rank (``DistributedSampler`` sees to it) for ``[B]`` labels, and with the ranks' token count (above) for
  token labels however many tokens each rank holds, a step equals one process whose batch is the union of
  the ranks' batches (tested: same weights up to float32 summation order; not DLB's ``confidence``
  schedule, whose ``c`` is each rank's). Method state is per rank (one file each, above); PS-KD's memory is made the same
  on every rank at each epoch's end, and its writes not yet synced travel in the checkpoint, so a run
  resumed from a mid-epoch checkpoint, or one the Trainer saved just before the epoch's end, continues
  exactly (tested: bit-identical weights and per-rank state). Resume with the world size that saved
  the checkpoint. The logged ``selfkd/<part>`` values are means over the ranks.

Methods whose step runs forward passes of their own (CS-KD's partners, DDGSD's second view, BYOT's
exits, DLB with ``forward="split"``) are refused: ``method.runs_on_logits`` must be true. So is
``args.label_smoothing_factor`` (use the ``ls`` method, or DLB's ``label_smoothing``).

The Trainer's private methods this subclass wraps or calls (the staged checkpoint save, the column removal) and
the public ones whose semantics it mirrors are checked when a trainer is built (:func:`_surfaces`): a transformers
or accelerate that changed them fails there, in one line naming its version, not with a wrong loss scale or a
half-written checkpoint later.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import shutil
from collections import deque
from collections.abc import Iterator, Mapping, Sized
from typing import Any, cast

from . import require

require("transformers", "hf")
require("accelerate", "hf")

import accelerate  # noqa: E402
import accelerate.data_loader  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler  # noqa: E402

from .. import distributed  # noqa: E402
from ..errors import ConfigError, TrainingError  # noqa: E402
from ..methods import Method  # noqa: E402
from ..methods.base import StepOutput  # noqa: E402
from ..methods.losses import IGNORE, cross_entropy  # noqa: E402

INDEX = "selfkd_index"
STATE = "selfkd_method.pt"
_RANK_FILE = re.compile(r"selfkd_method_rank(\d+)\.pt")
SAVING = ".selfkd-saving"  # OUTPUT_DIR/.selfkd-saving/checkpoint-N: a checkpoint being written
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last

__all__ = ["SelfKDTrainer", "STATE", "last_checkpoint", "drop_incomplete"]

TESTED = "transformers 5.24.0, accelerate 1.15.0"  # the versions the surfaces below were read from and tested with
# (Trainer.loss_is_scaled_for_ga, which the token reduction needs, came with transformers 5.19: pyproject's floor)


def _surfaces() -> list[tuple[str, Any, str, tuple[str, ...] | None, str]]:
    """``(package, owner, name, parameters it is called with (None: an attribute), why)`` of every host surface whose
    change would not fail by itself, or would fail late and obscurely (a wrong loss scale, a checkpoint half written).
    Looked up when a trainer is built, so that is where a changed transformers or accelerate fails, in one line."""
    trainer = transformers.Trainer
    return [
        # private, must stay: the Trainer writes a checkpoint file by file into its final folder and rotates the older
        # ones out inside _save_checkpoint, and the public on_save runs only after it: a kill in between left no
        # checkpoint to resume. Wrapping _save_checkpoint and pointing _get_output_dir at OUTPUT_DIR/.selfkd-saving is
        # the one way to write the whole folder, method state included, and rename it into place before rotation and
        # before any on_save callback reads it
        ("transformers", trainer, "_save_checkpoint", ("model", "trial"), "wraps it to write each checkpoint whole"),
        ("transformers", trainer, "_get_output_dir", ("trial",), "points it at the staging folder while saving"),
        ("transformers", transformers.trainer_utils, "rotate_checkpoints",
         ("output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"), "rotates after the rename"),
        # private, must stay: the public get_train_dataloader builds its loader in _get_dataloader from a batch size
        # and a sampler, which cannot carry the method's batches; these two apply the Trainer's own column removal
        ("transformers", trainer, "_remove_unused_columns", ("dataset", "description"), "removes unused columns"),
        ("transformers", trainer, "_get_collator_with_removed_columns", ("data_collator", "description"),
         "removes unused columns"),
        # public, and their semantics are what the token reduction mirrors (compute_loss below)
        ("transformers", trainer, "get_batch_samples", ("epoch_iterator", "num_batches", "device"),
         "counts the accumulation window's tokens"),
        ("transformers", trainer, "loss_is_scaled_for_ga", None, "says its token loss is scaled for accumulation"),
        ("accelerate", accelerate.data_loader, "prepare_data_loader",
         ("device", "num_processes", "process_index", "put_on_device", "rng_types", "dispatch_batches",
          "non_blocking", "use_stateful_dataloader"), "places the rank's own batches on the device"),
    ]


def _check_host() -> None:
    """ConfigError, one line naming the installed version, if a surface of :func:`_surfaces` changed."""
    versions = {"transformers": transformers.__version__, "accelerate": accelerate.__version__}
    for package, owner, name, params, why in _surfaces():
        where = f"{owner.__name__}.{name}"
        found: Any = getattr(owner, name, _MISSING)  # any attribute of the package
        got = None
        if found is _MISSING:
            got = "has none"
        elif params is not None:
            sig: Mapping[str, inspect.Parameter]
            try:
                sig = inspect.signature(found).parameters
            except (TypeError, ValueError):
                sig = {}
            open_ended = any(v.kind in (v.VAR_POSITIONAL, v.VAR_KEYWORD) for v in sig.values())  # a wrapper's (*a, **kw)
            if not open_ended and not set(params) <= set(sig):
                got = f"has {name}({', '.join(n for n in sig if n != 'self')})"
        if got is not None:
            want = where if params is None else f"{where}({', '.join(params)})"
            raise ConfigError(f"SelfKDTrainer needs {want} (selfkd {why}); {package} {versions[package]} {got}; "
                              f"selfkd is tested with {TESTED}")


_MISSING = object()


def _complete(folder: str) -> bool:
    """A checkpoint folder holds the Trainer's state (written last by the Trainer) and the method's."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return TRAINER_STATE in names and (STATE in names or any(_RANK_FILE.fullmatch(n) for n in names))


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    try:
        names = os.listdir(output_dir)
    except OSError:
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n)) for n in names if (m := _CHECKPOINT.fullmatch(n))]
    return sorted((step, path) for step, path in found if os.path.isdir(path))


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (None: there is none). Folders a killed
    save left incomplete (from before checkpoints were written under :data:`SAVING`) are passed over."""
    return next((path for _, path in reversed(_checkpoints(output_dir)) if _complete(path)), None)


_TRAINER_FILES = re.compile(r"(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)")


def _unloadable(folder: str) -> str | None:
    """The first of the Trainer's pickled files in a checkpoint that ``weights_only`` loading refuses, in
    one line (None: they all load). Asked only after a resume failed, to name the file."""
    from ..engine import checkpoint as ckpt

    try:
        from transformers.trainer_pt_utils import safe_globals  # numpy's RNG state, as the Trainer admits it
    except ImportError:  # pragma: no cover - older transformers
        safe_globals = contextlib.nullcontext
    try:
        names = sorted(n for n in os.listdir(folder) if _TRAINER_FILES.fullmatch(n))
    except OSError:
        return None
    for n in names:
        try:
            with safe_globals():
                ckpt.load(os.path.join(folder, n))
        except Exception as err:
            return str(err)
    return None


def drop_incomplete(output_dir: str) -> list[str]:
    """Delete what killed saves left in ``output_dir``: :data:`SAVING` and incomplete ``checkpoint-N``
    folders. Returns their names."""
    gone = []
    stage = os.path.join(output_dir, SAVING)
    if os.path.isdir(stage):
        if os.listdir(stage):
            gone.append(SAVING)
        shutil.rmtree(stage)
    for _, path in _checkpoints(output_dir):
        if not _complete(path):
            shutil.rmtree(path)
            gone.append(os.path.basename(path))
    return gone


class _Indexed(Dataset):
    """Each example, a dict, with its dataset index under :data:`INDEX`."""

    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.data[i]
        if not isinstance(item, dict):
            raise ConfigError(f"SelfKDTrainer: training examples must be dicts (got {type(item).__name__} at index {i})")
        return {**item, INDEX: i}


class _IndexCollator:
    """Takes the indices out before the user's collator (which may drop unknown keys), puts them back after."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        index = torch.tensor([f[INDEX] for f in features], dtype=torch.int64)
        batch = self.collate([{k: v for k, v in f.items() if k != INDEX} for f in features])
        batch[INDEX] = index
        return batch


class _MethodBatches(BatchSampler):
    """The method's batch sampler, made to fit the Trainer's resume.

    On resume the Trainer skips the batches already trained in the current epoch by iterating the
    batch sampler and discarding them. A sampler whose position is method state (DLB's) continues
    by itself, so this wrapper first yields that many placeholders for the Trainer to discard.
    """

    sampler: Any  # the Trainer's sampler of indices (with set_epoch when the method's sampler has none)

    def __init__(self, inner: Any, sampler: Any, batch_size: int, drop_last: bool):
        self.inner, self.sampler, self.batch_size, self.drop_last = inner, sampler, batch_size, drop_last
        self.skip = 0

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
        else:
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            yield []  # discarded unread by accelerate's SkipBatchSampler
        yield from self.inner


class SelfKDTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training loss, batches and checkpoints come from a selfkd method
    (see the module docstring). Extra keyword arguments: ``method`` (a :class:`~selfkd.methods.Method`),
    ``num_classes`` (default: ``model.config.num_labels``), ``causal_lm`` (shift logits and labels)."""

    def __init__(self, *args: Any, method: Method, num_classes: int | None = None, causal_lm: bool = False,
                 **kwargs: Any):
        if not isinstance(method, Method):
            raise ConfigError(f"SelfKDTrainer: method must be a selfkd Method (got {type(method).__name__})")
        if not method.runs_on_logits:
            raise ConfigError(f"SelfKDTrainer: method '{method.name}' runs forward passes of its own "
                              f"({method.describe()}); only methods computed from the model's logits run here")
        _check_host()
        super().__init__(*args, **kwargs)
        # private, must stay: the per-device batch size the Trainer's own loader uses (auto_find_batch_size moves it)
        if not isinstance(getattr(self, "_train_batch_size", None), int):
            raise ConfigError(f"SelfKDTrainer needs the Trainer's _train_batch_size (the per-device batch size its own "
                              f"loader uses); transformers {transformers.__version__} has none; selfkd is tested "
                              f"with {TESTED}")
        if self.args.label_smoothing_factor:
            raise ConfigError("SelfKDTrainer: args.label_smoothing_factor has no effect here; use the 'ls' method "
                              "or DLB's label_smoothing")
        if self.args.ignore_data_skip:
            raise ConfigError("SelfKDTrainer: args.ignore_data_skip=True would restart the epoch's batches on resume "
                              "while the method continues; leave it False")
        self.method = method
        self.causal_lm = causal_lm
        # the model gets no labels (the method computes the loss), so the Trainer must not count its tokens for it:
        # get_batch_samples below counts the tokens each term of the method's loss averages over
        self.model_accepts_loss_kwargs = False
        self._window: deque[dict[str, torch.Tensor]] = deque()  # this accumulation window's per-batch token counts
        self._totals: dict[str, torch.Tensor] = {}  # and their sums over the window (and the ranks)
        self._parts: dict[str, torch.Tensor] = {}
        self._part_steps = 0
        self._batches: _MethodBatches | None = None
        if self.train_dataset is not None:
            k = num_classes if num_classes is not None else getattr(getattr(self.model, "config", None), "num_labels", None)
            if k is None:
                raise ConfigError("SelfKDTrainer: pass num_classes= (the model has no config.num_labels)")
            epochs = max(1, math.ceil(self.args.num_train_epochs))
            if self.args.max_steps and self.args.max_steps > 0:
                per_rank = math.ceil(self._train_size() / self.args.world_size)  # DistributedSampler pads
                steps_per_epoch = max(1, math.ceil(per_rank / self._train_batch_size))
                epochs = max(1, math.ceil(self.args.max_steps * self.args.gradient_accumulation_steps / steps_per_epoch))
            method.setup(num_samples=self._train_size(), num_classes=int(k), epochs=epochs)
        self.add_callback(_EpochHook(self))

    # -- data ------------------------------------------------------------------------------
    def set_sampler_epoch(self, epoch: int) -> None:
        """Seed the method's batch sampler for ``epoch`` (a no-op before the first training loader exists)."""
        if self._batches is not None:
            self._batches.set_epoch(epoch)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        data, collate = self.train_dataset, self.data_collator
        try:
            import datasets

            if isinstance(data, datasets.Dataset):
                data = self._remove_unused_columns(data, description="training")
            else:
                collate = self._get_collator_with_removed_columns(collate, description="training")
        except ImportError:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        args = self.args
        sampler = self._index_sampler(data)
        labels = _labels(data)
        inner = self.method.batch_sampler(sampler, self._train_batch_size, drop_last=args.dataloader_drop_last,
                                          labels=labels)
        self._batches = _MethodBatches(inner, sampler, self._train_batch_size, args.dataloader_drop_last)
        self._batches.skip = self._resume_skip
        self._resume_skip = 0
        loader = DataLoader(_Indexed(data), batch_sampler=self._batches, collate_fn=_IndexCollator(collate),
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0)
        acc = self.accelerator
        if acc.num_processes > 1 and (acc.split_batches or acc.dispatch_batches):
            raise ConfigError("SelfKDTrainer: accelerator_config split_batches/dispatch_batches would split the "
                              "method's batches across ranks; each rank already draws its own shard: leave them False")
        # already one stream per rank: accelerate's documented prepare_data_loader for one process places the batches
        # on the device (as Accelerator.prepare does) without a BatchSamplerShard, which would deal them out again and
        # hold back (or pad) those not batch_size long (DLB's [repeated | new] batches, a short last one, the resume
        # placeholders). No generator to synchronise: the order is the DistributedSampler's (seed + epoch)
        return accelerate.data_loader.prepare_data_loader(
            loader, acc.device, num_processes=1, process_index=0, put_on_device=acc.device_placement,
            rng_types=list(acc.rng_types or []), dispatch_batches=False, non_blocking=acc.non_blocking,
            use_stateful_dataloader=acc.use_stateful_dataloader)

    def _index_sampler(self, data: Any) -> Any:
        """This rank's sample order, which the method's batch sampler batches: a ``DistributedSampler``
        (``data_seed``, else ``seed``; ``set_epoch`` per epoch)."""
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        return DistributedSampler(data, num_replicas=args.world_size, rank=args.process_index, shuffle=True, seed=seed)

    _resume_skip = 0

    # -- loss ------------------------------------------------------------------------------
    # Token labels ([B, T], -100 ignored) reduce as the Trainer reduces a model's own token loss (a global token mean
    # since transformers 4.46; as read in 5.24's trainer.py): get_batch_samples fetches the accumulation window's
    # batches and counts their tokens, summed over the ranks when args.average_tokens_across_devices (default True);
    # compute_loss divides by that count (num_items_in_batch), the Trainer then does not divide by the accumulation steps
    # (loss_is_scaled_for_ga), and with the ranks' count it multiplies by the world size, because DDP averages the
    # gradients. So a token weighs 1/N, N the tokens of the whole window on every rank: one process on the union
    # batch. Here each term of the method's loss (StepOutput.terms: DLB's CE and distillation terms) is rescaled by
    # its own count (Method.token_counts: DLB's repeated tokens for its distillation term). [B] labels (sequence
    # classification) keep the per-batch mean, divided by the accumulation steps, as the Trainer does for a model
    # that takes no loss kwargs.
    @staticmethod
    def _tokens(labels: Any) -> bool:
        return torch.is_tensor(labels) and labels.dim() >= 2 and not labels.is_floating_point()

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: Any) -> tuple[list, Any]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window.clear()
        if not batches or not all(self._tokens(b.get("labels")) for b in batches):
            return batches, num_items
        return batches, self._count_window(batches, device)

    def _count_window(self, batches: list[dict[str, Any]], device: Any) -> torch.Tensor:
        """Count the window's tokens per term (:attr:`_window`, :attr:`_totals`); the CE term's total."""
        targets = [b["labels"][:, 1:] if self.causal_lm else b["labels"] for b in batches]
        counts = self.method.token_counts(targets) or [{"tokens": (y != IGNORE).sum()} for y in targets]
        keys = list(counts[0])
        total = torch.stack([cast(torch.Tensor, sum(c[k] for c in counts)) for k in keys]).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total[None]).sum(0)  # as the Trainer sums num_items_in_batch
        self._window.extend(counts)
        self._totals = dict(zip(keys, total))
        return self._totals[keys[0]]

    def _window_share(self, out: StepOutput, num_items_in_batch: Any) -> torch.Tensor:
        """This batch's loss as its share of the window's: each term's mean times its tokens here over its tokens in
        the window (``num_items_in_batch`` for the first, the CE term), times the world size when the count is the
        ranks' (DDP averages the gradients)."""
        counts, totals = self._window.popleft(), dict(self._totals)
        first = next(iter(counts))
        if num_items_in_batch is not None:
            totals[first] = torch.as_tensor(num_items_in_batch, device=counts[first].device)
        terms = out.terms if out.terms is not None else {first: out.loss}
        if terms.keys() != counts.keys():
            raise TrainingError(f"SelfKDTrainer: method '{self.method.name}' returned loss terms {sorted(terms)} but "
                                f"token_counts for {sorted(counts)}; they must name the same terms")
        loss = cast(torch.Tensor, sum(terms[k] * (counts[k] / totals[k].clamp_min(1)) for k in counts))
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes
        return loss

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        labels = inputs.pop("labels")
        index = inputs.pop(INDEX, None)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if self.causal_lm:
            logits, labels = logits[:, :-1], labels[:, 1:]
        if not model.training:  # evaluation: no method state moves
            loss = cross_entropy(logits, labels)
        else:
            out = self.method.loss(logits, labels, index=index)
            windowed = bool(self._window) and self._tokens(labels)
            loss = self._window_share(out, num_items_in_batch) if windowed else out.loss
            self.loss_is_scaled_for_ga = windowed  # read by training_step right after this call
            for k, v in out.parts.items():
                self._parts[k] = self._parts.get(k, 0) + v.detach().float()
            self._part_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._part_steps and "loss" in logs:  # the training loop's log: every rank calls it at the same step
            mine = {k: float(v) / self._part_steps for k, v in self._parts.items()}
            every = distributed.all_gather_objects(mine)  # one process: [mine]
            for k in sorted({k for d in every for k in d}):
                vals = [d[k] for d in every if k in d]
                logs[f"selfkd/{k}"] = sum(vals) / len(vals)
            self._parts, self._part_steps = {}, 0
        super().log(logs, *args, **kwargs)

    def _train_size(self) -> int:
        """Samples in ``train_dataset``: a map-style data set, as the method's sampler needs."""
        data = self.train_dataset
        assert isinstance(data, Sized), "SelfKDTrainer: train_dataset must have a length"
        return len(data)

    # -- state -----------------------------------------------------------------------------
    def _state_file(self, folder: str) -> str:
        name = STATE if self.args.world_size == 1 else STATE.replace(".pt", f"_rank{self.args.process_index}.pt")
        return os.path.join(folder, name)

    _saving = False

    def _get_output_dir(self, trial: Any) -> str:
        root = super()._get_output_dir(trial)
        return os.path.join(root, SAVING) if self._saving else root

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint and the method's state, written under OUTPUT_DIR/.selfkd-saving and
        renamed to OUTPUT_DIR/checkpoint-N once every rank has written its files; then the older ones
        are rotated out. The Trainer writes file by file into the final folder and deletes the older
        checkpoints before the method state exists: a kill in between left only a folder that cannot be
        resumed. (Hub pushes read the folder in the background: with ``push_to_hub`` it is written in place.)
        Not the public ``on_save``: it runs after the Trainer has written the final folder and rotated (see
        :func:`_surfaces`)."""
        from ..engine import checkpoint as ckpt

        name = f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.push_to_hub:
            super()._save_checkpoint(model, trial)
            ckpt.save(self._state_file(os.path.join(self._get_output_dir(trial), name)),
                      {"method": self.method.name, "state": self.method.state_dict()})
            return
        self._saving = True
        try:
            stage = self._get_output_dir(trial)
            super()._save_checkpoint(model, trial)  # into stage/name; its rotation sees only stage
        finally:
            self._saving = False
        root = self._get_output_dir(trial)
        ckpt.save(self._state_file(os.path.join(stage, name)), {"method": self.method.name, "state": self.method.state_dict()})
        best = self.state.best_model_checkpoint
        if best is not None and os.path.dirname(best) == stage:  # the Trainer named the staged folder
            self.state.best_model_checkpoint = os.path.join(root, os.path.basename(best))
            if self.args.should_save:
                self.state.save_to_json(os.path.join(stage, name, TRAINER_STATE))
        self.accelerator.wait_for_everyone()  # every rank's RNG and method files are in place
        if self.args.should_save:
            final = os.path.join(root, name)
            if os.path.exists(final):  # e.g. a run resumed from an earlier checkpoint of its own
                shutil.rmtree(final)
            os.rename(os.path.join(stage, name), final)
            with contextlib.suppress(OSError):
                os.rmdir(stage)  # empty now
            transformers.trainer_utils.rotate_checkpoints(output_dir=root, save_total_limit=self.args.save_total_limit,
                                                          best_model_checkpoint=self.state.best_model_checkpoint,
                                                          use_mtime=True)
        self.accelerator.wait_for_everyone()  # no rank goes on (on_save callbacks) before the folder is there

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        output_dir = self.args.output_dir
        assert output_dir is not None  # TrainingArguments fills in its default folder
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(output_dir)
            if resume_from_checkpoint is None:
                raise ConfigError(f"resume_from_checkpoint=True: no checkpoint in {output_dir} (incomplete "
                                  "ones, left by a killed save, do not count)")
        if self.args.should_save:  # a save a kill interrupted: never renamed into place, never resumed from
            shutil.rmtree(os.path.join(output_dir, SAVING), ignore_errors=True)
        if resume_from_checkpoint:
            self._load_method_state(str(resume_from_checkpoint))
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except Exception:
            bad = _unloadable(str(resume_from_checkpoint)) if resume_from_checkpoint else None
            if bad is None:
                raise
            raise ConfigError(f"resume_from_checkpoint: {bad}") from None

    def _load_method_state(self, folder: str) -> None:
        from ..engine import checkpoint as ckpt

        path = self._state_file(folder)
        world = self.args.world_size
        ranks = [int(m.group(1)) for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                 if (m := _RANK_FILE.fullmatch(f))]
        single = os.path.isfile(os.path.join(folder, STATE))
        if (world == 1 and ranks and not single) or (world > 1 and (single or any(r >= world for r in ranks))):
            held = "1 process" if single else f"{max(ranks) + 1} ranks"
            raise ConfigError(f"resume_from_checkpoint: {folder} holds the method state of {held}, this run has "
                              f"{world} process{'es' if world > 1 else ''}; resume with the same world size")
        if not os.path.isfile(path):
            raise ConfigError(f"resume_from_checkpoint: {path} is missing (not a SelfKDTrainer checkpoint?)")
        saved = ckpt.load(path)
        if saved.get("method") != self.method.name:
            raise ConfigError(f"resume_from_checkpoint: {path} holds method '{saved.get('method')}', "
                              f"this trainer runs '{self.method.name}'")
        self.method.load_state_dict(saved["state"])
        # a sampler that continues by itself (DLB's) gets placeholders for the batches the Trainer will
        # skip; any other sampler replays its seeded epoch order and the Trainer's skip is right as it is
        position = self.method.resumes_at()
        n, bs = math.ceil(self._train_size() / self.args.world_size), self._train_batch_size  # per rank
        per_epoch = n // bs if self.args.dataloader_drop_last else math.ceil(n / bs)
        self._resume_skip = position if position is not None and 0 < position < per_epoch else 0


class _EpochHook(transformers.TrainerCallback):
    """``method.on_epoch_start(epoch, epochs)`` at the start of every epoch (resumed ones included)."""

    def __init__(self, trainer: SelfKDTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epochs = max(1, math.ceil(state.num_train_epochs or args.num_train_epochs))
        epoch = int(math.floor(state.epoch + 1e-9))  # the Trainer's epoch (a resumed one: the checkpoint's)
        # the Trainer's own set_epoch need not reach the sampler through accelerate's wrappers (its skip
        # wrapper in a resumed epoch): set it here, before the epoch is iterated
        self.trainer.set_sampler_epoch(epoch)
        self.trainer.method.on_epoch_start(min(epoch, epochs - 1), epochs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.method.on_epoch_end()  # before the epoch's checkpoint (e.g. PS-KD's memory across ranks)


def _labels(data: Any) -> torch.Tensor | None:
    """Per-example class labels for class-aware samplers, when the data set has a flat label column."""
    for key in ("labels", "label"):
        try:
            col = data[key]  # datasets.Dataset column
        except Exception:
            continue
        try:
            t = torch.as_tensor(col)
        except Exception:
            return None
        return t if t.dim() == 1 else None
    return None
