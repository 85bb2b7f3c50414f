"""Validated configuration of ``selfkd finetune``: a Hugging Face sequence classifier on labelled text.

Sections ``data`` (the text and its split), ``model`` (a local model folder, optional LoRA),
``method`` (any selfkd method computed from the logits: ce, ls, dlb, ...), ``optim`` (AdamW) and
``train``. Layers as for ``selfkd train``: defaults < YAML file < flags < ``--set key=value``; unknown
keys and bad values are one-line errors naming the key. Nothing here imports transformers (the CLI
reads a config before it imports :mod:`selfkd.integrations.finetune`).
"""
from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import Field, model_validator

from ..engine.config import MethodCfg, Schema, Section, build_config, resolve
from ..errors import ConfigError
from ..methods import method_class

KIND: Final = "finetune"


class TextDataCfg(Section):
    path: str | None = Field(None, description="a folder of class folders of .txt files, or a .csv/.tsv/.jsonl file")
    format: Literal["auto", "folder", "csv", "jsonl"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    encoding: str | list[str] = Field("utf-8", description="codec, or codecs tried in order per file")
    classes: list[str] | None = Field(None, description="the class names in label order; None: the labels found, sorted")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class held out when no test part is given")
    split_seed: int = Field(0, description="seed of the train/test split (independent of train.seed)")
    subset: int | None = Field(None, ge=2, description="train on a fixed class-balanced subset of N documents")
    test_subset: int | None = Field(None, ge=2, description="evaluate on a fixed class-balanced subset of N documents")
    subset_seed: int = 0
    max_length: int | None = Field(None, ge=4, description="tokens kept per document (longer ones are truncated, "
                                   "and the run says how many once); None: the model's limit")


class LoraCfg(Section):
    r: int = Field(0, ge=0, description="LoRA rank of the adapters on the encoder; 0: full fine-tuning")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is alpha/r · B·A)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"],
                                      description="names of the encoder's linear layers that get adapters")


class LMModelCfg(Section):
    path: str | None = Field(None, description="a local Hugging Face model folder (config.json, weights, tokenizer)")
    lora: LoraCfg = LoraCfg()


class LMOptimCfg(Section):
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(16, ge=1, description="new samples per step (DLB adds the repeated ones)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps with a linear warm-up")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0: off")


class LMTrainCfg(Section):
    epochs: int = Field(3, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: Literal["auto", "on", "off"] = Field("auto", description="auto: on CUDA devices that support it")
    eval_batch_size: int = Field(64, ge=1)
    log_every: int = Field(20, ge=1, description="steps between log lines")
    log: Literal["auto", "csv", "tensorboard"] = Field(
        "auto", description="as selfkd train's: RUN/metrics.csv is always written; tensorboard: also RUN/tb event "
        "files (needs selfkd[tensorboard]); auto: those when tensorboard is installed",
    )
    save_model: bool = Field(True, description="write the final model (and tokenizer) to RUN/model")


class FinetuneConfig(Schema):
    kind: Literal["finetune"] = KIND
    data: TextDataCfg = TextDataCfg()
    model: LMModelCfg = LMModelCfg()
    method: MethodCfg = MethodCfg()
    optim: LMOptimCfg = LMOptimCfg()
    train: LMTrainCfg = LMTrainCfg()
    imports: list[str] = Field(default_factory=list, description="modules imported for this run (--import); "
                               "resume imports them again")

    @model_validator(mode="after")
    def _checks(self) -> "FinetuneConfig":
        # whether the method runs on logits may depend on its parameters (DLB's forward): build_finetune checks it
        if method_class(self.method.name).needs_teacher:
            raise ValueError(f"method.name: '{self.method.name}' needs a trained teacher; not supported by finetune")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=None if self.imports else {"imports"})  # absent when empty


def build_finetune_config(*layers: dict[str, Any], source: str = "config") -> FinetuneConfig:
    return build_config(*layers, source=source, schema=FinetuneConfig)


def resolve_finetune(file: str | None = None, flags: dict[str, Any] | None = None,
                     overrides: list[str] | None = None) -> FinetuneConfig:
    cfg = resolve(file=file, flags=flags, overrides=overrides, schema=FinetuneConfig)
    for key, value in (("data.path", cfg.data.path), ("model.path", cfg.model.path)):
        required(value, key)
    return cfg


def required(value: str | None, key: str) -> str:
    """``data.path`` or ``model.path``: given, else the one-line ConfigError naming its flag."""
    if not value:
        raise ConfigError(f"{key} is required (flag {'--data' if key == 'data.path' else '--model'} or --set {key}=...)")
    return value
