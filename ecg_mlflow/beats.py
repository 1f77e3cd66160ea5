"""One sample per reference beat annotation: a window around the R peak plus rhythm context.

Rules (those of the AAMI EC57 reference scorer):

- only beat annotations are beats (:data:`ecg_mlflow.labels.BEAT_SYMBOLS`); rhythm, noise
  and other markers (``+ ~ | " x`` ...) are not;
- ``!`` (ventricular flutter wave) and every annotation inside a ``[ ... ]`` flutter episode
  are excluded;
- a beat whose window leaves the record is dropped and counted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ecg_mlflow.labels import BEAT_SYMBOLS
from ecg_mlflow.records import Record

RR_LOCAL_BEATS = 10  # local mean RR over this many preceding intervals
RECENT_BEATS = 20  # a beat is compared with the median of this many beats before it
# recent_reference="ontime": only beats whose previous RR is at least this share of the five-minute
# average RR serve as reference (the "premature" cut of de Chazal et al.'s features is alike).
ONTIME_SHARE = 0.9
# What a recent_cnn beat is read against (BeatDataset.recent_template): all of the beats before it,
# or only those of them that came on time.
RECENT_REFERENCES: tuple[str, ...] = ("all", "ontime")
RR_AVERAGE_BEATS = 300  # average RR over about five minutes (de Chazal et al. 2004 take ±5 min; ours looks back only)
RR_IRREGULAR_BEATS = 16  # rhythm irregularity over the successive RR differences of about the last 12 s
RR_SEQUENCE_BEATS = 8  # rr_features="sequence": the previous RR of a beat and of the 7 beats before it
FIBRILLATION_LAGS = (1, 2, 3)  # rr_features=lagged: changes over these lags; bigeminy and trigeminy repeat at 2 and 3
# sveb_af: the atrial activity before a beat is read from the part of the window 0.25 s to 0.05 s before
# the R peak (the P wave in sinus rhythm, f or F waves in atrial fibrillation or flutter), every second
# sample, averaged over this many beats before it; a detector learns the reference rhythms below from it.
ATRIAL_BEATS = 4
ATRIAL_SPAN_S = (0.25, 0.05)
ATRIAL_RHYTHMS: tuple[str, ...] = ("AFIB", "AFL")
# Below this irregularity (rr_irregularity) the rhythm before a beat counts as regular: sinus rhythm
# reads about 0.01-0.05 there, atrial fibrillation 0.15-0.3 (early_sveb, models.promote_early).
REGULAR_IRREGULARITY = 0.05


@dataclass
class RecordBeats:
    """Beats of one record.

    x: float32, shape ``(n, window, 2)``, mV.  sample: int64 ``(n,)``.  symbol: object ``(n,)``.
    rr_prev, rr_next, rr_local: float32 ``(n,)`` seconds (NaN where there is no neighbour).
    rhythm: object ``(n,)``, the reference rhythm in force at each beat (:func:`rhythm_at`).
    dropped: counts of beats not kept, by reason: ``'edge'`` (window leaves the record),
    ``'flutter'`` (``!`` flutter waves and beats inside ``[ ... ]``).
    """

    record: str
    x: np.ndarray
    sample: np.ndarray
    symbol: np.ndarray
    rr_prev: np.ndarray
    rr_next: np.ndarray
    rr_local: np.ndarray
    rhythm: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)


def flutter_mask(symbols: np.ndarray) -> np.ndarray:
    """True for annotations EC57 leaves out: ``!`` and everything from ``[`` to the next ``]``."""
    out = np.zeros(len(symbols), dtype=bool)
    inside = False
    for i, s in enumerate(symbols.tolist()):
        if s == "[":
            inside = True
        out[i] = inside or s == "!"
        if s == "]":
            inside = False
    return out


def rhythm_at(ann_sample: np.ndarray, ann_symbol: np.ndarray, ann_aux: np.ndarray,
              sample: np.ndarray) -> np.ndarray:
    """The reference rhythm in force at each of the beats at ``sample`` ``(n,)``: the ``aux_note``
    of the last rhythm annotation (symbol ``+``) at or before the beat, without its ``(`` and
    trailing NULs (``'N'``, ``'AFIB'``, ``'AFL'``, ``'SVTA'`` ...); ``''`` before the first one.
    ``ann_sample``, ``ann_symbol``, ``ann_aux``: ``(n_ann,)``, sorted by sample. Returns object ``(n,)``."""
    if not len(ann_sample) == len(ann_symbol) == len(ann_aux):
        raise ValueError(f"ann_sample, ann_symbol and ann_aux differ in length: "
                         f"{len(ann_sample)}, {len(ann_symbol)}, {len(ann_aux)}")
    changes = np.flatnonzero(np.asarray(ann_symbol, dtype=object) == "+")
    names = np.array([""] + [str(ann_aux[i]).replace("\x00", "").strip().lstrip("(") for i in changes], dtype=object)
    # Position of each beat among the changes: 0 = before the first, k = after the k-th.
    at = np.searchsorted(np.asarray(ann_sample)[changes], np.asarray(sample), side="right")
    return names[at]


def rr_intervals(sample: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Previous, next and local-mean RR interval (s) for beats at ``sample`` (sorted), each ``(n,)``.

    ``rr_prev[i]`` is the interval ending at beat ``i``, ``rr_next[i]`` the one starting there,
    ``rr_local[i]`` the mean of the (up to) ``RR_LOCAL_BEATS`` intervals ending at beat ``i``
    (so it never looks ahead); NaN where a beat has no such neighbour.
    """
    if len(sample) == 0:
        empty = np.zeros(0, dtype=np.float32)
        return empty, empty.copy(), empty.copy()
    rr = np.diff(sample).astype(np.float64) / fs
    nan = np.array([np.nan])
    rr_prev = np.concatenate([nan, rr])
    rr_next = np.concatenate([rr, nan])
    # Causal mean of the last RR_LOCAL_BEATS intervals (fewer at the start of the record).
    csum = np.concatenate([[0.0], np.cumsum(rr)])
    k = np.arange(len(rr))  # interval k ends at beat k + 1
    lo = np.maximum(0, k + 1 - RR_LOCAL_BEATS)
    local = (csum[k + 1] - csum[lo]) / (k + 1 - lo)
    rr_local = np.concatenate([nan, local])
    return rr_prev.astype(np.float32), rr_next.astype(np.float32), rr_local.astype(np.float32)


def _rows_by_record(record: np.ndarray, sample: np.ndarray, values: np.ndarray, name: str, beats: int):
    """Each record's rows in time order (one ``(k,)`` index array per record), after checking that
    ``record``, ``sample`` and ``values`` (called ``name`` in messages) match in length and that
    ``beats`` is a whole number >= 1."""
    if not len(record) == len(sample) == len(values):
        raise ValueError(f"record, sample and {name} differ in length: {len(record)}, {len(sample)}, {len(values)}")
    if isinstance(beats, bool) or not isinstance(beats, (int, np.integer)) or beats < 1:
        raise ValueError(f"beats must be a whole number >= 1, got {beats!r}")
    for r in np.unique(record):
        rows = np.flatnonzero(record == r)
        yield rows[np.argsort(sample[rows], kind="stable")]


def rr_average(record: np.ndarray, sample: np.ndarray, rr_prev: np.ndarray,
               beats: int = RR_AVERAGE_BEATS) -> np.ndarray:
    """Mean of the (up to) ``beats`` intervals ending at each beat and the beats before it in the
    same record (s), float64 ``(n,)``. ``record``, ``sample``, ``rr_prev``: ``(n,)`` per beat, rows
    in any order; NaN intervals are skipped, and NaN is returned where a beat has none. It never
    looks ahead, nor into another record."""
    out = np.full(len(record), np.nan)
    for rows in _rows_by_record(record, sample, rr_prev, "rr_prev", beats):
        v = rr_prev[rows].astype(np.float64)
        ok = np.isfinite(v)
        total = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
        count = np.concatenate([[0], np.cumsum(ok)])
        k = np.arange(len(rows))
        lo = np.maximum(0, k + 1 - beats)
        n = count[k + 1] - count[lo]
        out[rows] = np.where(n > 0, (total[k + 1] - total[lo]) / np.maximum(n, 1), np.nan)
    return out


def rr_median(record: np.ndarray, sample: np.ndarray, rr_prev: np.ndarray,
              beats: int = RR_AVERAGE_BEATS) -> np.ndarray:
    """Median of the (up to) ``beats`` intervals ending at each beat and the beats before it in the
    same record (s), float64 ``(n,)``: :func:`rr_average` with the median for the mean. Runs of
    tachycardia that fill less than half of the five minutes do not pull it down, so the rate
    before a run stays the reference of a record with many runs (209). ``record``, ``sample``,
    ``rr_prev``: ``(n,)`` per beat, rows in any order; NaN intervals are skipped, and NaN is
    returned where a beat has none. It never looks ahead, nor into another record."""
    out = np.full(len(record), np.nan)
    for rows in _rows_by_record(record, sample, rr_prev, "rr_prev", beats):
        # pandas' rolling median keeps a sorted window: about 30x faster than a median per window.
        out[rows] = pd.Series(rr_prev[rows], dtype=np.float64).rolling(beats, min_periods=1).median().to_numpy()
    return out


def rr_irregularity(record: np.ndarray, sample: np.ndarray, rr_prev: np.ndarray,
                    beats: int = RR_IRREGULAR_BEATS, lags: tuple[int, ...] = (1,)) -> np.ndarray:
    """How irregular the rhythm is just before each beat, float64 ``(n,)``: the median of the
    ``beats`` absolute successive differences of the RR intervals before the beat's own previous
    RR (``|RR_j - RR_j-1|`` for the intervals ending at the ``beats`` beats before it), over the
    mean of those intervals. About 0.01-0.05 in sinus rhythm (an isolated ectopic beat moves a
    median of 16 differences little), 0.15-0.3 in atrial fibrillation, where a short RR is
    ordinary and no sign of a premature beat. The beat's own interval is left out, so its own
    prematurity never counts. ``record``, ``sample``, ``rr_prev``: ``(n,)`` per beat, rows in any
    order; NaN intervals are skipped, NaN is returned where no difference is defined. It never
    looks ahead, nor into another record.

    ``lags`` other than ``(1,)`` compare each interval with the one ``lag`` intervals before it
    (``|RR_j - RR_j-lag|``) and take the smallest median over the lags. With ``(1, 2, 3)``
    (:data:`FIBRILLATION_LAGS`) bigeminy and trigeminy, whose intervals repeat every second or
    third beat, read as regular as sinus rhythm; atrial fibrillation, which repeats at no lag,
    still reads irregular."""
    if isinstance(lags, (str, bytes)) or not lags or any(
            isinstance(lag, bool) or not isinstance(lag, (int, np.integer)) or lag < 1 for lag in lags):
        raise ValueError(f"lags must be whole numbers >= 1, at least one, got {lags!r}")
    out = np.full(len(record), np.nan)
    windows = np.lib.stride_tricks.sliding_window_view
    for rows in _rows_by_record(record, sample, rr_prev, "rr_prev", beats):
        v = rr_prev[rows].astype(np.float64)
        # Beat i reads the intervals v[i - beats - 1 .. i - 1] (NaN-padded) and, per lag, the changes
        # d[i - beats .. i - 1], d[j] = |v[j] - v[j - lag]|.
        intervals = windows(np.concatenate([np.full(beats + 1, np.nan), v[:-1]]), beats + 1)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows at a record's start
            medians = []
            for lag in lags:
                d = np.abs(v - np.concatenate([np.full(lag, np.nan), v])[:len(v)])
                diffs = windows(np.concatenate([np.full(beats, np.nan), d[:-1]]), beats)
                medians.append(np.nanmedian(diffs, axis=1))
            out[rows] = np.nanmin(np.stack(medians), axis=0) / np.nanmean(intervals, axis=1)
    return out


def rr_sequence(record: np.ndarray, sample: np.ndarray, rr_prev: np.ndarray,
                beats: int = RR_SEQUENCE_BEATS) -> np.ndarray:
    """The last ``beats`` RR intervals up to each beat, newest first, float64 ``(n, beats)``: column
    ``j`` is the interval ending ``j`` beats before the beat (column 0 its own previous RR). One
    early beat reads as one short interval after steady ones, a run of supraventricular tachycardia
    as several short ones, atrial fibrillation as scattered ones. ``record``, ``sample``,
    ``rr_prev``: ``(n,)`` per beat, rows in any order; NaN where a record has no such interval. It
    never looks ahead, nor into another record."""
    by_record = list(_rows_by_record(record, sample, rr_prev, "rr_prev", beats))  # checks the inputs first
    out = np.full((len(record), beats), np.nan)
    for rows in by_record:
        v = np.concatenate([np.full(beats - 1, np.nan), rr_prev[rows].astype(np.float64)])
        out[rows] = np.lib.stride_tricks.sliding_window_view(v, beats)[:, ::-1]
    return out


def recent_median(record: np.ndarray, sample: np.ndarray, x: np.ndarray, beats: int = RECENT_BEATS,
                  chunk: int = 512, reference: np.ndarray | None = None) -> np.ndarray:
    """Sample-wise median of the windows of the (up to) ``beats`` reference beats before each beat in
    the same record, float32 ``(n, window, leads)``; ``x``: ``(n, window, leads)``,
    ``record``/``sample``: ``(n,)``, rows in any order. ``reference``: bool ``(n,)``, the beats that
    may serve as reference (None: every beat). Labels are not read (a test beat's neighbours have
    none), so ectopic neighbours count too unless ``reference`` leaves them out; the median keeps a
    few of them from moving it. A beat with no reference beat before it gets its own window. It
    never looks ahead, nor into another record."""
    if reference is None:
        reference = np.ones(len(record), dtype=bool)
    reference = np.asarray(reference)
    if reference.dtype != bool or reference.shape != (len(record),):
        raise ValueError(f"reference must be a bool array of shape ({len(record)},), "
                         f"got {reference.dtype} {reference.shape}")
    out = np.empty(x.shape, dtype=np.float32)
    for rows in _rows_by_record(record, sample, x, "x", beats):
        xr = x[rows]
        ref = np.flatnonzero(reference[rows])
        medians = _preceding_medians(xr[ref], beats, chunk)  # medians[k]: of reference beats k - beats .. k - 1
        # Beat i reads the reference beats before it: as many as there are among rows 0 .. i - 1.
        before = np.searchsorted(ref, np.arange(len(rows)), side="left")
        has = before > 0
        out[rows[~has]] = xr[~has]
        out[rows[has]] = medians[before[has]]
    return out


def _preceding_medians(xs: np.ndarray, beats: int, chunk: int) -> np.ndarray:
    """``(k + 1, window, leads)``: row ``j`` >= 1 is the sample-wise median of ``xs[max(0, j - beats):j]``
    (``xs``: ``(k, window, leads)``); row 0, which has no beat before it, is zeros."""
    out = np.zeros((len(xs) + 1,) + xs.shape[1:], dtype=np.float32)
    for j in range(1, min(beats, len(xs)) + 1):  # fewer than `beats` before these
        out[j] = np.median(xs[:j], axis=0)
    # Row j (j > beats) reads xs[j - beats .. j - 1]: window m of the view starts at xs[m].
    for j0 in range(beats + 1, len(xs) + 1, chunk):
        j1 = min(len(xs) + 1, j0 + chunk)
        view = np.lib.stride_tricks.sliding_window_view(xs[j0 - beats:j1 - 1], beats, axis=0)
        out[j0:j1] = np.median(view, axis=-1)
    return out


def atrial_span(r_peak: int, fs: float) -> slice:
    """The samples of a beat window that :func:`atrial_activity` reads: from ``ATRIAL_SPAN_S[0]``
    to ``ATRIAL_SPAN_S[1]`` seconds before the R peak at index ``r_peak``, every second sample;
    at least the window's first sample when the R peak sits closer to the start than that."""
    start = max(0, r_peak - round(ATRIAL_SPAN_S[0] * fs))
    stop = max(start + 1, r_peak - round(ATRIAL_SPAN_S[1] * fs))
    return slice(start, stop, 2)


def atrial_activity(record: np.ndarray, sample: np.ndarray, x: np.ndarray, r_peak: int, fs: float,
                    beats: int = ATRIAL_BEATS) -> np.ndarray:
    """What the atria did before each beat, float32 ``(n, k + 1)``: columns ``0 .. k - 1`` the
    mean, over the (up to) ``beats`` beats before it in the same record, of the first lead's
    :func:`atrial_span` of their windows (``k`` samples); column ``k`` how much those beats differ
    there (the standard deviation across them, averaged over the span). In sinus rhythm the same P
    wave comes before every beat: a clear mean, a small spread. In atrial fibrillation the f waves
    fall anywhere, in flutter the F waves cover the whole span. The beat's own window is left out,
    so a premature beat's own P wave never counts. ``x``: ``(n, window, leads)``,
    ``record``/``sample``: ``(n,)``, rows in any order. Zeros where there is no beat before (the
    spread: fewer than two). It never looks ahead, nor into another record."""
    if x.ndim != 3 or not 0 <= r_peak < x.shape[1]:
        raise ValueError(f"x must be (n, window, leads) with the R peak inside the window, got {x.shape} "
                         f"and r_peak {r_peak}")
    span = x[:, atrial_span(r_peak, fs), 0].astype(np.float64)
    out = np.zeros((len(x), span.shape[1] + 1), dtype=np.float32)
    for rows in _rows_by_record(record, sample, x, "x", beats):
        before = pd.DataFrame(span[rows]).shift(1).rolling(beats, min_periods=1)
        out[rows, :-1] = np.nan_to_num(before.mean().to_numpy())
        out[rows, -1] = np.nan_to_num(before.std().to_numpy().mean(axis=1))
    return out


def r_index(window: int, offset: int = 0) -> int:
    """Index of the annotated R peak inside a ``window``-sample beat window moved back by ``offset``."""
    return window // 2 + offset


def check_window_offset(window: int, offset: int) -> None:
    """``ValueError`` naming ``window_offset`` unless the R peak it puts (:func:`r_index`) lies inside the
    ``window``-sample window."""
    if not 0 <= r_index(window, offset) < window:
        raise ValueError(f"window_offset must keep the R peak inside the {window}-sample window "
                         f"({-(window // 2)} to {window - window // 2 - 1}), got {offset}")


def extract_beats(rec: Record, window: int, offset: int = 0) -> RecordBeats:
    """Cut a ``window``-sample window around every scorable beat of ``rec``.

    The window is ``rec.signal[s - r : s - r + window]`` for a beat at sample ``s``, with
    ``r = window // 2 + offset`` (:func:`r_index`): the annotated R peak sits at index ``r`` of the
    window, in its middle for ``offset=0``; a positive ``offset`` takes in more of what comes before it.
    Returns :class:`RecordBeats` with ``x`` of shape ``(n, window, 2)``.
    """
    if window <= 0:
        raise ValueError(f"window must be a positive number of samples, got {window}")
    check_window_offset(window, offset)
    is_beat = np.fromiter((s in BEAT_SYMBOLS for s in rec.ann_symbol.tolist()), dtype=bool,
                          count=len(rec.ann_symbol))
    excluded = flutter_mask(rec.ann_symbol)
    # RR context uses every real beat, also those dropped at the record's edges.
    beat_idx = np.flatnonzero(is_beat & ~excluded)
    sample = rec.ann_sample[beat_idx]
    rr_prev, rr_next, rr_local = rr_intervals(sample, rec.fs)

    start = sample - r_index(window, offset)
    inside = (start >= 0) & (start + window <= len(rec.signal))
    keep = np.flatnonzero(inside)
    offsets = start[keep][:, None] + np.arange(window)[None, :]
    x = rec.signal[offsets]  # (n, window, 2)
    return RecordBeats(
        record=rec.name,
        x=np.ascontiguousarray(x, dtype=np.float32),
        sample=sample[keep],
        symbol=rec.ann_symbol[beat_idx][keep],
        rr_prev=rr_prev[keep],
        rr_next=rr_next[keep],
        rr_local=rr_local[keep],
        rhythm=rhythm_at(rec.ann_sample, rec.ann_symbol, rec.ann_aux, sample[keep]),
        # `!` is a beat annotation in MIT-BIH (a flutter wave), so it counts as a dropped beat.
        dropped={"edge": int((~inside).sum()),
                 "flutter": int(((is_beat | (rec.ann_symbol == "!")) & excluded).sum())},
    )
