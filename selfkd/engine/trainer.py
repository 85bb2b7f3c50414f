"""The reference trainer: one run of one method on one data set, crash-safe and exactly resumable.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one object per epoch),
``checkpoint.pt`` (everything needed to continue: model, optimiser, scheduler, every RNG, the
method's state and the sampler position), ``best.pt`` (weights of the best epoch),
``test_correct.npy`` (the final evaluation's per-test-image correctness) and, once the run
has finished, ``summary.json`` (the names: :mod:`selfkd.engine.rundir`). Every file is written
atomically. Every writer holds the folder's ``flock`` (``.lock``, see :mod:`selfkd.engine.rundir`);
only a new or empty folder becomes a run.

Rooms beside this one: :mod:`~selfkd.engine.setup` builds a run, :mod:`~selfkd.engine.run_state` saves
and restores it, :mod:`~selfkd.engine.system` probes the process, :mod:`~selfkd.engine.stages` runs a
teacher stage first (``train_run``).
"""
from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from .. import distributed
from ..data import ArrayDataset, BatchView
from ..errors import TrainingError
from ..methods import Batch
from . import checkpoint as ckpt
from . import rundir, run_state, system
from .logs import CSV, RunLogs, write_csv
from .metrics import classification_metrics, reliability, topk_hits
from .progress import Progress
from .rundir import BEST, CHECKPOINT, CONFIG, DATA_INFO, LABEL_NOISE, METRICS, SUMMARY, TEST_CORRECT
from .schedule import lr_lambda
from .setup import Setup

TIMING_KEYS = ("epoch_seconds", "train_seconds", "images_per_s", "samples_per_s", "peak_mem_mb", "compile_s")
RANK_SEED_STRIDE = 7919  # a prime: rank r's augmentation and mixing seeds are offset by r * 7919


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
        self.setup = setup
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
            # Module.to's stub overloads omit memory_format, which Module.to accepts
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.ddp: DistributedDataParallel | None = None
        train_model: nn.Module = self.model
        if self.world > 1:
            if self.cfg.train.sync_bn:
                self.model = distributed.convert_sync_batchnorm(self.model, dev)
            self.ddp = DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
            train_model = self.ddp
        self.forward_model: nn.Module = train_model
        tc = self.cfg.train
        # compiled graphs are kept in this folder (None: inductor's default); compile time is clocked apart
        self.compile_dir = system.check_compile_cache(tc.compile_cache) if tc.compile and tc.compile_cache else None
        self.compile_clock = system.CompileClock() if tc.compile else None
        if tc.compile:
            self.forward_model = system.compiled(train_model, tc.compile_mode)
        self.method = setup.method
        optim = self.cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                   nesterov=optim.nesterov and optim.momentum > 0, weight_decay=optim.weight_decay)
        seed = self.cfg.train.seed
        rank_offset = RANK_SEED_STRIDE * self.rank  # each rank its own augmentation and mixing draws; rank 0 = one process
        self.gens = {
            "sampler": torch.Generator().manual_seed(seed + 1),
            "loader": torch.Generator().manual_seed(seed + 2 + rank_offset),
            "augment": torch.Generator(device=dev).manual_seed(seed + 3 + rank_offset),
            "mix": torch.Generator().manual_seed(seed + 4 + rank_offset),  # host draws: lam, box (no device sync)
        }
        if self.rank:
            torch.manual_seed(seed + rank_offset)  # dropout etc. differ per rank (the weights were initialised alike)
        if sampler is None:
            sampler = (DistributedSampler(setup.train, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=seed + 1, drop_last=False) if self.world > 1
                       else RandomSampler(setup.train, generator=self.gens["sampler"]))
        self.sampler = sampler
        self.batch_sampler = self.method.batch_sampler(sampler, optim.batch_size, drop_last=False,
                                                       labels=setup.train.labels)
        on_device = setup.train.images.device.type != "cpu" if isinstance(setup.train, ArrayDataset) else False
        # one indexing operation per batch (BatchView), decoded in workers when streaming; workers are
        # started once per run, not once per epoch (each start forks and waits for a first batch). They
        # draw no random numbers (augmentation runs here), so batches and training are those of 0 workers.
        workers = self.cfg.data.num_workers
        self.loader = DataLoader(
            BatchView(setup.train), sampler=self.batch_sampler, batch_size=None,
            num_workers=workers, pin_memory=dev.type == "cuda" and not on_device,
            generator=self.gens["loader"], persistent_workers=workers > 0,
        )
        self.steps_per_epoch = len(self.batch_sampler)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.cfg.schedule, self.cfg.train.epochs, self.steps_per_epoch, optim.lr)
        )
        self.noisy = setup.noisy
        self.history: list[dict[str, Any]] = []
        self.logs = RunLogs(self.dir, "csv")  # run() opens the configured sinks
        self.epoch = 0
        self.global_step = 0
        self.test_correct: torch.Tensor | None = None  # the last evaluate()'s per-test-image top-1 hits (CPU, bool)

    # -- files ---------------------------------------------------------------------------------
    def _write_metrics(self) -> None:
        ckpt.write_text(self.dir / METRICS, "".join(json.dumps(row) + "\n" for row in self.history))
        write_csv(self.dir / CSV, self.history)

    # -- the loop --------------------------------------------------------------------------------
    def _autocast(self):
        if self.setup.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.setup.device.type, dtype=self.setup.amp_dtype)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.setup.channels_last else x

    def _train_epoch(self, bar: Progress) -> dict[str, float]:
        setup, dev = self.setup, self.setup.device
        self.model.train()
        self.method.on_epoch_start(self.epoch, self.cfg.train.epochs)
        if hasattr(self.sampler, "set_epoch"):  # DistributedSampler: this epoch's shuffle
            self.sampler.set_epoch(self.epoch)
        system.reset_peak_mem(dev)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        scored = steps = 0
        # images/s counts forward passes in images, comparable across methods: DLB forwards each
        # sample twice per epoch, CS-KD its partners, DDGSD a second view
        images_per_epoch = len(setup.train) * self.method.forwards_per_sample
        first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        self.logs.start_epoch()
        aug_gen, mix_gen = self.gens["augment"], self.gens["mix"]

        def augment(raw: torch.Tensor) -> torch.Tensor:
            for policy in setup.policies:
                raw = policy(raw, aug_gen)
            return self._prep(setup.augment(raw, aug_gen))

        compiled0 = self._compile_seconds()
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
        seconds = time.perf_counter() - t0 - (self._compile_seconds() - compiled0)  # training time, compilation apart
        keys = sorted(sums)
        # every rank's sums: the epoch's metrics are over the whole training set
        totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).to(dev) for k in keys]
                             + [correct.double(), torch.tensor(float(scored), dtype=torch.float64, device=dev)])
        totals = distributed.all_gather_rows(totals[None]).sum(0) if self.world > 1 else totals
        peak = max(distributed.all_gather_objects(system.peak_mem_mb(dev)))
        n_counts = {k: counts[k] * self.world for k in keys}
        out_m = {f"train_{k}": float(totals[i] / n_counts[k]) for i, k in enumerate(keys)}
        out_m["train_acc"] = 100.0 * float(totals[-2]) / max(float(totals[-1]), 1.0)
        out_m.update(train_seconds=seconds, images_per_s=images_per_epoch / seconds, samples_per_s=len(setup.train) / seconds,
                     peak_mem_mb=peak, lr=self.opt.param_groups[0]["lr"])
        return out_m

    def _compile_seconds(self) -> float:
        return self.compile_clock.seconds if self.compile_clock is not None else 0.0

    def _step(self, x_raw: torch.Tensor, y_host: torch.Tensor, idx: torch.Tensor,
              augment: Callable[[torch.Tensor], torch.Tensor], mix_gen: torch.Generator):
        """One optimisation step. Nothing here reads a device value: the method's checks use the loader's
        CPU labels and indices (``y_host``, ``idx``); tests/test_sync_free.py counts it."""
        setup, dev = self.setup, self.setup.device
        x_raw = x_raw.to(dev, non_blocking=True)
        y = y_host.to(dev, non_blocking=True, copy=True)  # a distinct tensor even on the CPU
        batch = Batch(augment(x_raw), y, idx, raw=x_raw, augment=augment, y_host=y_host)
        if setup.mixer is not None:
            batch = self.method.mix(batch, setup.mixer, mix_gen)
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
        setup, dev = self.setup, self.setup.device
        bs, n = self.cfg.train.eval_batch_size, len(data)
        forward_exits = getattr(self.model, "forward_exits", None)
        multi = forward_exits is not None  # multi-exit models: score every exit, the deepest is the model
        # the eager model in eval: DDP's forward would sync buffers, and no gradient flows here
        net = self.model if self.ddp is not None else self.forward_model
        outs: list[list[torch.Tensor]] = []
        for a, b in distributed.eval_chunks(n, bs, self.rank, self.world):
            x = self._prep(setup.augment.normalize(data.batch(range(a, b))[0].to(dev)))
            with self._autocast():
                z = forward_exits(x) if forward_exits is not None else [net(x)]
            outs.append([e.float().cpu() for e in z])
        exits = getattr(self.model, "num_exits", 1) if multi else 1
        cols = [torch.cat(col) for col in zip(*outs)] if outs else [torch.empty(0, setup.num_classes)] * exits
        return [distributed.gather_chunks(c, n, bs) for c in cols]

    def evaluate(self) -> dict[str, Any]:
        labels = self.setup.test.labels
        exits = self._logits(self.setup.test)  # gathered: every rank holds all rows, in test-set order
        self.test_correct = topk_hits(exits[-1], labels, 1)
        metrics: dict[str, Any] = classification_metrics(exits[-1], labels, top1=self.test_correct)
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
        setup = self.setup
        pred = self._logits(setup.train)[-1].argmax(1)
        bad = setup.train.labels != setup.clean_labels

        def share(mask: torch.Tensor, ok: torch.Tensor) -> float:
            return 100.0 * float(ok[mask].double().mean()) if mask.any() else float("nan")

        return {"corrupted_acc": share(bad, pred == setup.clean_labels), "memorized": share(bad, pred == setup.train.labels),
                "clean_acc": share(~bad, pred == setup.clean_labels)}

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end; ``resume``: continue from ``checkpoint.pt`` when there is one (otherwise start).

        Holds the run directory's lock throughout. A new run needs a new or empty folder, unless the
        caller already holds the lock (``train_run`` and the sweep check and prepare the folder).
        """
        lock = rundir.locked(self.dir) if self.main else contextlib.nullcontext()
        clock = self.compile_clock.active() if self.compile_clock is not None else contextlib.nullcontext()
        cache = system.compile_cache(self.compile_dir) if self.compile_clock is not None else contextlib.nullcontext()
        with distributed.main_first(lock), system.thread_scope(), cache, clock:
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
            saved = ckpt.load(self.dir / CHECKPOINT)
            run_state.restore(self, saved)
            system.resume_threads(saved.get("threads"), self.threads, self.dir, self.log)
            if self.main:
                self._write_metrics()  # drop lines of an epoch that never reached its checkpoint
            self.log(f"resumed {self.dir} at epoch {self.epoch}/{self.cfg.train.epochs}")
        elif self.main:
            if not resume and rundir.depth(self.dir) == 1:  # a caller holding the lock prepared the folder
                rundir.check_new(self.dir)
            rundir.remove_leftovers(self.dir)
            ckpt.write_text(self.dir / CONFIG, self.cfg.to_yaml())
            ckpt.write_json(self.dir / DATA_INFO, self.setup.data_info)
            if self.noisy:
                ckpt.write_json(self.dir / LABEL_NOISE, self.setup.label_noise_record())
            self._write_metrics()
        self.log(self.startup_line())
        total = self.cfg.train.epochs
        wall0 = time.perf_counter()
        self.logs = RunLogs(self.dir, self.cfg.train.log if self.main else "csv",  # rank 0 writes the events
                            purge_step=self.global_step + 1 if self.global_step else None)
        with self.logs, Progress(total_steps=self.steps_per_epoch, enabled=self.progress, log=self.log) as bar:
            while self.epoch < total:
                t0, compiled0 = time.perf_counter(), self._compile_seconds()
                bar.start_epoch(self.epoch + 1, total)
                row: dict[str, Any] = {"epoch": self.epoch + 1}
                row.update(self._train_epoch(bar))
                system.release_memory()  # the freed training heap, before evaluation maps its own batches
                scored = (self.epoch + 1) % self.cfg.train.eval_every == 0 or self.epoch + 1 == total
                if scored:
                    row.update({f"test_{k}": v for k, v in self.evaluate().items()})
                    if self.noisy:
                        row.update({f"train_{k}": v for k, v in self.evaluate_train_noise().items()})
                compile_s = self._compile_seconds() - compiled0  # training and evaluation graphs
                system.release_memory()  # and evaluation's, before the next epoch
                row["epoch_seconds"] = time.perf_counter() - t0 - compile_s
                if self.compile_clock is not None:
                    row["compile_s"] = compile_s
                self.epoch += 1
                if self.main and self.epoch == total and self.test_correct is not None:
                    # the evaluation behind summary.json's last_acc, before the checkpoint that makes the epoch final
                    ckpt.write_array(self.dir / TEST_CORRECT, self.test_correct.numpy())
                self.logs.epoch(self.global_step, row)
                # best.pt holds the first scored epoch of the best accuracy, as summary.json's best_epoch does
                if self.main and scored and all(row["test_acc"] > old["test_acc"] for old in self.history if "test_acc" in old):
                    ckpt.save(self.dir / BEST, {"epoch": self.epoch, "model": self.model.state_dict()})
                self.history.append(row)
                state = run_state.capture(self)  # collective; the file is rank 0's (None elsewhere)
                if state is not None:
                    ckpt.save(self.dir / CHECKPOINT, state)
                    self._write_metrics()
                bar.end_epoch(row)
        summary = self.summary()
        summary["wall_seconds_this_session"] = time.perf_counter() - wall0
        if self.main:
            ckpt.write_json(self.dir / SUMMARY, summary)
        distributed.barrier()  # no rank leaves before the files are written
        return summary

    def startup_line(self) -> str:
        setup, d = self.setup, self.setup.train.image_shape
        params = sum(p.numel() for p in self.model.parameters())
        n = torch.get_num_threads()
        ranks = ""
        if self.world > 1:
            b = self.cfg.optim.batch_size
            ranks = (f", {self.world} ranks ({distributed.backend_name()}{', sync_bn' if self.cfg.train.sync_bn else ''}; "
                     f"batch {b}/rank = {b * self.world} global)")
        return (f"{self.cfg.data.name}: {len(setup.train)} train / {len(setup.test)} test, {setup.num_classes} classes, "
                f"{d[0]}x{d[1]}x{d[2]} | {self.cfg.model.name}: {params:,} parameters | {self.method.describe()} | "
                f"{setup.device}, {n} thread{'s' if n != 1 else ''}{ranks} | {self.dir}")

    def summary(self) -> dict[str, Any]:
        history = self.history
        last = history[-1]
        best = max((r for r in history if "test_acc" in r), key=lambda r: r["test_acc"])
        train_s = sum(r["train_seconds"] for r in history)
        rows = sum(r["images_per_s"] * r["train_seconds"] for r in history)
        return {
            "data": self.cfg.data.name, "model": self.cfg.model.name, "method": self.method.describe(),
            "epochs": len(history), "seed": self.cfg.train.seed,
            "last_acc": last["test_acc"], "best_acc": best["test_acc"], "best_epoch": best["epoch"],
            **({"last_top5": last["test_top5"]} if "test_top5" in last else {}),  # absent with <= 5 classes
            "ece": last["test_ece"], "nll": last["test_nll"],
            "reliability": last["test_reliability"],
            **{k: last[f"train_{k}"] for k in ("corrupted_acc", "memorized", "clean_acc") if f"train_{k}" in last},
            **{f"last_acc_exit{k}": last[f"test_acc_exit{k}"] for k in range(1, 16) if f"test_acc_exit{k}" in last},
            "seconds": sum(r["epoch_seconds"] for r in history), "train_seconds": train_s,
            **({"compile_s": sum(r.get("compile_s", 0.0) for r in history)} if self.compile_clock is not None else {}),
            "images_per_s": rows / train_s if train_s else math.nan,
            "samples_per_s": len(self.setup.train) * len(history) / train_s if train_s else math.nan,
            "peak_mem_mb": max(r["peak_mem_mb"] for r in history),
            "forwards_per_sample": self.method.forwards_per_sample,
            **dict(zip(("forward_passes", "backward_passes"), self.method.passes(len(history)))),  # per sample, run
            "params": sum(p.numel() for p in self.model.parameters()),
            "train_images": len(self.setup.train), "test_images": len(self.setup.test), "threads": torch.get_num_threads(),
            "world_size": self.world, "batch_size": self.cfg.optim.batch_size,
            "global_batch": self.cfg.optim.batch_size * self.world,  # new samples per step over all ranks
            "device": str(self.setup.device), "torch": torch.__version__, "python": platform.python_version(),
            **system.cpu_info(),
        }
