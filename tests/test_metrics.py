"""Metrics: hand-computed confusion matrices, every EC57 exclusion rule, the raw scheme, missing
statistics, and a cross-check against scikit-learn on random labels."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from ecg_mlflow import metrics as M
from ecg_mlflow.figures import plot_confusion
from ecg_mlflow.labels import AAMI, RAW, to_aami

AAMI_CLASSES = AAMI.classes  # N S V F Q

# Rows = true N S V F Q, columns = predicted n s v f q; every cell distinct so a wrong cell shows.
HAND = np.array([
    [100, 3, 4, 1, 0],
    [5, 20, 2, 0, 1],
    [6, 1, 30, 2, 1],
    [2, 1, 7, 10, 0],
    [1, 8, 9, 0, 3],
])


def one_beat(true: str, pred: str) -> np.ndarray:
    """AAMI matrix holding a single beat of true class ``true`` predicted as ``pred``."""
    cm = np.zeros((5, 5), dtype=np.int64)
    cm[AAMI_CLASSES.index(true), AAMI_CLASSES.index(pred)] = 1
    return cm


def test_confusion_by_hand():
    cm = M.confusion(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    np.testing.assert_array_equal(M.confusion(np.array([], dtype=int), np.array([], dtype=int), 2),
                                  np.zeros((2, 2)))


@pytest.mark.parametrize("y_true, y_pred, n, match", [
    (np.array([0, 1]), np.array([0]), 2, "same length"),
    (np.array([0, 2]), np.array([0, 1]), 2, r"y_true codes must lie in 0..1"),
    (np.array([0, 1]), np.array([-1, 1]), 2, r"y_pred codes must lie in 0..1"),
    (np.array([0.0, 1.0]), np.array([0, 1]), 2, "integer class codes"),
    (np.array([[0, 1]]), np.array([[0, 1]]), 2, "1-D"),
    (np.array([0]), np.array([0]), 0, "n_classes must be a positive integer"),
])
def test_confusion_rejects_bad_input(y_true, y_pred, n, match):
    with pytest.raises(ValueError, match=match):
        M.confusion(y_true, y_pred, n)


def test_classification_metrics_by_hand():
    cm = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    m = M.classification_metrics(cm, ["N", "S", "/"])
    assert m["n_beats"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision_N"] == pytest.approx(1 / 2) and m["recall_N"] == pytest.approx(1 / 2)
    assert m["precision_S"] == pytest.approx(1 / 2) and m["recall_S"] == pytest.approx(1)
    assert m["precision_paced"] == pytest.approx(1) and m["recall_paced"] == pytest.approx(2 / 3)
    f1 = [2 * 1 / (2 + 2), 2 * 1 / (1 + 2), 2 * 2 / (3 + 2)]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert not any("/" in k for k in m)


def test_missing_statistics_are_left_out():
    # Class S never true and never predicted; class V predicted once but never true.
    cm = np.array([[5, 0, 1], [0, 0, 0], [0, 0, 0]])
    m = M.classification_metrics(cm, ["N", "S", "V"])
    assert "precision_S" not in m and "recall_S" not in m
    assert "recall_V" not in m and m["precision_V"] == 0.0
    # macro-F1 over N and V only (S absent everywhere): F1_N = 10/11, F1_V = 0.
    assert m["macro_f1"] == pytest.approx((10 / 11 + 0) / 2)
    empty = M.classification_metrics(np.zeros((2, 2), dtype=int), ["N", "S"])
    assert empty == {"n_beats": 0.0}

    # A patient without V beats and without V predictions: VEB Se and +P undefined, FPR = 0.
    cm = np.zeros((5, 5), dtype=np.int64)
    cm[0, 0], cm[1, 1], cm[1, 0] = 50, 3, 1
    stats = M.ec57_stats(M.ec57_counts(cm, AAMI_CLASSES))
    assert "veb_se" not in stats and "veb_ppv" not in stats
    assert stats["veb_fpr"] == 0.0
    assert stats["sveb_se"] == pytest.approx(3 / 4) and stats["sveb_ppv"] == 1.0
    assert all(np.isfinite(v) for v in stats.values())


def test_ec57_counts_by_hand():
    c = M.ec57_counts(HAND, AAMI_CLASSES)
    assert c == {
        "veb_tp": 30, "veb_fn": 6 + 1 + 2 + 1, "veb_fp": 4 + 2,  # Fv = 7 and Qv = 9 are not FPs
        "veb_tn": (100 + 3 + 1 + 0) + (5 + 20 + 0 + 1),  # N and S rows not called V
        "sveb_tp": 20, "sveb_fn": 5 + 2 + 0 + 1, "sveb_fp": 3 + 1 + 1,  # Qs = 8 is not an FP
        "sveb_tn": (100 + 4 + 1 + 0) + (6 + 30 + 2 + 1) + (2 + 7 + 10 + 0),  # N, V, F rows not called S
    }
    s = M.ec57_stats(c)
    assert s == pytest.approx({"veb_se": 30 / 40, "veb_ppv": 30 / 36, "veb_fpr": 6 / 136,
                               "sveb_se": 20 / 28, "sveb_ppv": 20 / 25, "sveb_fpr": 5 / 168})


@pytest.mark.parametrize("true, pred, expected", [
    # VEB
    ("V", "V", {"veb_tp": 1, "sveb_tn": 1}),
    ("V", "N", {"veb_fn": 1, "sveb_tn": 1}),
    ("V", "F", {"veb_fn": 1, "sveb_tn": 1}),
    ("V", "Q", {"veb_fn": 1, "sveb_tn": 1}),
    ("N", "V", {"veb_fp": 1, "sveb_tn": 1}),
    ("S", "V", {"veb_fp": 1, "sveb_fn": 1}),
    ("F", "V", {"sveb_tn": 1}),  # fusion called V: not a VEB false positive, not a VEB negative
    ("Q", "V", {}),  # unclassifiable called V: not scored at all
    ("F", "N", {"sveb_tn": 1}),  # F is no VEB true negative either
    ("N", "N", {"veb_tn": 1, "sveb_tn": 1}),
    # SVEB
    ("S", "S", {"sveb_tp": 1, "veb_tn": 1}),
    ("S", "N", {"sveb_fn": 1, "veb_tn": 1}),
    ("S", "Q", {"sveb_fn": 1, "veb_tn": 1}),
    ("N", "S", {"sveb_fp": 1, "veb_tn": 1}),
    ("V", "S", {"sveb_fp": 1, "veb_fn": 1}),
    ("F", "S", {"sveb_fp": 1}),  # fusion called S *is* an SVEB false positive
    ("Q", "S", {}),  # unclassifiable called S: not an SVEB false positive
    ("Q", "N", {}),
])
def test_each_ec57_rule(true, pred, expected):
    counts = M.ec57_counts(one_beat(true, pred), AAMI_CLASSES)
    assert counts == {k: expected.get(k, 0) for k in M.EC57_COUNTS}


def test_raw_scheme_maps_symbols_to_aami_classes():
    raw = list(RAW.classes)
    cm = np.zeros((len(raw),) * 2, dtype=np.int64)

    def add(t: str, p: str, n: int) -> None:
        cm[raw.index(t), raw.index(p)] += n

    add("E", "V", 4)  # V called V: TP
    add("V", "E", 2)  # V called E (also AAMI V): TP
    add("L", "E", 3)  # N called V: VEB FP
    add("f", "V", 5)  # Q called V: excluded
    add("F", "E", 6)  # F called V: excluded
    add("a", "J", 7)  # S called S: SVEB TP
    add("/", "A", 8)  # Q called S: excluded
    add("j", "S", 9)  # N called S: SVEB FP
    add("R", "N", 10)  # N called N
    c = M.ec57_counts(cm, raw)
    assert c == {"veb_tp": 6, "veb_fn": 0, "veb_fp": 3, "veb_tn": 9 + 10 + 7,
                 "sveb_tp": 7, "sveb_fn": 0, "sveb_fp": 9, "sveb_tn": 6 + 3 + 10 + 6}

    # Random symbols: raw-scheme counts equal the counts of the AAMI labels of the same beats.
    rng = np.random.default_rng(0)
    t_sym = rng.choice(raw, 2000)
    p_sym = rng.choice(raw, 2000)
    raw_cm = M.confusion(RAW.encode(t_sym), RAW.encode(p_sym), RAW.n_classes)
    aami_cm = M.confusion(AAMI.encode(to_aami(t_sym)), AAMI.encode(to_aami(p_sym)), AAMI.n_classes)
    np.testing.assert_array_equal(M.to_aami_matrix(raw_cm, raw), aami_cm)
    assert M.ec57_counts(raw_cm, raw) == M.ec57_counts(aami_cm, AAMI_CLASSES)

    with pytest.raises(ValueError, match="has no AAMI class"):
        M.ec57_counts(np.eye(2, dtype=int), ["N", "X"])


def test_ec57_stats_needs_every_count():
    with pytest.raises(ValueError, match="sveb_tn"):
        M.ec57_stats({k: 1 for k in M.EC57_COUNTS if k != "sveb_tn"})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    classes = list(RAW.classes)
    k = len(classes)
    # Truth lacks the last classes, predictions lack others: exercises "present" handling.
    y_true = rng.integers(0, k - 3, 500)
    y_pred = rng.integers(2, k, 500)
    m, cm = M.evaluate(y_true, y_pred, classes)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["n_beats"] == 500
    labels = np.arange(k)
    prec = precision_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    rec = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    for i, c in enumerate(classes):
        name = M.metric_name(c)
        for key, ref in ((f"precision_{name}", prec[i]), (f"recall_{name}", rec[i])):
            if np.isnan(ref):
                assert key not in m
            else:
                assert m[key] == pytest.approx(ref)
    # evaluate = classification metrics + EC57 stats + counts as floats, no "test_" prefix.
    counts = M.ec57_counts(cm, classes)
    for key, v in counts.items():
        assert m[key] == float(v) and isinstance(m[key], float)
    for key, v in M.ec57_stats(counts).items():
        assert m[key] == v
    assert not any(key.startswith("test_") for key in m)


def test_metric_name():
    assert M.metric_name("/") == "paced"
    assert M.metric_name("N") == "N"
    with pytest.raises(ValueError):
        M.metric_name("")


def test_gross_and_average():
    # Patient A: V beats present.  Patient B: no V beats, no S beats, nothing called V or S.
    a = HAND
    b = np.zeros((5, 5), dtype=np.int64)
    b[0, 0], b[0, 3], b[3, 3] = 40, 2, 5
    per = [M.metrics_from_cm(a, AAMI_CLASSES), M.metrics_from_cm(b, AAMI_CLASSES)]
    assert "veb_se" not in per[1] and "sveb_ppv" not in per[1]
    out = M.gross_and_average(per, [a, b], AAMI_CLASSES)
    # gross: the summed matrix, by hand (B adds 42 VEB TNs, 47 SVEB TNs, 47 beats of which 45 right).
    assert out["gross_veb_se"] == pytest.approx(30 / 40)
    assert out["gross_veb_fpr"] == pytest.approx(6 / (136 + 42))
    assert out["gross_sveb_fpr"] == pytest.approx(5 / (168 + 47))
    assert out["gross_accuracy"] == pytest.approx((163 + 45) / (HAND.sum() + 47))
    # avg: B has no VEB Se, so the average is A's alone; FPR is defined for both (B's is 0).
    assert out["avg_veb_se"] == pytest.approx(30 / 40)
    assert out["avg_veb_fpr"] == pytest.approx((6 / 136 + 0.0) / 2)
    assert out["avg_accuracy"] == pytest.approx((163 / HAND.sum() + 45 / 47) / 2)
    assert set(out) == {f"{w}_{s}" for w in ("gross", "avg") for s in M.SUMMARY_STATS}
    # Undefined statistics given as NaN (as logged) are left out just the same.
    per_nan = [per[0], {**per[1], "veb_se": float("nan"), "sveb_ppv": float("nan")}]
    assert M.gross_and_average(per_nan, [a, b], AAMI_CLASSES) == out
    # Nobody with a defined statistic: both left out.
    only_b = M.gross_and_average(per[1:], [b], AAMI_CLASSES)
    assert "gross_veb_se" not in only_b and "avg_veb_se" not in only_b
    with pytest.raises(ValueError, match="same patients"):
        M.gross_and_average(per, [a], AAMI_CLASSES)


def test_plot_confusion():
    cm = np.array([[8, 2], [1, 3]])
    fig = plot_confusion(cm, ["N", "/"], "record 100")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    assert ax.get_title() == "record 100"
    assert sorted(t.get_text() for t in ax.texts) == sorted(["8", "2", "1", "3"])
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.8, 0.2], [0.25, 0.75]])
    plt.close(fig)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        plot_confusion(cm, ["N", "S", "V"], "bad")
