"""``selfkd finetune``: fine-tune a local Hugging Face model as a sequence classifier with a selfkd method.

One run = one :class:`~selfkd.integrations.finetune_config.FinetuneConfig` into one run directory, through
:class:`~selfkd.integrations.hf.SelfKDTrainer` (the method's loss, its batches, its state in every
checkpoint). The run directory holds what ``selfkd train`` writes, in the same formats:

* ``config.yaml`` (resolved), ``data.json`` (classes, split, documents per class, truncation);
* ``metrics.jsonl``: one object per epoch (``test_acc``, ``test_macro_f1``, ``test_ece``,
  ``test_nll``, ``train_loss``, seconds), written atomically after each epoch, and ``metrics.csv``, the
  same scalars as a table (integers as integers), as ``selfkd train`` writes them;
* ``tb/``: TensorBoard events under ``train.log`` as for ``selfkd train`` (``auto``: when tensorboard is
  installed): ``step/loss``, ``step/<part>``, ``step/lr``, ``step/grad_norm`` at the Trainer's log points
  (every ``train.log_every`` steps, means over the window) and ``epoch/<metric>`` per epoch, at the
  global step; a resumed run purges the events after its checkpoint;
* ``hf/checkpoint-N``: the Trainer's checkpoint of the last finished epoch (model, AdamW, scheduler,
  RNG, sampler position, the method's state): ``--resume`` continues exactly from it. It is written
  under ``hf/.selfkd-saving`` and renamed when complete, so a run killed while saving resumes from the
  checkpoint before (or from its start when there was none);
* ``test_correct.npy``: per test document, in test-set order, whether the final model's top-1 prediction
  is right (bool; the final evaluation's, as ``selfkd train`` writes it);
* on success ``summary.json`` (``last_acc``, ``best_acc``, ``macro_f1``, ``ece``, ``nll``, ... as
  ``selfkd report`` reads them) and ``model/`` (final weights and tokenizer, ``train.save_model``);
  the checkpoint is then deleted.

Everything is built (data read, model and tokenizer loaded, lengths measured) before the first file is
written, so bad input writes nothing. Documents longer than ``data.max_length`` tokens (default: the
model's limit) are truncated to their first tokens, and the run says once how many were.
"""
from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import require

require("transformers", "hf")
require("accelerate", "hf")

import torch  # noqa: E402
import transformers  # noqa: E402

from ..data.text import TextBundle, describe, load_text  # noqa: E402
from ..engine import checkpoint as ckpt  # noqa: E402
from ..engine import logs as runlogs  # noqa: E402
from ..engine import rundir  # noqa: E402
from ..engine import system  # noqa: E402
from ..engine.logs import CSV, RunLogs, write_csv  # noqa: E402
from ..engine.metrics import classification_metrics, macro_f1, reliability, topk_hits  # noqa: E402
from ..engine.rundir import CONFIG, DATA_INFO, METRICS, SUMMARY, TEST_CORRECT  # noqa: E402
from ..engine.setup import select_device  # noqa: E402
from ..errors import ConfigError  # noqa: E402
from ..methods import Method, build_method  # noqa: E402
from .finetune_config import FinetuneConfig, required  # noqa: E402
from .hf import SelfKDTrainer, drop_incomplete, last_checkpoint  # noqa: E402

HF_DIR = "hf"
MODEL_DIR = "model"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json")


@dataclass
class FinetuneSetup:
    cfg: FinetuneConfig
    device: torch.device
    bundle: TextBundle
    tokenizer: Any
    model: Any
    method: Method
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    max_length: int
    truncated: dict[str, int]
    trainable: int
    params: int


def model_limit(tokenizer: Any, config: Any) -> int:
    """The longest input the model takes: the tokenizer's ``model_max_length`` when it is set (not
    the 1e30 placeholder), else the position table of the model's config."""
    limits = [int(v) for v in (getattr(tokenizer, "model_max_length", None), getattr(config, "max_position_embeddings", None))
              if isinstance(v, int) and 0 < v < 1_000_000]
    if not limits:
        raise ConfigError("model.path: the tokenizer and config give no maximum length; set data.max_length")
    return min(limits)


def _config_problem(file: Path, err: Exception) -> str:
    """What is wrong with a model's ``config.json`` that transformers refused (``err``), in words."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})"
    if not text.strip():
        return "empty file (expected the model's JSON configuration)"
    try:
        obj = json.loads(text)
    except ValueError as e:
        where = ""
        if isinstance(e, json.JSONDecodeError):  # "Expecting value", "Unterminated string starting at"
            what = e.msg[:1].lower() + e.msg[1:]
            where = f": {what}{'' if what.endswith(' at') else ' at'} line {e.lineno} column {e.colno}"
        return f"not valid JSON{where}"
    if not isinstance(obj, dict):
        return f"holds a JSON {type(obj).__name__}, expected an object"
    kind = obj.get("model_type")
    if kind is None:
        return "no 'model_type' key (it names the architecture, e.g. \"bert\"); save the model with save_pretrained"
    if not isinstance(kind, str) or kind not in transformers.CONFIG_MAPPING:
        return (f"model_type {kind!r} is not an architecture transformers {transformers.__version__} knows "
                "(a newer transformers, or a model with custom code)")
    said = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return f"rejected by transformers ({type(err).__name__}{': ' + said[:200] if said else ''})"


def load_tokenizer(path: Path) -> Any:
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.path {path}: no tokenizer there (expected one of {', '.join(TOKENIZER_FILES)}); "
                          "save it beside the model with tokenizer.save_pretrained")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # a broken or unknown tokenizer: one line, not the library's traceback
        raise ConfigError(f"model.path {path}: the tokenizer cannot be loaded ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'})") from None


def _encode(tokenizer: Any, texts: list[str], labels: torch.Tensor, max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Token ids per document, truncated to ``max_length``; and how many were longer."""
    full = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    longer = sum(len(ids) > max_length for ids in full)
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    rows = [{**{k: enc[k][i] for k in keys}, "labels": int(labels[i])} for i in range(len(texts))]
    return rows, longer


def _lora(model: Any, cfg: FinetuneConfig) -> Any:
    lo = cfg.model.lora
    peft = require("peft", "lora")
    conf = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                           target_modules=list(lo.target_modules))
    try:
        return peft.get_peft_model(model, conf)
    except ValueError as err:
        raise ConfigError(f"model.lora.target_modules {lo.target_modules}: {str(err).splitlines()[0]}") from None


def build_finetune(cfg: FinetuneConfig, log: Callable[[str], None]) -> FinetuneSetup:
    """Everything a run needs, built before any file is written."""
    device = select_device(cfg.train.device)
    method = build_method(cfg.method.name, **cfg.method.params())
    if not method.runs_on_logits:
        raise ConfigError(f"method.name: '{cfg.method.name}' runs forward passes of its own ({method.describe()}); "
                          "finetune runs the methods computed from the model's logits (ce, ls, dlb, pskd, ...)")
    d = cfg.data
    bundle = load_text(required(d.path, "data.path"), format=d.format, text_column=d.text_column, label_column=d.label_column,
                       encoding=d.encoding, classes=d.classes, test_fraction=d.test_fraction, split_seed=d.split_seed,
                       subset=d.subset, test_subset=d.test_subset, subset_seed=d.subset_seed)
    path = Path(required(cfg.model.path, "model.path")).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path {path}: no config.json there (expected a Hugging Face model folder)")
    try:  # before the tokenizer, which reads config.json too and would blame itself
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise ConfigError(f"model.path {path}/config.json: {_config_problem(path / 'config.json', err)}") from None
    tokenizer = load_tokenizer(path)
    limit = model_limit(tokenizer, config)
    max_length = d.max_length or limit
    if max_length > limit:
        raise ConfigError(f"data.max_length={max_length} exceeds the model's limit of {limit} tokens")
    train, long_train = _encode(tokenizer, bundle.train.texts, bundle.train.labels, max_length)
    test, long_test = _encode(tokenizer, bundle.test.texts, bundle.test.labels, max_length)
    if long_train or long_test:
        log(f"data: {long_train} of {len(train)} training and {long_test} of {len(test)} test documents are longer "
            f"than {max_length} tokens; each is truncated to its first {max_length} (data.max_length)")
    k = bundle.num_classes
    torch.manual_seed(cfg.train.seed)  # the new head's initialisation is part of the seeded run
    quiet = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized: classifier.*" is the point of fine-tuning
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=k, id2label=dict(enumerate(bundle.classes)),
            label2id={c: i for i, c in enumerate(bundle.classes)}, local_files_only=True)
    except Exception as err:
        raise ConfigError(f"model.path {path}: the weights cannot be loaded as a sequence classifier "
                          f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    finally:
        transformers.logging.set_verbosity(quiet)
    if cfg.model.lora.r > 0:
        model = _lora(model, cfg)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return FinetuneSetup(cfg, device, bundle, tokenizer, model, method, train, test, max_length,
                         {"train": long_train, "test": long_test}, trainable, params)


def _args(s: FinetuneSetup, out: Path) -> transformers.TrainingArguments:
    c = s.cfg
    steps = c.train.epochs * math.ceil(len(s.train) / c.optim.batch_size)
    bf16 = c.train.bf16 == "on" or (c.train.bf16 == "auto" and s.device.type == "cuda" and torch.cuda.is_bf16_supported())
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=c.optim.batch_size, num_train_epochs=c.train.epochs,
        learning_rate=c.optim.lr, weight_decay=c.optim.weight_decay, lr_scheduler_type=c.optim.schedule,
        warmup_steps=int(math.ceil(c.optim.warmup_ratio * steps)),
        max_grad_norm=c.optim.max_grad_norm or None,  # type: ignore[arg-type]  # None: no clipping (annotated float)
        save_strategy="epoch", save_total_limit=1, eval_strategy="no", logging_strategy="steps",
        logging_steps=c.train.log_every, report_to=[], seed=c.train.seed,  # selfkd's own sinks: _Epochs data_seed=c.train.seed,
        use_cpu=s.device.type == "cpu", bf16=bf16, disable_tqdm=True, dataloader_pin_memory=False,
    )


class _Epochs(transformers.TrainerCallback):
    """After each epoch (before the Trainer saves its checkpoint): test metrics into ``metrics.jsonl``."""

    def __init__(self, run: "_Run"):
        self.run = run
        self.t0 = time.perf_counter()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.t0 = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            parts = " | ".join(f"{k.removeprefix('selfkd/')} {v:.4g}" for k, v in logs.items() if k.startswith("selfkd/"))
            self.run.log(f"step {state.global_step}: loss {logs['loss']:.4f}" + (f" ({parts})" if parts else ""))
            points = {"loss": logs["loss"], **{k.removeprefix("selfkd/"): v for k, v in logs.items() if k.startswith("selfkd/")}}
            points.update({name: logs[key] for key, name in (("learning_rate", "lr"), ("grad_norm", "grad_norm")) if key in logs})
            self.run.logs.points(state.global_step, points)  # host floats already: the Trainer read them to log

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        train_s = time.perf_counter() - self.t0
        trainer = self.run.trainer
        loss = float(trainer.epoch_loss / max(trainer.epoch_steps, 1))  # one host read per epoch
        trainer.epoch_loss, trainer.epoch_steps = 0.0, 0
        m = {"epoch": int(round(state.epoch)), "step": state.global_step, "train_loss": loss, "train_seconds": train_s}
        m.update({f"test_{k}": v for k, v in self.run.evaluate().items()})
        if m["epoch"] == self.run.s.cfg.train.epochs and self.run.test_correct is not None:  # before its checkpoint
            ckpt.write_array(self.run.dir / TEST_CORRECT, self.run.test_correct.numpy())
        m["epoch_seconds"] = time.perf_counter() - self.t0
        self.run.logs.epoch(state.global_step, m)  # flushed before the Trainer's checkpoint, as selfkd train does
        self.run.history.append(m)
        self.run.write_metrics()
        self.run.log(f"epoch {m['epoch']}/{args.num_train_epochs}: test acc {m['test_acc']:.2f} | macro-F1 "
                     f"{m['test_macro_f1']:.2f} | ece {m['test_ece']:.4f} | nll {m['test_nll']:.4f} | {train_s:.1f}s")


class _Trainer(SelfKDTrainer):
    """Adds the epoch's mean training loss, summed on the device (read once per epoch)."""

    epoch_loss: Any = 0.0
    epoch_steps = 0

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.epoch_loss = self.epoch_loss + (out[0] if return_outputs else out).detach().float()
            self.epoch_steps += 1
        return out


class _Run:
    def __init__(self, s: FinetuneSetup, run_dir: Path, log: Callable[[str], None]):
        self.s, self.dir, self.log = s, run_dir, log
        self.history: list[dict[str, Any]] = []
        self.test_correct: torch.Tensor | None = None  # the last evaluate()'s per-document top-1 hits
        self.logs = RunLogs(run_dir, "csv")  # run() opens the configured sinks
        collator = transformers.DataCollatorWithPadding(s.tokenizer)
        self.collator = collator
        self.trainer = _Trainer(model=s.model, args=_args(s, run_dir / HF_DIR), train_dataset=s.train,
                                     data_collator=collator, method=s.method, num_classes=s.bundle.num_classes)
        self.trainer.remove_callback(transformers.PrinterCallback)  # our own lines instead of raw dicts
        self.trainer.add_callback(_Epochs(self))

    def write_metrics(self) -> None:
        ckpt.write_text(self.dir / METRICS, "".join(json.dumps(h) + "\n" for h in self.history))
        write_csv(self.dir / CSV, self.history)

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        model = self.trainer.model
        assert model is not None  # __init__ gave _Trainer the model
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        bs = self.s.cfg.train.eval_batch_size
        out = []
        for i in range(0, len(self.s.test), bs):
            batch = self.collator([{k: v for k, v in r.items() if k != "labels"} for r in self.s.test[i : i + bs]])
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.trainer.args.bf16):
                z = model(**{k: v.to(dev) for k, v in batch.items()}).logits
            out.append(z.float().cpu())
        model.train(was)
        return torch.cat(out)

    def evaluate(self) -> dict[str, Any]:
        z = self.logits()
        y = self.s.bundle.test.labels
        self.test_correct = topk_hits(z, y, 1)
        m: dict[str, Any] = classification_metrics(z, y, top1=self.test_correct)
        m["macro_f1"] = macro_f1(z, y, self.s.bundle.num_classes)
        m["reliability"] = reliability(z, y)
        return m

    def run(self, resume: bool) -> dict[str, Any]:
        hf = self.dir / HF_DIR
        last, step = None, 0
        if resume and hf.is_dir():
            gone = drop_incomplete(str(hf))  # a save a kill interrupted: its files are of no use
            if gone:
                self.log(f"removed {', '.join(f'{HF_DIR}/{g}' for g in gone)}: a checkpoint the run was stopped while "
                         "saving")
            last = last_checkpoint(str(hf))
        if last is not None:
            try:
                state = json.loads((Path(last) / "trainer_state.json").read_text())
                done, step = state["epoch"], int(state["global_step"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"--resume {self.dir}: {last}/trainer_state.json cannot be read "
                                  f"({type(err).__name__}); it holds the epoch the run stopped at") from None
            self.history = [json.loads(line) for line in (self.dir / METRICS).read_text().splitlines() if line.strip()] \
                if (self.dir / METRICS).is_file() else []
            self.history = [h for h in self.history if h["epoch"] <= round(done)]
            self.write_metrics()  # drop an epoch that never reached its checkpoint
            self.log(f"resumed {self.dir} at epoch {round(done)}/{self.s.cfg.train.epochs}")
        else:
            if resume:  # stopped before its first checkpoint was complete: the same run, from its start
                self.log(f"resumed {self.dir}: no complete checkpoint yet; starting again at epoch 0/"
                         f"{self.s.cfg.train.epochs}")
            else:
                ckpt.write_text(self.dir / CONFIG, self.s.cfg.to_yaml())
            ckpt.write_json(self.dir / DATA_INFO, {**describe(self.s.bundle), "max_length": self.s.max_length,
                                              "truncated": self.s.truncated})
            self.write_metrics()
        self.log(self.startup_line())
        wall0 = time.perf_counter()
        self.logs = RunLogs(self.dir, self.s.cfg.train.log, purge_step=step + 1 if step else None)
        with self.logs:
            self.trainer.train(resume_from_checkpoint=last)
        summary = self.summary()
        summary["wall_seconds_this_session"] = time.perf_counter() - wall0
        if self.s.cfg.train.save_model:
            self.trainer.save_model(str(self.dir / MODEL_DIR))
            self.s.tokenizer.save_pretrained(str(self.dir / MODEL_DIR))
        ckpt.write_json(self.dir / SUMMARY, summary)
        shutil.rmtree(hf, ignore_errors=True)  # only needed to resume an unfinished run
        return summary

    def startup_line(self) -> str:
        """The line ``selfkd train`` prints before its first step, in the same format (tokens for the image shape)."""
        s, c = self.s, self.s.cfg
        n = torch.get_num_threads()
        lora = f" ({s.trainable:,} trainable, LoRA r={c.model.lora.r})" if c.model.lora.r > 0 else ""
        data, model = required(c.data.path, "data.path"), required(c.model.path, "model.path")
        return (f"{'/'.join(Path(data).parts[-2:])}: {len(s.train)} train / {len(s.test)} test, "
                f"{s.bundle.num_classes} classes, {s.max_length} tokens max | {'/'.join(Path(model).parts[-2:])}: "
                f"{s.params:,} parameters{lora} | {s.method.describe()} | {s.device}, {n} thread{'s' if n != 1 else ''}"
                f" | {self.dir}")

    def summary(self) -> dict[str, Any]:
        s, h = self.s, self.history
        last = h[-1]
        best = max(h, key=lambda r: r["test_acc"])
        train_s = sum(r["train_seconds"] for r in h)
        return {
            "kind": "finetune", "data": "/".join(Path(required(s.cfg.data.path, "data.path")).parts[-2:]),
            "model": "/".join(Path(required(s.cfg.model.path, "model.path")).parts[-2:]),
            "method": s.method.describe(), "epochs": len(h), "seed": s.cfg.train.seed,
            "last_acc": last["test_acc"], "best_acc": best["test_acc"], "best_epoch": best["epoch"],
            "macro_f1": last["test_macro_f1"], "ece": last["test_ece"], "nll": last["test_nll"],
            "reliability": last["test_reliability"], "seconds": sum(r["epoch_seconds"] for r in h),
            "train_seconds": train_s, "samples_per_s": len(s.train) * len(h) / train_s if train_s else math.nan,
            "forwards_per_sample": s.method.forwards_per_sample,
            **dict(zip(("forward_passes", "backward_passes"), s.method.passes(len(h)))),  # per sample, whole run
            "params": s.params, "trainable_params": s.trainable,
            "lora_r": s.cfg.model.lora.r, "train_docs": len(s.train), "test_docs": len(s.test),
            "max_length": s.max_length, "truncated_train": s.truncated["train"], "truncated_test": s.truncated["test"],
            "threads": torch.get_num_threads(), "device": str(s.device), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            **system.cpu_info(),  # exact numbers depend on the CPU's kernels, as in selfkd train's summary
        }


def finetune_run(cfg: FinetuneConfig, run_dir: str | Path, *, resume: bool = False,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg`` into ``run_dir`` (``resume``: continue from its last checkpoint); the summary."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards": noise in a run log
    run = Path(run_dir)
    flag = "--resume" if resume else "--out"
    try:
        rundir.check_writable(run, flag)  # cheap checks first: a bad --out fails before the model loads
        if not resume:
            rundir.check_new(run)
        runlogs.check(cfg.train.log)
        runlogs.check_dir(run, cfg.train.log)  # a resumed run's RUN/tb: before the model loads
        setup = build_finetune(cfg, say)
        with rundir.locked(run):  # one writer per run directory
            if not resume:
                rundir.check_new(run)
            rundir.remove_leftovers(run)
            return _Run(setup, run, say).run(resume)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
