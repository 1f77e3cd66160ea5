"""The subject-level bootstrap of gross EC57 statistics (`ecg_mlflow.uncertainty`), against a
plain re-implementation: draw subjects, sum their counts, compute the statistic with `metrics`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ecg_mlflow import uncertainty as U
from ecg_mlflow.metrics import EC57_COUNTS, ec57_stats


def random_counts(n: int, seed: int) -> np.ndarray:
    """Per-subject counts ``(n, 8)``; subject 0 has no V beats and calls none (VEB undefined for it)."""
    rng = np.random.default_rng(seed)
    c = np.stack([rng.integers(0, 60, n), rng.integers(0, 15, n), rng.integers(0, 20, n), rng.integers(500, 2000, n),
                  rng.integers(0, 40, n), rng.integers(0, 25, n), rng.integers(0, 60, n), rng.integers(500, 2000, n)],
                 axis=1)
    c[0, :3] = 0
    return c


def slow_stat(counts: np.ndarray, stat: str) -> float:
    """The statistic of the summed counts through `metrics.ec57_stats` (NaN when undefined)."""
    s = ec57_stats(dict(zip(EC57_COUNTS, counts.sum(axis=0).tolist())))
    if stat == U.SMALLEST:
        return min(s.get(k, math.nan) for k in U.RATES)
    return s.get(stat, math.nan)


def test_rates_are_ec57_stats_and_undefined_is_nan():
    c = random_counts(12, 0)
    got = U.rates(c)
    for i in range(len(c)):
        for k in U.STATISTICS:
            want = slow_stat(c[i:i + 1], k)
            assert (math.isnan(want) and math.isnan(got[k][i])) or got[k][i] == pytest.approx(want), (i, k)
    assert math.isnan(got["veb_se"][0]) and math.isnan(got[U.SMALLEST][0])
    assert U.rates(c.sum(axis=0))["sveb_ppv"].shape == ()


def test_subject_counts_sum_the_records_of_one_subject():
    counts = np.arange(24).reshape(3, 8)
    subjects, by_subject = U.subject_counts(["201", "100", "201"], counts)
    assert subjects == ["100", "201"]
    np.testing.assert_array_equal(by_subject, [counts[1], counts[0] + counts[2]])
    with pytest.raises(ValueError, match=r"\(n_patients, 8\)"):
        U.subject_counts(["100"], np.zeros((1, 7)))
    with pytest.raises(ValueError, match="non-negative"):
        U.subject_counts(["100"], -np.ones((1, 8)))


def test_resample_weights_are_the_documented_draws():
    w = U.resample_weights(5, 300, seed=4)
    draws = np.random.default_rng(4).integers(0, 5, (300, 5))
    np.testing.assert_array_equal(w, [np.bincount(row, minlength=5) for row in draws])
    assert (w.sum(axis=1) == 5).all()
    assert not np.array_equal(w, U.resample_weights(5, 300, seed=5))
    with pytest.raises(ValueError, match="at least one subject"):
        U.resample_weights(0, 10, 0)


def test_gross_interval_matches_a_plain_bootstrap():
    c = random_counts(20, 1)
    w = U.resample_weights(len(c), 2000, seed=0)
    got = U.gross_interval(c, w)
    draws = np.random.default_rng(0).integers(0, len(c), (2000, len(c)))
    for k in U.STATISTICS:
        values = np.array([slow_stat(c[d], k) for d in draws])
        values = values[np.isfinite(values)]
        point, lo, hi = got[k]
        assert point == pytest.approx(slow_stat(c, k))
        assert (lo, hi) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))
        assert lo <= point <= hi and hi - lo > 0.005  # twenty subjects leave a real interval


def test_one_subject_decides_the_width():
    # Nineteen subjects alike and one with many false S calls: +P's interval is wide, Se's narrow.
    c = np.tile([50, 2, 1, 1000, 30, 3, 3, 1000], (20, 1))
    calm = U.gross_interval(c, U.resample_weights(20, 2000, 0))
    c[7, 6] = 600
    loud = U.gross_interval(c, U.resample_weights(20, 2000, 0))
    width = {k: v[2] - v[1] for k, v in loud.items()}
    assert calm["sveb_ppv"][1] == calm["sveb_ppv"][2] == pytest.approx(30 / 33)  # every resample alike
    assert width["sveb_ppv"] > 0.15 and width["sveb_se"] == 0
    assert loud[U.SMALLEST][0] == pytest.approx(600 / (600 + 19 * 3 + 600))  # SVEB +P, the smallest


def test_paired_interval():
    a = random_counts(20, 2)
    w = U.resample_weights(len(a), 2000, seed=0)
    same = U.paired_interval(a, a, w)
    for k in U.STATISTICS:
        assert same[k]["diff"] == same[k]["ci_low"] == same[k]["ci_high"] == 0 and same[k]["share_b_higher"] == 0
    # b finds the same beats and makes 10 more false S calls in every subject: +P lower in every resample.
    b = a.copy()
    b[:, 6] += 10
    worse = U.paired_interval(a, b, w)["sveb_ppv"]
    assert worse["ci_high"] < 0 and worse["share_b_higher"] == 0
    assert worse["diff"] == pytest.approx(slow_stat(b, "sveb_ppv") - slow_stat(a, "sveb_ppv"))
    assert U.paired_interval(a, b, w)["veb_se"]["diff"] == 0
    # The paired interval of a difference against the plain recipe.
    b = random_counts(20, 3)
    got = U.paired_interval(a, b, w)
    draws = np.random.default_rng(0).integers(0, len(a), (2000, len(a)))
    for k in U.STATISTICS:
        d = np.array([slow_stat(b[x], k) - slow_stat(a[x], k) for x in draws])
        ok = np.isfinite(d)
        assert (got[k]["ci_low"], got[k]["ci_high"]) == pytest.approx(tuple(np.percentile(d[ok], [2.5, 97.5])))
        assert got[k]["share_b_higher"] == pytest.approx((d[ok] > 0).mean())
        assert got[k]["a"] == pytest.approx(slow_stat(a, k)) and got[k]["b"] == pytest.approx(slow_stat(b, k))
    with pytest.raises(ValueError, match="same subjects"):
        U.paired_interval(a, b[:5], w)
