"""PS-KD: progressive self-knowledge distillation (Kim, Ji, Yoon, Hwang, ICCV 2021, arXiv 2006.12000).

"Self-Knowledge Distillation with Progressive Refinement of Targets". Semantics pinned to the
official code (github.com/lgcnsai/PS-KD-Pytorch, ``main.py`` and ``loss/pskd_loss.py``):

* a per-sample memory ``P`` (N x K) holds each training sample's softmax prediction from its last
  visit (the previous epoch); after every step ``P[idx] = softmax(z)``, the logits of that step's
  forward (before the optimizer update), detached;
* targets ``ŷ = (1 − α_t) · onehot(y) + α_t · P[idx]`` with ``α_t = α_T · (epoch + 1) / E``;
* ``L = −Σ_k ŷ_k log softmax(z)_k``, mean over rows (the official ``(−ŷ·log_softmax(z)).mean(0).sum()``
  is the same number); no temperature.

The official code allocates ``P`` as zeros and, in epoch 0 only, writes the one-hot labels of each
batch into ``P[idx]`` just before building its targets, so every epoch-0 target is the one-hot label.
``setup`` knows no labels, so we do the same "on first visit": a row never written (all zeros) means
"not visited yet" and its target is the one-hot label. With a sampler that visits every sample in
epoch 0 (any permutation) this is identical; it differs only for a sample first seen after epoch 0
(``drop_last``, subsets), where the official target would be ``(1 − α_t) · onehot`` (not a
distribution) and ours is ``onehot``.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from .. import distributed
from ..data.mixing import Mix, MixBlocks, mix_rows
from ..errors import ConfigError, TrainingError, integer
from .base import Method, Params, StepOutput, host_range
from .losses import cross_entropy, one_hot, soft_cross_entropy
from .registry import register_method

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class PSKDParams(Params):
    alpha_T: float = Field(0.8, ge=0, le=1, description="final weight α_T of the previous prediction in the target")
    memory_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="storage type of the N x K prediction memory (float16: abs. error <= 2.5e-4 per entry)"
    )
    memory_device: Literal["device", "cpu"] = Field(
        "device",
        description="device: keep the memory beside the logits (no host sync per step); cpu: host memory, as the "
        "official code (one device-to-host copy per step)",
    )
    mix_memory: Literal["store", "keep"] = Field(
        "store",
        description="mixed batches (mixup/CutMix): store: P[idx] = softmax of the mixed row, as the official loop "
        "would on mixed inputs; keep: rows that mix two images leave P[idx] unchanged",
    )


@register_method
class PSKD(Method):
    """Progressive self-knowledge distillation (Kim et al., ICCV 2021).

    ``L = −Σ_k ŷ_k log softmax(z)_k``, ``ŷ = (1 − α_t)·onehot(y) + α_t·P[idx]``, ``α_t = α_T·(e+1)/E``

    * ``P[idx]``: the sample's softmax from its previous visit (previous epoch), detached; a sample
      not visited yet uses its one-hot label (the official epoch-0 rule, see the module docstring).
      After the step ``P[idx]`` is overwritten with this step's softmax.
    * Defaults α_T=0.8 (official); ``E`` is the run's epoch count (official ``--end_epoch``, 300 in
      the paper). ``α_t`` is capped at α_T if a plain loop runs past ``E``.
    * Needs each sample's dataset index (``batch.index``, or ``index=`` in :meth:`loss`).

    Plain loop: ``pskd.setup(num_samples=N, num_classes=K, epochs=E)``, then per epoch
    ``pskd.on_epoch_start(e, E)`` and per batch ``pskd.loss(model(x), y, index=idx).loss``.
    Indices repeated within one batch (sampling with replacement) keep one of the rows' softmax.

    More (cost, state, mixing, distributed): ``docs/methods.md``, section ``pskd``.
    """

    name = "pskd"
    formula = "−Σ ŷ·log softmax(z), ŷ = (1−α_t)·onehot(y) + α_t·P_prev[i], α_t = α_T·(e+1)/E"
    Params = PSKDParams
    hp: PSKDParams
    supports_mix = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._memory: Tensor | None = None
        self._log: list[tuple[Tensor, Tensor, Tensor]] = []  # DDP: (indices, rows, step) written since the last sync
        self.epochs = 0
        self.epoch = 0
        self.steps = 0

    @property
    def memory(self) -> Tensor | None:
        """The N x K memory of last-epoch predictions (None before :meth:`setup`)."""
        return self._memory

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.hp.memory_dtype]

    @property
    def alpha_t(self) -> float:
        """The weight of the previous predictions in this epoch's targets."""
        if self.epochs < 1:
            return 0.0
        return self.hp.alpha_T * min(self.epoch + 1, self.epochs) / self.epochs

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, *, num_samples: int, num_classes: int, epochs: int) -> None:
        sizes = [integer(value, f"PS-KD setup: {key}", 1)
                 for key, value in (("num_samples", num_samples), ("num_classes", num_classes), ("epochs", epochs))]
        self._memory = torch.zeros(sizes[0], sizes[1], dtype=self.dtype)
        self.epochs = sizes[2]
        self.epoch = 0

    def on_epoch_end(self) -> None:
        self.sync_memory()

    def sync_memory(self) -> None:
        """Make the memory the same on every rank: all-gather the rows each rank wrote since the last
        sync (indices, stored rows and the step that wrote them) and write them everywhere, the latest
        (step, rank) winning for a sample written twice (DistributedSampler's padding). One vectorised
        all-gather, no loop over rows. A no-op in one process. Collective: every rank calls it."""
        if not distributed.active() or self._memory is None:
            self._log = []
            return
        mem = self._memory
        dev = mem.device
        if self._log:
            idx = torch.cat([i.to(dev) for i, _, _ in self._log])  # a resumed log sits on the CPU
            rows = torch.cat([r.to(dev) for _, r, _ in self._log])
            step = torch.cat([t.to(dev) for _, _, t in self._log])
        else:
            idx = torch.empty(0, dtype=torch.int64, device=dev)
            rows = mem.new_empty((0, mem.shape[1]))
            step = torch.empty(0, dtype=torch.int64, device=dev)
        self._log = []
        world, me = distributed.world_size(), distributed.rank()
        all_idx = distributed.all_gather_rows(idx)
        all_rows = distributed.all_gather_rows(rows.view(torch.uint8)).view(mem.dtype)  # any dtype as bytes
        all_key = distributed.all_gather_rows(step * world + me)
        latest = torch.full((mem.shape[0],), -1, dtype=torch.int64, device=dev)
        latest.scatter_reduce_(0, all_idx, all_key, reduce="amax")
        win = all_key == latest[all_idx]
        mem[all_idx[win]] = all_rows[win]

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.sync_memory()  # plain loops that skip on_epoch_end
        if epoch < 0 or epochs < 1:
            raise TrainingError(f"PS-KD: on_epoch_start needs epoch >= 0 and epochs >= 1 (got {epoch}, {epochs})")
        self.epoch = int(epoch)
        self.epochs = int(epochs)

    # -- training ----------------------------------------------------------------------------
    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        mem = self._memory
        if mem is None:
            raise TrainingError(
                "PS-KD: the prediction memory is not set up: call pskd.setup(num_samples=N, num_classes=K, epochs=E) "
                "before training"
            )
        if index is None:
            raise TrainingError(
                "PS-KD needs each sample's dataset index: pass index= to pskd.loss (the trainer's batch.index); "
                "pskd(logits, y) alone cannot be used"
            )
        n, k = mem.shape
        rows = logits.shape[0]
        if logits.dim() != 2 or logits.shape[1] != k or target.shape[0] != rows or index.shape[0] != rows:
            raise TrainingError(
                f"PS-KD: expected logits [B, {k}] with B labels and B indices (got logits {tuple(logits.shape)}, "
                f"{target.shape[0]} labels, {index.shape[0]} indices)"
            )
        if index.device.type == "cpu" and rows:  # the loader's CPU indices: checked without a device sync
            lo, hi = host_range(index)
            if lo < 0 or hi >= n:
                raise TrainingError(f"PS-KD: index out of range for a memory of {n} samples (got {lo}..{hi})")
        if self.hp.memory_device == "device" and mem.device != logits.device:
            mem = self._memory = mem.to(logits.device)
        idx = index.to(mem.device, torch.int64, non_blocking=True)

        prev = mem[idx].to(logits.device, torch.float32, non_blocking=True)
        total = prev.sum(dim=1, keepdim=True)
        onehot = one_hot(target, k)
        prev = torch.where(total > 0, prev / total.clamp_min(1e-30), onehot)  # never visited: the label
        a = self.alpha_t
        write = None
        if mix is not None:
            partner, lam = mix_rows(mix, rows, logits.device)
            w = lam[:, None]
            prev = prev * w + prev.index_select(0, partner) * (1.0 - w)
            onehot = onehot * w + onehot.index_select(0, partner) * (1.0 - w)
            if self.hp.mix_memory == "keep":
                write = (partner == torch.arange(rows, device=partner.device)) | (lam == 1.0)
        soft = (1.0 - a) * onehot + a * prev
        loss = soft_cross_entropy(logits, soft)

        probs = torch.softmax(logits.detach().float(), dim=1)
        with torch.no_grad():
            z = logits.detach()
            ce = cross_entropy(z, target, mix=mix)
            kd = soft_cross_entropy(logits.detach(), prev)
        stored = probs.to(mem.device, self.dtype)
        if write is not None:  # keep: rows that mix two images write back the old value (no boolean indexing)
            stored = torch.where(write.to(mem.device)[:, None], stored, mem[idx])
        mem[idx] = stored
        if distributed.active():  # replayed on every rank at the epoch's end (sync_memory)
            self._log.append((idx, stored, torch.full_like(idx, self.steps)))
        self.steps += 1
        return StepOutput(loss, {"ce": ce, "kd": kd}, logits, target)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The prediction memory (on the CPU, in ``memory_dtype``) and the schedule position; in a
        multi-process run also this rank's writes not yet synced (``unsynced``: indices, rows, steps), so
        that a checkpoint taken before the epoch's end (a Trainer saving every n steps) still hands them
        to the other ranks at the next :meth:`sync_memory`."""
        state: dict[str, Any] = {"steps": self.steps, "epoch": self.epoch, "epochs": self.epochs}
        if self._memory is not None:
            state["memory"] = self._memory.to("cpu", copy=True)
        if self._log:
            state["unsynced"] = {key: torch.cat([e[i] for e in self._log]).to("cpu", copy=True)
                                 for i, key in enumerate(("index", "rows", "step"))}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state, ("steps", "epoch", "epochs", "memory", "unsynced"))
        mem = state.get("memory")
        if mem is not None:
            if mem.dim() != 2:
                raise ConfigError(f"PS-KD state: memory must be N x K (got shape {tuple(mem.shape)})")
            if self._memory is not None and self._memory.shape != mem.shape:
                raise ConfigError(
                    f"PS-KD state: the checkpoint's memory is {tuple(mem.shape)} but this run has "
                    f"{tuple(self._memory.shape)} (samples x classes)"
                )
            self._memory = mem.to("cpu", self.dtype, copy=True)
        self.steps = int(state.get("steps", 0))
        self.epoch = int(state.get("epoch", 0))
        self.epochs = int(state.get("epochs", 0))
        log = state.get("unsynced")
        self._log = [] if log is None else [(log["index"].to(torch.int64), log["rows"].to(self.dtype),
                                             log["step"].to(torch.int64))]
