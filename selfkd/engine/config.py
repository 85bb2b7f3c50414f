"""Typed, validated run configuration: defaults < preset < YAML file < flags < ``--set key=value``.

Every section forbids unknown keys; every error names the key (``optim.lr``) and what was expected.
Method hyper-parameters sit beside ``method.name`` and are validated by the method's own ``Params``.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..methods import method_class
from ..methods.base import format_validation_error


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoiseCfg(Section):
    kind: Literal["none", "symmetric", "asymmetric", "pairflip"] = "none"
    rate: float = Field(0.0, ge=0, lt=1)
    seed: int = 0


class DataCfg(Section):
    name: str = "digits"
    dir: str | None = None
    download: bool = False
    image_size: int | None = Field(None, ge=4)
    subset: int | None = Field(None, ge=2, description="train on a fixed, class-stratified subset of N images")
    subset_seed: int = Field(0, description="seed of the subset and test_subset draws")
    test_subset: int | None = Field(
        None, ge=2, description="evaluate on a fixed, class-stratified subset of N test images (quick sweeps); "
        "None: the whole test set")
    num_workers: int = Field(0, ge=0)
    cache_dir: str | None = None
    noise: NoiseCfg = NoiseCfg()


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


class ModelCfg(Section):
    name: str = "cnn_small"


class MethodCfg(Section):
    """``name`` plus the method's hyper-parameters (validated against the method's Params)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "ce"

    @model_validator(mode="after")
    def _check_params(self) -> "MethodCfg":
        method = method_class(self.name)(**self.params())  # raises ConfigError naming the bad key
        self.__pydantic_extra__ = method.hp.model_dump()  # resolved: defaults filled in
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


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


class TrainCfg(Section):
    epochs: int = Field(20, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False
    eval_batch_size: int = Field(500, ge=1)
    log_every: int = Field(20, ge=1, description="steps between progress updates and non-finite checks")
    log: Literal["auto", "csv", "tensorboard"] = Field(
        "auto", description="RUN/metrics.csv is always written; tensorboard: also RUN/tb event files (needs "
        "selfkd[tensorboard]); auto: those when tensorboard is installed",
    )


class Config(Section):
    data: DataCfg = DataCfg()
    augment: AugmentCfg = AugmentCfg()
    model: ModelCfg = ModelCfg()
    method: MethodCfg = MethodCfg()
    optim: OptimCfg = OptimCfg()
    schedule: ScheduleCfg = ScheduleCfg()
    train: TrainCfg = TrainCfg()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        late = [m for m in self.schedule.milestones if m >= self.train.epochs]
        if self.schedule.kind == "multistep" and late:
            raise ValueError(f"schedule.milestones {late} are not below train.epochs={self.train.epochs}")
        if self.schedule.warmup_epochs >= self.train.epochs:
            raise ValueError(f"schedule.warmup_epochs must be below train.epochs={self.train.epochs}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
def presets() -> dict[str, dict[str, Any]]:
    """Named recipes shipped with the package (``selfkd/presets/*.yaml``)."""
    out = {}
    for f in sorted(resources.files("selfkd").joinpath("presets").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            out[f.name[: -len(".yaml")]] = yaml.safe_load(f.read_text()) or {}
    return out


def load_preset(name: str) -> dict[str, Any]:
    """One named recipe; an unknown name is an error that lists the known ones."""
    table = presets()
    if name not in table:
        raise ConfigError(f"unknown preset '{name}'; known: {', '.join(table)}")
    return table[name]


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
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: value is not valid YAML") from None
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


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p}: not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p}:{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of sections, got {type(data).__name__}")
    return data


def build_config(*layers: dict[str, Any], source: str = "config", schema: type[Section] | None = None) -> Any:
    """Merge layers (later wins) and validate them as ``schema`` (default :class:`Config`)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer, "")
    try:
        return (schema or Config).model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


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


def save_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
