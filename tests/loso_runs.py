"""LOSO runs with known confusion matrices, logged into a real MLflow store through the client API.

:func:`log_loso` builds the run tree of the tracking contract (README, "What is logged where"): a
parent tagged ecg.role=loso and variant children with the tags, ``test_*`` metrics,
``confusion_matrix.json`` and ``predictions.csv`` that the LOSO experiment logs. Used by the
tests of ``compare`` and ``select``, which read such runs.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ecg_mlflow import compare as C
from ecg_mlflow.labels import AAMI
from ecg_mlflow.metrics import SUMMARY_STATS, gross_and_average, metrics_from_cm
from ecg_mlflow.splits import subject_of

CLASSES = list(AAMI.classes)  # N S V F Q
N, S, V, F, Q = range(5)


def patient_cms(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Confusion matrices (5, 5) per patient and variant, with classes missing on purpose:
    '100' has no V beats and nothing called V (VEB Se, +P undefined); '101' has no S beats
    (SVEB Se undefined) and only its transfer variant calls beats S; transfer improves the diagonal."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in ("100", "101", "105", "201", "202", "208"):
        base = rng.integers(0, 12, (5, 5))
        base[:, Q] = 0
        np.fill_diagonal(base, rng.integers(20, 200, 5))
        cms = {"no_transfer": base.copy(), "transfer": base.copy()}
        cms["transfer"][np.diag_indices(5)] += rng.integers(0, 15, 5)  # transfer gets more right
        cms["transfer"][N, S] = max(0, int(base[N, S]) - int(rng.integers(-3, 6)))
        for cm in cms.values():
            if p == "100":
                cm[V, :] = 0
                cm[:, V] = 0
            if p == "101":
                cm[S, :] = 0
                cm[:, S] = 0
        if p == "101":
            cms["transfer"][N, S] = 3
        out[p] = cms
    return out


RHYTHMS = ("N", "AFIB", "SVTA")


def predictions_of(cm: np.ndarray, patient: str, seed: int) -> pd.DataFrame:
    """A ``predictions.csv`` table that adds up to ``cm``: one row per beat, each beat given one of
    :data:`RHYTHMS` at random, probability 1 on its call."""
    rng = np.random.default_rng(seed)
    pairs = np.array([(i, j) for i in range(5) for j in range(5) for _ in range(int(cm[i, j]))]).reshape(-1, 2)
    pairs = pairs[rng.permutation(len(pairs))]
    table = pd.DataFrame({"record": patient, "sample": 300 * np.arange(len(pairs)), "time_s": np.arange(len(pairs)),
                          "rhythm": rng.choice(RHYTHMS, len(pairs)), "symbol": "N",
                          "label": [CLASSES[i] for i in pairs[:, 0]], "predicted": [CLASSES[j] for j in pairs[:, 1]]})
    for k, c in enumerate(CLASSES):
        table[f"p_{c}"] = (pairs[:, 1] == k).astype(float)
    return table


def log_loso(cms: dict[str, dict[str, np.ndarray]], *, experiment: str = "ecg-loso", name: str = "loso",
             params: dict | None = None, parent_metrics: bool = True, role: str = "loso",
             variants: tuple[str, ...] = C.VARIANTS, undefined: str = "nan", predictions: bool = True,
             trained_on: dict[str, list[str]] | None = None) -> str:
    """Log a LOSO parent run and its variant children; return the parent's run id.

    Child metrics are ``test_<k>`` for every key of ``metrics_from_cm``; the parent gets
    ``gross_<variant>_<stat>`` / ``avg_<variant>_<stat>``. A statistic without a denominator is
    logged as NaN (``undefined="nan"``, the contract) or left out (``"absent"``, older runs).
    ``predictions``: each child also logs a ``predictions.csv`` (:func:`predictions_of`), as LOSO
    runs do; False makes runs as they were logged before per-beat predictions. The client API with
    batched logging keeps this at a few calls per run. ``trained_on``: per
    patient, the records its base model trained on; each patient then gets a FINISHED base run
    (tag ``train_records``) that its variant runs name in ``base_run_id``, as LOSO runs do (without
    it they name a base run ``'b'`` that does not exist).
    """
    def complete(values: dict[str, float], names) -> dict[str, float]:
        return {k: values.get(k, math.nan) for k in names} if undefined == "nan" else values

    test_names = list(metrics_from_cm(np.eye(5, dtype=int), CLASSES))  # every class present: every name
    summary_names = [f"{kind}_{v}_{s}" for kind in ("gross", "avg") for v in variants for s in SUMMARY_STATS]
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    parent = client.create_run(exp_id, run_name=name, tags={"ecg.role": role}).info.run_id
    params = params or {"label_scheme": "aami", "finetune_minutes": 5, "model": "seed_cnn"}
    summary = {}
    bases = {p: "b" for p in cms}
    for p, records in (trained_on or {}).items():
        bases[p] = client.create_run(exp_id, run_name=f"base-{p}", tags={
            "mlflow.parentRunId": parent, "ecg.role": "base", "subject": subject_of(p),
            "train_records": ",".join(records)}).info.run_id
        client.set_terminated(bases[p])
    for variant in variants:
        per = [metrics_from_cm(cms[p][variant], CLASSES) for p in cms]
        agg = gross_and_average(per, [cms[p][variant] for p in cms], CLASSES)
        summary.update({f"{k.split('_', 1)[0]}_{variant}_{k.split('_', 1)[1]}": v for k, v in agg.items()})
        for p, m in zip(cms, per):
            child = client.create_run(exp_id, run_name=f"{p}-{variant}", tags={
                "mlflow.parentRunId": parent, "ecg.role": "variant", "patient": p, "subject": subject_of(p),
                "variant": variant, "base_run_id": bases[p]}).info.run_id
            client.log_batch(child, metrics=[Metric(f"test_{k}", v, 0, 0) for k, v in complete(m, test_names).items()])
            client.log_dict(child, {"labels": CLASSES, "matrix": cms[p][variant].tolist()}, "confusion_matrix.json")
            if predictions:
                client.log_text(child, predictions_of(cms[p][variant], p, int(p)).to_csv(index=False), "predictions.csv")
            client.set_terminated(child)
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in complete(summary, summary_names).items()]
                     if parent_metrics else [])
    client.set_terminated(parent)
    return parent
