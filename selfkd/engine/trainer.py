"""The reference trainer: one run of one method on one data set, crash-safe and exactly resumable.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one object per epoch),
``checkpoint.pt`` (everything needed to continue: model, optimiser, scheduler, every RNG, the
method's state and the sampler position), ``best.pt`` (weights of the best epoch) and, once the run
has finished, ``summary.json``. Every file is written atomically. Every writer holds the folder's
``flock`` (``.lock``, see :mod:`selfkd.engine.rundir`); only a new or empty folder becomes a run.
"""
from __future__ import annotations

import contextlib
import math
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from .. import distributed
from ..data import ArrayDataset, BatchAugment, BatchView, Mixer, apply_label_noise, build_mixer, build_policy, load_dataset
from ..data.policies import Policy
from ..data.split import stratified_subset  # noqa: F401  (re-exported: selfkd.engine.trainer.stratified_subset)
from ..errors import ConfigError, SelfKDError, TrainingError
from ..methods import Batch, Method, build_method, method_class
from ..models import build_model
from . import checkpoint as ckpt
from . import rundir
from .config import Config, MethodCfg, config_diff, config_hash, save_yaml
from . import logs
from .logs import CSV, RunLogs, write_csv
from .logs import check as check_logs
from .metrics import classification_metrics, reliability
from .progress import Progress
from .schedule import lr_lambda

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LABEL_NOISE = "label_noise.json"
DATA_INFO = "data.json"  # class names and preprocessing, for `selfkd export`
FORMAT = 1
TIMING_KEYS = ("epoch_seconds", "train_seconds", "images_per_s", "samples_per_s", "peak_mem_mb")


def select_device(name: str) -> torch.device:
    """The training device; under torchrun on CUDA, this rank's GPU (``cuda:LOCAL_RANK``)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    dev = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if distributed.active() else 0)
    return dev


@dataclass
class Setup:
    """Everything built from a config before any file is written (so bad input writes nothing)."""

    cfg: Config
    device: torch.device
    train: ArrayDataset
    test: ArrayDataset
    clean_labels: torch.Tensor
    num_classes: int
    augment: BatchAugment
    policies: list[Policy]  # uint8 -> uint8, before crop/flip/normalise
    mixer: Mixer | None  # mixup/CutMix on the normalised batch, applied through the method
    model: nn.Module
    method: Method
    channels_last: bool
    amp_dtype: torch.dtype | None
    data_info: dict[str, Any] = field(default_factory=dict)  # classes, mean, std, image size (DATA_INFO)


def build(cfg: Config) -> Setup:
    device = select_device(cfg.train.device)
    world = distributed.world_size()
    bundle = load_dataset(
        cfg.data.name, root=cfg.data.dir, download=cfg.data.download,
        image_size=cfg.data.image_size, cache_dir=cfg.data.cache_dir,
        stream=cfg.data.stream, stream_above_mb=cfg.data.stream_above_mb,
    )
    train = bundle.train
    if cfg.data.subset is not None:
        idx = stratified_subset(train.labels, cfg.data.subset, cfg.data.subset_seed)
        train = train.subset(idx)
    test = bundle.test
    if cfg.data.test_subset is not None:
        test = test.subset(stratified_subset(test.labels, cfg.data.test_subset, cfg.data.subset_seed,
                                             "data.test_subset", "test"))
    clean = train.labels.clone()
    noise = cfg.data.noise
    if noise.kind != "none" and noise.rate > 0:
        noisy = apply_label_noise(clean, bundle.num_classes, noise.kind, noise.rate, noise.seed, classes=bundle.classes)
        train = train.with_labels(noisy)
    aug = cfg.augment
    augment = BatchAugment(
        crop_padding=bundle.default_augment["crop_padding"] if aug.crop_padding is None else aug.crop_padding,
        flip=bundle.default_augment["flip"] if aug.flip is None else aug.flip,
        mean=bundle.mean, std=bundle.std,
    )
    fill = [round(255 * m) for m in bundle.mean] if aug.fill == "mean" else 0
    policies = []
    if aug.policy != "none":
        kwargs = {"num_ops": aug.randaugment_ops, "magnitude": aug.randaugment_magnitude} if aug.policy == "randaugment" else {}
        policies.append(build_policy(aug.policy, fill=fill, **kwargs))
    if aug.cutout:
        policies.append(build_policy("cutout", size=aug.cutout, fill=fill))
    mixer = build_mixer(aug.mix, alpha=aug.mix_alpha, prob=aug.mix_prob) if aug.mix != "none" else None
    check_logs(cfg.train.log)
    torch.manual_seed(cfg.train.seed)  # model init is part of the seeded run
    model = build_model(cfg.model.name, num_classes=bundle.num_classes, in_channels=bundle.channels)
    method = build_method(cfg.method.name, **cfg.method.params())
    if mixer is not None and not type(method).supports_mix:
        raise ConfigError(f"augment.mix={aug.mix}: method '{method.name}' does not define targets for mixed samples")
    if mixer is not None:
        method.check_mix(mixer)  # e.g. DLB's repeat_fraction < 1 cannot re-apply a mix: fail before writing
    method.setup(num_samples=len(train), num_classes=bundle.num_classes, epochs=cfg.train.epochs)
    model = method.prepare_model(model)
    if world > 1 and len(train) < world * cfg.optim.batch_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} per rank x {world} ranks = {world * cfg.optim.batch_size} "
                          f"samples per step, but the training set has {len(train)}: lower the batch size or the rank count")
    if cfg.train.sync_bn and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(f"train.sync_bn = true: model.name={cfg.model.name} has no BatchNorm layer to synchronise")
    if cfg.data.on_device:
        if device.type != "cuda":
            raise ConfigError("data.on_device = true needs a CUDA device (train.device=cuda or auto on a GPU machine)")
        if not isinstance(train, ArrayDataset):
            raise ConfigError("data.on_device = true needs an in-memory data set (not data.stream)")
        train = train.to(device)
    _dry_forward(model, test.batch([0, 1])[0] if len(test) > 1 else test.batch([0])[0], augment, cfg)
    cl = cfg.train.channels_last
    channels_last = cl == "on" or (cl == "auto" and bundle.image_size >= 16)
    amp = cfg.train.amp
    amp_dtype = torch.bfloat16 if amp == "bf16" or (amp == "auto" and device.type == "cuda") else None
    info = {"dataset": bundle.name, "classes": list(bundle.classes), "num_classes": bundle.num_classes,
            "in_channels": bundle.channels, "image_size": bundle.image_size, "mean": list(bundle.mean),
            "std": list(bundle.std)}
    return Setup(cfg, device, train, test, clean, bundle.num_classes, augment, policies, mixer, model,
                 method, channels_last, amp_dtype, info)


@torch.no_grad()
def _dry_forward(model: nn.Module, images: torch.Tensor, augment: BatchAugment, cfg: Config) -> None:
    """Two test images through the model in eval mode (no state changes, no RNG draws): a model that
    cannot take the data fails here, before anything is written."""
    was = model.training
    model.eval()
    try:
        x = augment.normalize(images)
        z = model.forward_exits(x)[-1] if hasattr(model, "forward_exits") else model(x)
    except (RuntimeError, ValueError, IndexError) as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)[:160]
        c, h, w = images.shape[1:]
        raise ConfigError(f"model.name={cfg.model.name} cannot take {cfg.data.name} images of {c}x{h}x{w} "
                          f"({first}); choose another model or resize with data.image_size (--image-size)") from None
    finally:
        model.train(was)
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != len(images):
        raise ConfigError(f"model.name={cfg.model.name}: expected (N, classes) logits on {cfg.data.name}, "
                          f"got {tuple(getattr(z, 'shape', ()))}")


def _rng_state(gens: dict[str, torch.Generator]) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in gens.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gens: dict[str, torch.Generator]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    for k, g in gens.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _reset_peak_mem(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or on Linux the process's peak resident set
    (writing 5 to ``/proc/self/clear_refs`` resets VmHWM), so runs that share a process (sweeps) each
    report their own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere: the process's lifetime peak


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's lifetime peak


@contextlib.contextmanager
def _thread_scope():
    """Restore torch's thread count after a run (a resumed run may set its recorded count)."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


class _DynamicBatch(nn.Module):
    """A compiled model whose inputs' batch dimension is dynamic from the first call: DLB alternates
    between ``B`` rows (first step) and ``2B`` (the rest), a last batch is short, CS-KD forwards halves:
    one graph serves them all instead of a recompile per new batch size."""

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if x.shape[0] > 1:
            torch._dynamo.mark_dynamic(x, 0)
        return self.compiled(x, *args, **kwargs)

    @property
    def _orig_mod(self) -> nn.Module:  # what methods copy (MrKD snapshots) or unwrap (BYOT under DDP)
        return self.compiled._orig_mod


def _on_main(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only (checks of the run directory); its SelfKDError is raised on every rank."""
    err = None
    if distributed.is_main():
        try:
            fn()
        except SelfKDError as e:
            err = str(e)
    err = distributed.broadcast_object(err)
    if err is not None:
        raise SelfKDError(err)


@contextlib.contextmanager
def _main_first(ctx):
    """Enter ``ctx`` (rank 0's lock) and share its outcome: an error on rank 0 stops every rank."""
    err = None
    try:
        ctx.__enter__()
    except SelfKDError as e:
        err = str(e)
    err = distributed.broadcast_object(err)
    if err is not None:
        raise SelfKDError(err)
    try:
        yield
    finally:
        ctx.__exit__(None, None, None)


class Trainer:
    """Train ``setup`` into ``run_dir``; :meth:`run` returns the summary.

    Under torchrun (``torch.distributed`` initialised, world size > 1) the model is wrapped in
    DistributedDataParallel, each rank trains on its DistributedSampler shard with ``optim.batch_size``
    new samples per step, evaluation is sharded and gathered, and only rank 0 logs and writes files.
    """

    def __init__(self, setup: Setup, run_dir: str | Path, *, progress: bool | None = None,
                 log: Callable[[str], None] | None = None, threads: int | None = None,
                 sampler: Sampler[int] | None = None):
        """``sampler``: the order of training indices (default: a seeded RandomSampler, or under torchrun
        this rank's DistributedSampler); the method's batch sampler wraps it."""
        self.s = setup
        self.threads = threads  # None: torch's current count for a new run, the recorded one on resume
        self.cfg = setup.cfg
        self.dir = Path(run_dir)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0  # only rank 0 logs and writes
        say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.log = say if self.main else (lambda msg: None)
        self.progress = progress if self.main else False
        dev = setup.device
        self.model = setup.model.to(dev)
        if setup.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp: DistributedDataParallel | None = None
        train_model: nn.Module = self.model
        if self.world > 1:
            if self.cfg.train.sync_bn:
                self.model = distributed.convert_sync_batchnorm(self.model, dev)
            self.ddp = DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
            train_model = self.ddp
        self.forward_model: nn.Module = train_model
        if self.cfg.train.compile:
            mode = None if self.cfg.train.compile_mode == "default" else self.cfg.train.compile_mode
            self.forward_model = _DynamicBatch(torch.compile(train_model, mode=mode))
        self.method = setup.method
        o = self.cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                                   weight_decay=o.weight_decay)
        seed = self.cfg.train.seed
        own = 7919 * self.rank  # each rank its own augmentation and mixing draws; rank 0 = one process
        self.gens = {
            "sampler": torch.Generator().manual_seed(seed + 1),
            "loader": torch.Generator().manual_seed(seed + 2 + own),
            "augment": torch.Generator(device=dev).manual_seed(seed + 3 + own),
            "mix": torch.Generator().manual_seed(seed + 4 + own),  # host draws: lam, box (no device sync)
        }
        if self.rank:
            torch.manual_seed(seed + own)  # dropout etc. differ per rank (the weights were initialised alike)
        if sampler is None:
            sampler = (DistributedSampler(setup.train, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=seed + 1, drop_last=False) if self.world > 1
                       else RandomSampler(setup.train, generator=self.gens["sampler"]))
        self.sampler = sampler
        self.batch_sampler = self.method.batch_sampler(sampler, o.batch_size, drop_last=False, labels=setup.train.labels)
        on_device = setup.train.images.device.type != "cpu" if isinstance(setup.train, ArrayDataset) else False
        # one indexing operation per batch (BatchView), decoded in workers when streaming
        self.loader = DataLoader(
            BatchView(setup.train), sampler=self.batch_sampler, batch_size=None,
            num_workers=self.cfg.data.num_workers, pin_memory=dev.type == "cuda" and not on_device,
            generator=self.gens["loader"], persistent_workers=False,
        )
        self.steps_per_epoch = len(self.batch_sampler)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.cfg.schedule, self.cfg.train.epochs, self.steps_per_epoch, o.lr)
        )
        self.noisy = bool((setup.train.labels != setup.clean_labels).any())
        self.history: list[dict[str, Any]] = []
        self.logs = RunLogs(self.dir, "csv")  # run() opens the configured sinks
        self.epoch = 0
        self.global_step = 0

    # -- checkpoints -----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": self.cfg.to_dict(),
            "config_sha256": config_hash(self.cfg),
            "threads": torch.get_num_threads(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "method": self.method.state_dict(),
            "rng": _rng_state(self.gens),
            "history": self.history,
            "world_size": self.world,
        }

    def _gathered_state(self) -> dict[str, Any] | None:
        """The checkpoint (on rank 0; None elsewhere): the model once, every rank's method state, RNG
        states and sampler position (``ranks``: ranks 1.., rank 0's at the top level). Collective."""
        state = self._state() if self.main else None
        if self.world == 1:
            return state
        mine = {"method": self.method.state_dict(), "rng": _rng_state(self.gens), "sampler_epoch": self.epoch}
        every = distributed.all_gather_objects(mine)
        if state is not None:
            state["ranks"] = every[1:]
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        path = self.dir / CHECKPOINT
        if state.get("format") != FORMAT:
            raise SelfKDError(f"checkpoint {path}: format {state.get('format')!r} is not {FORMAT}")
        old = state.get("config")
        if isinstance(old, dict) and state.get("config_sha256") != config_hash(self.cfg):
            diff = config_diff(old, self.cfg.to_dict())
            if any(k == "method.name" for k, _, _ in diff):  # another method: its parameters differ anyway
                diff = [d for d in diff if d[0] == "method.name" or not d[0].startswith("method.")]
            diff.sort(key=lambda d: not d[0].endswith(".name"))  # data/model/method names first
            if diff:
                shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff[:3])
                more = f"; and {len(diff) - 3} more" if len(diff) > 3 else ""
                raise SelfKDError(f"--resume {self.dir}: {CONFIG} differs from the config {CHECKPOINT} was trained "
                                  f"with ({shown}{more}); restore {CONFIG} or start a new run")
        saved = int(state.get("world_size", 1))
        if saved != self.world:
            raise SelfKDError(f"--resume {self.dir}: the checkpoint was written by {saved} rank{'s' if saved != 1 else ''}, "
                              f"this run has {self.world}; resume with the same world size (--nproc {saved}, or torchrun "
                              f"with nnodes x nproc_per_node = {saved})")
        mine = state if self.rank == 0 else state["ranks"][self.rank - 1]
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.method.load_state_dict(mine["method"])
            _set_rng_state(mine["rng"], self.gens)
            self.history = list(state["history"])
            self.epoch = int(state["epoch"])
            self.global_step = int(state["global_step"])
        except SelfKDError:
            raise
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
            first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")[:160]
            raise SelfKDError(f"checkpoint {path} does not fit this run's model {self.cfg.model.name!r} and method "
                              f"{self.cfg.method.name!r} ({type(err).__name__}: {first})") from None

    def _write_label_noise(self) -> None:
        s, noise = self.s, self.cfg.data.noise
        bad = torch.nonzero(s.train.labels != s.clean_labels).flatten()
        ckpt.write_json(self.dir / LABEL_NOISE, {
            "kind": noise.kind, "rate": noise.rate, "seed": noise.seed, "num_samples": len(s.train),
            "num_corrupted": len(bad), "corrupted": bad.tolist(), "noisy_labels": s.train.labels[bad].tolist(),
            "true_labels": s.clean_labels[bad].tolist(),
        })

    def _write_metrics(self) -> None:
        import json

        ckpt.write_text(self.dir / METRICS, "".join(json.dumps(h) + "\n" for h in self.history))
        write_csv(self.dir / CSV, self.history)

    # -- the loop --------------------------------------------------------------------------------
    def _autocast(self):
        if self.s.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.s.device.type, dtype=self.s.amp_dtype)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.s.channels_last else x

    def _train_epoch(self, bar: Progress) -> dict[str, float]:
        s, dev = self.s, self.s.device
        self.model.train()
        self.method.on_epoch_start(self.epoch, self.cfg.train.epochs)
        if hasattr(self.sampler, "set_epoch"):  # DistributedSampler: this epoch's shuffle
            self.sampler.set_epoch(self.epoch)
        _reset_peak_mem(dev)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        scored = steps = 0
        # images/s counts forward passes in images, comparable across methods: DLB forwards each
        # sample twice per epoch, CS-KD its partners, DDGSD a second view
        images_per_epoch = len(s.train) * self.method.forwards_per_sample
        first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        self.logs.start_epoch()
        aug_gen, mix_gen = self.gens["augment"], self.gens["mix"]

        def augment(raw: torch.Tensor) -> torch.Tensor:
            for policy in s.policies:
                raw = policy(raw, aug_gen)
            return self._prep(s.augment(raw, aug_gen))

        t0 = time.perf_counter()
        for x_raw, y_host, idx in self.loader:
            out = self._step(x_raw, y_host, idx, augment, mix_gen)
            loss = out.loss.detach()
            bad = ~torch.isfinite(loss) & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, self.global_step), first_bad)
            for k, v in (("loss", loss), *out.parts.items()):
                sums[k] = sums.get(k, 0) + v.float()
                counts[k] = counts.get(k, 0) + 1  # a part may be absent on some steps (DLB's first)
            if out.logits is not None:
                correct += (out.logits.detach().argmax(1) == out.target).sum()
                scored += out.target.shape[0]
            steps += 1
            self.global_step += 1
            if steps % self.cfg.train.log_every == 0 or steps == self.steps_per_epoch:
                self._check_finite(first_bad)
                done = images_per_epoch * steps / self.steps_per_epoch
                rate = done / (time.perf_counter() - t0)
                bar.update(steps, float(sums["loss"] / counts["loss"]), rate)
                self.logs.step(self.global_step, sums, counts, self.opt.param_groups[0]["lr"], rate)
        self._check_finite(first_bad)
        self.method.on_epoch_end()  # e.g. PS-KD: the same memory on every rank before the checkpoint
        seconds = time.perf_counter() - t0
        keys = sorted(sums)
        # every rank's sums: the epoch's metrics are over the whole training set
        totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).to(dev) for k in keys]
                             + [correct.double(), torch.tensor(float(scored), dtype=torch.float64, device=dev)])
        totals = distributed.all_gather_rows(totals[None]).sum(0) if self.world > 1 else totals
        peak = max(distributed.all_gather_objects(_peak_mem_mb(dev)))
        n_counts = {k: counts[k] * self.world for k in keys}
        out_m = {f"train_{k}": float(totals[i] / n_counts[k]) for i, k in enumerate(keys)}
        out_m["train_acc"] = 100.0 * float(totals[-2]) / max(float(totals[-1]), 1.0)
        out_m.update(train_seconds=seconds, images_per_s=images_per_epoch / seconds, samples_per_s=len(s.train) / seconds,
                     peak_mem_mb=peak, lr=self.opt.param_groups[0]["lr"])
        return out_m

    def _step(self, x_raw: torch.Tensor, y_host: torch.Tensor, idx: torch.Tensor,
              augment: Callable[[torch.Tensor], torch.Tensor], mix_gen: torch.Generator):
        """One optimisation step. Nothing here reads a device value: the method's checks use the loader's
        CPU labels and indices (``y_host``, ``idx``); tests/test_sync_free.py counts it."""
        s, dev = self.s, self.s.device
        x_raw = x_raw.to(dev, non_blocking=True)
        y = y_host.to(dev, non_blocking=True, copy=True)  # a distinct tensor even on the CPU
        batch = Batch(augment(x_raw), y, idx, raw=x_raw, augment=augment, y_host=y_host)
        if s.mixer is not None:
            batch = self.method.mix(batch, s.mixer, mix_gen)
        with self._autocast():
            out = self.method.train_step(self.forward_model, batch)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        self.sched.step()
        return out

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        if self.world > 1:  # every rank stops together, at the earliest non-finite step of any rank
            seen = [b for b in distributed.all_gather_objects(int(first_bad)) if b >= 0]
            bad = min(seen) if seen else -1
        else:
            bad = int(first_bad)
        if bad >= 0:
            step_in_epoch = bad - self.epoch * self.steps_per_epoch
            path = self.dir / CHECKPOINT
            last = (f"last good checkpoint: {path} (epoch {self.epoch})" if self.epoch and path.is_file()
                    else "no checkpoint was written yet")
            raise TrainingError(
                f"non-finite loss at epoch {self.epoch + 1} step {step_in_epoch + 1} (global step {bad + 1}); "
                f"stopped; {last}"
            )

    @torch.no_grad()
    def _logits(self, data: Any) -> list[torch.Tensor]:
        """Eval-mode logits of every exit (one for plain models; the deepest last), on the CPU, for every
        image of ``data`` in order. Under torchrun each rank computes every world-th chunk of the one-process
        chunking and the chunks are gathered, so the logits are those of one process."""
        self.model.eval()
        s, dev = self.s, self.s.device
        bs, n = self.cfg.train.eval_batch_size, len(data)
        multi = hasattr(self.model, "forward_exits")  # multi-exit models: score every exit, the deepest is the model
        # the eager model in eval: DDP's forward would sync buffers, and no gradient flows here
        net = self.model if self.ddp is not None else self.forward_model
        outs: list[list[torch.Tensor]] = []
        for a, b in distributed.eval_chunks(n, bs, self.rank, self.world):
            x = self._prep(s.augment.normalize(data.batch(range(a, b))[0].to(dev)))
            with self._autocast():
                z = self.model.forward_exits(x) if multi else [net(x)]
            outs.append([e.float().cpu() for e in z])
        exits = getattr(self.model, "num_exits", 1) if multi else 1
        cols = [torch.cat(col) for col in zip(*outs)] if outs else [torch.empty(0, s.num_classes)] * exits
        return [distributed.gather_chunks(c, n, bs) for c in cols]

    def evaluate(self) -> dict[str, Any]:
        labels = self.s.test.labels
        exits = self._logits(self.s.test)
        metrics: dict[str, Any] = classification_metrics(exits[-1], labels)
        if len(exits) > 1:
            for k, z in enumerate(exits, start=1):
                metrics[f"acc_exit{k}"] = classification_metrics(z, labels)["acc"]
        metrics["reliability"] = reliability(exits[-1], labels)
        return metrics

    def evaluate_train_noise(self) -> dict[str, float]:
        """On the (unaugmented) training images: how much of the label noise the model memorised.

        ``corrupted_acc``: accuracy on the samples whose label was corrupted, against their true labels;
        ``memorized``: share of those predicted as their noisy label; ``clean_acc``: accuracy on the others.
        """
        s = self.s
        pred = self._logits(s.train)[-1].argmax(1)
        bad = s.train.labels != s.clean_labels

        def share(mask: torch.Tensor, ok: torch.Tensor) -> float:
            return 100.0 * float(ok[mask].double().mean()) if mask.any() else float("nan")

        return {"corrupted_acc": share(bad, pred == s.clean_labels), "memorized": share(bad, pred == s.train.labels),
                "clean_acc": share(~bad, pred == s.clean_labels)}

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end; ``resume``: continue from ``checkpoint.pt`` when there is one (otherwise start).

        Holds the run directory's lock throughout. A new run needs a new or empty folder, unless the
        caller already holds the lock (``train_run`` and the sweep check and prepare the folder).
        """
        lock = rundir.locked(self.dir) if self.main else contextlib.nullcontext()
        with _main_first(lock), _thread_scope():
            return self._run(resume)

    def _run(self, resume: bool) -> dict[str, Any]:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        resuming = resume and distributed.broadcast_object((self.dir / CHECKPOINT).exists() if self.main else None)
        if resuming:
            gone = rundir.remove_leftovers(self.dir) if self.main else []
            if gone:
                self.log(f"removed {len(gone)} temp file{'s' if len(gone) != 1 else ''} of an interrupted write: "
                         f"{', '.join(gone)}")
            state = ckpt.load(self.dir / CHECKPOINT)
            self._restore(state)
            self._resume_threads(state.get("threads"))
            if self.main:
                self._write_metrics()  # drop lines of an epoch that never reached its checkpoint
            self.log(f"resumed {self.dir} at epoch {self.epoch}/{self.cfg.train.epochs}")
        elif self.main:
            if not resume and rundir.depth(self.dir) == 1:  # a caller holding the lock prepared the folder
                rundir.check_new(self.dir)
            rundir.remove_leftovers(self.dir)
            ckpt.write_text(self.dir / CONFIG, save_yaml(self.cfg))
            ckpt.write_json(self.dir / DATA_INFO, self.s.data_info)
            if self.noisy:
                self._write_label_noise()
            self._write_metrics()
        self.log(self.startup_line())
        total = self.cfg.train.epochs
        wall0 = time.perf_counter()
        self.logs = RunLogs(self.dir, self.cfg.train.log if self.main else "csv",  # rank 0 writes the events
                            purge_step=self.global_step + 1 if self.global_step else None)
        with self.logs, Progress(total_steps=self.steps_per_epoch, enabled=self.progress, log=self.log) as bar:
            while self.epoch < total:
                t0 = time.perf_counter()
                bar.start_epoch(self.epoch + 1, total)
                m = {"epoch": self.epoch + 1}
                m.update(self._train_epoch(bar))
                scored = (self.epoch + 1) % self.cfg.train.eval_every == 0 or self.epoch + 1 == total
                if scored:
                    m.update({f"test_{k}": v for k, v in self.evaluate().items()})
                    if self.noisy:
                        m.update({f"train_{k}": v for k, v in self.evaluate_train_noise().items()})
                m["epoch_seconds"] = time.perf_counter() - t0
                self.epoch += 1
                self.logs.epoch(self.global_step, m)
                # best.pt holds the first scored epoch of the best accuracy, as summary.json's best_epoch does
                if self.main and scored and all(m["test_acc"] > h["test_acc"] for h in self.history if "test_acc" in h):
                    ckpt.save(self.dir / BEST, {"epoch": self.epoch, "model": self.model.state_dict()})
                self.history.append(m)
                state = self._gathered_state()  # collective; the file is rank 0's
                if self.main:
                    ckpt.save(self.dir / CHECKPOINT, state)
                    self._write_metrics()
                bar.end_epoch(m)
        summary = self.summary()
        summary["wall_seconds_this_session"] = time.perf_counter() - wall0
        if self.main:
            ckpt.write_json(self.dir / SUMMARY, summary)
        distributed.barrier()  # no rank leaves before the files are written
        return summary

    def _resume_threads(self, saved: Any) -> None:
        """Bit-identical resume needs the thread count the run was started with: reuse the recorded one
        unless the caller chose a count, and say so when they differ."""
        if not isinstance(saved, int) or saved < 1:
            return
        if self.threads is None:
            if torch.get_num_threads() != saved:
                torch.set_num_threads(saved)
                self.log(f"{self.dir}: resuming with {saved} thread{'s' if saved != 1 else ''} as recorded in "
                         f"{CHECKPOINT} (bit-identical results need the same count; --threads overrides)")
        elif self.threads != saved:
            self.log(f"{self.dir}: resuming with {self.threads} threads, the run started with {saved}: the "
                     "results will not be bit-identical to an uninterrupted run")

    def startup_line(self) -> str:
        s, d = self.s, self.s.train.image_shape
        params = sum(p.numel() for p in self.model.parameters())
        n = torch.get_num_threads()
        ranks = ""
        if self.world > 1:
            b = self.cfg.optim.batch_size
            ranks = (f", {self.world} ranks ({distributed.backend_name()}{', sync_bn' if self.cfg.train.sync_bn else ''}; "
                     f"batch {b}/rank = {b * self.world} global)")
        return (f"{self.cfg.data.name}: {len(s.train)} train / {len(s.test)} test, {s.num_classes} classes, "
                f"{d[0]}x{d[1]}x{d[2]} | {self.cfg.model.name}: {params:,} parameters | {self.method.describe()} | "
                f"{s.device}, {n} thread{'s' if n != 1 else ''}{ranks} | {self.dir}")

    def summary(self) -> dict[str, Any]:
        h = self.history
        last = h[-1]
        best = max((r for r in h if "test_acc" in r), key=lambda r: r["test_acc"])
        train_s = sum(r["train_seconds"] for r in h)
        rows = sum(r["images_per_s"] * r["train_seconds"] for r in h)
        return {
            "data": self.cfg.data.name, "model": self.cfg.model.name, "method": self.method.describe(),
            "epochs": len(h), "seed": self.cfg.train.seed,
            "last_acc": last["test_acc"], "best_acc": best["test_acc"], "best_epoch": best["epoch"],
            **({"last_top5": last["test_top5"]} if "test_top5" in last else {}),  # absent with <= 5 classes
            "ece": last["test_ece"], "nll": last["test_nll"],
            "reliability": last["test_reliability"],
            **{k: last[f"train_{k}"] for k in ("corrupted_acc", "memorized", "clean_acc") if f"train_{k}" in last},
            **{f"last_acc_exit{k}": last[f"test_acc_exit{k}"] for k in range(1, 16) if f"test_acc_exit{k}" in last},
            "seconds": sum(r["epoch_seconds"] for r in h), "train_seconds": train_s,
            "images_per_s": rows / train_s if train_s else math.nan,
            "samples_per_s": len(self.s.train) * len(h) / train_s if train_s else math.nan,
            "peak_mem_mb": max(r["peak_mem_mb"] for r in h),
            "forwards_per_sample": self.method.forwards_per_sample,
            "params": sum(p.numel() for p in self.model.parameters()),
            "train_images": len(self.s.train), "test_images": len(self.s.test), "threads": torch.get_num_threads(),
            "world_size": self.world, "batch_size": self.cfg.optim.batch_size,
            "global_batch": self.cfg.optim.batch_size * self.world,  # new samples per step over all ranks
            "device": str(self.s.device), "torch": torch.__version__, "python": platform.python_version(),
        }


def train_run(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool | None = None,
              log: Callable[[str], None] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``, first training a CE teacher when the method needs one.

    Before any data is loaded, ``run_dir`` must be writable and (unless ``resume``) new or empty; the
    data and model are then built (a bad config writes nothing), and the run's lock is held while
    anything is written. ``resume``: continue from the checkpoint when there is one, else start.

    A method with ``needs_teacher`` and no ``method.teacher`` gets ``RUN/teacher``: a CE run of the
    same config (model, data, seed, epochs). ``config.yaml`` is written before the teacher trains,
    so ``--resume`` works at any point: an unfinished teacher is resumed first.
    """
    run = Path(run_dir)
    main_rank = distributed.is_main()
    say = (log or (lambda msg: print(msg, file=sys.stderr, flush=True))) if main_rank else (lambda msg: None)

    def checks() -> None:
        rundir.check_writable(run, "--resume" if resume else "--out")
        if not resume:
            rundir.check_new(run)
        logs.check_dir(run, cfg.train.log)  # a resumed run's RUN/tb: before any data is loaded

    _on_main(checks)
    teacher: Trainer | None = None
    if method_class(cfg.method.name).needs_teacher:
        own = run / "teacher"
        if cfg.method.params().get("teacher") is None:
            params = cfg.method.params() | {"teacher": str(own)}
            cfg = cfg.model_copy(update={"method": MethodCfg(name=cfg.method.name, **params)})
        if Path(cfg.method.params()["teacher"]).resolve() == own.resolve() and not (own / SUMMARY).exists():
            teacher_cfg = cfg.model_copy(update={"method": MethodCfg(name="ce")})
            # validate data and model before anything is written
            teacher = Trainer(build(teacher_cfg), own, progress=progress, log=log, threads=threads)
    main = None if teacher is not None else Trainer(build(cfg), run, progress=progress, log=log, threads=threads)
    with _main_first(rundir.locked(run) if main_rank else contextlib.nullcontext()):
        if not resume:  # again under the lock: another process may have started here meanwhile
            _on_main(lambda: rundir.check_new(run))
        if teacher is not None:
            if not resume and main_rank:
                ckpt.write_text(run / CONFIG, save_yaml(cfg))
            say(f"training the CE teacher first: {teacher.dir}")
            teacher.run(resume=(teacher.dir / CONFIG).exists())
            main = Trainer(build(cfg), run, progress=progress, log=log, threads=threads)
        assert main is not None
        return main.run(resume=resume)
