"""The reference trainer: one run of one method on one data set, crash-safe and exactly resumable.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one object per epoch),
``checkpoint.pt`` (everything needed to continue: model, optimiser, scheduler, every RNG, the
method's state and the sampler position), ``best.pt`` (weights of the best epoch) and, once the run
has finished, ``summary.json``. Every file is written atomically.
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
from torch.utils.data import DataLoader, RandomSampler

from ..data import ArrayDataset, BatchAugment, Mixer, apply_label_noise, build_mixer, build_policy, load_dataset
from ..data.policies import Policy
from ..data.split import stratified_subset  # noqa: F401  (re-exported: selfkd.engine.trainer.stratified_subset)
from ..errors import ConfigError, SelfKDError, TrainingError
from ..methods import Batch, Method, build_method, method_class
from ..models import build_model
from . import checkpoint as ckpt
from .config import Config, MethodCfg, save_yaml
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
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    bundle = load_dataset(
        cfg.data.name, root=cfg.data.dir, download=cfg.data.download,
        image_size=cfg.data.image_size, cache_dir=cfg.data.cache_dir,
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
    cl = cfg.train.channels_last
    channels_last = cl == "on" or (cl == "auto" and bundle.image_size >= 16)
    amp = cfg.train.amp
    amp_dtype = torch.bfloat16 if amp == "bf16" or (amp == "auto" and device.type == "cuda") else None
    info = {"dataset": bundle.name, "classes": list(bundle.classes), "num_classes": bundle.num_classes,
            "in_channels": bundle.channels, "image_size": bundle.image_size, "mean": list(bundle.mean),
            "std": list(bundle.std)}
    return Setup(cfg, device, train, test, clean, bundle.num_classes, augment, policies, mixer, model,
                 method, channels_last, amp_dtype, info)


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


class Trainer:
    """Train ``setup`` into ``run_dir``; :meth:`run` returns the summary."""

    def __init__(self, setup: Setup, run_dir: str | Path, *, progress: bool | None = None,
                 log: Callable[[str], None] | None = None):
        self.s = setup
        self.cfg = setup.cfg
        self.dir = Path(run_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.progress = progress
        dev = setup.device
        self.model = setup.model.to(dev)
        if setup.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward_model: nn.Module = torch.compile(self.model) if self.cfg.train.compile else self.model
        self.method = setup.method
        o = self.cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                                   weight_decay=o.weight_decay)
        seed = self.cfg.train.seed
        self.gens = {
            "sampler": torch.Generator().manual_seed(seed + 1),
            "loader": torch.Generator().manual_seed(seed + 2),
            "augment": torch.Generator(device=dev).manual_seed(seed + 3),
        }
        self.batch_sampler = self.method.batch_sampler(
            RandomSampler(setup.train, generator=self.gens["sampler"]), o.batch_size, drop_last=False,
            labels=setup.train.labels,
        )
        self.loader = DataLoader(
            setup.train, batch_sampler=self.batch_sampler, num_workers=self.cfg.data.num_workers,
            pin_memory=dev.type == "cuda", generator=self.gens["loader"],
            persistent_workers=False,
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
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "method": self.method.state_dict(),
            "rng": _rng_state(self.gens),
            "history": self.history,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("format") != FORMAT:
            raise SelfKDError(f"checkpoint format {state.get('format')!r} is not {FORMAT}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        _set_rng_state(state["rng"], self.gens)
        self.history = list(state["history"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])

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
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(self.epoch)
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
        aug_gen = self.gens["augment"]

        def augment(raw: torch.Tensor) -> torch.Tensor:
            for policy in s.policies:
                raw = policy(raw, aug_gen)
            return self._prep(s.augment(raw, aug_gen))

        t0 = time.perf_counter()
        for x_raw, y, idx in self.loader:
            x_raw = x_raw.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            batch = Batch(augment(x_raw), y, idx, raw=x_raw, augment=augment)
            if s.mixer is not None:
                batch = self.method.mix(batch, s.mixer, aug_gen)
            with self._autocast():
                out = self.method.train_step(self.forward_model, batch)
            self.opt.zero_grad(set_to_none=True)
            out.loss.backward()
            self.opt.step()
            self.sched.step()
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
        seconds = time.perf_counter() - t0
        out_m = {f"train_{k}": float(v / counts[k]) for k, v in sums.items()}
        out_m["train_acc"] = 100.0 * float(correct) / max(scored, 1)
        out_m.update(train_seconds=seconds, images_per_s=images_per_epoch / seconds, samples_per_s=len(s.train) / seconds,
                     peak_mem_mb=_peak_mem_mb(dev), lr=self.opt.param_groups[0]["lr"])
        return out_m

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = int(first_bad)
        if bad >= 0:
            step_in_epoch = bad - self.epoch * self.steps_per_epoch
            last = f"epoch {self.epoch}" if self.epoch else "none yet"
            raise TrainingError(
                f"non-finite loss at epoch {self.epoch + 1} step {step_in_epoch + 1} (global step {bad + 1}); "
                f"stopped; last good checkpoint: {self.dir / CHECKPOINT} ({last})"
            )

    @torch.no_grad()
    def _logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Eval-mode logits of every exit (one for plain models; the deepest last), on the CPU."""
        self.model.eval()
        s, dev = self.s, self.s.device
        bs = self.cfg.train.eval_batch_size
        multi = hasattr(self.model, "forward_exits")  # multi-exit models: score every exit, the deepest is the model
        outs: list[list[torch.Tensor]] = []
        for i in range(0, len(images), bs):
            x = self._prep(s.augment.normalize(images[i : i + bs].to(dev)))
            with self._autocast():
                z = self.model.forward_exits(x) if multi else [self.forward_model(x)]
            outs.append([e.float().cpu() for e in z])
        return [torch.cat(col) for col in zip(*outs)]

    def evaluate(self) -> dict[str, Any]:
        labels = self.s.test.labels
        exits = self._logits(self.s.test.images)
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
        pred = self._logits(s.train.images)[-1].argmax(1)
        bad = s.train.labels != s.clean_labels

        def share(mask: torch.Tensor, ok: torch.Tensor) -> float:
            return 100.0 * float(ok[mask].double().mean()) if mask.any() else float("nan")

        return {"corrupted_acc": share(bad, pred == s.clean_labels), "memorized": share(bad, pred == s.train.labels),
                "clean_acc": share(~bad, pred == s.clean_labels)}

    def run(self, resume: bool = False) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.dir / CHECKPOINT).exists():
            self._restore(ckpt.load(self.dir / CHECKPOINT))
            self._write_metrics()  # drop lines of an epoch that never reached its checkpoint
            self.log(f"resumed {self.dir} at epoch {self.epoch}/{self.cfg.train.epochs}")
        else:
            ckpt.write_text(self.dir / CONFIG, save_yaml(self.cfg))
            ckpt.write_json(self.dir / DATA_INFO, self.s.data_info)
            if self.noisy:
                self._write_label_noise()
            self._write_metrics()
        total = self.cfg.train.epochs
        wall0 = time.perf_counter()
        self.logs = RunLogs(self.dir, self.cfg.train.log, purge_step=self.global_step + 1 if self.global_step else None)
        with self.logs, Progress(total_steps=self.steps_per_epoch, enabled=self.progress, log=self.log) as bar:
            while self.epoch < total:
                t0 = time.perf_counter()
                bar.start_epoch(self.epoch + 1, total)
                m = {"epoch": self.epoch + 1}
                m.update(self._train_epoch(bar))
                m.update({f"test_{k}": v for k, v in self.evaluate().items()})
                if self.noisy:
                    m.update({f"train_{k}": v for k, v in self.evaluate_train_noise().items()})
                m["epoch_seconds"] = time.perf_counter() - t0
                self.epoch += 1
                self.history.append(m)
                best = max(h["test_acc"] for h in self.history)
                self.logs.epoch(self.global_step, m)
                if m["test_acc"] >= best:
                    ckpt.save(self.dir / BEST, {"epoch": self.epoch, "model": self.model.state_dict()})
                ckpt.save(self.dir / CHECKPOINT, self._state())
                self._write_metrics()
                bar.end_epoch(m)
        summary = self.summary()
        summary["wall_seconds_this_session"] = time.perf_counter() - wall0
        ckpt.write_json(self.dir / SUMMARY, summary)
        return summary

    def summary(self) -> dict[str, Any]:
        h = self.history
        last = h[-1]
        best = max(h, key=lambda r: r["test_acc"])
        train_s = sum(r["train_seconds"] for r in h)
        rows = sum(r["images_per_s"] * r["train_seconds"] for r in h)
        return {
            "data": self.cfg.data.name, "model": self.cfg.model.name, "method": self.method.describe(),
            "epochs": len(h), "seed": self.cfg.train.seed,
            "last_acc": last["test_acc"], "best_acc": best["test_acc"], "best_epoch": best["epoch"],
            "last_top5": last["test_top5"], "ece": last["test_ece"], "nll": last["test_nll"],
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
            "device": str(self.s.device), "torch": torch.__version__, "python": platform.python_version(),
        }


def train_run(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``, first training a CE teacher when the method needs one.

    A method with ``needs_teacher`` and no ``method.teacher`` gets ``RUN/teacher``: a CE run of the
    same config (model, data, seed, epochs). ``config.yaml`` is written before the teacher trains,
    so ``--resume`` works at any point: an unfinished teacher is resumed first.
    """
    run = Path(run_dir)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if getattr(method_class(cfg.method.name), "needs_teacher", False):
        own = run / "teacher"
        if cfg.method.params().get("teacher") is None:
            params = cfg.method.params() | {"teacher": str(own)}
            cfg = cfg.model_copy(update={"method": MethodCfg(name=cfg.method.name, **params)})
        if Path(cfg.method.params()["teacher"]).resolve() == own.resolve() and not (own / SUMMARY).exists():
            teacher_cfg = cfg.model_copy(update={"method": MethodCfg(name="ce")})
            setup = build(teacher_cfg)  # validate data and model before anything is written
            if not resume:
                ckpt.write_text(run / CONFIG, save_yaml(cfg))
            say(f"training the CE teacher first: {own}")
            Trainer(setup, own, progress=progress, log=log).run(resume=(own / CHECKPOINT).exists())
    return Trainer(build(cfg), run, progress=progress, log=log).run(resume=resume)
