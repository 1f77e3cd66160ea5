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


def test_without_one_names_the_subject_a_difference_rests_on():
    a = np.tile([50, 2, 1, 1000, 30, 100, 3, 1000], (20, 1))
    # b finds 90 more of subject 7's S beats and nothing else changes: all of the gain is 7's.
    b = a.copy()
    b[7, 4:6] = [120, 10]
    got = U.without_one(a, b)
    assert got["sveb_se"] == (0.0, 7)
    assert math.isnan(got["veb_se"][0]) and got["veb_se"][1] == -1  # no difference: nobody to name
    assert U.paired_interval(a, b, U.resample_weights(20, 50, 0))["sveb_se"]["without_one_at"] == 7
    # The same 90 beats spread over the twenty subjects: leaving any one out keeps most of the gain.
    spread = a.copy()
    spread[:, 4] += 4
    spread[:, 5] -= 4
    spread[:10, 4] += 1
    spread[:10, 5] -= 1
    diff = slow_stat(spread, "sveb_se") - slow_stat(a, "sveb_se")
    kept, row = U.without_one(a, spread)["sveb_se"]
    assert 0.9 * diff < kept < diff and row < 10  # one of the subjects that gained most
    # A loss: the leave-one-out difference nearest to zero is the largest one.
    loss, row = U.without_one(b, a)["sveb_se"]
    assert (loss, row) == (0.0, 7)
    # Against the plain recipe on random counts: every subject left out in turn, through metrics.
    a, b = random_counts(12, 5), random_counts(12, 6)
    got = U.without_one(a, b)
    for k in U.STATISTICS:
        side = np.sign(slow_stat(b, k) - slow_stat(a, k))
        d = np.array([slow_stat(np.delete(b, i, 0), k) - slow_stat(np.delete(a, i, 0), k) for i in range(12)])
        i = int(np.nanargmin(side * d))
        assert got[k] == (pytest.approx(d[i]), i), k
    # One subject: nothing is left when it is left out.
    assert all(v[1] == -1 and math.isnan(v[0]) for v in U.without_one(a[:1], b[:1]).values())
