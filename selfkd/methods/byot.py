"""BYOT: Be Your Own Teacher (Zhang et al., ICCV 2019, arXiv 1905.08094), multi-exit self-distillation.

Semantics pinned to the authors' journal-version code (github.com/ArchipLab-LinfengZhang/
pytorch-self-distillation-final, ``train.py`` and ``resnet.py``):

* the network gets a classifier ("exit") after each stage; the deepest exit is the teacher of the
  shallower ones;
* ``L = CE(z_deep, y) + Σ_{shallow i} [ c·H(softmax(z_deep/T).detach(), softmax(z_i/T)) + (1−c)·CE(z_i, y) ]``
  with ``H(p, q) = −Σ_k p_k log q_k`` (a soft cross-entropy, mean over rows), c=0.3, T=3 and **no T²
  factor**; the deepest exit gets its CE only (it is the detached teacher of the soft terms);
* each shallow exit is a stack of SepConv blocks (depthwise-separable 3x3 conv pairs with BN+ReLU), one
  per downsampling step between its stage and the last one, taking the stage's channels to the next
  stages' channels; then global average pooling and a linear layer.

What we build (:class:`MultiExit`, via :meth:`BYOT.prepare_model`):

* any model exposing ``features(x) -> list[Tensor]`` (stage outputs, shallow to deep),
  ``stage_channels`` and a final ``pool`` plus ``fc`` (ResNets, WRN; DenseNet's ``norm`` is applied
  before the pool as in its own forward) or ``pool`` plus ``classifier`` (VGG) is supported: S stages
  give S exits (ResNets/WRN/DenseNet 3, VGG 5). ``cnn_small`` has no stages and is refused.
* The deepest exit *is* the model's own head, so ``MultiExit.forward`` is the plain classifier.
* Shallow exit of stage i: for each later stage j+1 it repeats the trunk's step from stage j to j+1:
  ``log2(H_j / H_{j+1})`` stride-2 blocks (the first takes ``C_j -> C_{j+1}``), or one stride-1 block when
  only the channels change; at least one block. Block = ``head="sepconv"`` (default, the official
  SepConv: dw3x3(stride)-pw1x1-BN-ReLU-dw3x3-pw1x1-BN-ReLU) or ``head="conv"`` (3x3 conv(stride)-BN-ReLU).
  Then adaptive average pool to 1x1 and one ``Linear(C_last, K)`` (also where the model's own head is an
  MLP, as VGG's 512-512-K: the journal code's exits are single linear layers). Resolutions are read from one probe
  forward at 32x32 in eval mode under ``no_grad`` (BN statistics and RNG untouched).
* ``attention=True`` adds the attention gate that the journal code's ResNet always applies before each
  shallow exit: ``x · sigmoid(upsample(block(x, stride 2)))``; the trunk continues with the ungated ``x``.
  Default off (the ICCV paper's figure has no gate).
* ``t2_scaling=True`` replaces each soft term by the library's ``kd_kl`` = ``T²·KL(softmax(z_deep/T) ‖
  softmax(z_i/T))``: the gradient is T² times the official one (KL and H differ by the teacher's entropy,
  a constant for the student), so the reported ``kd`` value differs too. Default False = official.
* ``hint_weight`` λ adds a feature hint towards the deepest exit's features (detached teacher), in one of
  two forms (``hint``):

  - ``"paper"`` (the ICCV paper's L2 hint): ``λ · Σ_i mean_rows ||F_i − F_deep||²``, ``F_i`` the output of
    exit i's blocks (the map it pools) and ``F_deep`` the map the deepest exit pools; a squared L2 norm
    summed over C·H·W per row (batchmean). A shallow map of another size (odd inputs) is average-pooled to
    the deep size.
  - ``"journal"`` (the journal code, ``--feature_loss_coefficient 0.03``): ``λ · Σ_i ||A_i(f_i) − f_deep||``
    with ``f`` the pooled features (B x C), ``A_i`` a trainable ``Linear(C, C)`` adaptation layer per
    hinted exit (held by :class:`MultiExit`, so it is optimised and saved with the model) and ``||·||``
    the unsquared L2 norm over the whole batch (``torch.dist``: not per row, not averaged). Every shallow
    exit but the one next to the deepest gets the term, as in that code.

  Default λ=0 (off). The ``byot-journal`` preset sets the journal code's recipe (see ``selfkd presets``).
* Not reproduced: the journal code's extra "ensemble" output (the mean of the exits), which is only
  reported, never trained.

Parts reported: ``ce`` (deepest exit's CE), ``kd`` (sum over shallow exits of the soft term, before ``c``),
``ce_aux`` (sum over shallow exits of their CE, before ``1−c``) and, when ``hint_weight > 0``, ``hint``
(sum over shallow exits, before λ). ``loss = ce + c·kd + (1−c)·ce_aux + λ·hint``.

Checkpoints: the wrapper's ``state_dict`` holds the base model under ``net.`` (``net.stem.0.weight``,
``net.fc.weight``, ...) and the shallow exits under ``exits.<i>.`` (``exits.0`` is the shallowest);
:meth:`MultiExit.base_state_dict` strips a checkpoint back to the plain model's keys. The method itself
has no state. Compute: one trunk forward per step (``forwards_per_sample`` = 1) plus the exit heads.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.mixing import Mix, MixBlocks
from ..errors import ConfigError, TrainingError
from ..models._common import init_conv_bn
from ..nn_utils import unwrap
from .base import Batch, Method, Params, StepOutput
from .losses import cross_entropy, kd_kl, soft_cross_entropy
from .registry import register_method

PROBE_SIZE = 32  # spatial size of the probe input that measures each stage's resolution


# -- exit heads ----------------------------------------------------------------------------------
class SepConv(nn.Module):
    """Two depthwise-separable 3x3 convs: dw(stride)-pw-BN-ReLU-dw-pw(C_in -> C_out)-BN-ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


def _block(kind: str, c_in: int, c_out: int, stride: int) -> nn.Module:
    if kind == "sepconv":
        return SepConv(c_in, c_out, stride)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=False)
    )


class Attention(nn.Module):
    """The journal code's gate: ``x · sigmoid(upsample(block(x, stride 2)))``."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.block = _block(kind, channels, channels, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = F.interpolate(self.block(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(a)


class Exit(nn.Module):
    """One shallow exit: [attention], blocks to the deepest channels/resolution, GAP, linear."""

    def __init__(self, blocks: list[nn.Module], channels: int, num_classes: int, attention: nn.Module | None) -> None:
        super().__init__()
        self.attention = attention
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def features(self, x: Tensor) -> Tensor:
        if self.attention is not None:
            x = self.attention(x)
        return self.blocks(x)

    def classify(self, f: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(f), 1))


def _stages(net: nn.Module, x: Tensor) -> list[Tensor]:
    """``net.features(x)``: the outputs of the stages of a model that has them (a method of the model's
    class, which nn.Module's typing cannot see; :class:`MultiExit` checks it is there)."""
    return getattr(net, "features")(x)


def _pooled(net: nn.Module, f: Tensor) -> Tensor:
    """``flatten(net.pool(f), 1)``: the model's pooling before its head (a submodule, typed Tensor | Module by torch)."""
    return torch.flatten(getattr(net, "pool")(f), 1)


def _model_label(model: nn.Module) -> str:
    """The registry name ``build_model`` gave ``model`` (e.g. ``cnn_small``), else its class name."""
    return getattr(model, "registry_name", type(model).__name__)


class MultiExit(nn.Module):
    """``net`` with a classifier after every stage; the deepest exit is ``net``'s own head.

    ``forward(x)`` returns the deepest exit's logits (the plain classifier); ``forward_exits(x)`` all exits'
    logits, shallow to deep. ``state_dict`` keys: ``net.*`` (the base model) and ``exits.<i>.*``.
    """

    def __init__(self, net: nn.Module, *, head: Literal["sepconv", "conv"] = "sepconv", attention: bool = False,
                 adapt: bool = False) -> None:
        super().__init__()
        label = _model_label(net)
        stage_channels = getattr(net, "stage_channels", None)
        if not callable(getattr(net, "features", None)) or not stage_channels:
            raise ConfigError(
                f"byot needs a model with stages (resnet*, wrn20_8, vgg16/19, densenet40: features(x) and "
                f"stage_channels); got {label}"
            )
        if not isinstance(getattr(net, "pool", None), nn.Module) or not (
            isinstance(getattr(net, "fc", None), nn.Module) or isinstance(getattr(net, "classifier", None), nn.Module)
        ):
            raise ConfigError(f"byot needs a model whose head is pool + fc (or pool + classifier); got {label}")
        if len(stage_channels) < 2:
            raise ConfigError(f"byot needs a model with at least 2 stages; {label} has {len(stage_channels)}")
        self.net = net
        self._head_name = "fc" if isinstance(getattr(net, "fc", None), nn.Module) else "classifier"
        channels = list(stage_channels)
        sizes, num_classes = self._probe(net, label, channels)
        exits = []
        for i in range(len(channels) - 1):
            blocks: list[nn.Module] = []
            c = channels[i]
            for j in range(i, len(channels) - 1):
                steps = _downsamplings(sizes[j], sizes[j + 1], label)
                for _ in range(steps):
                    blocks.append(_block(head, c, channels[j + 1], 2))
                    c = channels[j + 1]
                if steps == 0 and c != channels[j + 1]:
                    blocks.append(_block(head, c, channels[j + 1], 1))
                    c = channels[j + 1]
            if not blocks:
                blocks.append(_block(head, c, c, 1))
            gate = Attention(head, channels[i]) if attention else None
            exits.append(Exit(blocks, channels[-1], num_classes, gate))
        self.exits = nn.ModuleList(exits)
        init_conv_bn(self.exits)  # convs Kaiming (fan_out), BN 1/0; linears keep PyTorch's default init
        # the journal hint's adaptation layers: one per hinted exit (all shallow ones but the deepest's neighbour)
        self.adapt = nn.ModuleList(nn.Linear(channels[-1], channels[-1]) for _ in journal_hinted(len(exits))) \
            if adapt else None
        ref = next(net.parameters(), None)
        if ref is not None:
            self.exits.to(device=ref.device, dtype=ref.dtype)

    # -- construction helpers ------------------------------------------------------------------
    def _probe(self, net: nn.Module, label: str, channels: list[int]) -> tuple[list[int], int]:
        """Stage resolutions on a PROBE_SIZE input and the class count; checks the deep head reproduces ``net``."""
        conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ConfigError(f"byot: {label} has no Conv2d to infer its input channels from")
        ref = next(net.parameters())
        n = conv.in_channels * PROBE_SIZE * PROBE_SIZE
        x = torch.sin(torch.arange(2 * n, dtype=torch.float32) * 0.37).reshape(2, conv.in_channels, PROBE_SIZE, PROBE_SIZE)
        x = x.to(device=ref.device, dtype=ref.dtype)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                feats = _stages(net, x)
                deep = self._deep(feats[-1])[1]
                plain = net(x)
        except Exception as err:
            raise ConfigError(f"byot: probing {label} with a {PROBE_SIZE}x{PROBE_SIZE} input failed: {err}") from None
        finally:
            net.train(was_training)
        got = [f.shape[1] for f in feats]
        if got != channels:
            raise ConfigError(f"byot: {label}.features() gives channels {got} but stage_channels says {channels}")
        if not torch.allclose(deep, plain, rtol=1e-4, atol=1e-5):
            raise ConfigError(f"byot: {label}'s forward is not its head applied to features(x)[-1]; cannot attach exits")
        return [f.shape[-1] for f in feats], plain.shape[1]

    # -- the deep exit ---------------------------------------------------------------------------
    def _deep(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """(features the deepest exit pools, its logits): ``net``'s own head on the last stage."""
        norm = getattr(self.net, "norm", None)
        if isinstance(norm, nn.Module):
            f = norm(f)
        head = getattr(self.net, self._head_name)
        return f, head(_pooled(self.net, f))

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, exits: bool = False, with_features: bool = False) -> Any:
        """The deepest exit's logits (the model's own classifier); ``exits=True``: :meth:`forward_exits`
        (the way in through a DistributedDataParallel wrapper, which only wraps ``forward``)."""
        if exits:
            return self.forward_exits(x, with_features=with_features)
        return self._deep(_stages(self.net, x)[-1])[1]

    def forward_exits(self, x: Tensor, with_features: bool = False) -> Any:
        """All exits' logits, shallow to deep (the last equals ``forward(x)``).

        With ``with_features=True`` returns ``(logits, features)``: the tensors each exit pools.
        """
        stages = _stages(self.net, x)
        logits, feats = [], []
        for ex, s in zip(cast("list[Exit]", self.exits), stages[:-1]):  # nn.ModuleList is not generic
            f = ex.features(s)
            feats.append(f)
            logits.append(ex.classify(f))
        f, z = self._deep(stages[-1])
        feats.append(f)
        logits.append(z)
        return (logits, feats) if with_features else logits

    def journal_features(self, feats: Sequence[Tensor]) -> list[Tensor | None]:
        """The journal hint's inputs from ``forward_exits(..., with_features=True)``'s maps: the adapted
        pooled features ``A_i(f_i)`` of the hinted shallow exits (None for the others) and, last, the
        deepest exit's pooled features."""
        if self.adapt is None:
            raise TrainingError("byot: hint='journal' needs the wrapper built with adapt=True (method.prepare_model)")
        out: list[Tensor | None] = [None] * (len(feats) - 1)
        for a, i in zip(self.adapt, journal_hinted(len(feats) - 1)):
            out[i] = a(_pooled(self.exits[i], feats[i]))
        out.append(_pooled(self.net, feats[-1]))
        return out

    @property
    def num_exits(self) -> int:
        return len(self.exits) + 1

    @staticmethod
    def base_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The base model's weights from a wrapper ``state_dict`` (``net.`` keys, prefix stripped)."""
        return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}


def journal_hinted(shallow: int) -> list[int]:
    """Shallow exits (0 = shallowest) that get the journal code's feature hint: all but the deepest's neighbour."""
    return list(range(shallow - 1))


def _downsamplings(h_from: int, h_to: int, label: str) -> int:
    if h_to > h_from or h_to < 1:
        raise ConfigError(f"byot: {label}'s stages must not grow in resolution ({h_from} -> {h_to})")
    return int(round(math.log2(h_from / h_to)))


# -- the loss ------------------------------------------------------------------------------------
def byot_loss(
    exits: Sequence[Tensor],
    target: Tensor,
    *,
    kd_weight: float = 0.3,
    temperature: float = 3.0,
    t2_scaling: bool = False,
    hint_weight: float = 0.0,
    features: Sequence[Tensor | None] | None = None,
    hint: Literal["paper", "journal"] = "paper",
    mix: Mix | MixBlocks | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """BYOT's loss on the exits' logits (shallow to deep); returns ``(loss, parts)``.

    ``loss = CE(z_deep) + c·kd + (1−c)·ce_aux + λ·hint`` with ``kd = Σ_i H(softmax(z_deep/T), softmax(z_i/T))``
    (or ``Σ_i T²·KL(...)`` with ``t2_scaling``), ``ce_aux = Σ_i CE(z_i)`` over the shallow exits i, and
    ``hint = Σ_i mean_rows ||F_i − F_deep||²`` (``hint="paper"``, feature maps) or ``Σ_i ||f_i − f_deep||``
    (``"journal"``: adapted pooled features, one L2 norm over the batch; exits whose entry is None are
    skipped). The deep logits and features are detached teachers of those terms.
    ``mix``: mixed rows; every CE (deep and shallow) becomes ``lam·CE(z, y) + (1−lam)·CE(z, y[index])``.
    """
    if len(exits) < 2:
        raise TrainingError(f"byot: needs at least 2 exits (shallow ones and the deepest), got {len(exits)}")
    deep = exits[-1]
    teacher = F.softmax(deep.detach().float() / temperature, dim=1)
    def hard(z: Tensor) -> Tensor:
        return cross_entropy(z, target, mix=mix)

    ce = hard(deep)
    kd = ce.new_zeros(())
    ce_aux = ce.new_zeros(())
    for z in exits[:-1]:
        if t2_scaling:
            kd = kd + kd_kl(z, deep, temperature)
        else:
            kd = kd + soft_cross_entropy(z.float() / temperature, teacher)
        ce_aux = ce_aux + hard(z)
    loss = ce + kd_weight * kd + (1.0 - kd_weight) * ce_aux
    parts = {"ce": ce.detach(), "kd": kd.detach(), "ce_aux": ce_aux.detach()}
    if hint_weight > 0:
        if features is None or len(features) != len(exits):
            raise TrainingError(
                f"byot: hint_weight > 0 needs one feature map per exit ({len(exits)}), "
                f"got {None if features is None else len(features)}"
            )
        if features[-1] is None:
            raise TrainingError("byot: the hint needs the deepest exit's features (the last entry of features is None)")
        f_deep = features[-1].detach().float()
        hint_sum = ce.new_zeros(())
        for f in features[:-1]:
            if f is None:
                continue
            f = f.float()
            if hint == "journal":
                hint_sum = hint_sum + torch.linalg.vector_norm(f - f_deep)
                continue
            if f.shape[-2:] != f_deep.shape[-2:]:
                f = F.adaptive_avg_pool2d(f, (f_deep.shape[-2], f_deep.shape[-1]))
            hint_sum = hint_sum + (f - f_deep).pow(2).flatten(1).sum(1).mean()
        loss = loss + hint_weight * hint_sum
        parts["hint"] = hint_sum.detach()
    return loss, parts


# -- the method ----------------------------------------------------------------------------------
class BYOTParams(Params):
    kd_weight: float = Field(
        0.3, ge=0, le=1, description="c: weight of each shallow exit's soft term; its CE gets 1−c (official 0.3)"
    )
    temperature: float = Field(3.0, gt=0, description="softmax temperature T of the soft terms (official 3)")
    t2_scaling: bool = Field(
        False, description="use T²·KL (kd_kl) as the soft term instead of the official unscaled soft cross-entropy"
    )
    hint_weight: float = Field(
        0.0, ge=0, description="λ of the feature hint between each shallow exit's features and the deepest (form: "
        "`hint`; 0 = off)",
    )
    hint: Literal["paper", "journal"] = Field(
        "paper", description="form of the feature hint: paper (squared L2 of feature maps, batchmean) or journal "
        "(unsquared L2 over the batch of linearly adapted pooled features, as the journal code)",
    )
    head: Literal["sepconv", "conv"] = Field(
        "sepconv", description="exit block per downsampling step: sepconv (official SepConv) or conv (3x3 conv-BN-ReLU)"
    )
    attention: bool = Field(False, description="the journal code's sigmoid attention gate before each shallow exit "
                            "(always on in that code)")


@register_method
class BYOT(Method):
    """Be Your Own Teacher (Zhang et al., ICCV 2019): multi-exit self-distillation, deepest exit as teacher.

    ``L = CE(z_S, y) + Σ_{i<S} [ c·H(softmax(z_S/T).detach(), softmax(z_i/T)) + (1−c)·CE(z_i, y) ] (+ λ·hint)``

    * Defaults: c = ``kd_weight`` = 0.3, T = 3 and no T² (``t2_scaling=False``) as the journal code; SepConv
      exit heads; no feature hint (``hint_weight=0``) and no attention gate, so the defaults are the logit
      terms alone. The journal code also has its feature hint (``hint="journal"``, λ=0.03) and attention
      gates: preset ``byot-journal`` sets them with that code's training recipe.
    * :meth:`prepare_model` wraps the model in :class:`MultiExit` (exits after every stage; see the module
      docstring for the head layout); train that wrapper. ``forward`` is the deepest exit, so evaluation and
      plain use see the normal classifier; ``forward_exits`` gives every exit.
    * One trunk forward per step; the exits add their heads' cost. No method state.
    * **Mixed samples** (mixup/CutMix): every exit's CE is mixed, ``lam·CE(z_i, y) + (1−lam)·CE(z_i, y[index])``;
      the soft terms (and the hint) are unchanged: the deepest exit on the same mixed input is the teacher.
    * **Distributed** (DDP): per rank; Each rank scores the exits of its own shard; the exits are part of the trained model, so DDP
      averages their gradients with the backbone's (the trainer's DDP wrapper reaches every exit
      through ``forward(x, exits=True)``).
    """

    name = "byot"
    own_forward = True
    needs_stages = True
    formula = "CE(z_S, y) + Σ_{i<S} [c·H(softmax(z_S/T).detach(), softmax(z_i/T)) + (1−c)·CE(z_i, y)]"
    Params = BYOTParams
    hp: BYOTParams
    supports_mix = True

    @property
    def forwards_per_sample(self) -> float:
        return 1.0

    def prepare_model(self, model: nn.Module) -> MultiExit:
        """Wrap ``model`` with an exit after each stage (a model already wrapped is returned as is)."""
        if isinstance(model, MultiExit):
            return model
        journal = self.hp.hint == "journal" and self.hp.hint_weight > 0
        return MultiExit(model, head=self.hp.head, attention=self.hp.attention, adapt=journal)

    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        inner = unwrap(model)
        if isinstance(inner, MultiExit) and inner is not model:  # through DDP (gradient sync) or the compiled graph
            if self.hp.hint_weight > 0:
                exits, feats = model(batch.x, exits=True, with_features=True)
            else:
                exits, feats = model(batch.x, exits=True), None
            return self._score(exits, batch.y, feats, batch.mix)
        forward_exits = getattr(model, "forward_exits", None)
        if not callable(forward_exits):
            raise TrainingError(
                "byot: the model has no forward_exits(); train the model returned by method.prepare_model(model)"
            )
        if self.hp.hint_weight > 0:
            exits, feats = forward_exits(batch.x, with_features=True)
            if self.hp.hint == "journal":
                feats = getattr(model, "journal_features")(feats)
        else:
            exits, feats = forward_exits(batch.x), None
        return self._score(exits, batch.y, feats, batch.mix)

    def loss(self, logits: Any, target: Tensor, index: Tensor | None = None,
             mix: Mix | MixBlocks | None = None) -> StepOutput:
        """``logits``: the exits' logits, shallow to deep (a list, as ``forward_exits`` returns, or an E x N x K tensor)."""
        if isinstance(logits, Tensor):
            if logits.dim() != 3:
                raise TrainingError(
                    f"byot: scores the logits of every exit (model.forward_exits(x), shallow to deep), "
                    f"got one tensor of shape {tuple(logits.shape)}"
                )
            logits = list(logits.unbind(0))
        return self._score(list(logits), target, None, mix)

    def _score(self, exits: list[Tensor], target: Tensor, feats: list[Tensor] | None,
               mix: Mix | MixBlocks | None = None) -> StepOutput:
        hp = self.hp
        loss, parts = byot_loss(
            exits, target, kd_weight=hp.kd_weight, temperature=hp.temperature, t2_scaling=hp.t2_scaling,
            hint_weight=hp.hint_weight, features=feats, hint=hp.hint, mix=mix,
        )
        return StepOutput(loss, parts, exits[-1], target)
