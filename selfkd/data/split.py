"""Fixed, class-stratified draws of indices: subsets and train/test splits, from their own seed."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError


def _by_class(labels: torch.Tensor, seed: int) -> dict[int, list[int]]:
    """Indices per class, each list in one seeded random order (classes in label order)."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    out: dict[int, list[int]] = {}
    for i in perm.tolist():
        out.setdefault(int(labels[i]), []).append(i)
    return dict(sorted(out.items()))


def stratified_subset(labels: torch.Tensor, n: int, seed: int, key: str = "data.subset",
                      split: str = "training", unit: str = "images") -> torch.Tensor:
    """A fixed, class-balanced subset of ``n`` indices (round-robin over classes in a seeded order),
    sorted."""
    if n > len(labels):
        raise ConfigError(f"{key}={n} exceeds the {len(labels)} {split} {unit}")
    by_class = _by_class(labels, seed)
    # rank of each index within its class: take the lowest ranks first, classes interleaved
    ranked = sorted(((r, c, i) for c, idx in by_class.items() for r, i in enumerate(idx)))
    return torch.tensor(sorted(i for _, _, i in ranked[:n]), dtype=torch.int64)


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices), both sorted: per class, ``round(test_fraction · n_c)`` samples
    (at least 1, at most ``n_c − 1``) drawn in a seeded order go to test, the rest to train, so each
    class keeps its share on both sides. The draw depends only on ``labels`` and ``seed``."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction={test_fraction}: expected a number between 0 and 1")
    train: list[int] = []
    test: list[int] = []
    for c, idx in _by_class(labels, seed).items():
        if len(idx) < 2:
            raise ConfigError(f"class {c} has {len(idx)} sample: a stratified train/test split needs at least 2 per class")
        k = min(max(int(round(test_fraction * len(idx))), 1), len(idx) - 1)
        test += idx[:k]
        train += idx[k:]
    return torch.tensor(sorted(train), dtype=torch.int64), torch.tensor(sorted(test), dtype=torch.int64)


def _approximate_mode(counts: np.ndarray, n: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws summing to ``n``: floor of each class's share, then one more for the largest
    remainders, ties broken by ``rng`` (scikit-learn's ``_approximate_mode``, the same calls on ``rng``)."""
    share = counts / counts.sum() * n
    out = np.floor(share)
    need = int(n - out.sum())
    if need > 0:
        rest = share - out
        for value in np.sort(np.unique(rest))[::-1]:
            (tied,) = np.where(rest == value)
            take = min(len(tied), need)
            out[rng.choice(tied, size=take, replace=False)] += 1
            need -= take
            if need == 0:
                break
    return out.astype(int)


def sklearn_split(labels: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices exactly as ``sklearn.model_selection.train_test_split(range(n),
    test_size=test_size, stratify=labels, random_state=seed)`` returns them, in its shuffled order,
    without importing scikit-learn (a second and a half of every CLI process's start, for a fixed split).
    tests/test_data.py checks it against scikit-learn itself."""
    n = len(labels)
    n_test = math.ceil(test_size * n)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_tr = _approximate_mode(counts, n - n_test, rng)
    n_te = _approximate_mode(counts - n_tr, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, idx in enumerate(by_class):
        drawn = idx[rng.permutation(counts[i])]
        train.extend(drawn[:n_tr[i]])
        test.extend(drawn[n_tr[i]:n_tr[i] + n_te[i]])
    return rng.permutation(train), rng.permutation(test)
