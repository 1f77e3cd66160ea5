"""`prepare` on the real MIT-BIH Arrhythmia Database: beat counts against the published table."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import wfdb

from ecg_mlflow.dataset import PrepareConfig, prepare, select_records
from ecg_mlflow.records import MITDB_RECORDS

pytestmark = pytest.mark.realdata

# Beats per annotation symbol in the 48 records, as PhysioNet's MIT-BIH directory tables count them.
PUBLISHED = {"N": 75052, "L": 8075, "R": 7259, "V": 7130, "/": 7028, "A": 2546, "f": 982, "F": 803,
             "j": 229, "a": 150, "E": 106, "J": 83, "Q": 33, "e": 16, "S": 2}
WINDOW = 160


def annotated_and_dropped(mitdb_dir) -> tuple[Counter, Counter, Counter, int]:
    """Straight from the files: beats per symbol; those the rules drop because the beat lies
    inside a ``[ ... ]`` flutter episode, or else because its window leaves the record; and
    the number of ``!`` flutter waves."""
    annotated, flutter, edge, waves = Counter(), Counter(), Counter(), 0
    for r in MITDB_RECORDS:
        n_samples = wfdb.rdheader(str(mitdb_dir / r)).sig_len
        ann = wfdb.rdann(str(mitdb_dir / r), "atr")
        in_flutter = False
        for s, sym in zip(ann.sample.tolist(), ann.symbol):
            in_flutter = in_flutter or sym == "["
            waves += sym == "!"
            if sym in PUBLISHED:
                annotated[sym] += 1
                first, last = s - WINDOW // 2, s - WINDOW // 2 + WINDOW - 1
                if in_flutter:
                    flutter[sym] += 1
                elif first < 0 or last >= n_samples:
                    edge[sym] += 1
            in_flutter = in_flutter and sym != "]"
    return annotated, flutter, edge, waves


@pytest.fixture(scope="module")
def raw_all(mitdb_dir, dataset_cache):
    # As recorded (signal_filter="none"), so windows can be checked against the files' samples.
    return prepare(PrepareConfig(data_dir=str(mitdb_dir), records="all", label_scheme="raw",
                                 include_paced=True, window=WINDOW, cache_dir=str(dataset_cache), signal_filter="none"))


def test_beat_counts_are_the_published_ones_minus_the_dropped(mitdb_dir, raw_all):
    annotated, flutter, edge, waves = annotated_and_dropped(mitdb_dir)
    assert annotated == Counter(PUBLISHED)  # the files are the published database
    dropped = flutter + edge
    assert sum(dropped.values()) > 0
    assert Counter(raw_all.symbol.tolist()) == Counter(PUBLISHED) - dropped
    assert len(raw_all) == sum(PUBLISHED.values()) - sum(dropped.values())
    assert raw_all.records == list(MITDB_RECORDS)
    reported = Counter()
    for counts in raw_all.meta["dropped"].values():
        reported.update(counts)
    assert reported == Counter(edge=sum(edge.values()), flutter=sum(flutter.values()) + waves, unmapped=0)


def test_lead_order_and_records_without_mlii(mitdb_dir, raw_all):
    assert wfdb.rdheader(str(mitdb_dir / "114")).sig_name == ["V5", "MLII"]
    assert raw_all.meta["leads"]["114"] == ["MLII", "V5"]
    mlii = wfdb.rdrecord(str(mitdb_dir / "114"), channels=[1]).p_signal[:, 0]
    i = int(np.flatnonzero(raw_all.record == "114")[100])
    s = int(raw_all.sample[i])
    np.testing.assert_allclose(raw_all.x[i, :, 0], mlii[s - WINDOW // 2: s + WINDOW // 2], rtol=1e-6)
    assert raw_all.meta["missing_primary_lead"] == ["102", "104"]
    summary = raw_all.summary().set_index("record")
    assert summary.index[~summary["has_mlii"]].tolist() == ["102", "104"]


def test_aami_leaves_paced_records_out_by_default(mitdb_dir, dataset_cache):
    kept, out = select_records(PrepareConfig(data_dir=str(mitdb_dir)), mitdb_dir)
    assert out == ["102", "104", "107", "217"] and len(kept) == 44
    ds = prepare(PrepareConfig(data_dir=str(mitdb_dir), records="100,102,104,107,217",
                               cache_dir=str(dataset_cache)))
    assert ds.records == ["100"] and ds.meta["paced_excluded"] == ["102", "104", "107", "217"]
    assert set(ds.record) == {"100"} and ds.classes == ["N", "S", "V", "F", "Q"]


def test_each_beat_carries_the_rhythm_annotated_before_it(mitdb_dir, raw_all):
    """Read straight from the files, one annotation after another: a beat's rhythm is that of the
    last rhythm change (``+``) before it in the file."""
    for r in raw_all.records:
        ann = wfdb.rdann(str(mitdb_dir / r), "atr")
        current, at_sample = "", {}
        for s, sym, aux in zip(ann.sample.tolist(), ann.symbol, ann.aux_note):
            if sym == "+":
                current = aux.replace("\x00", "").lstrip("(")
            at_sample[s] = current
        rows = raw_all.record == r
        assert raw_all.rhythm[rows].tolist() == [at_sample[s] for s in raw_all.sample[rows].tolist()], r
    counts = Counter(raw_all.rhythm.tolist())
    # every record opens with a rhythm annotation; 232 is sinus bradycardia throughout
    assert "" not in counts and {"N", "AFIB", "AFL", "SVTA", "NOD"} <= set(counts)
    assert set(raw_all.rhythm[raw_all.record == "232"]) == {"SBR"}
