"""How far a gross EC57 statistic could move on other subjects: a subject-level bootstrap.

A gross statistic sums confusion counts over patients, so one record can move it by points
(record 124 alone made about 400 false S calls in some runs here). Resampling *subjects*
with replacement, recomputing the statistic from the summed counts of each resample, and
taking percentiles gives an interval that says how much of a figure is owed to which subjects
happened to be in the set. Records of one subject (201 and 202) are drawn together.

Two runs on the same patients (two option sets, or transfer and no transfer) are compared on
the same resamples, so the interval of their difference is a paired one: it is far narrower
than the two intervals side by side when both runs err on the same records.

A paired difference can also rest on one subject: a gain in SVEB Se made of one record's runs of
tachycardia. :func:`paired_interval` therefore gives the difference with each subject left out in
turn, and names the subject whose absence brings it nearest to zero (or past it).

Counts are arrays whose last axis holds :data:`ecg_mlflow.metrics.EC57_COUNTS` in that order
(``veb_tp, veb_fn, veb_fp, veb_tn, sveb_tp, ...``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ecg_mlflow.metrics import EC57_COUNTS

# The four statistics the literature reports, and their smallest (how options are chosen here).
RATES: tuple[str, ...] = ("veb_se", "veb_ppv", "sveb_se", "sveb_ppv")
SMALLEST = "smallest"
STATISTICS: tuple[str, ...] = RATES + (SMALLEST,)
_COL = {k: i for i, k in enumerate(EC57_COUNTS)}


def subject_counts(subjects: Sequence[str], counts: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Per-patient counts ``(n_patients, 8)`` summed by subject.

    Returns the subjects (sorted) and their counts ``(n_subjects, 8)``, int64.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != len(EC57_COUNTS) or len(subjects) != counts.shape[0]:
        raise ValueError(f"counts must be (n_patients, {len(EC57_COUNTS)}) with one subject per row, "
                         f"got shape {counts.shape} for {len(subjects)} subjects")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    order = sorted(set(subjects))
    pos = {s: i for i, s in enumerate(order)}
    out = np.zeros((len(order), counts.shape[1]), dtype=np.int64)
    np.add.at(out, [pos[s] for s in subjects], counts.astype(np.int64))
    return order, out


def resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each of ``n`` subjects is drawn in each of ``n_boot`` resamples, int64 ``(n_boot, n)``
    (each row sums to ``n``). The draws are ``default_rng(seed).integers(0, n, (n_boot, n))``."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"need at least one subject and one resample, got n={n}, n_boot={n_boot}")
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (draws + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n)


def rates(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Se and +P of VEB and SVEB, and the smallest of the four, from counts ``(..., 8)``.

    Each value has the shape ``counts.shape[:-1]``; NaN where a denominator is zero (and
    ``smallest`` is NaN wherever one of the four is).
    """
    c = np.asarray(counts, dtype=np.float64)

    def ratio(num: str, other: str) -> np.ndarray:
        tp, den = c[..., _COL[num]], c[..., _COL[num]] + c[..., _COL[other]]
        return np.where(den > 0, tp / np.where(den > 0, den, 1), np.nan)  # never divides by zero

    out = {"veb_se": ratio("veb_tp", "veb_fn"), "veb_ppv": ratio("veb_tp", "veb_fp"),
           "sveb_se": ratio("sveb_tp", "sveb_fn"), "sveb_ppv": ratio("sveb_tp", "sveb_fp")}
    out[SMALLEST] = np.min(np.stack([out[k] for k in RATES]), axis=0)  # NaN propagates
    return out


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.nan, np.nan
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def gross_interval(counts: np.ndarray, weights: np.ndarray, level: float = 0.95,
                   resampled: np.ndarray | None = None) -> dict[str, tuple[float, float, float]]:
    """Per statistic of :data:`STATISTICS`: (gross value, CI low, CI high).

    counts: per subject ``(n_subjects, 8)``; weights: :func:`resample_weights` ``(n_boot, n_subjects)``.
    resampled: the summed counts of each resample ``(n_boot, 8)`` where they are not ``weights @
    counts`` (a procedure made again on each resample); default ``weights @ counts``.
    Resamples where a statistic is undefined (no V beat drawn, say) are left out of its interval.
    """
    counts = np.asarray(counts, dtype=np.int64)
    point = rates(counts.sum(axis=0))
    boot = rates(weights @ counts if resampled is None else resampled)
    return {k: (float(point[k]), *_percentiles(boot[k], level)) for k in STATISTICS}


def paired_interval(counts_a: np.ndarray, counts_b: np.ndarray, weights: np.ndarray,
                    level: float = 0.95, resampled_b: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """``b - a`` for each statistic of :data:`STATISTICS`, on the same subjects and resamples.

    counts_a, counts_b: ``(n_subjects, 8)``, row ``i`` of both the same subject; resampled_b: ``b``'s
    summed counts per resample where they are not ``weights @ counts_b`` (see :func:`gross_interval`). Per statistic:
    ``a``, ``b``, ``diff`` (b - a), ``ci_low``, ``ci_high`` of the difference, ``share_b_higher``,
    the share of resamples (where both are defined) in which ``b`` is higher, and ``without_one``,
    the difference with one subject left out: the subject (row ``without_one_at``) whose absence
    moves it furthest towards zero or past it (see :func:`without_one`).
    """
    a, b = np.asarray(counts_a, dtype=np.int64), np.asarray(counts_b, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"paired counts must have one shape (the same subjects), got {a.shape} and {b.shape}")
    pa, pb = rates(a.sum(axis=0)), rates(b.sum(axis=0))
    ba, bb = rates(weights @ a), rates(weights @ b if resampled_b is None else resampled_b)
    left_out = without_one(a, b)
    out = {}
    for k in STATISTICS:
        d = bb[k] - ba[k]
        ok = np.isfinite(d)
        lo, hi = _percentiles(d, level)
        out[k] = {"a": float(pa[k]), "b": float(pb[k]), "diff": float(pb[k] - pa[k]), "ci_low": lo, "ci_high": hi,
                  "share_b_higher": float((d[ok] > 0).mean()) if ok.any() else np.nan,
                  "without_one": left_out[k][0], "without_one_at": left_out[k][1]}
    return out


def without_one(counts_a: np.ndarray, counts_b: np.ndarray) -> dict[str, tuple[float, int]]:
    """How much of ``b - a`` one subject carries, per statistic of :data:`STATISTICS`.

    counts_a, counts_b: ``(n_subjects, 8)``, row ``i`` of both the same subject. The difference
    ``b - a`` of the gross statistic is taken again with each subject left out in turn (a
    jackknife); returned is the one nearest to zero, or furthest past it, on the side of the
    full difference, and the row of the subject left out: ``(difference, row)``. ``(NaN, -1)``
    where the full difference is zero or undefined, or no subject can be left out with both
    statistics still defined (a single subject, say).
    """
    a, b = np.asarray(counts_a, dtype=np.int64), np.asarray(counts_b, dtype=np.int64)
    full_a, full_b = rates(a.sum(axis=0)), rates(b.sum(axis=0))
    la, lb = rates(a.sum(axis=0) - a), rates(b.sum(axis=0) - b)  # row i: subject i left out
    out = {}
    for k in STATISTICS:
        side = np.sign(full_b[k] - full_a[k])
        d = lb[k] - la[k]
        if not np.isfinite(side) or side == 0 or not np.isfinite(d).any():
            out[k] = (np.nan, -1)
            continue
        i = int(np.nanargmin(side * d))
        out[k] = (float(d[i]), i)
    return out
