"""Typed, validated run configuration: defaults < preset < YAML file < flags < ``--set key=value``.

Every section forbids unknown keys; every error names the key (``optim.lr``) and what was expected.
Method hyper-parameters sit beside ``method.name`` and are validated by the method's own ``Params``.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..methods import Params, method_class
from ..methods.base import format_validation_error
from .presets import load_preset, presets  # noqa: F401  (public here since the first release)
from .yamlio import load_yaml, parse_yaml  # noqa: F401

SEED_MAX = 2**63 - 1  # torch generators take 64 bits; the trainer adds small offsets to train.seed


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoEffect(ValueError):
    """An option that would change nothing (almost always a mistake): the message names the key, what makes
    it idle and how to fix it, so it is reported as it stands, not under its section's name."""


def _default(section: type[Section], key: str) -> Any:
    return section.model_fields[key].default


class Schema(Section):
    """Base of a whole config (``selfkd train``'s :class:`Config`, ``selfkd finetune``'s): its fields are
    its sections; it dumps to plain JSON types and to the YAML a run directory keeps."""

    @classmethod
    def sections(cls) -> list[str]:
        """The section names, in order (what a config file's top level may hold)."""
        return [k for k, f in cls.model_fields.items() if isinstance(f.annotation, type) and issubclass(f.annotation, Section)]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class NoiseCfg(Section):
    kind: Literal["none", "symmetric", "asymmetric", "pairflip"] = "none"
    rate: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)

    @model_validator(mode="after")
    def _no_effect(self) -> "NoiseCfg":
        if self.kind == "none" and self.rate > 0:
            raise NoEffect(f"data.noise.rate = {self.rate} has no effect without a noise kind: set data.noise.kind to "
                             "symmetric, asymmetric or pairflip")
        return self


class DataCfg(Section):
    name: str = "digits"
    dir: str | None = None
    download: bool = False
    image_size: int | None = Field(None, ge=4)
    subset: int | None = Field(None, ge=2, description="train on a fixed, class-stratified subset of N images")
    subset_seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the subset and test_subset draws")
    test_subset: int | None = Field(
        None, ge=2, description="evaluate on a fixed, class-stratified subset of N test images (quick sweeps); "
        "None: the whole test set")
    num_workers: int = Field(0, ge=0)
    cache_dir: str | None = None
    stream: bool | Literal["auto"] = Field(
        "auto", description="imagefolder: read images from disk per batch (folders or .tar shards) instead of "
        "holding them in memory; auto: when the folder's files exceed stream_above_mb")
    stream_above_mb: float = Field(4096.0, gt=0, description="data.stream=auto streams folders larger than this (MiB)")
    on_device: bool = Field(False, description="keep the in-memory training set on the GPU (CIFAR scale): a batch is "
                            "one gather on the device")
    noise: NoiseCfg = NoiseCfg()

    @model_validator(mode="after")
    def _no_effect(self) -> "DataCfg":
        """An option that would change nothing is an error (it is almost always a mistake)."""
        name = self.name.strip().lower()
        if name == "digits" and self.dir is not None:
            raise NoEffect(f"data.dir (--data-dir) = {self.dir!r} has no effect: digits is bundled with scikit-learn and "
                             "reads no folder; drop it, or choose the data set with --data cifar10 | cifar100 | imagefolder")
        if self.download and name not in ("cifar10", "cifar100"):
            raise NoEffect(f"data.download (--download) has no effect for data.name={self.name!r}: only cifar10 and "
                             "cifar100 can be downloaded")
        if self.cache_dir is not None and name != "imagefolder":
            raise NoEffect(f"data.cache_dir = {self.cache_dir!r} has no effect for data.name={self.name!r}: only "
                             "imagefolder caches decoded images")
        if self.stream is True and name != "imagefolder":
            raise NoEffect(f"data.stream = true has no effect for data.name={self.name!r}: only imagefolder data is streamed")
        if self.stream_above_mb != _default(DataCfg, "stream_above_mb") and (self.stream != "auto" or name != "imagefolder"):
            raise NoEffect("data.stream_above_mb has no effect unless data.stream=auto and data.name=imagefolder")
        if self.on_device and self.num_workers:
            raise NoEffect("data.on_device = true: batches are gathered on the GPU, so data.num_workers must be 0")
        if self.on_device and self.stream is True:
            raise NoEffect("data.on_device = true cannot hold a streamed data set (data.stream=true)")
        if self.subset is None and self.test_subset is None and self.subset_seed != 0:
            raise NoEffect("data.subset_seed has no effect without data.subset or data.test_subset")
        return self


class AugmentCfg(Section):
    """Per-sample augmentation on the training device, in this order: ``policy`` -> ``cutout`` ->
    random crop + flip -> normalise. Every random draw comes from the run's seeded generator."""

    crop_padding: int | None = Field(None, ge=0, description="None: the data set's default")
    flip: bool | None = None
    policy: Literal["none", "autoaugment", "randaugment", "trivialaugment"] = "none"
    randaugment_ops: int = Field(2, ge=1)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    cutout: int = Field(0, ge=0, description="side of the Cutout square in pixels; 0: off")
    mix: Literal["none", "mixup", "cutmix"] = Field(
        "none", description="batch mixing after normalisation; each method defines its distillation target for mixed rows")
    mix_alpha: float = Field(1.0, gt=0, description="Beta(α, α) of the mixing coefficient")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability that a batch is mixed")
    fill: Literal["mean", "zero"] = Field(
        "mean", description="pixel value of Cutout and of areas uncovered by geometric ops: the training mean "
        "(= 0 after normalisation, as the official Cutout code) or black")

    @model_validator(mode="after")
    def _no_effect(self) -> "AugmentCfg":
        rules = []
        if self.policy != "randaugment":
            rules.append((("randaugment_ops", "randaugment_magnitude"), f"with augment.policy={self.policy!r} (needs randaugment)"))
        if self.mix == "none":
            rules.append((("mix_alpha", "mix_prob"), "with augment.mix='none' (set mixup or cutmix)"))
        for keys, why in rules:
            for k in keys:
                if getattr(self, k) != _default(AugmentCfg, k):
                    raise NoEffect(f"augment.{k} = {getattr(self, k)} has no effect {why}")
        return self


class ModelCfg(Section):
    name: str = "cnn_small"


class MethodCfg(Section):
    """``name`` plus the method's hyper-parameters (validated against the method's Params)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "ce"

    @model_validator(mode="before")
    @classmethod
    def _resolve_params(cls, data: Any) -> Any:
        """Validate the hyper-parameters against the method's ``Params`` and keep them resolved (defaults filled in)."""
        if not isinstance(data, dict) or not isinstance(data.get("name", "ce"), str):
            return data  # pydantic reports the wrong type
        name = data.get("name", "ce")
        hp = method_params(name, {k: v for k, v in data.items() if k != "name"})
        return {"name": name, **hp.model_dump()}

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def method_params(name: str, params: dict[str, Any]) -> Params:
    """Method ``name``'s validated ``Params`` (no method is built); a bad value is one ConfigError naming the key."""
    cls = method_class(name)
    try:
        return cls.Params(**params)
    except ValidationError as err:
        msg = format_validation_error(f"method '{cls.name}'", err)
        if "unknown key" in msg:
            msg += f"; known hyper-parameters: {', '.join(cls.Params.model_fields) or 'none'}"
        raise ConfigError(msg) from None


class OptimCfg(Section):
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(64, ge=2, description="new samples per step")


class ScheduleCfg(Section):
    kind: Literal["multistep", "cosine", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="epochs at which multistep multiplies by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr: float = Field(0.0, ge=0)

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v) or v != sorted(set(v)):
            raise ValueError("milestones must be increasing positive epochs")
        return v

    @model_validator(mode="after")
    def _no_effect(self) -> "ScheduleCfg":
        if self.kind != "multistep" and self.milestones:
            raise NoEffect(f"schedule.milestones = {self.milestones} have no effect with schedule.kind={self.kind!r}; "
                             "drop them (schedule.milestones=[]) or use kind multistep")
        if self.kind != "multistep" and self.gamma != _default(ScheduleCfg, "gamma"):
            raise NoEffect(f"schedule.gamma = {self.gamma} has no effect with schedule.kind={self.kind!r} (needs multistep)")
        if self.kind != "cosine" and self.min_lr != 0:
            raise NoEffect(f"schedule.min_lr = {self.min_lr} has no effect with schedule.kind={self.kind!r} (needs cosine)")
        return self


class TrainCfg(Section):
    epochs: int = Field(20, ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode; reduce-overhead uses CUDA graphs")
    compile_cache: str | None = Field(
        None, description="folder of inductor's on-disk caches: runs and resumes naming the same folder compile once; "
        "None: a sweep's OUT/compile_cache, a single run inductor's default (TORCHINDUCTOR_CACHE_DIR or a temp folder)")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend under torchrun: auto is nccl on CUDA, gloo on the CPU")
    sync_bn: bool = Field(False, description="under torchrun: BatchNorm statistics over every rank's batch (SyncBatchNorm)")
    eval_batch_size: int = Field(500, ge=1)
    log_every: int = Field(20, ge=1, description="steps between progress updates and non-finite checks")
    eval_every: int = Field(1, ge=1, description="epochs between evaluations; the last epoch is always evaluated")
    log: Literal["auto", "csv", "tensorboard"] = Field(
        "auto", description="RUN/metrics.csv is always written; tensorboard: also RUN/tb event files (needs "
        "selfkd[tensorboard]); auto: those when tensorboard is installed",
    )

    @model_validator(mode="after")
    def _no_effect(self) -> "TrainCfg":
        if self.compile_mode != "default" and not self.compile:
            raise NoEffect(f"train.compile_mode = {self.compile_mode!r} has no effect without train.compile (--compile)")
        if self.compile_cache is not None and not self.compile:
            raise NoEffect(f"train.compile_cache = {self.compile_cache!r} has no effect without train.compile (--compile)")
        return self


class Config(Schema):
    data: DataCfg = DataCfg()
    augment: AugmentCfg = AugmentCfg()
    model: ModelCfg = ModelCfg()
    method: MethodCfg = MethodCfg()
    optim: OptimCfg = OptimCfg()
    schedule: ScheduleCfg = ScheduleCfg()
    train: TrainCfg = TrainCfg()
    imports: list[str] = Field(default_factory=list, description="modules imported for this run (--import, a sweep's "
                               "import:); resume and export import them again. Not part of the config hash")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        late = [m for m in self.schedule.milestones if m >= self.train.epochs]
        if self.schedule.kind == "multistep" and late:
            raise ValueError(f"schedule.milestones {late} are not below train.epochs={self.train.epochs}")
        if self.schedule.warmup_epochs >= self.train.epochs:
            raise ValueError(f"schedule.warmup_epochs must be below train.epochs={self.train.epochs}")
        if self.data.on_device and self.train.device == "cpu":
            raise NoEffect("data.on_device = true has no effect with train.device=cpu: the data set is already in host memory")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=None if self.imports else {"imports"})  # absent when empty


# ---------------------------------------------------------------------------------------------
def config_hash(cfg: Config) -> str:
    """SHA-256 of the resolved config (canonical JSON): checkpoints carry it to detect edits before a resume."""
    d = cfg.to_dict()
    d.pop("imports", None)  # where the code is found, not what is trained (a moved plugin file can resume)
    d["train"].pop("compile_cache", None)  # where compiled graphs are kept: a resume may name another folder
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# where things are found, not what is trained: a resume or a restored sweep may name other places
WHERE_KEYS = ("imports", "train.compile_cache", "data.cache_dir")


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ, as ``(key, old, new)``, :data:`WHERE_KEYS` aside. Keys only in ``new``
    (added to the config since ``old`` was written) count as unchanged: they hold their defaults."""
    a, b = flatten(old), flatten(new)
    return [(k, a[k], b.get(k, "<unset>")) for k in sorted(a)
            if k not in WHERE_KEYS and a[k] != b.get(k, "<unset>")]


def _merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if k == "method" and "name" in v and v["name"] != out[k].get("name"):
                out[k] = copy.deepcopy(v)  # another method: the old one's hyper-parameters do not apply
            else:
                out[k] = _merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        why = getattr(err, "problem", None)
        raise ConfigError(f"--set {item!r}: value is not valid YAML{f' ({why})' if why else ''}") from None
    tree: dict[str, Any] = {}
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the inverse of :func:`parse_override`'s nesting)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_config(*layers: dict[str, Any], source: str = "config", schema: type[Section] | None = None) -> Any:
    """Merge layers (later wins) and validate them as ``schema`` (default :class:`Config`)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer, "")
    try:
        return (schema or Config).model_validate(merged)
    except ValidationError as err:
        idle = err.errors()[0].get("ctx", {}).get("error")
        raise ConfigError(f"{source}: {idle}" if isinstance(idle, NoEffect) else format_validation_error(source, err)) from None


def resolve(
    preset: str | None = None,
    file: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    schema: type[Section] | None = None,
) -> Any:
    layers: list[dict[str, Any]] = []
    if preset is not None:
        layers.append(load_preset(preset))
    if file is not None:
        layers.append(load_yaml(file))
    if flags:
        layers.append(flags)
    for item in overrides or []:
        layers.append(parse_override(item))
    return build_config(*layers, schema=schema)


def save_yaml(cfg: Schema) -> str:
    return cfg.to_yaml()
