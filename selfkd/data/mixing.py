"""Batch mixing (mixup, CutMix) on normalised float batches, with what a loss needs to undo it.

    mixer = build_mixer("cutmix", alpha=1.0)
    x, mix = mixer(x, generator)                # x: float [B, C, H, W] after BatchAugment
    loss = cross_entropy(model(x), y, mix=mix)  # lam * CE(., y) + (1 - lam) * CE(., y[mix.index])
    x2_mixed = remix(x2, mix)                   # the very same mixing on another view of the same rows

(``cross_entropy`` is :func:`selfkd.methods.losses.cross_entropy`.)

Row ``i`` of a mixed batch is ``lam * x[i] + (1 - lam) * x[mix.index[i]]`` (mixup) or ``x[i]`` with
one box pasted from ``x[mix.index[i]]`` (CutMix; the same box for the whole batch, as the official
code, and ``lam`` = the fraction of ``x[i]`` actually kept, after clipping the box at the borders).

Random numbers come only from ``generator`` (on the batch's device or on the CPU), in this order:
``u = rand(1)`` only when ``prob < 1`` (no mixing when ``u >= prob``), then ``lam ~ Beta(alpha,
alpha)`` (:func:`sample_beta`), then ``index = randperm(B)``, then for CutMix the box centre
``cx = randint(W)``, ``cy = randint(H)``. ``lam`` and the box are read on the host (one sync).

Beta sampler: torch's ``Beta``/``Gamma`` distributions take no generator, so :func:`sample_beta`
draws ``Beta(a, b) = X / (X + Y)`` from two Gamma variates made with the Marsaglia-Tsang (2000)
squeeze/rejection method from generator-driven normals and uniforms (for shape < 1, the boost
``Gamma(k) = Gamma(k + 1) * U^(1/k)``), in float64 and in log space (``lam = sigmoid(log X - log Y)``),
so tiny ``alpha`` (U^(1/k) underflow) stays finite. The number of rejection rounds is random but
fixed by the generator state, so the draws are reproducible.

A :class:`Mix` records everything needed to apply the same mixing again (:func:`remix`): the kind, the
permutation, ``lam`` and, for CutMix, the box. A batch made of consecutive blocks, each mixed within
itself (DLB's repeated and new rows, CS-KD's anchors and partners), is a :class:`MixBlocks`;
:func:`mix_rows` gives either as a partner row and a weight per row. The losses and targets of mixed
rows (``cross_entropy(..., mix=)``, ``mix_targets``, ``mixed_log_probs``) are in
:mod:`selfkd.methods.losses`: the data layer mixes inputs, the methods define what a mixed row is taught.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from ._util import draw_device

__all__ = ["MIXERS", "Mix", "MixBlocks", "Mixer", "build_mixer", "cutmix", "mix_from_state", "mix_rows",
           "mix_state", "mixup", "remix", "sample_beta"]

Tensor = torch.Tensor


@dataclass
class Mix:
    """How a batch was mixed: row ``i`` keeps ``lam`` of sample ``i`` and ``1 - lam`` of sample
    ``index[i]``. ``index``: int64 permutation ``[B]`` on the batch's device; ``lam`` in [0, 1].

    ``kind``: ``"mixup"`` (``lam * x + (1 - lam) * x[index]``; the default, so a hand-built
    ``Mix(index, lam)`` is a mixup), ``"cutmix"`` (rows ``box = (y0, y1, x0, x1)`` of ``x[index]`` pasted
    into every row: ``x[:, :, y0:y1, x0:x1]``) or ``"none"`` (no mixing: identity index, ``lam = 1``).
    :func:`remix` applies the same mixing to another batch of the same rows.
    """

    index: Tensor
    lam: float
    kind: str = "mixup"
    box: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in MIXERS:
            raise ConfigError(f"Mix: kind must be one of {', '.join(MIXERS)} (got {self.kind!r})")
        if (self.kind == "cutmix") != (self.box is not None):
            raise ConfigError(f"Mix: a box (y0, y1, x0, x1) is needed for kind 'cutmix' and only for it "
                              f"(got kind={self.kind!r}, box={self.box!r})")
        if self.box is not None:
            box = tuple(int(v) for v in self.box)
            if len(box) != 4:
                raise ConfigError(f"Mix: box must be (y0, y1, x0, x1) (got {box!r})")
            self.box = box


@dataclass
class MixBlocks:
    """A batch of ``rows`` rows whose consecutive blocks are each mixed within themselves:
    ``blocks[k] = (start, mix)`` mixes rows ``start : start + len(mix.index)`` with ``mix`` (its
    ``index`` counts from the block's first row). Rows in no block are unmixed."""

    blocks: list[tuple[int, Mix]]
    rows: int

    def block(self, start: int) -> Mix:
        """The mix of the block that starts at row ``start``."""
        for s, m in self.blocks:
            if s == start:
                return m
        raise KeyError(f"MixBlocks: no block starts at row {start}")


# ==================================================================================================
# Beta sampler
# ==================================================================================================


def _log_gamma(shape: float, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``n`` draws of ``log Gamma(shape, 1)`` (float64), Marsaglia & Tsang 2000."""
    k = shape + 1.0 if shape < 1.0 else shape
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    pending = torch.arange(n, device=device)
    while pending.numel():
        m = pending.numel()
        z = torch.randn(m, generator=generator, device=device, dtype=torch.float64)
        u = 1.0 - torch.rand(m, generator=generator, device=device, dtype=torch.float64)  # (0, 1]
        v = (1.0 + c * z) ** 3
        logv = torch.log(v.clamp(min=1e-300))
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * logv)
        out[pending[ok]] = math.log(d) + logv[ok]
        pending = pending[~ok]
    if shape < 1.0:
        u = 1.0 - torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        out += torch.log(u) / shape
    return out


def sample_beta(a: float, b: float, generator: torch.Generator, n: int = 1,
                device: torch.device | str | None = None) -> Tensor:
    """``n`` draws of ``Beta(a, b)`` (float64, on ``device``, default the generator's) from ``generator``:
    ``sigmoid(log X - log Y)`` with ``X ~ Gamma(a)``, ``Y ~ Gamma(b)`` (all X draws first, then Y)."""
    for key, v in (("a", a), ("b", b)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"sample_beta: {key} must be a number > 0, got {v!r}")
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"sample_beta: expected a torch.Generator, got {type(generator).__name__}")
    dev = generator.device if device is None else torch.device(device)
    lx = _log_gamma(float(a), n, generator, dev)
    ly = _log_gamma(float(b), n, generator, dev)
    return torch.sigmoid(lx - ly)


# ==================================================================================================
# mixup / cutmix
# ==================================================================================================


def _check(who: str, x: Tensor, alpha: float, prob: float) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{who}: expected a float batch [B, ...], got a {got}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"alpha: expected a number > 0, got {alpha!r}")
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise ConfigError(f"prob: expected a number in [0, 1], got {prob!r}")


def _skip(x: Tensor, generator: torch.Generator, gdev: torch.device, prob: float) -> bool:
    if prob >= 1.0:
        return False
    return float(torch.rand(1, generator=generator, device=gdev).item()) >= prob


def _no_mix(x: Tensor) -> tuple[Tensor, Mix]:
    return x, Mix(index=torch.arange(x.shape[0], device=x.device), lam=1.0, kind="none")


def mixup(x: Tensor, generator: torch.Generator, alpha: float = 1.0, prob: float = 1.0) -> tuple[Tensor, Mix]:
    """mixup (Zhang et al., ICLR 2018): ``lam * x + (1 - lam) * x[index]``, ``lam ~ Beta(alpha, alpha)``,
    ``index`` a random permutation. With probability ``1 - prob`` the batch is returned unmixed
    (``lam = 1``, identity index)."""
    _check("mixup", x, alpha, prob)
    gdev = draw_device("mixup", x, generator)
    if _skip(x, generator, gdev, prob):
        return _no_mix(x)
    lam = float(sample_beta(alpha, alpha, generator, 1, gdev).item())
    index = torch.randperm(x.shape[0], generator=generator, device=gdev).to(x.device)
    mixed = x.mul(lam).add_(x.index_select(0, index), alpha=1.0 - lam)
    return mixed, Mix(index=index, lam=lam, kind="mixup")


def cutmix(x: Tensor, generator: torch.Generator, alpha: float = 1.0, prob: float = 1.0) -> tuple[Tensor, Mix]:
    """CutMix (Yun et al., ICCV 2019): a box of side ``int(H * sqrt(1 - lam))`` x ``int(W * sqrt(1 - lam))``
    (half-sides ``side // 2``, as the official code) centred at a uniform pixel, clipped at the
    borders, is pasted from ``x[index]`` into every row; ``lam ~ Beta(alpha, alpha)`` is then replaced
    by the kept area ``1 - box area / (H * W)``. ``x``: ``[B, C, H, W]``. With probability ``1 - prob``
    no mixing (the official CIFAR recipe uses ``prob = 0.5``)."""
    _check("cutmix", x, alpha, prob)
    if x.dim() != 4:
        raise DataError(f"cutmix: expected a float batch [B, C, H, W], got shape {tuple(x.shape)}")
    gdev = draw_device("cutmix", x, generator)
    if _skip(x, generator, gdev, prob):
        return _no_mix(x)
    h, w = x.shape[-2:]
    lam = float(sample_beta(alpha, alpha, generator, 1, gdev).item())
    index = torch.randperm(x.shape[0], generator=generator, device=gdev).to(x.device)
    rat = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(w * rat), int(h * rat)
    cx = int(torch.randint(0, w, (1,), generator=generator, device=gdev).item())
    cy = int(torch.randint(0, h, (1,), generator=generator, device=gdev).item())
    x0, x1 = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
    y0, y1 = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[index, :, y0:y1, x0:x1]
    kept = 1.0 - (x1 - x0) * (y1 - y0) / float(h * w)
    return mixed, Mix(index=index, lam=kept, kind="cutmix", box=(y0, y1, x0, x1))


def remix(x: Tensor, mix: Mix) -> Tensor:
    """Apply ``mix`` (same kind, permutation, ``lam`` and CutMix box) to ``x``, a batch of the same rows
    (e.g. a fresh augmentation of the same images). On the batch that made ``mix`` it reproduces the
    mixer's output exactly. ``kind="none"`` returns ``x`` itself, as the mixers do."""
    if not isinstance(mix, Mix):
        raise DataError(f"remix: expected a Mix, got {type(mix).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] != mix.index.shape[0]:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"remix: expected a float batch of {mix.index.shape[0]} rows, got a {got}")
    if mix.kind == "none":
        return x
    index = mix.index.to(x.device)
    if mix.kind == "mixup":
        return x.mul(mix.lam).add_(x.index_select(0, index), alpha=1.0 - mix.lam)
    if x.dim() != 4:
        raise DataError(f"remix: CutMix needs a float batch [B, C, H, W], got shape {tuple(x.shape)}")
    assert mix.box is not None  # kind "cutmix" has one (Mix.__post_init__)
    y0, y1, x0, x1 = mix.box
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[index, :, y0:y1, x0:x1]
    return mixed


def mix_state(mix: Mix) -> dict:
    """``mix`` as plain checkpoint-safe values (index on the CPU)."""
    state = {"kind": mix.kind, "lam": float(mix.lam), "index": mix.index.detach().to("cpu", torch.int64).clone()}
    if mix.box is not None:
        state["box"] = list(mix.box)
    return state


def mix_from_state(state: dict) -> Mix:
    """The inverse of :func:`mix_state`."""
    box = state.get("box")
    return Mix(index=state["index"].to(torch.int64), lam=float(state["lam"]), kind=str(state["kind"]),
               box=None if box is None else tuple(box))  # Mix makes them ints and checks there are 4


# ==================================================================================================
# per-row view (what the losses in selfkd.methods.losses read)
# ==================================================================================================


def mix_rows(mix: Mix | MixBlocks, rows: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Per row ``i``: the partner row ``index[i]`` (int64, counted over the whole batch) and the weight
    ``lam[i]`` (float32) that row ``i``'s own sample keeps; ``rows`` is the batch size (checked)."""
    if isinstance(mix, Mix):
        if mix.index.shape[0] != rows:
            raise DataError(f"mix: the Mix covers {mix.index.shape[0]} rows but the batch has {rows}")
        index = mix.index.to(device) if device is not None else mix.index
        return index, torch.full((rows,), float(mix.lam), dtype=torch.float32, device=index.device)
    if not isinstance(mix, MixBlocks):
        raise DataError(f"mix: expected a Mix or MixBlocks, got {type(mix).__name__}")
    if mix.rows != rows:
        raise DataError(f"mix: the MixBlocks cover {mix.rows} rows but the batch has {rows}")
    dev = device if device is not None else (mix.blocks[0][1].index.device if mix.blocks else "cpu")
    index = torch.arange(rows, device=dev)
    lam = torch.ones(rows, dtype=torch.float32, device=dev)
    for start, m in mix.blocks:
        n = m.index.shape[0]
        if start < 0 or start + n > rows:
            raise DataError(f"mix: a block of {n} rows at row {start} does not fit a batch of {rows}")
        index[start:start + n] = m.index.to(dev) + start
        lam[start:start + n] = float(m.lam)
    return index, lam


# ==================================================================================================
# builder
# ==================================================================================================

MIXERS = ("none", "mixup", "cutmix")
_FUNCS = {"mixup": mixup, "cutmix": cutmix}


class Mixer:
    """``mixer(x, generator) -> (x_mixed, Mix)``; ``"none"`` returns ``x`` with ``lam = 1``, no draws."""

    def __init__(self, name: str, alpha: float = 1.0, prob: float = 1.0) -> None:
        if name not in MIXERS:
            raise ConfigError(f"mixer: unknown name {name!r}; known: {', '.join(MIXERS)}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"alpha: expected a number > 0, got {alpha!r}")
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            raise ConfigError(f"prob: expected a number in [0, 1], got {prob!r}")
        self.name, self.alpha, self.prob = name, float(alpha), float(prob)

    def __call__(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Mix]:
        if self.name == "none":
            return _no_mix(x)
        return _FUNCS[self.name](x, generator, alpha=self.alpha, prob=self.prob)

    def __repr__(self) -> str:
        return f"Mixer(name={self.name!r}, alpha={self.alpha}, prob={self.prob})"


def build_mixer(name: str, alpha: float = 1.0, prob: float = 1.0) -> Mixer:
    """A :class:`Mixer` for ``name`` in ``none``, ``mixup``, ``cutmix``; ConfigError otherwise."""
    return Mixer(name, alpha, prob)
