"""The data layer (records, labels, beats, splits, dataset) on tiny WFDB records written here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import wfdb
import wfdb.io.download

from ecg_mlflow import dataset as dataset_mod
from ecg_mlflow.beats import (RR_LOCAL_BEATS, extract_beats, recent_median, rhythm_at, rr_average, rr_intervals,
                              rr_irregularity, rr_median, rr_sequence)
from ecg_mlflow.dataset import (
    PrepareConfig, include_paced_from_param, load, prepare, select_records, window_from_param,
    window_offset_from_param, summary_html,
)
from ecg_mlflow.filters import filter_signal
from ecg_mlflow.labels import AAMI, BEAT_SYMBOLS, RAW, get_scheme
from ecg_mlflow.records import MITDB_RECORDS, DataError, parse_records, read_record
from ecg_mlflow.splits import FINETUNE, TEST, loso_folds, subject_of
from wfdb_records import regular_beats, write_record, write_records_list

CLOSED_PORT_URL = "http://127.0.0.1:9/"  # port 9 (discard) is closed on loopback: downloads fail at once


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test here may reach PhysioNet or the user's cache: wfdb's URLs point at a closed
    loopback port (dl_database builds them from PN_CONTENT_URL and config.db_index_url)."""
    monkeypatch.setattr(wfdb.io.download, "PN_CONTENT_URL", CLOSED_PORT_URL)
    monkeypatch.setattr(wfdb.io.download.config, "db_index_url", CLOSED_PORT_URL)
    monkeypatch.delenv("ECG_DATA_DIR", raising=False)
    monkeypatch.setenv("ECG_CACHE_DIR", str(tmp_path / "user-cache"))


@pytest.fixture()
def db(tmp_path) -> Path:
    return tmp_path / "db"


def cfg(db: Path, records, **kw) -> PrepareConfig:
    kw.setdefault("finetune_minutes", 0.1)  # 6 s: the tiny records last 20 s
    kw.setdefault("cache_dir", str(db.parent / "cache"))
    kw.setdefault("download", False)
    # The data layer's rules are checked against the signal as written; the filters have tests of their own.
    kw.setdefault("signal_filter", "none")
    return PrepareConfig(data_dir=str(db), records=records, **kw)


# ---------------------------------------------------------------- windows


def test_window_edges_and_content(db):
    # 10 s at 360 Hz = 3600 samples; window 160 -> [s - 80, s + 80).
    samples = [79, 80, 1000, 3520, 3521]
    write_record(db, "100", seconds=10, samples=samples, lead_names=("V5", "MLII"))
    ds = prepare(cfg(db, "100", finetune_minutes=0.1), workers=1)

    assert ds.sample.tolist() == [80, 1000, 3520]  # 79 starts at -1, 3521 ends at 3601
    assert ds.meta["dropped"]["100"]["edge"] == 2
    assert ds.x.shape == (3, 160, 2)
    raw = wfdb.rdrecord(str(db / "100")).p_signal  # stored V5, MLII
    for i, s in enumerate(ds.sample):
        np.testing.assert_array_equal(ds.x[i], raw[s - 80:s + 80, ::-1].astype(np.float32))
    np.testing.assert_array_equal(ds.time_s, np.array([80, 1000, 3520]) / 360)


@pytest.mark.parametrize("window", [7, 8])
def test_r_peak_sits_at_window_half(db, window):
    write_record(db, "100", seconds=2, samples=[100, 400])
    rec = read_record(db, "100")
    rb = extract_beats(rec, window)
    for i, s in enumerate(rb.sample):
        assert rb.x[i, window // 2, 0] == rec.signal[s, 0]
        np.testing.assert_array_equal(rb.x[i], rec.signal[s - window // 2: s - window // 2 + window])


@pytest.mark.parametrize("window,offset", [(256, 48), (8, 3), (8, -4), (7, -3), (7, 3)])
def test_window_offset_moves_the_r_peak_back_from_the_window_half(db, window, offset):
    write_record(db, "100", seconds=2, samples=[300, 500])
    rec = read_record(db, "100")
    rb = extract_beats(rec, window, offset)
    r = window // 2 + offset
    assert len(rb.sample) == 2
    for i, s in enumerate(rb.sample):
        assert rb.x[i, r, 0] == rec.signal[s, 0]
        np.testing.assert_array_equal(rb.x[i], rec.signal[s - r: s - r + window])


@pytest.mark.parametrize("window,offset", [(160, 80), (160, -81), (7, 4), (7, -4)])
def test_a_window_offset_that_puts_the_r_peak_outside_the_window_is_refused(db, tmp_path, window, offset):
    write_record(db, "100", seconds=2, samples=[100, 400])
    with pytest.raises(ValueError, match="window_offset must keep the R peak inside"):
        extract_beats(read_record(db, "100"), window, offset)
    with pytest.raises(ValueError, match=f"window_offset .* inside the {window}-sample window"):
        prepare(PrepareConfig(data_dir=str(tmp_path / "nowhere"), window=window, window_offset=offset,
                              download=False))


def test_a_dataset_with_a_window_offset_is_another_dataset_with_the_same_beats(db):
    write_record(db, "100", samples=regular_beats(360, 20))
    centred = prepare(cfg(db, "100", window=256), workers=1)
    moved = prepare(cfg(db, "100", window=256, window_offset=48), workers=1)
    assert moved.digest != centred.digest and moved.path != centred.path
    assert centred.meta["window_offset"] == 0 and moved.meta["window_offset"] == 48
    assert prepare(cfg(db, "100", window=256, window_offset=0), workers=1).path == centred.path
    # Every beat of the synthetic record lies far from its edges, so both keep the same beats.
    assert moved.sample.tolist() == centred.sample.tolist() and moved.label.tolist() == centred.label.tolist()
    np.testing.assert_array_equal(moved.x[:, 48:], centred.x[:, :-48])
    assert "R peak at index 176" in summary_html(moved)
    assert (centred.r_peak, moved.r_peak) == (128, 176)
    from ecg_mlflow.training import BeatSource

    assert BeatSource.from_dataset(moved).r_peak == 176  # where a core window is cut (core_window)


def test_non_beat_annotations_and_flutter_are_excluded(db):
    ann = [(500, "N"), (600, "+"), (700, "~"), (900, "N"), (1000, "|"), (1100, "x"), (1200, '"'),
           (1500, "["), (1600, "!"), (1700, "V"), (1800, "!"), (1900, "]"),
           (2100, "N"), (2400, "!"), (2700, "V")]
    samples, symbols = zip(*ann)
    write_record(db, "100", seconds=10, samples=samples, symbols=symbols)
    ds = prepare(cfg(db, "100", label_scheme="raw"), workers=1)

    assert ds.sample.tolist() == [500, 900, 2100, 2700]
    assert ds.symbol.tolist() == ["N", "N", "N", "V"]
    # three `!` waves (two inside, one outside the episode) and the V inside [ ... ]
    assert ds.meta["dropped"]["100"] == {"edge": 0, "flutter": 4, "unmapped": 0}
    # RR context skips excluded beats: 900 -> 2100 is one interval
    np.testing.assert_allclose(ds.rr_prev[1:], np.array([400, 1200, 600]) / 360, rtol=1e-6)


def test_each_beat_carries_the_rhythm_in_force_from_the_rhythm_annotations(db):
    ann = [(300, "N", ""), (500, "+", "(N"), (700, "N", ""), (1000, "A", ""), (1300, "+", "(AFIB"),
           (1300, "N", ""), (1500, "~", "noise"), (1700, "V", ""), (2000, "+", "(SVTA"), (2200, "A", ""),
           (2500, "N", "")]
    samples, symbols, aux = zip(*ann)
    write_record(db, "100", seconds=10, samples=samples, symbols=symbols, aux_notes=aux)
    ds = prepare(cfg(db, "100", label_scheme="raw"), workers=1)

    assert ds.sample.tolist() == [300, 700, 1000, 1300, 1700, 2200, 2500]
    # '' before the first change; a change takes effect at its own sample; a noise note is no rhythm
    assert ds.rhythm.tolist() == ["", "N", "N", "AFIB", "AFIB", "SVTA", "SVTA"]
    assert ds.frame()["rhythm"].tolist() == ds.rhythm.tolist()
    with pytest.raises(ValueError, match="differ in length"):
        rhythm_at(np.array([1, 2]), np.array(["+"]), np.array(["(N"]), np.array([1]))


def test_rr_intervals_match_a_direct_computation():
    rng = np.random.default_rng(0)
    sample = np.cumsum(rng.integers(200, 400, size=30))
    prev, nxt, local = rr_intervals(sample, 360.0)
    rr = np.diff(sample) / 360.0
    for i in range(len(sample)):
        assert np.isnan(prev[i]) if i == 0 else prev[i] == pytest.approx(rr[i - 1], rel=1e-6)
        assert np.isnan(nxt[i]) if i == len(sample) - 1 else nxt[i] == pytest.approx(rr[i], rel=1e-6)
        window = rr[max(0, i - RR_LOCAL_BEATS):i]
        assert np.isnan(local[i]) if i == 0 else local[i] == pytest.approx(window.mean(), rel=1e-6)
    for n in (0, 1):
        out = rr_intervals(sample[:n], 360.0)
        assert [len(a) for a in out] == [n, n, n]


@pytest.mark.parametrize("average, statistic", [(rr_average, np.mean), (rr_median, np.median)])
def test_rr_average_and_median_look_back_within_their_own_record_in_any_row_order(average, statistic):
    rng = np.random.default_rng(1)
    record = np.array(["100"] * 12 + ["101"] * 8, dtype=object)
    sample = np.concatenate([np.cumsum(rng.integers(200, 400, 12)), np.cumsum(rng.integers(200, 400, 8))])
    rr_prev = rng.uniform(0.5, 1.5, 20)
    rr_prev[[0, 12, 5]] = np.nan  # each record's first beat, and a gap inside record 100
    order = rng.permutation(20)  # rows shuffled: the result follows each row, not its position
    got = average(record[order], sample[order], rr_prev[order], beats=4)[np.argsort(order)]
    for start, stop in ((0, 12), (12, 20)):
        for i in range(start, stop):
            window = rr_prev[max(start, i - 3):i + 1]
            window = window[np.isfinite(window)]
            assert np.isnan(got[i]) if len(window) == 0 else got[i] == pytest.approx(statistic(window))
    assert np.isnan(got[12])  # never the last beats of record 100
    with pytest.raises(ValueError, match="beats"):
        average(record, sample, rr_prev, beats=0)
    with pytest.raises(ValueError, match="length"):
        average(record, sample[:5], rr_prev)


def test_rr_median_stays_at_the_rate_before_a_run_that_fills_less_than_half_of_its_window():
    # while the mean follows the run
    steady = np.array([1.0] * 6 + [0.4] * 4)
    one, at = np.array(["1"] * 10, dtype=object), np.arange(10)
    assert rr_median(one, at, steady, beats=10)[-1] == 1.0
    assert rr_average(one, at, steady, beats=10)[-1] == pytest.approx(0.76)


def test_rr_irregularity_reads_the_intervals_before_the_beats_own_within_its_record_in_any_row_order():
    rng = np.random.default_rng(3)
    record = np.array(["100"] * 30 + ["101"] * 12, dtype=object)
    sample = np.concatenate([np.cumsum(rng.integers(200, 400, 30)), np.cumsum(rng.integers(200, 400, 12))])
    rr_prev = rng.uniform(0.5, 1.5, 42)
    rr_prev[[0, 30, 9]] = np.nan  # each record's first beat, and a gap inside record 100
    order = rng.permutation(42)
    got = rr_irregularity(record[order], sample[order], rr_prev[order], beats=5)[np.argsort(order)]
    for start, stop in ((0, 30), (30, 42)):
        for i in range(start, stop):
            before = rr_prev[max(start, i - 6):i]  # the 6 intervals before beat i's own: 5 differences
            diffs = np.abs(np.diff(before))
            diffs = diffs[np.isfinite(diffs)]
            if len(diffs) == 0:
                assert np.isnan(got[i])
            else:
                assert got[i] == pytest.approx(np.median(diffs) / np.nanmean(before))
    assert np.isnan(got[30]) and np.isnan(got[31])  # never record 100's intervals
    # The beat's own interval never counts: a premature beat after a steady rhythm reads 0.
    steady = np.full(10, 0.8)
    steady[0], steady[-1] = np.nan, 0.4
    flat = rr_irregularity(np.array(["1"] * 10, dtype=object), np.arange(10), steady, beats=5)
    assert flat[-1] == 0.0
    with pytest.raises(ValueError, match="beats"):
        rr_irregularity(record, sample, rr_prev, beats=0)
    with pytest.raises(ValueError, match="length"):
        rr_irregularity(record, sample[:5], rr_prev)


def test_rr_irregularity_over_lags_takes_the_smallest_median_change_so_bigeminy_reads_regular():
    rng = np.random.default_rng(6)
    record = np.array(["100"] * 25 + ["101"] * 15, dtype=object)
    sample = np.concatenate([np.cumsum(rng.integers(200, 400, 25)), np.cumsum(rng.integers(200, 400, 15))])
    rr_prev = rng.uniform(0.5, 1.5, 40)
    rr_prev[[0, 25, 12]] = np.nan
    order = rng.permutation(40)
    got = rr_irregularity(record[order], sample[order], rr_prev[order], beats=5, lags=(1, 2, 3))[np.argsort(order)]
    for start, stop in ((0, 25), (25, 40)):
        for i in range(start, stop):
            before = rr_prev[start:i]  # the record's intervals before beat i's own
            medians = []
            for lag in (1, 2, 3):
                changes = np.abs(before[lag:] - before[:-lag])[-5:]  # the 5 changes ending just before beat i
                changes = changes[np.isfinite(changes)]
                if len(changes):
                    medians.append(np.median(changes))
            if not medians:
                assert np.isnan(got[i])
            else:
                assert got[i] == pytest.approx(min(medians) / np.nanmean(rr_prev[max(start, i - 6):i]))
    assert np.isnan(got[25]) and np.isnan(got[26])  # never record 100's intervals
    # Bigeminy (short, long, short, ...) repeats every second interval: irregular at lag 1 only.
    one = np.array(["1"] * 40, dtype=object)
    bigeminy = np.tile([0.5, 1.1], 20)
    assert rr_irregularity(one, np.arange(40), bigeminy)[-1] == pytest.approx(0.6 / 0.8, rel=0.05)
    assert rr_irregularity(one, np.arange(40), bigeminy, lags=(1, 2, 3))[-1] == pytest.approx(0.0)
    scattered = rng.uniform(0.4, 1.2, 40)  # fibrillation repeats at no lag
    assert rr_irregularity(one, np.arange(40), scattered, lags=(1, 2, 3))[-1] > 0.15
    np.testing.assert_array_equal(rr_irregularity(record, sample, rr_prev, lags=(1,)),
                                  rr_irregularity(record, sample, rr_prev))
    for bad in ((), (0,), (1, 2.5), "12", (True,)):
        with pytest.raises(ValueError, match="lags"):
            rr_irregularity(record, sample, rr_prev, lags=bad)


def test_rr_sequence_reads_the_intervals_up_to_the_beat_newest_first_within_its_record_in_any_row_order():
    rng = np.random.default_rng(5)
    record = np.array(["100"] * 20 + ["101"] * 6, dtype=object)
    sample = np.concatenate([np.cumsum(rng.integers(200, 400, 20)), np.cumsum(rng.integers(200, 400, 6))])
    rr_prev = rng.uniform(0.5, 1.5, 26)
    rr_prev[[0, 20]] = np.nan  # each record's first beat has no interval
    order = rng.permutation(26)
    got = rr_sequence(record[order], sample[order], rr_prev[order], beats=4)[np.argsort(order)]
    assert got.shape == (26, 4)
    for start, stop in ((0, 20), (20, 26)):
        for i in range(start, stop):
            for j in range(4):
                want = rr_prev[i - j] if i - j >= start else np.nan  # never record 100's intervals
                np.testing.assert_equal(got[i, j], want)
    with pytest.raises(ValueError, match="beats"):
        rr_sequence(record, sample, rr_prev, beats=0)
    with pytest.raises(ValueError, match="length"):
        rr_sequence(record, sample[:5], rr_prev)


def test_recent_median_is_the_median_of_the_beats_before_within_the_record_in_any_row_order():
    rng = np.random.default_rng(2)
    record = np.array(["100"] * 40 + ["101"] * 25, dtype=object)
    sample = np.concatenate([np.cumsum(rng.integers(200, 400, 40)), np.cumsum(rng.integers(200, 400, 25))])
    x = rng.normal(size=(65, 6, 2)).astype(np.float32)
    order = rng.permutation(65)
    # chunk=4 makes the chunked path cross chunk borders many times.
    got = recent_median(record[order], sample[order], x[order], beats=7, chunk=4)[np.argsort(order)]
    for start, stop in ((0, 40), (40, 65)):
        assert np.array_equal(got[start], x[start])  # nothing before the first beat: its own window
        for i in range(start + 1, stop):
            np.testing.assert_allclose(got[i], np.median(x[max(start, i - 7):i], axis=0), rtol=1e-6)
    assert got.dtype == np.float32
    with pytest.raises(ValueError, match="beats"):
        recent_median(record, sample, x, beats=0)
    with pytest.raises(ValueError, match="length"):
        recent_median(record, sample[:5], x)


def test_recent_median_with_a_reference_mask_reads_only_the_reference_beats_before():
    rng = np.random.default_rng(3)
    record = np.array(["100"] * 40 + ["101"] * 25, dtype=object)
    sample = np.concatenate([np.cumsum(rng.integers(200, 400, 40)), np.cumsum(rng.integers(200, 400, 25))])
    x = rng.normal(size=(65, 6, 2)).astype(np.float32)
    reference = rng.random(65) < 0.6
    reference[40:45] = False  # record 101 starts with beats that may not serve as reference
    order = rng.permutation(65)
    got = recent_median(record[order], sample[order], x[order], beats=5, chunk=3,
                        reference=reference[order])[np.argsort(order)]
    for start, stop in ((0, 40), (40, 65)):
        for i in range(start, stop):
            before = start + np.flatnonzero(reference[start:i])[-5:]
            want = x[i] if len(before) == 0 else np.median(x[before], axis=0)  # none before: its own window
            np.testing.assert_allclose(got[i], want, rtol=1e-6)
    # Every beat a reference: the plain recent median.
    np.testing.assert_array_equal(recent_median(record, sample, x, beats=5, reference=np.ones(65, bool)),
                                  recent_median(record, sample, x, beats=5))
    with pytest.raises(ValueError, match="reference"):
        recent_median(record, sample, x, reference=reference[:10])
    with pytest.raises(ValueError, match="reference"):
        recent_median(record, sample, x, reference=reference.astype(int))


# ---------------------------------------------------------------- labels


def test_class_codes_are_fixed():
    assert AAMI.classes == ("N", "S", "V", "F", "Q")
    expected_aami = {"N": 0, "L": 0, "R": 0, "e": 0, "j": 0, "B": 0, "A": 1, "a": 1, "J": 1, "S": 1, "n": 1,
                     "V": 2, "E": 2, "r": 2, "F": 3, "/": 4, "f": 4, "Q": 4, "?": 4}
    assert {s: AAMI.code_of(s) for s in BEAT_SYMBOLS} == expected_aami
    assert "".join(RAW.classes) == "NLRejAaJSVEF/fQ"
    assert [RAW.code_of(s) for s in "NLRejAaJSVEF/fQ"] == list(range(15))
    assert [RAW.code_of(s) for s in "Br?n!+"] == [-1] * 6
    # codes do not depend on which symbols a record happens to contain, or their order
    assert AAMI.encode(np.array(["V", "N", "Q"], dtype=object)).tolist() == [2, 0, 4]
    assert AAMI.encode(np.array(["Q"], dtype=object)).tolist() == [4]
    with pytest.raises(ValueError, match="label_scheme"):
        get_scheme("AAMI5")


def test_unmapped_symbols_are_dropped_and_counted(db):
    symbols = ["N", "B", "r", "?", "V", "N"]
    write_record(db, "100", seconds=10, samples=[300, 600, 900, 1200, 1500, 1800], symbols=symbols)
    raw = prepare(cfg(db, "100", label_scheme="raw"), workers=1)
    assert raw.symbol.tolist() == ["N", "V", "N"]
    assert raw.label.tolist() == [0, 9, 0]
    assert raw.meta["dropped"]["100"]["unmapped"] == 3
    aami = prepare(cfg(db, "100"), workers=1)
    assert aami.label.tolist() == [0, 0, 2, 4, 2, 0]
    assert aami.meta["dropped"]["100"]["unmapped"] == 0


# ---------------------------------------------------------------- leads, subjects, splits


def test_mlii_is_stored_first_and_missing_mlii_is_reported(db):
    beats = regular_beats(360, 20)
    write_record(db, "114", samples=beats, lead_names=("V5", "MLII"))
    write_record(db, "102", samples=beats, lead_names=("V5", "V2"))
    ds = prepare(cfg(db, "114,102", include_paced=True), workers=1)

    assert ds.meta["leads"] == {"114": ["MLII", "V5"], "102": ["V5", "V2"]}
    assert ds.meta["missing_primary_lead"] == ["102"]
    raw = wfdb.rdrecord(str(db / "114")).p_signal
    s = ds.sample[ds.record == "114"][3]
    np.testing.assert_array_equal(ds.x[ds.record == "114"][3, :, 0], raw[s - 80:s + 80, 1].astype(np.float32))
    summary = ds.summary().set_index("record")
    assert summary.loc["114", "has_mlii"] and not summary.loc["102", "has_mlii"]
    assert summary.loc["102", "lead_0"] == "V5"


def test_subjects_time_split_and_loso_folds(db):
    for r in ("100", "201", "202"):
        write_record(db, r, samples=regular_beats(360, 20))
    ds = prepare(cfg(db, "100,201,202", finetune_minutes=0.1), workers=1)

    assert subject_of("202") == "201" and subject_of("201") == "201" and subject_of("100") == "100"
    assert set(ds.subject[ds.record == "202"]) == {"201"}
    np.testing.assert_array_equal(ds.part == FINETUNE, ds.time_s < 6.0)
    assert set(ds.part) == {FINETUNE, TEST}

    folds = {f.subject: f for f in loso_folds(ds.record, ds.part)}
    assert list(folds) == ["100", "201"]
    f = folds["201"]
    assert f.records == ("201", "202")
    assert not np.any(f.train & np.isin(ds.record, ["201", "202"]))
    np.testing.assert_array_equal(f.train, ds.record == "100")
    for r in ("201", "202"):
        np.testing.assert_array_equal(f.finetune[r] | f.test[r], ds.record == r)
        assert not np.any(f.finetune[r] & f.test[r])
        assert ds.time_s[f.finetune[r]].max() < 6.0 <= ds.time_s[f.test[r]].min()
    with pytest.raises(ValueError, match="subjects"):
        loso_folds(ds.record, ds.part, subjects=["202"])


def test_paced_records_follow_the_scheme_unless_configured(db):
    for r in ("100", "102"):
        write_record(db, r, samples=regular_beats(360, 20))
    kept, out = select_records(cfg(db, "100,102"), db)
    assert (kept, out) == (["100"], ["102"])
    assert select_records(cfg(db, "100,102", include_paced=True), db) == (["100", "102"], [])
    assert select_records(cfg(db, "100,102", label_scheme="raw"), db) == (["100", "102"], [])
    assert select_records(cfg(db, "100,102", label_scheme="raw", include_paced=False), db) == (["100"], ["102"])
    with pytest.raises(DataError, match="include_paced"):
        prepare(cfg(db, "102"), workers=1)


# ---------------------------------------------------------------- resampling


@pytest.mark.parametrize("fs", [250.0, 128.0])
def test_other_rates_are_resampled_to_360_hz(db, fs):
    beats = regular_beats(fs, 20, rr_s=0.77)
    write_record(db, "100", fs=fs, seconds=20, samples=beats, spike_mv=2.0, lead_names=("V1", "MLII"))
    # the spike is on the first stored lead (V1); read it from the second column after MLII-first
    ds = prepare(cfg(db, "100"), workers=1)

    assert ds.meta["fs"] == 360
    np.testing.assert_allclose(ds.time_s, beats[:len(ds)] / fs, atol=0.5 / 360)
    peaks = np.argmax(ds.x[:, :, 1], axis=1)
    assert np.all(np.abs(peaks - 80) <= 1), peaks
    rec = read_record(db, "100")
    assert rec.fs == 360 and abs(len(rec.signal) - 20 * 360) <= 1


# ---------------------------------------------------------------- cache and file


def test_cache_is_reused_and_keyed_on_inputs_and_parameters(db):
    write_record(db, "100", samples=regular_beats(360, 20))
    first = prepare(cfg(db, "100"), workers=1)
    stat = first.path.stat()
    again = prepare(cfg(db, "100"), workers=1)
    assert again.path == first.path and again.digest == first.digest
    assert (again.path.stat().st_mtime_ns, again.path.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)

    other_window = prepare(cfg(db, "100", window=100), workers=1)
    other_minutes = prepare(cfg(db, "100", finetune_minutes=0.2), workers=1)
    assert len({first.digest, other_window.digest, other_minutes.digest}) == 3

    # a changed annotation file: new key, new content
    write_record(db, "100", samples=regular_beats(360, 20, rr_s=0.9))
    changed = prepare(cfg(db, "100"), workers=1)
    assert changed.digest != first.digest and len(changed) != len(first)
    assert first.path.is_file()  # the old entry is left alone


def test_signal_filter_removes_baseline_wander_and_keeps_the_beats_in_place():
    fs, n = 360.0, 360 * 60
    t = np.arange(n) / fs
    wander = 1.0 * np.sin(2 * np.pi * 0.1 * t)  # breathing-like drift, as large as a QRS
    beats = np.zeros(n)
    for s in range(180, n - 180, 288):  # 75/min, 8 ms wide spikes of 1 mV
        beats += np.exp(-0.5 * ((np.arange(n) - s) / 3.0) ** 2)
    mains = 0.1 * np.sin(2 * np.pi * 60 * t)
    middle = slice(360 * 5, n - 360 * 5)  # away from the padded ends
    raw = np.stack([wander + beats, wander + mains], axis=1).astype(np.float32)

    high = filter_signal(raw, fs, "highpass")
    band = filter_signal(raw, fs, "bandpass")
    assert high.shape == raw.shape and high.dtype == np.float32
    assert filter_signal(raw, fs, "none") is raw
    # The 0.1 Hz wander goes: what is left of lead 1 (wander + mains) is the mains hum alone.
    assert np.abs(high[middle, 1] - mains[middle]).max() < 0.05
    # The spikes stay where they were (zero phase) and keep most of their height.
    peaks = np.flatnonzero((high[1:-1, 0] > high[:-2, 0]) & (high[1:-1, 0] >= high[2:, 0]) & (high[1:-1, 0] > 0.5)) + 1
    assert peaks.tolist() == list(range(180, n - 180, 288))
    assert 0.8 < high[middle, 0].max() < 1.05
    # bandpass also cuts the 60 Hz hum (0.1 mV) to under a fifth (second order each way), which highpass passes.
    assert np.abs(band[middle, 1]).max() < 0.02 < 0.08 < np.abs(high[middle, 1]).max()  # 6 samples a cycle: 0.087
    with pytest.raises(ValueError, match="signal_filter must be one of"):
        filter_signal(raw, fs, "notch")
    with pytest.raises(ValueError, match=r"shaped \(n_samples, leads\)"):
        filter_signal(raw[:, 0], fs, "highpass")
    with pytest.raises(ValueError, match="too short to filter"):
        filter_signal(raw[:10], fs, "bandpass")


def test_a_filtered_dataset_cuts_its_beats_from_the_filtered_record(db):
    write_record(db, "100", samples=regular_beats(360, 20), spike_mv=1.0)
    raw = prepare(cfg(db, "100"), workers=1)
    high = prepare(cfg(db, "100", signal_filter="highpass"), workers=1)
    assert high.digest != raw.digest and high.path != raw.path
    assert raw.meta["signal_filter"] == "none" and high.meta["signal_filter"] == "highpass"
    assert prepare(cfg(db, "100", signal_filter="none"), workers=1).path == raw.path
    # The same beats, labels and rhythm; only the waveforms differ.
    assert high.sample.tolist() == raw.sample.tolist() and high.label.tolist() == raw.label.tolist()
    np.testing.assert_array_equal(high.rr_prev, raw.rr_prev)
    rec = read_record(db, "100")
    want = filter_signal(rec.signal, rec.fs, "highpass")
    for i, s in enumerate(high.sample):
        np.testing.assert_array_equal(high.x[i], want[s - 80:s + 80])
    assert np.abs(high.x - raw.x).max() > 0.1  # the synthetic leads' slow sine is gone from the windows


def test_corrupt_cache_file_is_rebuilt(db):
    write_record(db, "100", samples=regular_beats(360, 20))
    good = prepare(cfg(db, "100"), workers=1)
    expected = good.x.copy()
    for damage in (b"not parquet at all", good.path.read_bytes()[: good.path.stat().st_size // 2]):
        good.path.write_bytes(damage)
        with pytest.raises(DataError, match=str(good.path.name)):
            load(good.path)
        rebuilt = prepare(cfg(db, "100"), workers=1)
        assert rebuilt.path == good.path
        np.testing.assert_array_equal(rebuilt.x, expected)


def test_write_is_atomic(db, monkeypatch):
    write_record(db, "100", samples=regular_beats(360, 20))
    real_write = pq.write_table

    def write_then_fail(table, where, **kw):  # the disk fills up after the data is written
        real_write(table, where, **kw)
        raise OSError("No space left on device")

    monkeypatch.setattr(dataset_mod.pq, "write_table", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        prepare(cfg(db, "100"), workers=1)
    cache = db.parent / "cache"
    assert list(cache.iterdir()) == []  # no partial file, no temporary left behind

    monkeypatch.setattr(dataset_mod.pq, "write_table", real_write)
    ds = prepare(cfg(db, "100"), workers=1)
    assert [p.name for p in cache.iterdir()] == [ds.path.name]
    assert ds.path.stat().st_mode & 0o777 == 0o644
    table = pq.read_table(ds.path)
    assert table.num_rows == len(ds) and table.column("signal").type.list_size == 320


def test_parallel_and_serial_builds_agree(db, tmp_path):
    for r in ("100", "101"):
        write_record(db, r, samples=regular_beats(360, 20, rr_s=0.7 if r == "100" else 0.9))
    serial = prepare(cfg(db, "100,101", cache_dir=str(tmp_path / "c1")), workers=1)
    pooled = prepare(cfg(db, "100,101", cache_dir=str(tmp_path / "c2")), workers=2)
    assert serial.digest == pooled.digest
    np.testing.assert_array_equal(serial.x, pooled.x)
    np.testing.assert_array_equal(serial.record, pooled.record)


# ---------------------------------------------------------------- bad input


def two_records(db: Path) -> None:
    for r in ("100", "101"):
        write_record(db, r, samples=regular_beats(360, 20))
    write_records_list(db, ["100", "101"])


@pytest.mark.parametrize("ext", ["hea", "dat", "atr"])
def test_missing_file_is_named(db, ext):
    two_records(db)
    (db / f"101.{ext}").unlink()
    with pytest.raises(DataError, match=rf"missing record file.*{db / ('101.' + ext)}"):
        prepare(cfg(db, "100,101"), workers=1)


def test_failed_download_says_where_to_put_the_files(tmp_path):
    # No data_dir and no ECG_DATA_DIR: the records belong in the download cache, which is empty.
    with pytest.raises(DataError) as err:
        prepare(PrepareConfig(records="100", cache_dir=str(tmp_path / "cache")), workers=1)
    msg = str(err.value)
    target = tmp_path / "user-cache" / "mitdb"
    assert "download" in msg and "127.0.0.1" in msg  # it really tried, at the closed port
    assert f"in {target}" in msg and "ECG_DATA_DIR" in msg


def test_truncated_signal_file_is_named(db):
    two_records(db)
    os.truncate(db / "101.dat", 1000)
    with pytest.raises(DataError, match=rf"{db / '101.dat'} is truncated"):
        prepare(cfg(db, "100,101"), workers=1)


def test_header_length_that_does_not_match_the_data_is_named(db):
    two_records(db)
    hea = db / "101.hea"
    lines = hea.read_text().splitlines()
    lines[0] = lines[0].replace(" 7200", " 7000")  # record line: name, signals, fs, length
    hea.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{db / '101.dat'} does not match its header {hea}"):
        prepare(cfg(db, "100,101"), workers=1)


def test_corrupt_header_is_named(db):
    two_records(db)
    (db / "101.hea").write_bytes(b"\x00\x13garbage header\nnot a signal line\n")
    with pytest.raises(DataError, match=rf"corrupt header {db / '101.hea'}"):
        prepare(cfg(db, "100,101", download=True), workers=1)  # and no download is attempted


def test_corrupt_annotation_file_is_named(db):
    two_records(db)
    (db / "101.atr").write_bytes(b"\xff\xff\x00garbage" * 10)
    with pytest.raises(DataError, match=rf"{db / '101.atr'}"):
        prepare(cfg(db, "100,101"), workers=1)


def test_unknown_record_ids_are_named(db):
    two_records(db)
    with pytest.raises(DataError, match=r"unknown record id\(s\) \['999'\] in 'records'"):
        prepare(cfg(db, "100,999"), workers=1)


def test_patient_context_comes_from_the_fine_tune_minutes_only(db):
    # Fine-tune part (first 6 s): 1 mV flat, RR 0.8 s; test part: 9 mV, RR 0.5 s. A V beat first.
    fs, seconds = 360, 20
    signal = np.full((fs * seconds, 2), 1.0)
    signal[6 * fs:] = 9.0
    times = np.concatenate([np.arange(0.3, 6.0, 0.8), np.arange(6.2, 19.5, 0.5)])
    samples = np.round(times * fs).astype(int)
    symbols = ["V"] + ["N"] * (len(samples) - 1)
    write_record(db, "100", samples=samples, symbols=symbols, signal=signal)
    write_record(db, "101", samples=regular_beats(fs, seconds), symbols=["A"] * len(regular_beats(fs, seconds)))
    write_records_list(db, ["100", "101"])
    ds = prepare(cfg(db, "100,101"), workers=1)
    templates, record_index, rr_patient = ds.patient_context()
    assert templates.shape == (2,) + ds.x.shape[1:] and record_index.shape == (len(ds),)
    np.testing.assert_allclose(templates[0], 1.0, atol=0.02)  # the 9 mV test part never reaches it
    rows = np.flatnonzero((ds.record == "100") & (ds.part == TEST))
    np.testing.assert_allclose(rr_patient[rows[1:], 0], 0.5 / 0.8, rtol=0.01)  # RR over the fine-tune RR
    # Record 101 has no N beat: its template is the median of all its fine-tune beats.
    assert record_index[ds.record == "101"].tolist() == [1] * int((ds.record == "101").sum())
    assert np.all(np.isfinite(rr_patient))


def test_early_marks_beats_short_against_the_local_mean_or_the_minutes_before(db):
    # RR 0.8 s, one beat at 0.6 s (short against both), then from 10 s a steady 0.6 s
    # (short against the five-minute average only, which still holds the 0.8 s beats).
    fs, seconds = 360, 20
    times = np.concatenate([np.arange(0.3, 5.0, 0.8), [4.3 + 0.6], np.arange(4.9 + 0.8, 10.0, 0.8),
                            np.arange(10.3, 19.5, 0.6)])
    samples = np.round(times * fs).astype(int)
    write_record(db, "100", samples=samples, symbols=["N"] * len(samples), signal=np.zeros((fs * seconds, 2)))
    write_records_list(db, ["100"])
    ds = prepare(cfg(db, "100"), workers=1)
    early = ds.early()
    assert early.dtype == bool and early.shape == (len(ds),)
    short_local, short_long = ds.rr_features()[:, 0] < 0.9, ds.rr_long()[:, 0] < 0.9
    np.testing.assert_array_equal(early, short_local | short_long)
    t = ds.time_s
    assert early[np.argmin(np.abs(t - 4.9))]  # the premature beat
    assert not early[np.argmin(np.abs(t - 5.7))]  # the long interval after it
    steady = t > 16.5  # ten 0.6 s intervals on: the local mean has caught up
    assert steady.sum() >= 3 and early[steady].all() and not short_local[steady].any()
    assert not early[t < 4.5].any()  # the regular beats before it (and the first, with no RR)
    assert not ds.early(share=0.5).any()
    # rr_sequence: the last eight intervals over the five-minute average, newest first; its first
    # column is rr_long's, and the premature beat's short interval moves one column per beat.
    seq = ds.rr_sequence()
    assert seq.shape == (len(ds), 8) and seq.dtype == np.float32
    np.testing.assert_allclose(seq[:, 0], ds.rr_long()[:, 0], rtol=1e-6)
    i = int(np.argmin(np.abs(t - 4.9)))
    for k in range(4):
        np.testing.assert_array_equal(seq[i + k] < 0.9, np.arange(8) == k)
    assert (seq[0] == 1.0).all()  # the first beat: no interval, so 1.0
    # rr_median: rr_long over the five-minute median. Until the 0.6 s beats are half of those
    # before, the median stays 0.8 s, so they read 0.75 against it and less early against the mean.
    med = ds.rr_median()
    assert med.shape == (len(ds), 2) and med.dtype == np.float32 and (med[0] == 1.0).all()
    run = (t > 10.5) & (t < 14)
    assert run.sum() >= 4
    np.testing.assert_allclose(med[run, 0], 0.75, rtol=1e-3)
    assert (ds.rr_long()[run, 0] > 0.76).all()


def test_rr_lagged_reads_bigeminy_as_regular_and_scattered_intervals_as_irregular(db):
    # 40 s of bigeminy (RR 0.5 s, 1.1 s, ...), then 40 s of intervals scattered as in fibrillation.
    from ecg_mlflow.training import BeatSource

    fs, seconds = 360, 82
    scattered = np.random.default_rng(8).uniform(0.4, 1.2, 60)
    intervals = np.concatenate([np.tile([0.5, 1.1], 25), scattered])
    times = 0.5 + np.concatenate([[0.0], np.cumsum(intervals)])
    times = times[times < seconds - 1]
    samples = np.round(times * fs).astype(int)
    write_record(db, "100", samples=samples, symbols=["N"] * len(samples), signal=np.zeros((fs * seconds, 2)),
                 seconds=seconds)
    write_records_list(db, ["100"])
    ds = prepare(cfg(db, "100"), workers=1)
    lagged, irregular = ds.rr_lagged(), ds.rr_irregular()
    assert lagged.shape == (len(ds), 1) and lagged.dtype == np.float32 and lagged[0, 0] == 0.0
    t = ds.time_s
    bigeminy = (t > 0.5 + 18 * 0.8) & (t < 0.5 + 40)  # past the first 17 intervals, still in bigeminy
    fibrillation = t > 0.5 + 40 + 18 * 0.8
    assert bigeminy.sum() >= 20 and fibrillation.sum() >= 20
    assert (irregular[bigeminy] > 0.5).all() and (lagged[bigeminy] < 0.02).all()
    assert (lagged[fibrillation] > 0.1).all()  # sinus rhythm reads 0.01-0.05
    # A BeatSource made from the dataset (as LOSO and classify make it) holds these rows.
    np.testing.assert_array_equal(BeatSource.from_dataset(ds).inputs(np.arange(len(ds)), ("rr_lagged",))["rr_lagged"],
                                  lagged)


def test_record_sets_split_the_non_paced_records_by_subject(tmp_path):
    # Empty directory: ids are checked against the MIT-BIH list.
    half1, half2 = (parse_records(name, tmp_path) for name in ("half1", " HALF2 "))
    assert len(half1) == 23 and len(half2) == 21
    paced = {"102", "104", "107", "217"}
    assert set(half1) | set(half2) == set(MITDB_RECORDS) - paced
    assert not {subject_of(r) for r in half1} & {subject_of(r) for r in half2}
    with pytest.raises(DataError, match=r"unknown record id\(s\) \['half3'\].*a set: half1, half2"):
        parse_records("half3", tmp_path)


def test_finetune_minutes_longer_than_a_record_is_named(db):
    two_records(db)
    with pytest.raises(ValueError, match=r"finetune_minutes=0.5 .* record 100 lasts 0.33 minutes"):
        prepare(cfg(db, "100,101", finetune_minutes=0.5), workers=1)


@pytest.mark.parametrize("window", [0, -160, 160.0, 160.5, True, "160"])
def test_bad_window_is_named_before_any_file_is_read(tmp_path, window):
    with pytest.raises(ValueError, match="window must be a positive whole number"):
        prepare(PrepareConfig(data_dir=str(tmp_path / "nowhere"), window=window, download=False))


@pytest.mark.parametrize("bad", [dict(label_scheme="aami5"), dict(finetune_minutes=0),
                                 dict(finetune_minutes=float("nan")), dict(include_paced="yes"),
                                 dict(signal_filter="lowpass"), dict(signal_filter=""),
                                 dict(window_offset=1.5), dict(window_offset=True), dict(window_offset="48")])
def test_bad_parameters_are_named(tmp_path, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        prepare(PrepareConfig(data_dir=str(tmp_path / "nowhere"), download=False, **bad))


def test_entry_point_parameter_parsing():
    assert window_from_param("160.0") == 160 and window_from_param(160) == 160
    for bad in ("160.5", "0", "-3", "abc", "nan", "inf"):
        with pytest.raises(ValueError, match="window"):
            window_from_param(bad)
    assert window_offset_from_param("48.0") == 48 and window_offset_from_param("-3") == -3
    for bad in ("4.5", "abc", "nan", "inf", ""):
        with pytest.raises(ValueError, match="window_offset"):
            window_offset_from_param(bad)
    assert [include_paced_from_param(v) for v in ("auto", "true", "FALSE")] == [None, True, False]
    with pytest.raises(ValueError, match="include_paced"):
        include_paced_from_param("maybe")
