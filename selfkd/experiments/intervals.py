"""95% intervals for seed-paired accuracy differences that include test-sampling error.

A difference between two arms measured on one test set has two sources of error: the seeds (training
randomness, and the training subset where several are drawn) and the test images themselves (another
draw of 10,000 images would give other accuracies). A seed-only interval ignores the second one.

* :func:`paired_bootstrap`: the two-way bootstrap when every run's per-image correctness is known:
  resample the paired units (seed, subset) and, independently, the test images (one draw shared by every
  unit, since all units share the test set), and take the percentile interval of the mean difference.
* :func:`paired_interval`: the same question from per-run accuracies only (what older reports hold): a
  t-interval over the paired units, widened by a conservative test-sampling term
  ``(p_a(1 - p_a) + p_b(1 - p_b)) / N`` (the variance of a difference of two independent binomial
  accuracies; the real one is smaller, since two models' errors on the same images are positively
  correlated), combined in quadrature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (numpy has no t quantile)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    """Student's t 97.5% quantile (a 95% two-sided interval) for ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"need at least 2 paired units for an interval, got {df + 1}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    mean: float  # mean paired difference, points
    lo: float
    hi: float
    units: int  # paired units (seed x subset) the interval is over
    method: str  # "bootstrap" or "t+binomial"

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def text(self, digits: int = 2) -> str:
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = 2000, seed: int = 0,
                     chunk: int = 100) -> Interval:
    """``correct_a``, ``correct_b``: ``[units, N]`` booleans, row u the per-test-image correctness of arm A
    and arm B in paired unit u (same seed and training subset). Differences in accuracy points."""
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [units, images] arrays of one shape, got {a.shape} and {b.shape}")
    units, n_test = a.shape
    if units < 2:
        raise ValueError(f"need at least 2 paired units for an interval, got {units}")
    d = a.astype(np.float32) - b.astype(np.float32)
    # an image draw enters only through how often it picks each image: [k, N] counts @ d.T sums each unit's
    # differences exactly (integers below 2**24 in float32), the same numbers as d[:, images].mean(-1), 3x faster
    exact = np.dtype(np.float32 if n_test < 2 ** 24 else np.float64)
    dt = np.ascontiguousarray(d.T, dtype=exact)
    offsets = n_test * np.arange(chunk)[:, None]
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        images = rng.integers(0, n_test, size=(k, n_test))
        counts = np.bincount((images + offsets[:k]).ravel(), minlength=k * n_test).reshape(k, n_test)
        per_unit = (np.matmul(counts.astype(exact), dt).T / n_test).astype(np.float32)  # [units, k]
        pick = rng.integers(0, units, size=(k, units))
        stats[start:start + k] = per_unit[pick, np.arange(k)[:, None]].mean(1)
    lo, hi = np.percentile(stats * 100, [2.5, 97.5])
    return Interval(float(d.mean() * 100), float(lo), float(hi), units, "bootstrap")


def paired_interval(acc_a: list[float], acc_b: list[float], n_test: int) -> Interval:
    """From per-unit accuracies in % (``acc_a[u]`` pairs with ``acc_b[u]``) on an ``n_test``-image test set:
    ``mean ± sqrt((t·s/√n)² + (1.96·σ_test)²)`` with ``σ_test² = (p̄_a q̄_a + p̄_b q̄_b) / N``."""
    if len(acc_a) != len(acc_b):
        raise ValueError(f"unpaired: {len(acc_a)} vs {len(acc_b)} units")
    n = len(acc_a)
    diffs = [x - y for x, y in zip(acc_a, acc_b)]
    mean = sum(diffs) / max(n, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1)) if n > 1 else 0.0
    return interval_from_summary(mean, sd, n, sum(acc_a) / n, sum(acc_b) / n, n_test)


def interval_from_summary(mean: float, sd: float, n: int, acc_a: float, acc_b: float, n_test: int) -> Interval:
    """:func:`paired_interval` from a report's summary: the paired mean and standard deviation (points) over
    ``n`` units, and the two arms' mean accuracies (%)."""
    half_seed = t975(n - 1) * sd / math.sqrt(n)
    pa, pb = acc_a / 100, acc_b / 100
    sigma_test = math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n_test) * 100
    half = math.sqrt(half_seed ** 2 + (1.96 * sigma_test) ** 2)
    return Interval(mean, mean - half, mean + half, n, "t+binomial")
