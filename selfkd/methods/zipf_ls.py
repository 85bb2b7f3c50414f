"""Zipf's Label Smoothing (Liang, Li, Bing, Zhao, Liu, Li, ECCV 2022, arXiv 2207.12980).

"Efficient One Pass Self-distillation with Zipf's Label Smoothing"; semantics pinned to the official
PyTorch code, github.com/megvii-research/zipfls @0e85434 (``pytorch_zipfls/losses.py``: ``zipf_loss``,
``gen_pdf``, ``get_masked_distribution``, ``kl_loss``; ``train.py``; ``README.md``).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.mixing import Mix, MixBlocks, mix_rows
from ..errors import ConfigError, TrainingError
from .base import Method, Params, StepOutput
from .losses import cross_entropy
from .registry import register_method


def min_rank(scores: Tensor) -> Tensor:
    """Per row, ``1 + #{j : s_j > s_i}``: descending rank, ties share the smallest rank
    (``scipy.stats.rankdata(-s, method='min')``, as the official code). int64, same shape."""
    s = scores.float().contiguous()
    ascending = s.sort(dim=1).values.contiguous()
    at_most = torch.searchsorted(ascending, s, right=True)  # #{j : s_j <= s_i}
    return s.shape[1] - at_most + 1


def zipf_target(scores: Tensor, target: Tensor, power: float) -> Tensor:
    """The non-target soft label, ``(N, K−1)``: ``rank^−power`` with ranks taken over all K classes
    (the true class included), the true class then removed, the rest renormalised."""
    n, k = scores.shape
    w = min_rank(scores).float().pow(-power)
    w = w.gather(1, non_target_columns(target, k))
    return w / w.sum(dim=1, keepdim=True)


def non_target_columns(target: Tensor, num_classes: int) -> Tensor:
    """``(N, K−1)`` class indices of each row without its target, ascending: a gather index (boolean-mask
    selection would make the host wait for the mask's count on a GPU)."""
    cols = torch.arange(num_classes - 1, device=target.device).expand(target.shape[0], -1)
    return cols + (cols >= target.view(-1, 1)).long()


def dense_votes(fmap: Tensor, fc: nn.Linear, upsample: int) -> Tensor:
    """Per image, how many locations of the final feature map the linear head assigns to each class.

    ``fmap`` (N, C, H, W) is the map the model global-average-pools; ``fc`` is applied at every
    location (after an optional bilinear ×``upsample``), each location votes for its argmax class
    (ties: the first class). Returns (N, K) float32 counts. No gradients; float32 even under autocast.
    """
    with torch.no_grad(), torch.autocast(fmap.device.type, enabled=False):
        x = fmap.detach().float()
        if upsample > 1:
            x = F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)
        n, c, h, w = x.shape
        if c != fc.in_features:
            raise TrainingError(
                f"zipf-ls rank='dense': the pooled feature map has {c} channels but fc expects {fc.in_features}"
            )
        bias = None if fc.bias is None else fc.bias.float()
        dense = F.linear(x.permute(0, 2, 3, 1).reshape(n, h * w, c), fc.weight.float(), bias)  # (N, HW, K)
        winner = dense.argmax(dim=2)  # (N, HW)
        classes = torch.arange(fc.out_features, device=x.device)
        return (winner.unsqueeze(2) == classes).sum(dim=1).float()


class ZipfLSParams(Params):
    loss_lambda: float = Field(0.1, ge=0, description="weight λ of the Zipf KL term (official --loss_lambda)")
    power: float = Field(
        1.0, ge=0, le=32, description="Zipf exponent: non-target weight ∝ rank^−power (official --power)"
    )
    mask_correct: bool = Field(
        False, description="apply the Zipf term only to correctly classified rows, averaged over them (official --mask)"
    )
    rank: Literal["logits", "dense"] = Field(
        "logits",
        description="what ranks the classes: logits (the final logits, detached) or dense (votes of per-location "
        "argmaxes of the linear head over the final feature map: the official --dense; models with pool and fc)",
    )
    dense_upsample: int = Field(
        1, ge=1, le=8, description="rank='dense': bilinear upsampling factor of the feature map before voting "
        "(official --upsample bilinear = 2)",
    )
    mix_rule: Literal["exclude", "weighted"] = Field(
        "exclude",
        description="Zipf term on mixed rows (mixup/CutMix): exclude: one term over the classes that are not a label "
        "of the mixture; weighted: lam·term(y) + (1−lam)·term(y[index])",
    )


@register_method
class ZipfLS(Method):
    """Zipf's label smoothing: a self-generated, rank-based soft label for the non-target classes.

    ``L = CE(z, y) + λ·KL(q ‖ softmax(z_¬y))``, ``q_k ∝ rank_k^−power`` over the non-target classes

    * ``z_¬y``: the K−1 non-target logits (the true class removed, order kept); ``q`` is built from the
      network's own current prediction, detached: each class is ranked over **all K classes, the true
      class included** (ties share the smallest rank, like ``rankdata(method='min')``), weighted
      ``rank^−power``, then the true class is removed and the rest renormalised — exactly the official
      ``gen_pdf``/``get_masked_distribution``. So when the true class ranks first the others get
      weights ∝ 1/2, 1/3, …; when it ranks third they get 1/1, 1/2, 1/4, ….
    * ``rank="logits"`` (our default) ranks by the final logits. ``rank="dense"`` is the official
      ``--dense`` (used by every command in the official README): the linear head ``fc`` is applied at
      every location of the feature map the model average-pools, each location votes for its argmax,
      and classes are ranked by votes (many ties: all classes without votes share one rank). It needs
      a model with a ``pool`` module fed that map and a linear ``fc`` head: ``resnet*``, ``wrn20_8``,
      ``densenet40``, ``cnn_small`` (not the VGGs), and the model must go through
      :meth:`prepare_model` (the trainer does this), which adds a forward pre-hook on ``pool``; the
      pre-hook keeps the last training-mode input of ``pool`` (detached) for the next loss call. No
      extra forward pass. ``dense_upsample=2`` is the official CIFAR ``--upsample bilinear``; the
      official CIFAR ResNet-18 votes over 4×4 upsampled to 8×8, our CIFAR ResNets already end at 8×8.
      (The official code also allows votes from intermediate stages, ``--deeplayer``; default 1, not
      offered here.)
    * Defaults: λ=0.1 (official README, CIFAR-100 and ImageNet; TinyImageNet and iNat21 use λ=1.0),
      power=1 (official default), mask off. The official total loss is ``CE + λ·KL`` (its ``--alpha``
      only weights extra-exit losses with ``--deeplayer`` > 1).

    More (cost, state, mixing, distributed): ``docs/methods.md``, section ``zipf-ls``.
    """

    name = "zipf-ls"
    formula = "CE(z, y) + λ·KL(zipf(rank of own prediction) ‖ softmax(z_non-target))"
    Params = ZipfLSParams
    hp: ZipfLSParams
    supports_mix = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._fmap: Tensor | None = None
        self._fc: nn.Linear | None = None
        self._hook: Any = None

    @property
    def feature_map(self) -> Tensor | None:
        """``rank="dense"``: the map the model pooled in its last forward, until the loss consumes it."""
        return self._fmap

    # -- dense ranking -----------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``rank="dense"``: tap the input of ``model.pool`` (forward pre-hook); the model is unchanged."""
        if self.hp.rank != "dense":
            return model
        pool, fc = getattr(model, "pool", None), getattr(model, "fc", None)
        if not isinstance(pool, nn.Module) or not isinstance(fc, nn.Linear):
            raise ConfigError(
                f"method 'zipf-ls': rank: 'dense' needs a model with a 'pool' module and a linear 'fc' head "
                f"(resnet*, wrn20_8, densenet40, cnn_small); {type(model).__name__} has none; use rank='logits'"
            )
        if self._hook is not None:
            self._hook.remove()
        self._fc = fc
        self._fmap = None
        self._hook = pool.register_forward_pre_hook(self._tap)
        return model

    def _tap(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training:
            self._fmap = args[0].detach()

    def _take_votes(self, rows: int) -> Tensor:
        fmap, self._fmap = self._fmap, None
        if fmap is None or self._fc is None:
            raise TrainingError(
                "zipf-ls rank='dense': no feature map was captured; pass the model through "
                "method.prepare_model(model) and call the loss right after a training-mode forward"
            )
        if fmap.dim() != 4 or fmap.shape[0] != rows:
            raise TrainingError(
                f"zipf-ls rank='dense': the captured feature map has shape {tuple(fmap.shape)} but the loss got "
                f"{rows} rows; call the loss once per forward, on the logits of that forward"
            )
        return dense_votes(fmap, self._fc, self.hp.dense_upsample)

    # -- loss --------------------------------------------------------------------------------
    def loss(self, logits: Tensor, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        hp = self.hp
        z = logits.float()
        n, k = z.shape
        scores = self._take_votes(n).to(z.device) if hp.rank == "dense" else z.detach()
        if mix is not None:
            return self._mixed_loss(logits, z, scores, target, mix)
        q = zipf_target(scores, target, hp.power)
        log_p = F.log_softmax(z.gather(1, non_target_columns(target, k)), dim=1)
        per_row = (torch.xlogy(q, q) - q * log_p).sum(dim=1)  # KL(q ‖ softmax(z_¬y))
        if hp.mask_correct:
            correct = (z.detach().argmax(dim=1) == target).float()
            zipf = (per_row * correct).sum() / correct.sum().clamp(min=1.0)
        else:
            zipf = per_row.mean()
        ce = cross_entropy(logits, target)
        loss = ce + hp.loss_lambda * zipf
        return StepOutput(loss, {"ce": ce.detach(), "zipf": zipf.detach()}, logits, target)

    def _mixed_loss(self, logits: Tensor, z: Tensor, scores: Tensor, target: Tensor,
                    mix: Mix | MixBlocks) -> StepOutput:
        hp = self.hp
        n, k = z.shape
        partner, lam = mix_rows(mix, n, target.device)
        other = target.index_select(0, partner)
        has_own, has_other = lam > 0, lam < 1
        if hp.mix_rule == "exclude":
            none = torch.zeros(n, k, dtype=torch.bool, device=z.device)  # scatter, not masks: no host sync
            labels = none.scatter(1, target[:, None], has_own[:, None])
            labels |= none.scatter(1, other[:, None], has_other[:, None])
            keep = ~labels
            w = min_rank(scores).float().pow(-hp.power) * keep
            q = w / w.sum(dim=1, keepdim=True).clamp_min(1e-30)  # a row with no class left (K=2): q = 0, term 0
            drop = labels & keep.any(dim=1, keepdim=True)
            log_p = F.log_softmax(z.masked_fill(drop, -torch.inf), dim=1)
            per_row = torch.where(keep, torch.xlogy(q, q) - q * log_p, torch.zeros_like(q)).sum(dim=1)
        else:
            per_row = lam * self._row_kl(z, scores, target) + (1.0 - lam) * self._row_kl(z, scores, other)
        if hp.mask_correct:
            pred = z.detach().argmax(dim=1)
            correct = (((pred == target) & has_own) | ((pred == other) & has_other)).float()
            zipf = (per_row * correct).sum() / correct.sum().clamp(min=1.0)
        else:
            zipf = per_row.mean()
        ce = cross_entropy(logits, target, mix=mix)
        loss = ce + hp.loss_lambda * zipf
        return StepOutput(loss, {"ce": ce.detach(), "zipf": zipf.detach()}, logits, target)

    def _row_kl(self, z: Tensor, scores: Tensor, target: Tensor) -> Tensor:
        """Per row, the unmixed term ``KL(q ‖ softmax(z_¬y))`` for labels ``target``."""
        n, k = z.shape
        q = zipf_target(scores, target, self.hp.power)
        log_p = F.log_softmax(z.gather(1, non_target_columns(target, k)), dim=1)
        return (torch.xlogy(q, q) - q * log_p).sum(dim=1)
