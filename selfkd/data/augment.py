"""Batched, on-device augmentation: random crop with zero padding, horizontal flip, normalisation."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ._util import draw_device


def _floats(v: Any, what: str) -> tuple[float, ...]:
    """``v`` as floats: a sequence of numbers, or one number (a 0-d array too); any other value is a ConfigError."""
    try:
        out = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else list(v)))
    except TypeError:
        try:
            out = (float(v),)  # a single number: one channel
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: expected a sequence of numbers, got {v!r}") from None
    except ValueError:
        raise ConfigError(f"{what}: expected a sequence of numbers, got {v!r}") from None
    if not out:
        raise ConfigError(f"{what}: expected one number per channel, got an empty sequence")
    return out


class BatchAugment:
    """Augment a uint8 batch [B, C, H, W] on its own device, without a Python loop over samples.

    ``aug(x, generator)``: per sample, a random ``H x W`` window of the image zero-padded by
    ``crop_padding`` on every side (offsets uniform in ``[0, 2 * crop_padding]`` on each axis), then,
    when ``flip``, a horizontal flip with probability 0.5; then scaling to [0, 1] and normalising with
    ``mean``/``std`` (per channel, [0, 1] units). Padding is applied to the raw image, so padded
    pixels come out as ``-mean / std`` (as with torchvision's ``RandomCrop(padding=p)`` before
    ``Normalize``).

    Random numbers come only from ``generator``: one on ``x``'s device, or a CPU generator (the draws,
    3 * B numbers at most, are then moved to the device). Same generator state, same output.

    ``normalize(x)`` is the evaluation path: scaling and normalisation only.

    Both return float32; a channels_last input gives a channels_last output, anything else a
    contiguous (NCHW) one.
    """

    def __init__(self, crop_padding: int = 0, flip: bool = False,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> None:
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ConfigError(f"crop_padding: expected an integer >= 0, got {crop_padding!r}")
        if not isinstance(flip, bool):
            raise ConfigError(f"flip: expected true or false, got {flip!r}")
        self.crop_padding = crop_padding
        self.flip = flip
        self.mean = _floats(mean, "mean")
        self.std = _floats(std, "std")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"mean/std: one value per channel expected, got {len(self.mean)} means and {len(self.std)} stds")
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"std: every value must be > 0, got {self.std}")
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"BatchAugment(crop_padding={self.crop_padding}, flip={self.flip}, mean={self.mean}, std={self.std})"

    # -- helpers ----------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"BatchAugment: expected a uint8 tensor [B, C, H, W], got a {got}")
        if x.shape[1] != len(self.mean):
            raise DataError(f"BatchAugment: the batch has {x.shape[1]} channels but mean/std have {len(self.mean)}")

    def _scale_bias(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float64)
            std = torch.tensor(self.std, dtype=torch.float64)
            scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, -1, 1, 1).to(device)
            bias = (-mean / std).to(torch.float32).view(1, -1, 1, 1).to(device)
            self._affine[device] = (scale, bias)
        return self._affine[device]

    @staticmethod
    def _channels_last(x: torch.Tensor) -> bool:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

    # -- public -----------------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32 ``(x / 255 - mean) / std`` on x's device."""
        self._check(x)
        scale, bias = self._scale_bias(x.device)
        fmt = torch.channels_last if self._channels_last(x) else torch.contiguous_format
        return x.to(torch.float32, memory_format=fmt).mul_(scale).add_(bias)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self._check(x)
        p, flip = self.crop_padding, self.flip
        if p == 0 and not flip:
            return self.normalize(x)
        dev = x.device
        gdev = draw_device("BatchAugment", x, generator)
        b, c, h, w = x.shape
        rows = torch.arange(h, device=dev).expand(b, h)
        cols = torch.arange(w, device=dev).expand(b, w)
        src = x
        if p:
            oy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gdev).to(dev, non_blocking=True)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gdev).to(dev, non_blocking=True)
            src = F.pad(x, (p, p, p, p))  # zeros
            rows = rows + oy[:, None]
            cols = cols + ox[:, None]
        if flip:
            f = torch.randint(0, 2, (b,), generator=generator, device=gdev).to(dev, non_blocking=True).bool()
            cols = torch.where(f[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
        ci = torch.arange(c, device=dev).view(1, c, 1, 1)
        out = src[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # [B, C, H, W] uint8
        if self._channels_last(x):
            out = out.contiguous(memory_format=torch.channels_last)
        return self.normalize(out)
