"""Tf-KD_self: the teacher is the same architecture, trained first with plain cross-entropy.

Yuan, Tay, Li, Wang, Feng, "Revisiting Knowledge Distillation via Label Smoothing Regularization",
CVPR 2020, Eq. (7); official code github.com/yuanli2333/Teacher-free-Knowledge-Distillation
(``loss_kd_self``).
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from ..data.mixing import Mix, MixBlocks
from ..errors import ConfigError, TrainingError
from .base import Batch, Method, Params, StepOutput
from .losses import cross_entropy, kd_kl
from .registry import register_method

CHECKPOINT = "checkpoint.pt"  # the name the reference trainer gives its last checkpoint


def teacher_file(teacher: str) -> Path:
    """A run directory means its ``checkpoint.pt``; anything else is the file itself."""
    p = Path(teacher).expanduser()
    return p / CHECKPOINT if p.is_dir() else p


def load_teacher_weights(teacher: str, owner: str = "tfkd-self") -> dict[str, Tensor]:
    """The teacher's state_dict from a run directory or a ``.pt`` file, loaded with ``weights_only``.
    The file holds ``{"model": state_dict, ...}`` (the trainer's ``checkpoint.pt``/``best.pt``) or a bare
    state_dict. Every failure is a ConfigError naming the path."""
    path = teacher_file(teacher)
    if not path.is_file():
        raise ConfigError(f"{owner}: method.teacher: {path} not found (give a run directory or a .pt file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or a disallowed global
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{owner}: method.teacher: {path} cannot be loaded ({type(err).__name__}: {first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    plain = isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    if not plain:
        raise ConfigError(f"{owner}: method.teacher: {path} holds no 'model' state_dict")
    return obj


def fingerprint(state: dict[str, Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and bytes (independent of memory format)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(state[key].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TfKDSelfParams(Params):
    teacher: str | None = Field(
        None,
        description="run directory (its checkpoint.pt) or .pt file of a CE-trained model of the same architecture; "
        "unset: `selfkd train` trains one first, into RUN/teacher",
    )
    alpha: float = Field(0.95, ge=0, le=1, description="weight α of the distillation term; CE gets 1−α")
    temperature: float = Field(6.0, gt=0, description="softmax temperature T of teacher and student")


@register_method
class TfKDSelf(Method):
    """Tf-KD_self (Yuan et al., CVPR 2020): distill from a CE-trained copy of the same architecture.

    ``L = (1−α) · CE(z, y) + α · T² · KL(softmax(z_t/T) ‖ softmax(z/T))``

    * Two stages. ``teacher`` is a run directory (its ``checkpoint.pt``: the *last* epoch's weights;
      give ``RUN/best.pt`` for the best epoch's) or a ``.pt`` file holding ``{"model": state_dict}`` or
      a bare state_dict. :meth:`prepare_model` copies the student's architecture, loads those weights
      (``torch.load(weights_only=True)``), freezes the copy and puts it in eval mode (as the official
      code does); the student is returned unchanged. The teacher follows the student's device and
      memory format at the first :meth:`train_step`. Unset ``teacher``: the engine's ``train_run``
      trains a CE teacher of the same config first (``needs_teacher``); anywhere else
      :meth:`prepare_model` raises ConfigError.
    * Defaults α=0.95, T=6: the official ResNet-18/CIFAR-100 self-teacher values (without m/K).

    More (cost, state, mixing, distributed): ``docs/methods.md``, section ``tfkd-self``.
    """

    name = "tfkd-self"
    own_forward = True
    formula = "(1−α)·CE(z, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z/T)), z_t: a CE-trained copy"
    Params = TfKDSelfParams
    hp: TfKDSelfParams
    needs_teacher: ClassVar[bool] = True
    supports_mix = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.teacher: nn.Module | None = None
        self._fingerprint: str | None = None
        self._expected: str | None = None  # from a checkpoint loaded before prepare_model
        self._placed: tuple[torch.device, bool] | None = None

    @property
    def forwards_per_sample(self) -> float:
        return 2.0

    @property
    def backwards_per_sample(self) -> float:
        return 1.0  # the teacher's forward is no-grad

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Load the frozen teacher (a copy of ``model``'s architecture); return ``model`` unchanged."""
        if self.hp.teacher is None:
            raise ConfigError(
                "tfkd-self: method.teacher is not set: give the run directory or .pt file of a CE-trained model "
                "(`selfkd train` trains one first when it is unset)"
            )
        state = load_teacher_weights(self.hp.teacher, self.name)
        teacher = copy.deepcopy(model)
        try:
            teacher.load_state_dict(state)
        except RuntimeError as err:
            why = " ".join(line.strip() for line in str(err).splitlines()[:2])
            why = why if len(why) <= 300 else why[:297] + "..."
            raise ConfigError(
                f"tfkd-self: method.teacher: {teacher_file(self.hp.teacher)} does not fit the model ({why})"
            ) from None
        for p in teacher.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.teacher = teacher.eval()
        self._fingerprint = fingerprint(state)
        self._placed = None
        self._check_fingerprint()
        return model

    def _check_fingerprint(self) -> None:
        if self._expected is not None and self._fingerprint is not None and self._expected != self._fingerprint:
            raise ConfigError(
                f"tfkd-self: method.teacher: {teacher_file(self.hp.teacher or '')} holds other weights than the "
                f"teacher this run started with (sha256 {self._fingerprint[:12]} != {self._expected[:12]})"
            )

    def _ready_teacher(self, x: Tensor) -> nn.Module:
        if self.teacher is None:
            raise TrainingError("tfkd-self: no teacher: call method.prepare_model(model) before training")
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        where = (x.device, channels_last)
        if self._placed != where:  # the trainer moves the student after prepare_model
            self.teacher.to(x.device)
            if channels_last:
                self.teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's overloads of Module.to omit it
            self._placed = where
        return self.teacher

    # -- training ----------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        teacher = self._ready_teacher(batch.x)
        with torch.no_grad():
            z_t = teacher(batch.x)
        return self.loss(model(batch.x), batch.y, index=batch.index, teacher=z_t, mix=batch.mix)

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             teacher: Tensor | None = None, mix: Mix | MixBlocks | None = None) -> StepOutput:
        if teacher is None:
            raise TrainingError("tfkd-self: the loss needs the teacher's logits: loss(logits, y, teacher=z_t)")
        ce = cross_entropy(logits, target, mix=mix)
        kd = kd_kl(logits, teacher.detach(), self.hp.temperature)
        a = self.hp.alpha
        return StepOutput((1.0 - a) * ce + a * kd, {"ce": ce.detach(), "kd": kd.detach()}, logits, target)

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        raise TrainingError(
            "tfkd-self: the loss needs the teacher's logits: call method.train_step(model, Batch(x, y)) "
            "after method.prepare_model(model), or method.loss(logits, y, teacher=z_t)"
        )

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Only the teacher weights' sha256: the teacher is reloaded from ``teacher``."""
        fp = self._fingerprint or self._expected
        return {} if fp is None else {"teacher_sha256": fp}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state, ("teacher_sha256",))
        self._expected = state.get("teacher_sha256")
        self._check_fingerprint()
