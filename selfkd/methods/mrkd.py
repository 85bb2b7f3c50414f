"""MrKD: Memory-replay Knowledge Distillation, past copies of the model as the teacher.

Wang, Zhang, Pang, Li, "Extending Label Smoothing Regularization with Self-Knowledge Distillation",
arXiv 2009.05226 (2020); journal version Wang, Zhang, Li, "Memory-Replay Knowledge Distillation",
Sensors 21(8) 2792 (2021). The interval, the number of copies, α, T, the FCN and the KA rule are our
choices (class docstring; README "Sources"), each one a knob.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .. import distributed
from ..data.mixing import Mix, MixBlocks, mix_rows
from ..errors import ConfigError, TrainingError
from ..nn_utils import unwrap
from .base import Batch, Method, Params, StepOutput
from .losses import cross_entropy, kd_kl
from .registry import register_method


def knowledge_adjustment(teacher: Tensor, target: Tensor) -> Tensor:
    """KA (Wen et al., arXiv 1911.07471): where the teacher's argmax is not ``y``, swap the logit of
    ``y`` with the largest logit, so the true class is on top and the rest of the row is unchanged."""
    top = teacher.argmax(dim=1, keepdim=True)
    y = target.view(-1, 1)
    t_top, t_y = teacher.gather(1, top), teacher.gather(1, y)
    return teacher.clone().scatter_(1, top, t_y).scatter_(1, y, t_top)  # rows with top == y: unchanged


def _cpu_clone(obj: Any) -> Any:
    """Plain containers with every tensor copied to the CPU (checkpoint-safe, not aliased)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_clone(v) for v in obj)
    return obj


def _freeze(module: nn.Module, mode: str) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
        p.grad = None
    return module.train(mode == "train")


class MrKDParams(Params):
    temperature: float = Field(3.0, gt=0, description="softmax temperature T of the distillation term")
    alpha: float = Field(1.0, ge=0, description="weight α of the distillation term (CE keeps weight 1)")
    copies: int = Field(1, ge=1, le=64, description="snapshots kept (FIFO): the teachers")
    interval: int = Field(
        200, ge=1, description="training steps between snapshots; the first one is taken after `interval` updates"
    )
    ensemble: Literal["mean", "fcn"] = Field(
        "mean",
        description="how several snapshots make one teacher: mean of their logits, or fcn: a linear layer on the "
        "concatenated logits, trained by CE with its own optimiser (journal version)",
    )
    knowledge_adjustment: bool = Field(
        False, description="KA: where the teacher's argmax is not the label, swap the two logits (journal version)"
    )
    teacher_mode: Literal["eval", "train"] = Field(
        "eval", description="mode of the snapshots' forward: eval uses their own BatchNorm running statistics"
    )
    fcn_lr: float = Field(0.01, gt=0, description="fcn: SGD learning rate of the ensembling layer")
    fcn_momentum: float = Field(0.9, ge=0, lt=1, description="fcn: SGD momentum of the ensembling layer")
    ka_mixed: Literal["skip", "dominant"] = Field(
        "skip",
        description="KA on mixed rows (mixup/CutMix) whose two labels differ: skip (teacher left as is) or dominant "
        "(adjusted towards the label with the larger share, y if lam >= 0.5)",
    )


@register_method
class MrKD(Method):
    """Memory-replay KD: the model's own past copies on the training trajectory are the teacher.

    ``L = CE(z, y) + α · T² · KL(softmax(z_b/T) ‖ softmax(z/T))``

    * **Snapshots.** Steps count calls to :meth:`train_step` from 0 across epochs. At the end of
      step ``t`` with ``t > 0`` and ``t % interval == 0`` the model, as it stands before step ``t``'s
      update (weights after ``t`` updates; BatchNorm buffers including step ``t``'s batch), is copied
      into the pool of at most ``copies`` frozen snapshots; when the pool is full the oldest is
      overwritten (FIFO). A snapshot is first used at the next step: the newest is 1 to ``interval``
      updates old (the oldest of M up to ``M·interval``), never the current weights. Steps 0 to
      ``interval`` have no teacher and their loss is CE only (``kd`` part 0): no random-init model is
      ever a teacher.
    * **Defaults** (our choices): T=3 and α=1, as ``dlb`` (the same loss
      form with a past model as the teacher, so a comparison isolates the teacher); ``copies=1``,
      ``ensemble="mean"``, no KA (the arXiv version); ``interval=200`` steps (about half a CIFAR epoch
      at batch 128), a step count so that runs do not depend on the epoch length. The journal setup is
      ``copies=M, ensemble="fcn", knowledge_adjustment=true``.

    More (cost, state, mixing, distributed): ``docs/methods.md``, section ``mrkd``.
    """

    name = "mrkd"
    own_forward = True
    formula = "CE(z, y) + α·T²·KL(softmax(z_b/T) ‖ softmax(z/T)), z_b: past snapshots of the model"
    Params: ClassVar[type[MrKDParams]] = MrKDParams
    hp: MrKDParams
    supports_mix = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.steps = 0
        self._snapshots: list[nn.Module] = []  # oldest first
        self._pending: list[dict[str, Tensor]] | None = None  # loaded, rebuilt at the next train_step
        self._fcn: nn.Linear | None = None
        self._fcn_opt: torch.optim.Optimizer | None = None

    @property
    def snapshots(self) -> list[nn.Module]:
        """The frozen snapshots, oldest first (empty until the first one is taken or a loaded one is rebuilt)."""
        return self._snapshots

    @property
    def fcn(self) -> nn.Linear | None:
        """``ensemble="fcn"``: the ensembling layer (None until built)."""
        return self._fcn

    @property
    def fcn_optimizer(self) -> torch.optim.Optimizer | None:
        """``ensemble="fcn"``: the layer's own SGD optimiser."""
        return self._fcn_opt

    @property
    def forwards_per_sample(self) -> float:
        """Once the pool is full: the student's forward and one no-grad forward per snapshot."""
        return 1.0 + self.hp.copies

    @property
    def backwards_per_sample(self) -> float:
        return 1.0

    def passes(self, epochs: int) -> tuple[float, float]:
        """The snapshots' forwards counted only at the steps they existed: step ``t`` (of :attr:`steps`)
        forwards ``min(copies, (t - 1) // interval)`` of them; per sample, steps are taken as equal batches."""
        if self.steps == 0:
            return float(epochs), float(epochs)
        i, c, m = self.hp.interval, self.hp.copies, self.steps - 1  # sum over u = t - 1 in [0, m) of min(c, u // i)
        q = min(m // i, c)
        teacher = i * q * (q - 1) // 2 + q * (m - q * i) if q == c else i * q * (q - 1) // 2 + q * (m % i)
        return epochs * (1.0 + teacher / self.steps), float(epochs)

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, *, num_samples: int, num_classes: int, epochs: int) -> None:
        if self.hp.ensemble == "fcn" and self._fcn is None:
            self._build_fcn(num_classes)

    def _build_fcn(self, num_classes: int) -> None:
        m, k = self.hp.copies, num_classes
        fcn = nn.Linear(m * k, k)
        with torch.no_grad():
            fcn.weight.copy_(torch.eye(k).repeat(1, m) / m)
            fcn.bias.zero_()
        self._fcn = fcn
        self._fcn_opt = torch.optim.SGD(fcn.parameters(), lr=self.hp.fcn_lr, momentum=self.hp.fcn_momentum)

    def _fcn_to(self, device: torch.device) -> None:
        assert self._fcn is not None and self._fcn_opt is not None
        if self._fcn.weight.device != device:
            self._fcn.to(device)  # parameters are moved in place: the optimiser keeps them
            for st in self._fcn_opt.state.values():
                for key, val in st.items():
                    if isinstance(val, Tensor):
                        st[key] = val.to(device)

    # -- training ----------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        base = unwrap(model)  # the snapshots copy the eager module, not its DDP / compile wrappers
        self._materialize(base, batch.x.device)
        teacher = fcn_ce = None
        if self._snapshots:
            with torch.no_grad():
                outs = [snap(batch.x) for snap in self._snapshots]
            teacher, fcn_ce = self.ensemble(outs, batch.y, mix=batch.mix)
        logits = model(batch.x)
        out = self.loss(logits, batch.y, index=batch.index, teacher=teacher, mix=batch.mix)
        if self.hp.ensemble == "fcn":
            out.parts["fcn_ce"] = fcn_ce if fcn_ce is not None else torch.zeros((), device=logits.device)
        if self.steps > 0 and self.steps % self.hp.interval == 0:
            self._snapshot(base)
        self.steps += 1
        return out

    def ensemble(self, outs: list[Tensor], target: Tensor,
                 mix: Mix | MixBlocks | None = None) -> tuple[Tensor, Tensor | None]:
        """One teacher from the snapshots' logits (oldest first); with fcn, also trains the layer
        (one SGD step; mixed CE on a mixed batch) and returns its CE. The teacher is detached, float32."""
        outs = [o.detach().float() for o in outs]
        if self.hp.ensemble == "mean":
            return torch.stack(outs).mean(dim=0), None
        if self._fcn is None:
            self._build_fcn(outs[0].shape[1])
        assert self._fcn is not None and self._fcn_opt is not None
        outs = [outs[0]] * (self.hp.copies - len(outs)) + outs  # pad the missing oldest slots
        inp = torch.cat(outs, dim=1)
        self._fcn_to(inp.device)
        with torch.enable_grad(), torch.autocast(inp.device.type, enabled=False):
            z = self._fcn(inp)
            ce = cross_entropy(z, target, mix=mix)
            self._fcn_opt.zero_grad(set_to_none=True)
            ce.backward()
            # DDP: the layer is trained on every rank's batch alike (averaged gradients), so ranks do not drift
            distributed.all_reduce_mean_([p.grad for p in self._fcn.parameters() if p.grad is not None])  # weight and bias: both have one
            self._fcn_opt.step()
        return z.detach(), ce.detach()

    def _snapshot(self, base: nn.Module) -> None:
        if len(self._snapshots) < self.hp.copies:
            self._snapshots.append(_freeze(copy.deepcopy(base), self.hp.teacher_mode))
        else:
            oldest = self._snapshots.pop(0)
            oldest.load_state_dict(base.state_dict())
            self._snapshots.append(oldest)

    def _materialize(self, base: nn.Module, device: torch.device) -> None:
        if self._pending is not None:
            snaps = []
            for sd in self._pending:
                snap = copy.deepcopy(base)
                try:
                    snap.load_state_dict(sd)
                except RuntimeError as err:
                    raise TrainingError(
                        f"{self.name}: a saved snapshot does not fit the model ({str(err).splitlines()[0]})"
                    ) from None
                snaps.append(_freeze(snap, self.hp.teacher_mode))
            self._snapshots, self._pending = snaps, None
        for i, snap in enumerate(self._snapshots):
            p = next(snap.parameters(), None)
            if p is not None and p.device != device:
                self._snapshots[i] = snap.to(device)

    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             teacher: Tensor | None = None, mix: Mix | MixBlocks | None = None) -> StepOutput:
        """``CE + α·KD`` given the teacher's logits (KA is applied here); no teacher: CE only.
        ``mix``: how the rows were mixed (the teacher must have seen the same mixed input)."""
        ce = cross_entropy(logits, target, mix=mix)
        if teacher is None:
            kd = torch.zeros((), device=logits.device)
            total = ce
        else:
            t = teacher.detach().float()
            if self.hp.knowledge_adjustment:
                t = self._adjust(t, target, mix)
            kd = self.distill(logits, t, target, mix)
            total = ce + self.hp.alpha * kd
        return StepOutput(total, {"ce": ce.detach(), "kd": kd.detach()}, logits, target)

    def _adjust(self, teacher: Tensor, target: Tensor, mix: Mix | MixBlocks | None) -> Tensor:
        """KA; on mixed rows as ``ka_mixed`` says (see the class docstring)."""
        if mix is None:
            return knowledge_adjustment(teacher, target)
        partner, lam = mix_rows(mix, target.shape[0], target.device)
        other = target.index_select(0, partner)
        if self.hp.ka_mixed == "dominant":
            return knowledge_adjustment(teacher, torch.where(lam >= 0.5, target, other))
        label = torch.where(lam == 0.0, other, target)
        single = (lam == 1.0) | (lam == 0.0) | (target == other)
        return torch.where(single[:, None], knowledge_adjustment(teacher, label), teacher)

    def distill(self, logits: Tensor, teacher: Tensor, target: Tensor,
                mix: Mix | MixBlocks | None = None) -> Tensor:
        """The distillation term ``T²·KL(softmax(teacher/T) ‖ softmax(z/T))`` (the teacher does not
        depend on the label: the same for mixed rows)."""
        return kd_kl(logits, teacher, self.hp.temperature)

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        raise TrainingError(
            f"{self.name}: the teacher is a snapshot of the model, so the loss needs the model: call "
            f"method.train_step(model, Batch(x, y)) (or method.loss(logits, y, teacher=teacher_logits))"
        )

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, the snapshots' state_dicts (oldest first) and, with fcn, the layer and its optimiser."""
        if self._pending is not None:
            snaps = _cpu_clone(self._pending)
        else:
            snaps = [_cpu_clone(s.state_dict()) for s in self._snapshots]
        state: dict[str, Any] = {"steps": self.steps, "snapshots": snaps}
        if self._fcn is not None:
            assert self._fcn_opt is not None  # built with the layer
            state["fcn"] = _cpu_clone(self._fcn.state_dict())
            state["fcn_optimizer"] = _cpu_clone(self._fcn_opt.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state, ("steps", "snapshots", "fcn", "fcn_optimizer"), required=("steps", "snapshots"))
        snaps = list(state["snapshots"])
        if len(snaps) > self.hp.copies:
            raise ConfigError(
                f"method '{self.name}': copies: the checkpoint holds {len(snaps)} snapshots "
                f"(got copies={self.hp.copies})"
            )
        has_fcn = "fcn" in state
        if has_fcn != (self.hp.ensemble == "fcn") and (has_fcn or snaps):
            raise ConfigError(
                f"method '{self.name}': ensemble: the checkpoint was written with "
                f"ensemble={'fcn' if has_fcn else 'mean'} (got {self.hp.ensemble!r})"
            )
        if has_fcn:
            w = state["fcn"]["weight"]
            k = w.shape[0]
            if w.shape[1] != self.hp.copies * k:
                raise ConfigError(
                    f"method '{self.name}': copies: the checkpoint's ensembling layer takes {w.shape[1] // k} "
                    f"snapshots (got copies={self.hp.copies})"
                )
            self._build_fcn(k)
            assert self._fcn is not None and self._fcn_opt is not None
            self._fcn.load_state_dict(state["fcn"])
            self._fcn_opt.load_state_dict(state["fcn_optimizer"])
        self.steps = int(state["steps"])
        self._snapshots = []
        self._pending = [dict(sd) for sd in snaps]
