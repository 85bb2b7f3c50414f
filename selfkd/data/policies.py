"""Batched image policies on uint8 batches: Cutout, AutoAugment, RandAugment, TrivialAugment.

Every policy is called as ``policy(x, generator)`` with ``x`` a uint8 tensor ``[B, C, H, W]``
(C = 1 or 3) on any device, and returns a uint8 tensor of the same shape on the same device. It
runs before :class:`selfkd.data.BatchAugment` (crop, flip, normalisation), on raw pixel values.

Random numbers come only from ``generator``: one on ``x``'s device, or a CPU generator (the few
per-sample draws are then moved to the device). The number of draws per call depends only on the
batch shape, never on the pixel values, so the same generator state gives the same output.

Vectorisation: per sample, a policy draws an operation (and its magnitude and sign); the operations
are then applied kind by kind, each to the subset of the batch that drew it (``index_select`` /
``index_copy_``), so Python loops run over the 15 operation kinds, never over samples. Grouping
costs one host synchronisation per operation slot (a ``bincount``).

The operations follow torchvision's tensor implementations (``torchvision.transforms.autoaugment``,
v0.13+), rewritten with plain torch ops; torchvision is not needed. ``OPS[name](x, m, fill)`` applies
one operation to a uint8 batch with a per-sample magnitude ``m`` (float tensor ``[B]``):

- ShearX / ShearY (m = shear factor): output(x, y) = input(x + m*y, y) / input(x, y + m*x), with
  coordinates measured from the image's top-left corner (the PIL convention of the official
  AutoAugment code; torchvision passes ``center=[0, 0]`` for the same reason).
- TranslateX / TranslateY (m = pixels, truncated toward zero as torchvision's ``int(m)``): the content
  moves by m pixels (positive: right / down).
- Rotate (m = degrees): counter-clockwise about the image centre (rotate(90) == ``torch.rot90``).
  The five affine ops build one 2x3 matrix per sample and use ``F.affine_grid`` + ``F.grid_sample``
  (nearest, ``align_corners=False``); pixels that come from outside the image take ``fill``.
- Brightness / Color / Contrast / Sharpness (factor f = 1 + m): a blend ``f*img + (1-f)*other``
  (computed as ``img + m*(img - other)``), clamped to [0, 255] and truncated to uint8 (torchvision's
  ``_blend``), with ``other`` = black / the
  grayscale image (0.2989 R + 0.587 G + 0.114 B, truncated; Color is the identity for C = 1) / the
  mean of the grayscale image / the 3x3 smoothed image (kernel [[1,1,1],[1,5,1],[1,1,1]]/13, rounded,
  the one-pixel border left as is).
- Posterize (m = bits kept): ``x & (0xFF << (8 - bits))``.
- Solarize (m = threshold): ``255 - x`` where ``x >= m``.
- AutoContrast: per sample and channel, ``floor((x - lo) * 255 / (hi - lo))`` (exact integer
  arithmetic; torchvision's float32 version can be one lower on a few values); constant channels
  are left as they are.
- Equalize: per sample and channel, PIL's histogram equalisation (as torchvision's tensor version):
  ``step = (N - count of the last non-empty bin) // 255``, ``lut[i] = (cumhist[i-1] + step // 2) //
  step``; ``step == 0`` leaves the channel as it is. Vectorised with ``scatter_add_`` on a
  ``[B*C, 256]`` histogram.
- Invert: ``255 - x``. Identity: ``x``.

Magnitude ranges (level ``i`` of ``n`` bins, ``i / (n - 1)`` of the maximum, signed ops get a random
sign per sample), as torchvision's:

- AutoAugment (n = 10) and RandAugment (n = 31): shear 0.3, translate 150/331 of the width (X) /
  height (Y), rotate 30 degrees, enhancement ops 0.9, posterize ``8 - round(i / ((n-1)/4))`` bits,
  solarize ``255 * (1 - i/(n-1))``.
- TrivialAugment (TrivialAugmentWide, n = 31): shear 0.99, translate 32 pixels (absolute, as
  torchvision's), rotate 135 degrees, enhancement ops 0.99, posterize ``8 - round(i / ((n-1)/6))``
  bits, solarize as above.

Fill: affine ops fill with 0 (torchvision's default ``fill=None``); the official AutoAugment code
and the DeepVoltaire port use 128 (gray): pass ``fill=128`` (or one value per channel) to get it.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ._util import draw_device

__all__ = [
    "AutoAugment", "Cutout", "OPS", "OP_NAMES", "POLICIES", "AUTOAUGMENT_POLICIES", "Policy",
    "RandAugment", "TrivialAugment", "build_policy",
]

Tensor = torch.Tensor

# ==================================================================================================
# helpers
# ==================================================================================================


def _check_batch(who: str, x: Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{who}: expected a uint8 tensor [B, C, H, W], got a {got}")
    if x.shape[1] not in (1, 3):
        raise DataError(f"{who}: expected 1 or 3 channels, got {x.shape[1]}")


def _channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _fill_values(fill, key: str = "fill") -> tuple[int, ...]:
    vals = list(fill) if isinstance(fill, (list, tuple)) else [fill]
    if not vals or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in vals):
        raise ConfigError(f"{key}: expected an integer in [0, 255] or one per channel, got {fill!r}")
    return tuple(vals)


def _fill_tensor(who: str, fill: tuple[int, ...], x: Tensor) -> Tensor:
    c = x.shape[1]
    if len(fill) not in (1, c):
        raise DataError(f"{who}: fill has {len(fill)} values but the batch has {c} channels")
    return torch.tensor(fill, dtype=torch.float32, device=x.device).view(1, -1, 1, 1).expand(1, c, 1, 1)


def _int_param(v, key: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}: expected an integer {rng}, got {v!r}")
    return v


def _to_u8(xf: Tensor) -> Tensor:
    """float -> uint8 as torchvision: clamp to [0, 255], truncate."""
    return xf.clamp_(0.0, 255.0).to(torch.uint8)


def _col(m: Tensor) -> Tensor:
    return m.to(torch.float32).view(-1, 1, 1, 1)


# ==================================================================================================
# operations: op(x uint8 [n, C, H, W], m float [n], fill float [1, C, 1, 1]) -> uint8 [n, C, H, W]
# ==================================================================================================


def _affine(x: Tensor, a: Tensor, b: Tensor, fill: Tensor) -> Tensor:
    """Sample ``x`` at ``a @ p + b`` for each output pixel centre ``p`` (pixel units, origin at the
    top-left corner of the image, pixel (i, j) centred at (j + 0.5, i + 0.5)); nearest neighbour;
    outside the image: ``fill``. ``a``: [n, 2, 2], ``b``: [n, 2] (float64, (x, y) order)."""
    n, c, h, w = x.shape
    d = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64, device=x.device)
    # normalised coordinates (align_corners=False): p = D (u + 1), D = diag(w/2, h/2)
    lin = a * d.view(1, 1, 2) / d.view(1, 2, 1)
    trans = ((a @ d.view(1, 2, 1)).squeeze(-1) + b) / d - 1.0
    theta = torch.cat([lin, trans.unsqueeze(-1)], dim=2).to(torch.float32)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    xf = x.to(torch.float32) - fill
    out = F.grid_sample(xf, grid, mode="nearest", padding_mode="zeros", align_corners=False) + fill
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _eye(m: Tensor) -> Tensor:
    return torch.eye(2, dtype=torch.float64, device=m.device).repeat(m.shape[0], 1, 1)


def op_shear_x(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    a = _eye(m)
    a[:, 0, 1] = m.to(torch.float64)
    return _affine(x, a, torch.zeros(m.shape[0], 2, dtype=torch.float64, device=x.device), fill)


def op_shear_y(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    a = _eye(m)
    a[:, 1, 0] = m.to(torch.float64)
    return _affine(x, a, torch.zeros(m.shape[0], 2, dtype=torch.float64, device=x.device), fill)


def op_translate_x(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    b = torch.zeros(m.shape[0], 2, dtype=torch.float64, device=x.device)
    b[:, 0] = -m.to(torch.float64).trunc()
    return _affine(x, _eye(m), b, fill)


def op_translate_y(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    b = torch.zeros(m.shape[0], 2, dtype=torch.float64, device=x.device)
    b[:, 1] = -m.to(torch.float64).trunc()
    return _affine(x, _eye(m), b, fill)


def op_rotate(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    """Counter-clockwise by ``m`` degrees about the image centre."""
    h, w = x.shape[-2:]
    t = torch.deg2rad(m.to(torch.float64))
    cos, sin = torch.cos(t), torch.sin(t)
    # on screen (y down) a counter-clockwise rotation maps d -> [[c, s], [-s, c]] d; sample the inverse
    a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
    c = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64, device=x.device)
    b = c - (a @ c.view(1, 2, 1)).squeeze(-1)
    return _affine(x, a, b, fill)


def _gray(x: Tensor) -> Tensor:
    """uint8 [n, 3, H, W] -> float [n, 1, H, W] holding torchvision's truncated uint8 grayscale."""
    xf = x.to(torch.float32)
    g = 0.2989 * xf[:, 0:1] + 0.587 * xf[:, 1:2] + 0.114 * xf[:, 2:3]
    return g.to(torch.uint8).to(torch.float32)


def _blend(x: Tensor, other: Tensor, m: Tensor) -> Tensor:
    """``f * x + (1 - f) * other`` with ``f = 1 + m``, written ``x + m * (x - other)`` so that pixels
    where ``other == x`` (the border in Sharpness) stay exact."""
    xf = x.to(torch.float32)
    return _to_u8(xf + _col(m) * (xf - other))


def op_brightness(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    return _blend(x, torch.zeros((), device=x.device), m)


def op_color(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return _blend(x, _gray(x), m)


def op_contrast(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    g = _gray(x) if x.shape[1] == 3 else x.to(torch.float32)
    return _blend(x, g.mean(dim=(-3, -2, -1), keepdim=True), m)


_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))


def op_sharpness(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    n, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    k = torch.tensor(_SMOOTH, dtype=torch.float32, device=x.device).view(1, 1, 3, 3)
    xf = x.to(torch.float32)
    inner = F.conv2d(xf.reshape(n * c, 1, h, w), k).div_(13.0).round_().view(n, c, h - 2, w - 2)
    degenerate = xf.clone()
    degenerate[:, :, 1:-1, 1:-1] = inner
    return _blend(x, degenerate, m)


def op_posterize(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    bits = m.to(torch.int64).clamp(0, 8)
    mask = torch.bitwise_left_shift(torch.full_like(bits, 255), 8 - bits).bitwise_and_(255)
    mask = mask.to(torch.uint8).view(-1, 1, 1, 1)
    return x & mask


def op_solarize(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    return torch.where(x.to(torch.float32) >= _col(m), 255 - x, x)


def op_autocontrast(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    xi = x.to(torch.int32)
    lo = xi.amin(dim=(-2, -1), keepdim=True)
    hi = xi.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    flat = span == 0
    out = torch.div((xi - lo) * 255, span.clamp(min=1), rounding_mode="floor")
    return torch.where(flat, xi, out).clamp_(0, 255).to(torch.uint8)


def op_equalize(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).to(torch.int64)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    last = hist.gather(1, flat.amax(dim=1, keepdim=True))       # count of the last non-empty bin
    step = torch.div(h * w - last, 255, rounding_mode="floor")  # [n*c, 1]
    safe = step.clamp(min=1)
    lut = torch.div(hist.cumsum(1) + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = F.pad(lut, (1, 0))[:, :-1].clamp_(0, 255)
    out = torch.where(step == 0, flat, lut.gather(1, flat))
    return out.to(torch.uint8).view(n, c, h, w)


def op_invert(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    return 255 - x


def op_identity(x: Tensor, m: Tensor, fill: Tensor) -> Tensor:
    return x


OPS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "Identity": op_identity, "ShearX": op_shear_x, "ShearY": op_shear_y,
    "TranslateX": op_translate_x, "TranslateY": op_translate_y, "Rotate": op_rotate,
    "Brightness": op_brightness, "Color": op_color, "Contrast": op_contrast, "Sharpness": op_sharpness,
    "Posterize": op_posterize, "Solarize": op_solarize, "AutoContrast": op_autocontrast,
    "Equalize": op_equalize, "Invert": op_invert,
}
OP_NAMES: tuple[str, ...] = tuple(OPS)
_OP_ID = {name: i for i, name in enumerate(OP_NAMES)}
_IDENTITY = _OP_ID["Identity"]
_SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                     "Brightness", "Color", "Contrast", "Sharpness"})
# RandAugment / TrivialAugment draw among the first 14 ops (no Invert), as torchvision's.
_RA_OPS = OP_NAMES[:14]


def _levels(op: str, num_bins: int, h: int, w: int, wide: bool) -> list[float]:
    """The ``num_bins`` magnitudes of ``op`` (unsigned), torchvision's ranges."""
    n = num_bins
    frac = [i / (n - 1) for i in range(n)]
    if op in ("ShearX", "ShearY"):
        top = 0.99 if wide else 0.3
    elif op == "TranslateX":
        top = 32.0 if wide else 150.0 / 331.0 * w
    elif op == "TranslateY":
        top = 32.0 if wide else 150.0 / 331.0 * h
    elif op == "Rotate":
        top = 135.0 if wide else 30.0
    elif op in ("Brightness", "Color", "Contrast", "Sharpness"):
        top = 0.99 if wide else 0.9
    elif op == "Posterize":
        div = (n - 1) / (6 if wide else 4)
        return [float(8 - round(i / div)) for i in range(n)]
    elif op == "Solarize":
        return [255.0 * (1.0 - f) for f in frac]
    else:
        return [0.0] * n
    return [top * f for f in frac]


# ==================================================================================================
# policies
# ==================================================================================================


class Policy:
    """Base class: ``policy(x uint8 [B, C, H, W], generator) -> uint8 [B, C, H, W]``."""

    name = "policy"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in inspect.signature(type(self).__init__).parameters
                         if k != "self")
        return f"{type(self).__name__}({args})"


class _OpPolicy(Policy):
    """Shared machinery: per-sample op ids and magnitudes, applied op kind by op kind."""

    wide = False
    num_magnitude_bins = 10

    def __init__(self, fill) -> None:
        self.fill = fill if isinstance(fill, int) else list(_fill_values(fill))
        self._fill = _fill_values(fill)
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _table(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """levels [num_ops, num_bins] (float32) and signed [num_ops] (bool) on ``device``."""
        key = (h, w, device)
        if key not in self._tables:
            lv = [_levels(op, self.num_magnitude_bins, h, w, self.wide) for op in OP_NAMES]
            signed = [op in _SIGNED for op in OP_NAMES]
            self._tables[key] = (torch.tensor(lv, dtype=torch.float32, device=device),
                                 torch.tensor(signed, dtype=torch.bool, device=device))
        return self._tables[key]

    def _magnitudes(self, x: Tensor, op: Tensor, level: Tensor, negative: Tensor) -> Tensor:
        levels, signed = self._table(x.shape[-2], x.shape[-1], x.device)
        m = levels[op, level]
        return torch.where(signed[op] & negative, -m, m)

    def _apply(self, x: Tensor, op: Tensor, m: Tensor) -> Tensor:
        """Apply op ``op[i]`` with magnitude ``m[i]`` to sample ``i``, grouped by op kind."""
        fill = _fill_tensor(type(self).__name__, self._fill, x)
        counts = torch.bincount(op, minlength=len(OP_NAMES)).tolist()  # one host sync
        order = torch.argsort(op, stable=True)
        out = x
        start = 0
        for k, cnt in enumerate(counts):
            if cnt and k != _IDENTITY:
                idx = order[start:start + cnt]
                res = OPS[OP_NAMES[k]](x.index_select(0, idx), m.index_select(0, idx), fill)
                if out is x:
                    out = x.clone()
                out.index_copy_(0, idx, res)
            start += cnt
        return out

    def _slots(self, x: Tensor, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        """Per slot: op ids [B] (int64) and signed magnitudes [B] (float32), on x's device."""
        raise NotImplementedError

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        who = type(self).__name__
        _check_batch(who, x)
        cl = _channels_last(x)
        x = x.contiguous()
        for op, m in self._slots(x, generator):
            x = self._apply(x, op, m)
        return x.contiguous(memory_format=torch.channels_last) if cl else x


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator, gdev: torch.device,
             dev: torch.device) -> Tensor:
    return torch.randint(0, high, shape, generator=generator, device=gdev).to(dev, non_blocking=True)


# --- AutoAugment tables: (op, probability, magnitude level of 10 or None), torchvision's copy of ----
# --- the policies of Cubuk et al. 2019 (appendix tables) ------------------------------------------

_AA_CIFAR10 = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

_AA_SVHN = (
    (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
    (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
    (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
    (("Invert", 0.9, None), ("Equalize", 0.6, None)),
    (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
    (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
    (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
    (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
    (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
    (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
    (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
    (("Invert", 0.9, None), ("Equalize", 0.6, None)),
    (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
    (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
    (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
    (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
    (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
    (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
    (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
    (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
    (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
    (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
    (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
)

AUTOAUGMENT_POLICIES = {"cifar10": _AA_CIFAR10, "svhn": _AA_SVHN}


class AutoAugment(_OpPolicy):
    """AutoAugment (Cubuk et al., CVPR 2019, "AutoAugment: Learning Augmentation Strategies from Data").

    Per sample: one of the sub-policies uniformly at random; each of its two ops runs, in order, with
    its probability, at its magnitude level (of 10 bins; ranges in the module docstring), with a random
    sign for signed ops. Tables: ``"cifar10"`` (default, the 25 CIFAR-10 sub-policies) and ``"svhn"``,
    as listed by torchvision; ``policy`` may also be an explicit sequence of sub-policies
    ``((op, p, level or None), ...)``.

    Draws (fixed count per call): sub-policy ``randint(n, [B])``, then ``rand([B, S])`` (op applied when
    ``u < p``), then signs ``randint(2, [B, S])`` (1 = negative), S = ops per sub-policy.
    Fill of the affine ops: ``fill`` (default 0, torchvision's; 128 = the official code's gray).
    """

    name = "autoaugment"
    num_magnitude_bins = 10

    def __init__(self, policy="cifar10", fill=0) -> None:
        super().__init__(fill)
        if isinstance(policy, str):
            if policy not in AUTOAUGMENT_POLICIES:
                known = ", ".join(AUTOAUGMENT_POLICIES)
                raise ConfigError(f"policy: unknown AutoAugment policy {policy!r}; known: {known}")
            table = AUTOAUGMENT_POLICIES[policy]
        else:
            table = policy
        self.policy = policy
        self.subpolicies = self._parse(table)
        s = len(self.subpolicies[0])
        self._op = torch.tensor([[_OP_ID[o] for o, _, _ in sp] for sp in self.subpolicies], dtype=torch.int64)
        self._p = torch.tensor([[p for _, p, _ in sp] for sp in self.subpolicies], dtype=torch.float32)
        self._lv = torch.tensor([[0 if lv is None else lv for _, _, lv in sp] for sp in self.subpolicies],
                                dtype=torch.int64)
        self._slots_per = s
        self._dev: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    @staticmethod
    def _parse(table) -> tuple:
        bad = ConfigError(f"policy: expected a policy name or a non-empty sequence of sub-policies "
                          f"((op, probability, level 0-9 or None), ...) of equal length, got {table!r}")
        try:
            subs = tuple(tuple((str(o), float(p), None if lv is None else int(lv)) for o, p, lv in sp) for sp in table)
        except (TypeError, ValueError):
            raise bad from None
        if not subs or not subs[0] or any(len(sp) != len(subs[0]) for sp in subs):
            raise bad
        for sp in subs:
            for o, p, lv in sp:
                if o not in OPS:
                    raise ConfigError(f"policy: unknown op {o!r}; known: {', '.join(OP_NAMES)}")
                if not 0.0 <= p <= 1.0 or (lv is not None and not 0 <= lv < 10):
                    raise bad
        return subs

    def _slots(self, x: Tensor, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        dev, b, s = x.device, x.shape[0], self._slots_per
        gdev = draw_device(type(self).__name__, x, generator)
        sub = _randint(len(self.subpolicies), (b,), generator, gdev, dev)
        u = torch.rand((b, s), generator=generator, device=gdev).to(dev, non_blocking=True)
        neg = _randint(2, (b, s), generator, gdev, dev).bool()
        if dev not in self._dev:
            self._dev[dev] = (self._op.to(dev), self._p.to(dev), self._lv.to(dev))
        op_t, p_t, lv_t = self._dev[dev]
        out = []
        for j in range(s):
            op = op_t[sub, j]
            op = torch.where(u[:, j] < p_t[sub, j], op, torch.full_like(op, _IDENTITY))
            out.append((op, self._magnitudes(x, op, lv_t[sub, j], neg[:, j])))
        return out

    def __repr__(self) -> str:
        return f"AutoAugment(policy={self.policy!r}, fill={self.fill!r})"


class RandAugment(_OpPolicy):
    """RandAugment (Cubuk et al., CVPR-W 2020, "RandAugment: Practical automated data augmentation
    with a reduced search space"), torchvision's version.

    Per sample, ``num_ops`` times in sequence: one of the 14 ops (Identity, ShearX, ShearY,
    TranslateX, TranslateY, Rotate, Brightness, Color, Contrast, Sharpness, Posterize, Solarize,
    AutoContrast, Equalize) uniformly at random, at magnitude level ``magnitude`` of
    ``num_magnitude_bins`` (default 9 of 31, i.e. 30% of each range: rotate 9 degrees, shear 0.09,
    translate 4 px on 32x32, enhancement factor 1 +- 0.27, posterize 7 bits, solarize 178.5), with a
    random sign for signed ops. Draws: ops ``randint(14, [B, num_ops])``, then signs
    ``randint(2, [B, num_ops])``. Fill of the affine ops: ``fill`` (default 0).
    """

    name = "randaugment"

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, fill=0) -> None:
        super().__init__(fill)
        self.num_ops = _int_param(num_ops, "num_ops", 0)
        self.num_magnitude_bins = _int_param(num_magnitude_bins, "num_magnitude_bins", 2)
        self.magnitude = _int_param(magnitude, "magnitude", 0, self.num_magnitude_bins - 1)

    def _slots(self, x: Tensor, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        dev, b, k = x.device, x.shape[0], self.num_ops
        gdev = draw_device(type(self).__name__, x, generator)
        op = _randint(len(_RA_OPS), (b, k), generator, gdev, dev)
        neg = _randint(2, (b, k), generator, gdev, dev).bool()
        level = torch.full((b,), self.magnitude, dtype=torch.int64, device=dev)
        return [(op[:, j], self._magnitudes(x, op[:, j], level, neg[:, j])) for j in range(k)]


class TrivialAugment(_OpPolicy):
    """TrivialAugment (Müller & Hutter, ICCV 2021, "TrivialAugment: Tuning-free Yet State-of-the-Art
    Data Augmentation"), the "Wide" variant (torchvision's ``TrivialAugmentWide``).

    Per sample: one of the 14 RandAugment ops uniformly at random, at a uniformly random level of
    ``num_magnitude_bins`` (31) over the wide ranges (shear 0.99, translate 32 px, rotate 135 degrees,
    enhancement 0.99, posterize 8..2 bits, solarize 255..0), with a random sign for signed ops.
    Draws: op ``randint(14, [B])``, level ``randint(bins, [B])``, sign ``randint(2, [B])``.
    Fill of the affine ops: ``fill`` (default 0).
    """

    name = "trivialaugment"
    wide = True

    def __init__(self, num_magnitude_bins: int = 31, fill=0) -> None:
        super().__init__(fill)
        self.num_magnitude_bins = _int_param(num_magnitude_bins, "num_magnitude_bins", 2)

    def _slots(self, x: Tensor, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        dev, b = x.device, x.shape[0]
        gdev = draw_device(type(self).__name__, x, generator)
        op = _randint(len(_RA_OPS), (b,), generator, gdev, dev)
        level = _randint(self.num_magnitude_bins, (b,), generator, gdev, dev)
        neg = _randint(2, (b,), generator, gdev, dev).bool()
        return [(op, self._magnitudes(x, op, level, neg))]


class Cutout(Policy):
    """Cutout (DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks with
    Cutout"): per sample, one ``size x size`` square at a uniformly random centre ``(cy, cx)`` in
    ``[0, H) x [0, W)`` is filled, clipped at the borders (so near a border less than size² pixels
    change). Rows ``[cy - size//2, cy - size//2 + size)`` (same for columns): for even sizes exactly
    the official code's box, for odd sizes a full ``size``-wide one (the official code's is size-1).

    Fill: ``fill`` (default 0 = black, per channel allowed). The official code multiplies the
    *normalised* image by the mask, i.e. fills with the data set's mean pixel: to reproduce it pass
    ``fill=[round(255 * m) for m in mean]``. Draws: ``cy = randint(H, [B])`` then ``cx = randint(W, [B])``.
    Applied to every sample (the official code has no probability).
    """

    name = "cutout"

    def __init__(self, size: int = 16, fill=0) -> None:
        self.size = _int_param(size, "size", 1)
        self.fill = fill if isinstance(fill, int) else list(_fill_values(fill))
        self._fill = _fill_values(fill)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_batch("Cutout", x)
        dev = x.device
        b, c, h, w = x.shape
        gdev = draw_device("Cutout", x, generator)
        cy = _randint(h, (b,), generator, gdev, dev)
        cx = _randint(w, (b,), generator, gdev, dev)
        y0, x0 = cy - self.size // 2, cx - self.size // 2
        rows = torch.arange(h, device=dev).view(1, h)
        cols = torch.arange(w, device=dev).view(1, w)
        in_r = (rows >= y0[:, None]) & (rows < (y0 + self.size)[:, None])  # [B, H]
        in_c = (cols >= x0[:, None]) & (cols < (x0 + self.size)[:, None])  # [B, W]
        mask = (in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1)           # [B, 1, H, W]
        fill = _fill_tensor("Cutout", self._fill, x).to(torch.uint8)
        return torch.where(mask, fill, x)


POLICIES: dict[str, type[Policy]] = {
    "cutout": Cutout, "autoaugment": AutoAugment, "randaugment": RandAugment, "trivialaugment": TrivialAugment,
}


def build_policy(name: str, **kwargs) -> Policy:
    """``POLICIES[name](**kwargs)``; unknown names or options raise :class:`ConfigError` (one line)."""
    if name not in POLICIES:
        raise ConfigError(f"augment policy: unknown name {name!r}; known: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    known = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    for k in kwargs:
        if k not in known:
            raise ConfigError(f"{name}: unknown option {k!r}; known: {', '.join(known)}")
    return cls(**kwargs)
