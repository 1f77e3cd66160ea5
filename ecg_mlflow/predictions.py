"""Per-beat predictions: the table every variant run logs, and errors counted by rhythm.

Each variant run (``no_transfer`` and ``transfer`` of a LOSO run, and those of a ``blend``) logs
``predictions.csv``: one row per test beat, in the order of the beat table, with

- ``record``, ``sample`` (annotation index at 360 Hz), ``time_s``;
- ``rhythm``: the reference rhythm in force at the beat (``N``, ``AFIB``, ``AFL``, ``SVTA``, ``NOD``,
  ... as MIT-BIH's rhythm annotations name them; empty before a record's first one);
- ``symbol`` (the reference beat symbol), ``label`` (its class) and ``predicted`` (the class called);
- ``p_<class>``: the class probabilities (softmax of the model's outputs; a blend's mean).

A user can count errors any way from it (by time, rhythm, beat symbol) without loading a model.
:func:`error_counts` counts the VEB and SVEB errors per rhythm (or per record and rhythm, or any
columns) with EC57's rules (:func:`ecg_mlflow.metrics.ec57_counts`), so its rows add up to the gross
counts; ``compare`` puts the rhythm table in its report and the record-and-rhythm table in its CSVs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

import mlflow

from ecg_mlflow.dataset import BeatDataset
from ecg_mlflow.metrics import confusion, ec57_counts, metric_name

PREDICTIONS_FILE = "predictions.csv"
COLUMNS: tuple[str, ...] = ("record", "sample", "time_s", "rhythm", "symbol", "label", "predicted")
NO_RHYTHM = "(none)"  # how error_counts names beats before a record's first rhythm annotation


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(n, k)`` logits, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predictions_table(ds: BeatDataset, rows: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    """The predictions of beats ``rows`` ``(n,)`` (indices into :class:`~ecg_mlflow.dataset.BeatDataset`
    ``ds``): ``probabilities`` ``(n, k)`` over ``ds.classes``, ``predicted`` ``(n,)`` class codes.
    Returns a DataFrame with :data:`COLUMNS` and one ``p_<class>`` column per class; a beat without a
    reference label (label code < 0: a detected beat that no reference beat matches) has label ``''``."""
    rows, probabilities, predicted = np.asarray(rows), np.asarray(probabilities), np.asarray(predicted)
    classes = np.asarray(ds.classes, dtype=object)
    if probabilities.shape != (len(rows), len(classes)):
        raise ValueError(f"probabilities must be ({len(rows)}, {len(classes)}) for {len(rows)} beats and classes "
                         f"{list(classes)}, got {probabilities.shape}")
    if predicted.shape != (len(rows),):
        raise ValueError(f"predicted must be ({len(rows)},), got {predicted.shape}")
    codes = ds.label[rows].astype(int)
    df = pd.DataFrame({
        "record": ds.record[rows], "sample": ds.sample[rows], "time_s": np.round(ds.time_s[rows], 3),
        "rhythm": ds.rhythm[rows], "symbol": ds.symbol[rows],
        "label": np.where(codes >= 0, classes[np.maximum(codes, 0)], ""),
        "predicted": classes[predicted.astype(int)],
    })
    for i, c in enumerate(classes):
        df[f"p_{metric_name(c)}"] = np.round(probabilities[:, i], 5)
    return df


def log_predictions(table: pd.DataFrame) -> None:
    """Log ``table`` (:func:`predictions_table`) to the active run as ``predictions.csv``."""
    mlflow.log_text(table.to_csv(index=False), PREDICTIONS_FILE)


def read_predictions(run_id: str) -> pd.DataFrame | None:
    """The ``predictions.csv`` of variant run ``run_id``, or None when the run has none (runs logged
    before predictions were). Rhythm and class names are read as written (never as NaN)."""
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    if PREDICTIONS_FILE not in names:
        return None
    # load_text downloads into a temporary directory it removes again (one per child run in compare).
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{PREDICTIONS_FILE}")
    return pd.read_csv(io.StringIO(text), dtype={c: str for c in ("record", "rhythm", "symbol", "label", "predicted")},
                       keep_default_na=False)


def error_counts(table: pd.DataFrame, classes: Sequence[str], by: Sequence[str] = ("rhythm",)) -> pd.DataFrame:
    """VEB and SVEB errors of predictions ``table`` (:func:`predictions_table`, any number of patients)
    per group of the columns ``by`` (e.g. ``("rhythm",)`` or ``("record", "rhythm")``), under EC57's
    rules on each group's confusion matrix over ``classes``.

    One row per group, most beats first (rhythm ``(none)``: before a record's first rhythm annotation):
    the ``by`` columns, ``beats``, ``records``, and for ``veb`` and ``sveb``: ``_beats`` (reference),
    ``_found`` (TP), ``_missed`` (FN), ``_false`` (FP), ``_se`` and ``_ppv`` (fractions, NaN without a
    denominator). Each count column sums to the gross count of the same beats."""
    by = list(by)
    missing = [c for c in dict.fromkeys([*COLUMNS, *by]) if c not in table.columns]
    if missing:
        raise ValueError(f"predictions table lacks columns {missing}")
    code = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(table["label"]).union(table["predicted"]) - set(code))
    if unknown:
        raise ValueError(f"predictions name classes {unknown}, not among {list(classes)}")
    table = table.assign(rhythm=table["rhythm"].replace("", NO_RHYTHM))
    out = []
    for key, g in table.groupby(by, sort=False):
        cm = confusion(g["label"].map(code).to_numpy(), g["predicted"].map(code).to_numpy(), len(classes))
        counts = ec57_counts(cm, list(classes))
        row: dict[str, object] = {**dict(zip(by, key)), "beats": len(g), "records": g["record"].nunique()}
        for kind in ("veb", "sveb"):
            tp, fn, fp = (counts[f"{kind}_{c}"] for c in ("tp", "fn", "fp"))
            row |= {f"{kind}_beats": tp + fn, f"{kind}_found": tp, f"{kind}_missed": fn, f"{kind}_false": fp,
                    f"{kind}_se": tp / (tp + fn) if tp + fn else np.nan,
                    f"{kind}_ppv": tp / (tp + fp) if tp + fp else np.nan}
        out.append(row)
    if not out:
        return pd.DataFrame(columns=[*by, "beats", "records"])
    return pd.DataFrame(out).sort_values(["beats", *by], ascending=[False] + [True] * len(by), ignore_index=True)


__all__ = ["COLUMNS", "NO_RHYTHM", "PREDICTIONS_FILE", "error_counts", "log_predictions", "predictions_table",
           "read_predictions", "softmax"]
