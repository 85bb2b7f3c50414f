"""DLB's hyper-parameters (``method.*`` in a config)."""
from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from ..base import Params

#: every schedule ``DLB(schedule=...)`` accepts (:mod:`~selfkd.methods.dlb.schedules`)
Schedule = Literal["constant", "linear", "confidence", "entropy", "margin"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
#: the schedules that weight each repeated row (or token) instead of moving α and T
PER_SAMPLE = ("entropy", "margin")
RENAMED = {"dynamic": "confidence"}


class DLBParams(Params):
    temperature: float = Field(3.0, gt=0, description="softmax temperature T of the distillation term")
    alpha: float = Field(1.0, ge=0, description="weight α of the distillation term")
    repeat_fraction: float = Field(
        1.0, gt=0, le=1, description="fraction of the previous step's new samples that repeat"
    )
    ce_rows: Literal["all", "new"] = Field("all", description="rows that receive cross-entropy")
    carry_over: bool = Field(True, description="the first step of an epoch repeats the last step of the previous one")
    forward: Literal["joint", "split"] = Field(
        "joint",
        description="joint: one forward over [repeated|new] (paper); split: new then repeated (official code, "
        "BatchNorm sees two batches)",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="ε of label smoothing in the CE term (ε/K on every class)")
    schedule: Schedule = Field(
        "constant", description="alpha/T over training: constant, linear ramp, confidence (α·c, T·(2−c) per step); "
        "or a per-row weight of the distillation term from the teacher's uncertainty: entropy, margin "
        "(see selfkd.methods.dlb.schedules)"
    )
    ramp_epochs: float = Field(0.0, ge=0, description="linear: epochs over which alpha and T move to their final values")
    alpha_start: float = Field(0.0, ge=0, description="linear: alpha at the start of the ramp")
    temperature_start: float | None = Field(None, gt=0, description="linear: T at the start of the ramp (None: T)")
    padding_side: Literal["right", "left"] = Field(
        "right", description="token logits [B, T, V]: where the collator pads, to align a repeated row's positions "
        "with its cached ones when its padded length changed",
    )

    cache_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the cached teacher logits: bfloat16/float16 halve the cache (the rounding "
        "bound is in docs/methods.md)",
    )
    cache_topk: int | None = Field(
        None, gt=0, description="cache only the K largest teacher logits per row (token) and the tail's mass: the "
        "distillation term over K+1 buckets (selfkd.methods.losses.kd_kl_topk); K <= V, checked at the first step; "
        "None: all V",
    )

    @model_validator(mode="after")
    def _fixed_temperature(self) -> "DLBParams":
        moves = self.schedule == "confidence" or (
            self.schedule == "linear" and self.temperature_start not in (None, self.temperature))
        if self.cache_topk is not None and moves:
            what = "schedule 'confidence'" if self.schedule == "confidence" else "a linear temperature ramp"
            raise ValueError(f"cache_topk={self.cache_topk} keeps the tail's mass at one temperature, but {what} "
                             "moves T during training: use cache_topk=None or a fixed T")
        return self

    @field_validator("cache_topk", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected an integer K >= 1 or None")
        return v

    @field_validator("schedule", mode="before")
    @classmethod
    def _renamed(cls, v: Any) -> Any:
        if v in RENAMED:
            raise ValueError(f"schedule {v!r} was renamed {RENAMED[v]!r} (it is our own rule, not DynSDPB's)")
        return v
