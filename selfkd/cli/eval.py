"""``selfkd eval RUN --data ... --out FILE``: score a run (``selfkd train`` or ``selfkd finetune``) on a data set,
with the run's own preprocessing, into a JSON file.

The run's preprocessing is what it recorded, never the new data's:

* a ``train`` run: the images are resized to the run's ``image_size`` and normalised with the run's
  per-channel ``mean``/``std`` (``RUN/data.json``: the training data's statistics), ``(x / 255 - mean) / std``;
  the model is rebuilt from ``RUN/config.yaml`` (a method that wraps it, e.g. BYOT's exits: the deepest exit);
* a ``finetune`` run: the tokenizer saved in ``RUN/model`` and the run's ``max_length`` (longer documents are
  truncated, and counted), the run's ``data`` reading options (format, columns, encoding, test split rule).

``--split test`` (default) scores the data set's test part as a run would take it (CIFAR's test batch, digits'
fixed split, imagefolder's ``val/`` or ``test/``, a text folder's ``test/`` or, for text without one, the
stratified split of the run's ``data.test_fraction``/``data.split_seed``); ``train`` its training part; ``all``
both. Subsets of the run (``data.subset``/``test_subset``) are not applied: the whole part is scored.
``--weights last`` (default: the final weights, those of ``summary.json``'s ``last_acc``/``ece``/``nll``, so a
run scored on its own data reproduces them) or ``best`` (``best.pt``; train runs only: a finetune run keeps
its final weights). Inference is in float32, in eval mode.

The data set's classes must be the run's: the same number and the same names (a different order is mapped to
the run's label order). The JSON holds the metrics with ``summary.json``'s units: ``acc`` and ``top5`` (only
with more than 5 classes) in percent, ``ece`` a fraction (0-1, 15 equal-width bins), ``nll`` nats per
sample, ``reliability`` (per-bin counts, confidence, accuracy), ``macro_f1`` in percent (finetune runs), and
``count`` (samples scored), with what was scored (``run``, ``kind``, ``weights``, ``epoch``, ``data``,
``split``, ``classes``). ``--out`` follows ``selfkd export``'s rules: a new file, never overwritten (an
existing one or a dangling link is refused; the file is linked into place, so another writer cannot be
replaced either). Plugin modules recorded in the run's ``config.yaml`` are imported first.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SPLITS = ("test", "train", "all")


def _check_out(dest: Path) -> None:
    """export's rules, checked before any data is read."""
    if dest.is_symlink() and not dest.exists():
        raise ConfigError(f"eval --out {dest}: a dangling symbolic link; remove it or choose another file")
    if dest.exists():
        raise ConfigError(f"eval --out {dest}: already exists; choose another file (it is never overwritten)")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"eval --out {dest}: folder {parent} does not exist")


def _match_classes(run_classes: list[str], found: list[str], where: str) -> list[int] | None:
    """None when ``found`` is the run's class list; else the run's label of each found class (same names, another
    order). Different count or names: one line saying which."""
    run_classes, found = [str(c) for c in run_classes], [str(c) for c in found]
    if found == run_classes:
        return None
    if len(found) != len(run_classes):
        raise ConfigError(f"{where}: {len(found)} classes, the run has {len(run_classes)} "
                          f"({_names(found)} vs the run's {_names(run_classes)})")
    extra, missing = [c for c in found if c not in run_classes], [c for c in run_classes if c not in found]
    if extra or missing:
        raise ConfigError(f"{where}: its class names are not the run's: {_names(extra)} not in the run, "
                          f"{_names(missing)} of the run not in the data")
    return [run_classes.index(c) for c in found]


def _names(xs: list[str], k: int = 6) -> str:
    return "[" + ", ".join(xs[:k]) + (f", ... {len(xs) - k} more" if len(xs) > k else "") + "]"


def eval_run(run_dir: str, data: str, out: str, *, data_dir: str | None = None, split: str = "test",
             weights: str | None = None, device: str = "auto", batch_size: int | None = None) -> dict[str, Any]:
    """Score ``run_dir`` on ``data`` and write the JSON to ``out`` (a new file); the dict written."""
    from ..engine import config as C
    from ..engine.rundir import CONFIG
    from ..plugins import import_recorded

    run, dest = Path(run_dir), Path(out)
    if not run.exists():
        raise ConfigError(f"eval {run}: no such folder")
    if not (run / CONFIG).is_file():
        raise ConfigError(f"eval {run}: no {CONFIG} there (not a run directory)")
    if split not in SPLITS:
        raise ConfigError(f"eval --split {split}: expected one of {', '.join(SPLITS)}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"eval --batch-size {batch_size}: expected a positive number")
    _check_out(dest)
    raw = C.load_yaml(run / CONFIG)
    import_recorded(raw, str(run / CONFIG))  # a plugin model or method the run was trained with
    kind = "finetune" if isinstance(raw, dict) and raw.get("kind") == "finetune" else "train"
    score = _score_text if kind == "finetune" else _score_images
    result = {"run": str(run), "kind": kind, **score(run, raw, data, data_dir, split, weights, device, batch_size)}
    from ..engine import checkpoint as ckpt

    ckpt.write_new(dest, (json.dumps(result, indent=1) + "\n").encode())  # exclusive: never replaces a file
    return result


def _metrics(logits: Any, labels: Any, num_classes: int, f1: bool = False) -> dict[str, Any]:
    from ..engine.metrics import classification_metrics, macro_f1, reliability

    if len(labels) == 0:
        raise ConfigError("eval: the chosen part of the data set holds no samples; choose another --split")
    m: dict[str, Any] = classification_metrics(logits, labels)
    if f1:
        m["macro_f1"] = macro_f1(logits, labels, num_classes)
    m["reliability"] = reliability(logits, labels)
    m["count"] = len(labels)
    return m


def _score_images(run: Path, raw: dict[str, Any], data: str, data_dir: str | None, split: str, weights: str | None,
                  device: str, batch_size: int | None) -> dict[str, Any]:
    import torch

    from ..data import BatchAugment, load_dataset
    from ..data.loaders import KNOWN_DATASETS
    from ..engine import checkpoint as ckpt
    from ..engine import config as C
    from ..engine.rundir import BEST, CHECKPOINT, CONFIG
    from ..engine.setup import select_device
    from ..methods import build_method
    from ..models import build_model
    from .export import _info

    which = weights or "last"
    src = run / (BEST if which == "best" else CHECKPOINT)
    if not src.is_file():
        raise ConfigError(f"eval {run}: no weights ({src.name} is missing: the run has not finished an epoch)")
    if data.strip().lower() not in KNOWN_DATASETS:
        raise ConfigError(f"eval --data {data}: unknown data set for a train run; known: {', '.join(KNOWN_DATASETS)}")
    if data_dir is not None and data.strip().lower() == "digits":
        raise ConfigError("eval --data-dir has no effect with --data digits (bundled with scikit-learn)")
    cfg = C.build_config(raw, source=str(run / CONFIG))
    info = _info(run, cfg)
    dev = select_device(device)
    name = data.strip().lower()
    bundle = load_dataset(name, root=data_dir, image_size=info["image_size"], cache_dir=cfg.data.cache_dir,
                          stream="auto" if name == "imagefolder" else False, stream_above_mb=cfg.data.stream_above_mb)
    where = f"eval --data {data}" + (f" --data-dir {data_dir}" if data_dir else "")
    if bundle.channels != info["in_channels"]:
        raise ConfigError(f"{where}: {bundle.channels}-channel images; the run's model takes {info['in_channels']}")
    order = _match_classes(info["classes"], list(bundle.classes), where)
    parts = {"test": [bundle.test], "train": [bundle.train], "all": [bundle.train, bundle.test]}[split]
    state = ckpt.load(src)
    model = build_model(cfg.model.name, num_classes=info["num_classes"], in_channels=info["in_channels"])
    if set(state["model"]) != set(model.state_dict()):  # the method wrapped the model (BYOT's exits)
        model = build_method(cfg.method.name, **cfg.method.params()).prepare_model(model)
    model.load_state_dict(state["model"])
    layout = cfg.train.channels_last  # the trainer's memory format: the same kernels as its own evaluation
    channels_last = layout == "on" or (layout == "auto" and info["image_size"] >= 16)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt).eval()  # type: ignore[call-overload]  # stub omits memory_format
    norm = BatchAugment(mean=info["mean"], std=info["std"])
    bs = batch_size or cfg.train.eval_batch_size
    logits, labels = [], []
    with torch.no_grad():
        for part in parts:
            for a in range(0, len(part), bs):
                x, y, _ = part.batch(range(a, min(a + bs, len(part))))
                x = norm.normalize(x.to(dev))
                x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
                z = model.forward_exits(x)[-1] if hasattr(model, "forward_exits") else model(x)
                logits.append(z.float().cpu())
                labels.append(y)
    y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
    if order is not None:
        y = torch.tensor(order)[y]
    z = torch.cat(logits) if logits else torch.empty(0, info["num_classes"])
    return {"weights": which, "epoch": int(state["epoch"]), "data": bundle.name, "data_dir": data_dir, "split": split,
            "classes": list(info["classes"]), **_metrics(z, y, info["num_classes"])}


def _score_text(run: Path, raw: dict[str, Any], data: str, data_dir: str | None, split: str, weights: str | None,
                device: str, batch_size: int | None) -> dict[str, Any]:
    from ..engine.rundir import CONFIG, DATA_INFO
    from ..integrations.finetune import MODEL_DIR

    if data_dir is not None:
        raise ConfigError("eval --data-dir has no effect on a finetune run: --data is the text's path")
    if weights == "best":
        raise ConfigError(f"eval --weights best: {run} is a finetune run, which keeps only its final weights "
                          f"({MODEL_DIR}/); use --weights last")
    model_dir = run / MODEL_DIR
    if not ((model_dir / "config.json").is_file() or (model_dir / "adapter_config.json").is_file()):
        raise ConfigError(f"eval {run}: no weights ({MODEL_DIR}/ is missing: the run has not finished, or it ran "
                          "with train.save_model=false)")
    import torch
    import transformers

    from ..data.text import load_text
    from ..engine.setup import select_device
    from ..integrations.finetune import _encode, load_tokenizer
    from ..integrations.finetune_config import build_finetune_config

    if not Path(data).expanduser().exists():
        raise ConfigError(f"eval --data {data}: not found (a finetune run is scored on a folder of class folders of "
                          ".txt files or a .csv/.tsv/.jsonl file)")
    cfg = build_finetune_config(raw, source=str(run / CONFIG))
    recorded = json.loads((run / DATA_INFO).read_text()) if (run / DATA_INFO).is_file() else {}
    d = cfg.data
    bundle = load_text(data, format=d.format, text_column=d.text_column, label_column=d.label_column,
                       encoding=d.encoding, test_fraction=d.test_fraction, split_seed=d.split_seed)
    model_cfg = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    id2label = model_cfg.get("id2label") or {}
    classes = recorded.get("classes") or [id2label[k] for k in sorted(id2label, key=int)]
    order = _match_classes(classes, bundle.classes, f"eval --data {data}")
    tokenizer = load_tokenizer(model_dir)
    max_length = int(recorded.get("max_length") or d.max_length or tokenizer.model_max_length)
    quiet, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights": noise before the one result line
    try:
        if (model_dir / "adapter_config.json").is_file():  # LoRA: the adapter on its base model (model.path)
            from ..plugins import require

            peft = require("peft", "lora")
            model = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True)
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:  # a broken folder: one line, not the library's traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
        raise ConfigError(f"eval {run}: {MODEL_DIR}/ cannot be loaded ({type(err).__name__}: {first})") from None
    finally:
        transformers.logging.set_verbosity(quiet)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    dev = select_device(device)
    model = model.to(dev).eval()
    parts = {"test": [bundle.test], "train": [bundle.train], "all": [bundle.train, bundle.test]}[split]
    collator = transformers.DataCollatorWithPadding(tokenizer)
    bs = batch_size or cfg.train.eval_batch_size
    logits, labels, truncated = [], [], 0
    with torch.no_grad():
        for part in parts:
            rows, longer = _encode(tokenizer, part.texts, part.labels, max_length)
            truncated += longer
            for a in range(0, len(rows), bs):
                batch = collator([{k: v for k, v in r.items() if k != "labels"} for r in rows[a : a + bs]])
                logits.append(model(**{k: v.to(dev) for k, v in batch.items()}).logits.float().cpu())
            labels.append(part.labels)
    y = torch.cat(labels)
    if order is not None:
        y = torch.tensor(order)[y]
    k = len(classes)
    z = torch.cat(logits) if logits else torch.empty(0, k)
    from ..engine.rundir import SUMMARY

    done = json.loads((run / SUMMARY).read_text()).get("epochs") if (run / SUMMARY).is_file() else None
    return {"weights": "last", "epoch": int(done or cfg.train.epochs),  # model/ is written when the run finishes
            "data": data, "split": split, "classes": list(classes), "max_length": max_length, "truncated": truncated,
            **_metrics(z, y, k, f1=True)}
