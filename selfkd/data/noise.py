"""Synthetic label noise, exact and reproducible.

Kinds (``rate`` in [0, 1); counts are exact, ``round(rate * n)`` with Python's ``round``):

- ``none``: labels unchanged.
- ``symmetric``: ``round(rate * N)`` samples, chosen uniformly, get a label drawn uniformly from the
  *other* ``K - 1`` classes (so every chosen label really changes).
- ``asymmetric``: class-conditional flips, ``round(rate * n_c)`` samples of each source class ``c``.
  When ``classes`` are CIFAR-10's names (any order) the standard mapping of Patrini et al. (2017) is
  used: truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog (other classes untouched).
  For any other data set (or ``classes=None``) the documented rule is ``c -> (c + 1) mod K`` for every
  class, i.e. the same as ``pairflip``.
- ``pairflip``: ``c -> (c + 1) mod K``, for ``round(rate * n_c)`` samples of every class ``c``.

Randomness comes only from a private ``torch.Generator`` seeded with ``seed`` (never the global RNG).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError, DataError, integer

NOISE_KINDS = ("none", "symmetric", "asymmetric", "pairflip")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_ASYMMETRIC = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}


def _flip_fraction(noisy: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor | int, rate: float,
                   g: torch.Generator) -> None:
    """Set ``round(rate * len(idx))`` randomly chosen entries of ``noisy[idx]`` to ``targets``."""
    k = round(rate * idx.numel())
    if k == 0:
        return
    chosen = idx[torch.randperm(idx.numel(), generator=g)[:k]]
    noisy[chosen] = targets if isinstance(targets, int) else targets[chosen]


def apply_label_noise(labels: torch.Tensor, num_classes: int, kind: str, rate: float, seed: int,
                      classes: Sequence[str] | None = None) -> torch.Tensor:
    """A noisy copy of ``labels`` (same dtype and device; the input is never modified)."""
    if kind not in NOISE_KINDS:
        raise ConfigError(f"noise.kind: unknown kind {kind!r}; expected one of: {', '.join(NOISE_KINDS)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
        raise ConfigError(f"noise.rate: expected a number in [0, 1), got {rate!r}")
    num_classes = integer(num_classes, "num_classes", 1)
    seed = integer(seed, "noise.seed")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point \
            or labels.dtype.is_complex or labels.dtype == torch.bool:
        got = (f"{labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise DataError(f"labels: expected a 1-D integer tensor, got a {got}")
    y = labels.detach().to("cpu", torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f"labels: label {bad} out of range [0, {num_classes})")
    rate = float(rate)
    noisy = y.clone()
    if kind == "none" or rate == 0.0 or y.numel() == 0:
        return noisy.to(labels.device, labels.dtype)
    if num_classes < 2:
        raise ConfigError(f"noise.kind={kind}: needs at least 2 classes, got {num_classes}")
    g = torch.Generator().manual_seed(seed)

    if kind == "symmetric":
        n = y.numel()
        k = round(rate * n)
        chosen = torch.randperm(n, generator=g)[:k]
        shift = torch.randint(1, num_classes, (k,), generator=g)  # uniform over the other K-1 classes
        noisy[chosen] = (y[chosen] + shift) % num_classes
        return noisy.to(labels.device, labels.dtype)

    if kind == "asymmetric" and classes is not None and len(classes) == num_classes \
            and sorted(str(c) for c in classes) == sorted(CIFAR10_CLASSES):
        pos = {str(c): i for i, c in enumerate(classes)}
        mapping = {pos[s]: pos[t] for s, t in CIFAR10_ASYMMETRIC.items()}
    else:  # pairflip, and asymmetric for data sets other than CIFAR-10
        mapping = {c: (c + 1) % num_classes for c in range(num_classes)}
    for src in sorted(mapping):
        idx = torch.nonzero(y == src).flatten()
        _flip_fraction(noisy, idx, mapping[src], rate, g)
    return noisy.to(labels.device, labels.dtype)
