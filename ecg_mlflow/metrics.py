"""Beat-classification metrics: confusion matrices, accuracy, macro-F1 and AAMI EC57 statistics.

Every function works from a confusion matrix ``cm`` of shape ``(n_classes, n_classes)``
(rows = true class code, columns = predicted class code), so per-patient and pooled
("gross") statistics come from the same code: pool by summing matrices.

A statistic whose denominator is 0 (e.g. VEB sensitivity for a patient without V beats) is
left out of the returned dict: never reported as 0 or NaN, so that averages over patients
only see patients where the statistic is defined.

EC57 rules (ANSI/AAMI EC57, as de Chazal et al. 2004 and Kiranyaz et al. 2016 apply them to
the five AAMI classes N, S, V, F, Q; ``Xy`` = true class X predicted as y):

VEB (positive class V)
    TP = Vv; FN = Vn + Vs + Vf + Vq (a V beat called anything else is missed);
    FP = Nv + Sv: a fusion (F) or unclassifiable (Q) beat called V is *not* a VEB false
    positive; TN = N and S beats not called V. F and Q beats are therefore not scored for
    VEB at all (neither FP nor TN), which keeps FPR = FP / (FP + TN) over one set of negatives.
SVEB (positive class S)
    TP = Ss; FN = Sn + Sv + Sf + Sq; FP = Ns + Vs + Fs: a Q beat called S is not an SVEB
    false positive; TN = N, V and F beats not called S. Q beats are not scored for SVEB.

Some papers count every remaining beat (F and Q rows included) as a true negative; that only
enlarges TN and lowers FPR slightly; Se and +P (``ppv``) do not depend on the choice.

Under the ``raw`` label scheme (one class per MIT-BIH beat symbol) the matrix is first
collapsed to the AAMI classes with :data:`ecg_mlflow.labels.AAMI`'s symbol map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ecg_mlflow.labels import AAMI

EC57_STATS: tuple[str, ...] = ("veb_se", "veb_ppv", "veb_fpr", "sveb_se", "sveb_ppv", "sveb_fpr")
EC57_COUNTS: tuple[str, ...] = tuple(f"{k}_{c}" for k in ("veb", "sveb") for c in ("tp", "fn", "fp", "tn"))
# Statistics pooled over patients (gross) and averaged over patients (avg) in a LOSO run.
SUMMARY_STATS: tuple[str, ...] = EC57_STATS + ("accuracy", "macro_f1")

_AAMI_CODE = {c: i for i, c in enumerate(AAMI.classes)}  # N S V F Q -> 0..4


def metric_name(cls: str) -> str:
    """A metric-name-safe spelling of a class name: ``'/'`` (paced beat) becomes ``'paced'``."""
    if not isinstance(cls, str) or not cls:
        raise ValueError(f"class name must be a non-empty string, got {cls!r}")
    return cls.replace("/", "paced")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix of integer class codes.

    y_true, y_pred: shape ``(n,)``, integer codes in ``0 .. n_classes - 1``.
    Returns int64 ``(n_classes, n_classes)``, rows = true code, columns = predicted code.
    """
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.ndim != 1:
            raise ValueError(f"{name} must be 1-D (n,), got shape {y.shape}")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class codes, got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} codes must lie in 0..{n_classes - 1}, got range "
                             f"{int(y.min())}..{int(y.max())}")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {y_true.shape} and {y_pred.shape}")
    flat = y_true.astype(np.int64) * n_classes + y_pred.astype(np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.int64)


def _check_cm(cm: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    cm = np.asarray(cm)
    k = len(classes)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix must be ({k}, {k}) for classes {list(classes)}, got shape {cm.shape}")
    if cm.size and (not np.issubdtype(cm.dtype, np.number) or (cm < 0).any()):
        raise ValueError("confusion matrix must hold non-negative counts")
    if len(set(classes)) != k:
        raise ValueError(f"class names must be distinct, got {list(classes)}")
    return cm.astype(np.int64)


def classification_metrics(cm: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro-F1, beat count and per-class precision/recall from ``cm`` ``(k, k)``.

    Keys: ``accuracy``, ``macro_f1``, ``n_beats``, ``precision_<c>``, ``recall_<c>`` with
    ``<c> = metric_name(class)``. Values with a zero denominator are left out. macro-F1 is the
    mean F1 over classes that occur as truth or as prediction (as scikit-learn's ``f1_score``
    with ``average='macro'`` over the labels present).
    """
    cm = _check_cm(cm, classes)
    n = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true beats per class
    predicted = cm.sum(axis=0)  # predicted beats per class
    out: dict[str, float] = {"n_beats": float(n)}
    if n > 0:
        out["accuracy"] = float(tp.sum() / n)
    for i, c in enumerate(classes):
        if predicted[i] > 0:
            out[f"precision_{metric_name(c)}"] = float(tp[i] / predicted[i])
        if support[i] > 0:
            out[f"recall_{metric_name(c)}"] = float(tp[i] / support[i])
    present = (support > 0) | (predicted > 0)
    if present.any():
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted); defined wherever the class is present.
        f1 = 2 * tp[present] / (support[present] + predicted[present])
        out["macro_f1"] = float(f1.mean())
    return out


def to_aami_matrix(cm: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Collapse ``cm`` ``(k, k)`` over any scheme's classes to the AAMI ``(5, 5)`` matrix (N S V F Q).

    Each class name is mapped with ``AAMI.symbol_to_class`` (the AAMI letters map to themselves).
    """
    cm = _check_cm(cm, classes)
    codes = []
    for c in classes:
        aami = AAMI.symbol_to_class.get(c)
        if aami is None:
            raise ValueError(f"class {c!r} has no AAMI class; EC57 statistics need classes from the "
                             f"'aami' or 'raw' label scheme")
        codes.append(_AAMI_CODE[aami])
    codes = np.asarray(codes)
    out = np.zeros((5, 5), dtype=np.int64)
    np.add.at(out, (codes[:, None], codes[None, :]), cm)
    return out


def ec57_counts(cm: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """VEB and SVEB TP/FN/FP/TN counts of ``cm`` ``(k, k)`` by the EC57 rules in the module docstring."""
    a = to_aami_matrix(cm, classes)
    N, S, V, F, Q = (_AAMI_CODE[c] for c in "NSVFQ")

    def counts(pos: int, scored_negatives: list[int]) -> tuple[int, int, int, int]:
        tp = a[pos, pos]
        fn = a[pos].sum() - tp
        fp = a[scored_negatives, pos].sum()
        tn = a[scored_negatives].sum() - fp
        return int(tp), int(fn), int(fp), int(tn)

    veb = counts(V, [N, S])  # F and Q beats are not scored for VEB
    sveb = counts(S, [N, V, F])  # Q beats are not scored for SVEB
    return dict(zip(EC57_COUNTS, veb + sveb))


def _ratio(num: float, den: float) -> float | None:
    return None if den <= 0 else float(num / den)


def ec57_stats(counts: Mapping[str, int]) -> dict[str, float]:
    """Se = TP/(TP+FN), +P (ppv) = TP/(TP+FP), FPR = FP/(FP+TN) for VEB and SVEB, as fractions.

    ``counts`` holds the keys of :func:`ec57_counts`; a statistic with a zero denominator is left out.
    """
    missing = [k for k in EC57_COUNTS if k not in counts]
    if missing:
        raise ValueError(f"counts lacks {missing}; expected the keys {list(EC57_COUNTS)}")
    out: dict[str, float] = {}
    for k in ("veb", "sveb"):
        tp, fn, fp, tn = (float(counts[f"{k}_{c}"]) for c in ("tp", "fn", "fp", "tn"))
        for stat, value in (("se", _ratio(tp, tp + fn)), ("ppv", _ratio(tp, tp + fp)),
                            ("fpr", _ratio(fp, fp + tn))):
            if value is not None:
                out[f"{k}_{stat}"] = value
    return out


def metrics_from_cm(cm: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Everything :func:`evaluate` reports, from a confusion matrix ``(k, k)``."""
    counts = ec57_counts(cm, classes)
    out = classification_metrics(cm, classes)
    out.update(ec57_stats(counts))
    out.update({k: float(v) for k, v in counts.items()})
    return out


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> tuple[dict[str, float], np.ndarray]:
    """All metrics of one test set and its confusion matrix.

    y_true, y_pred: ``(n,)`` class codes into ``classes``. Returns (metrics without a ``test_``
    prefix, int64 ``(len(classes), len(classes))`` confusion matrix).
    """
    cm = confusion(y_true, y_pred, len(classes))
    return metrics_from_cm(cm, classes), cm


def gross_and_average(per_patient: Sequence[Mapping[str, float]], cms: Sequence[np.ndarray],
                      classes: Sequence[str]) -> dict[str, float]:
    """Pooled and averaged statistics over patients.

    ``gross_<stat>``: the statistic of the confusion matrices summed over patients (each
    ``(k, k)``). ``avg_<stat>``: the mean of the per-patient values, over the patients where
    the statistic is present (a NaN value counts as absent, as logged runs store it). ``<stat>`` ranges over :data:`SUMMARY_STATS`; undefined ones are left out.
    """
    if len(cms) == 0:
        raise ValueError("gross_and_average needs at least one patient's confusion matrix")
    if len(per_patient) != len(cms):
        raise ValueError(f"per_patient and cms must describe the same patients, got {len(per_patient)} "
                         f"metric dicts and {len(cms)} confusion matrices")
    total = sum((_check_cm(cm, classes) for cm in cms), start=np.zeros((len(classes),) * 2, dtype=np.int64))
    pooled = metrics_from_cm(total, classes)
    out: dict[str, float] = {}
    for stat in SUMMARY_STATS:
        if stat in pooled:
            out[f"gross_{stat}"] = pooled[stat]
        values = [float(p[stat]) for p in per_patient if stat in p and not np.isnan(p[stat])]
        if values:
            out[f"avg_{stat}"] = float(np.mean(values))
    return out
