"""Intervals for paired accuracy differences: hand-computed values, the bootstrap's limits and errors."""
import math

import numpy as np
import pytest

from selfkd.experiments.intervals import paired_bootstrap, paired_interval, t975


def test_t_plus_binomial_interval_by_hand():
    iv = paired_interval([50.0, 52.0, 54.0], [49.0, 50.0, 51.0], n_test=1000)
    # diffs 1, 2, 3: mean 2, sd 1; seed half-width t(2) * 1 / sqrt(3); test term 1.96 * sqrt((.52*.48 + .5*.5)/1000)
    half = math.hypot(4.303 / math.sqrt(3), 1.96 * math.sqrt((0.52 * 0.48 + 0.25) / 1000) * 100)
    assert iv.mean == pytest.approx(2.0) and iv.units == 3
    assert (iv.lo, iv.hi) == pytest.approx((2 - half, 2 + half), abs=1e-9)
    assert not iv.excludes_zero() and iv.text() == f"+2.00 [{2 - half:+.2f}, {2 + half:+.2f}]"


def test_a_larger_test_set_only_shrinks_the_test_term():
    small = paired_interval([60.0, 61.0], [58.0, 59.5], n_test=500)
    large = paired_interval([60.0, 61.0], [58.0, 59.5], n_test=10_000_000)
    seed_only = t975(1) * np.std([2.0, 1.5], ddof=1) / math.sqrt(2)
    assert large.hi - large.mean == pytest.approx(seed_only, rel=1e-3) and small.hi - small.mean > seed_only


def test_bootstrap_of_identical_and_of_opposite_arms():
    rng = np.random.default_rng(0)
    a = rng.random((4, 300)) < 0.6
    same = paired_bootstrap(a, a, resamples=200)
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)
    full = paired_bootstrap(np.ones((3, 50), bool), np.zeros((3, 50), bool), resamples=50)
    assert (full.mean, full.lo, full.hi) == (100.0, 100.0, 100.0)


def test_bootstrap_is_the_two_way_resample_it_names():
    # the definition, written out: per draw, resample the test images (with replacement), take each unit's mean
    # difference on them, resample the units, average; the function's counting shortcut gives the same numbers
    rng = np.random.default_rng(3)
    a, b = rng.random((5, 700)) < 0.6, rng.random((5, 700)) < 0.55
    d = a.astype(np.float32) - b.astype(np.float32)
    draws, stats = np.random.default_rng(4), []
    for start in range(0, 250, 100):
        k = min(100, 250 - start)
        images = draws.integers(0, 700, size=(k, 700))
        per_unit = np.stack([[d[u, images[j]].mean() for j in range(k)] for u in range(5)])
        pick = draws.integers(0, 5, size=(k, 5))
        stats += [per_unit[pick[j], j].mean() for j in range(k)]
    lo, hi = np.percentile(np.array(stats, dtype=np.float64) * 100, [2.5, 97.5])
    iv = paired_bootstrap(a, b, resamples=250, seed=4)
    assert (iv.lo, iv.hi) == pytest.approx((lo, hi), abs=1e-9) and iv.mean == pytest.approx(d.mean() * 100)


def test_bootstrap_width_covers_the_known_sampling_error():
    # independent arms with p = 0.6 on every image and no seed effect: the mean difference over 10 units x
    # 2,000 images has sd sqrt(2 * .24 / 20,000); the two-way bootstrap counts the image and the unit draw
    # (conservative for this crossed design), so its 95% width lies between 1x and 2x the normal one
    rng = np.random.default_rng(1)
    a, b = rng.random((10, 2000)) < 0.6, rng.random((10, 2000)) < 0.6
    iv = paired_bootstrap(a, b, resamples=1000, seed=2)
    normal = 2 * 1.96 * math.sqrt(2 * 0.24 / 20_000) * 100
    assert normal <= iv.hi - iv.lo <= 2 * normal and iv.lo < iv.mean < iv.hi


def test_bad_shapes_and_too_few_units_are_errors():
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap(np.ones((2, 3), bool), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="at least 2 paired units"):
        paired_bootstrap(np.ones((1, 3), bool), np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="at least 2 paired units"):
        paired_interval([1.0], [2.0], 100)
    with pytest.raises(ValueError, match="unpaired"):
        paired_interval([1.0, 2.0], [2.0], 100)
