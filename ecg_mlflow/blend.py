"""A cross-run ensemble: the mean class probabilities of the models of several LOSO runs on the same patients.

Two option sets often fail on different records (one misses the V beats of a record, the other
makes false S calls in another). :func:`blend` loads, for every patient, each LOSO run's base model
(no transfer) and transfer model from the tracking store, lets each predict the patient's test
beats from the inputs its own run prepared (window, RR features, recent reference), and calls each
beat the class of the **mean softmax probability** over the runs. Probabilities, not logits: a gated
model (``sveb_gate``, ``sveb_regular``, ``early_sveb``, ``sveb_af``) moves one logit by 1e4, which would swamp a
mean of logits.

Beats are matched by record and annotation sample. A beat that one run's window could not hold
(a few at a record's ends when the windows differ) is left out of the blend, and the count is
logged per patient as ``test_beats_left_out``.

The blend is logged as a LOSO run (tag ``ecg.role=loso``, plus ``blend_of`` naming the runs), with
one variant child per patient and variant carrying the ``test_*`` metrics, ``confusion_matrix.json``
and ``predictions.csv`` (the mean probabilities) of the LOSO contract, so :mod:`ecg_mlflow.compare`
reads it like any other: pooled with a run of the other patients, or set beside one of its members
on the same patients (paired subject bootstrap).
It trains nothing and registers nothing.

Every run is checked before any model is loaded or anything is logged: each must be a FINISHED
LOSO run, not itself a blend, with the same label scheme, paced-record choice, fine-tune minutes
and evaluation segment as the others, and the same patients with both variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ecg_mlflow import tracking
from ecg_mlflow.dataset import BeatDataset, PrepareConfig, prepare
from ecg_mlflow.experiment import VARIANTS, LosoConfig, PatientResult
from ecg_mlflow.loso import aggregate, beat_source, log_test_results, plan_folds, print_summary
from ecg_mlflow.predictions import log_predictions, predictions_table, softmax
from ecg_mlflow.resume import config_of_run
from ecg_mlflow.splits import patient_key, subject_of
from ecg_mlflow.training import predict_logits

BLEND_TAG = "blend_of"
# What decides which beats are a patient's test beats and what their labels are: the runs must agree.
SAME = ("label_scheme", "include_paced", "finetune_minutes", "evaluate_on")


class BlendError(ValueError):
    """A run that cannot be blended; the message names it."""


@dataclass
class Member:
    """One LOSO run of the blend: its configuration and, per (patient, variant), the variant child
    run and the model that predicted there (the transfer model, or the base model for no transfer)."""

    run_id: str
    name: str
    experiment_id: str
    cfg: LosoConfig
    models: dict[tuple[str, str], tuple[str, str]]  # (patient, variant) -> (child run id, model uri)

    @property
    def patients(self) -> set[str]:
        return {p for p, _ in self.models}


def parse_run_ids(loso_runs: str) -> list[str]:
    """``'a,b'`` -> ``['a', 'b']``: at least two distinct LOSO run ids."""
    ids = [s.strip() for s in str(loso_runs).split(",") if s.strip()]
    if any("+" in i for i in ids):
        raise BlendError(f"loso_runs: {loso_runs!r} pools runs with '+'; blend the runs of each set of patients "
                         "separately and pool the blends in compare")
    if len(ids) < 2:
        raise BlendError(f"loso_runs must name at least two LOSO runs, comma-separated, got {loso_runs!r}")
    if len(set(ids)) != len(ids):
        raise BlendError(f"loso_runs names a run more than once: {loso_runs!r}")
    return ids


def load_member(client: MlflowClient, run_id: str, given: LosoConfig) -> Member:
    """A LOSO run and the models of its FINISHED variant children, read from the store."""
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise BlendError(f"loso_runs: run {run_id!r} not found in the tracking store {mlflow.get_tracking_uri()}") \
            from e
    what = f"run {run_id!r} ({run.info.run_name})"
    role = run.data.tags.get(tracking.ROLE_TAG)
    if role != "loso":
        raise BlendError(f"loso_runs: {what} is not a LOSO run: its tag {tracking.ROLE_TAG} is {role!r}, "
                         "expected 'loso'")
    if BLEND_TAG in run.data.tags:
        raise BlendError(f"loso_runs: {what} is itself a blend (it logs no models); blend its runs "
                         f"{run.data.tags[BLEND_TAG]} with the others instead")
    if run.info.status != "FINISHED":
        raise BlendError(f"loso_runs: {what} has status {run.info.status}, expected FINISHED")
    # All experiments: a child started without an experiment id may sit outside its parent's.
    children = mlflow.search_runs(
        search_all_experiments=True, output_format="list",
        filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.`{tracking.ROLE_TAG}` = 'variant' "
                      "and attributes.status = 'FINISHED'")
    models: dict[tuple[str, str], tuple[str, str]] = {}
    for c in children:
        tags = c.data.tags
        key = (tags.get("patient", ""), tags.get("variant", ""))
        if key[1] not in VARIANTS or not key[0]:
            continue
        uri = f"runs:/{c.info.run_id}/model" if key[1] == "transfer" else tags.get("base_model_uri", "")
        if not uri:
            raise BlendError(f"loso_runs: {what}: its {key[1]} run for patient {key[0]} names no base_model_uri")
        if key in models:
            raise BlendError(f"loso_runs: {what} has more than one {key[1]} run for patient {key[0]}")
        models[key] = (c.info.run_id, uri)
    if not models:
        raise BlendError(f"loso_runs: {what} has no FINISHED variant runs")
    for p in {p for p, _ in models}:
        lacking = [v for v in VARIANTS if (p, v) not in models]
        if lacking:
            raise BlendError(f"loso_runs: {what} has no FINISHED {lacking[0]} run for patient {p}")
    return Member(run_id, run.info.run_name or run_id, run.info.experiment_id,
                  config_of_run(dict(run.data.params), given), models)


def check_members(members: list[Member]) -> list[str]:
    """The patients every member holds out, after checking the members agree on what a test beat is."""
    def setting(m: Member, k: str):
        return m.cfg.evaluate_on if k == "evaluate_on" else getattr(m.cfg.prepare, k)

    first = members[0]
    for m in members[1:]:
        for k in SAME:
            if setting(m, k) != setting(first, k):
                raise BlendError(f"loso_runs: run {m.run_id!r} has {k}={setting(m, k)!r}, run {first.run_id!r} has "
                                 f"{k}={setting(first, k)!r}; blended runs must score the same beats")
        if m.patients != first.patients:
            odd = sorted(m.patients ^ first.patients)
            raise BlendError(f"loso_runs: runs {first.run_id!r} and {m.run_id!r} hold out different patients "
                             f"(not in both: {odd}); blend runs of the same patients")
    return sorted(first.patients, key=patient_key)


def mean_probabilities(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray, int]:
    """Blend the members' predictions of one patient's test beats.

    ``parts``: per member ``(sample (n_i,), label (n_i,), probabilities (n_i, k))``. Returns the
    samples every member holds (sorted), their labels, the mean probabilities ``(n, k)`` and the
    number of beats left out because some member lacks them. Raises :class:`BlendError` when the
    members label a shared beat differently."""
    common = parts[0][0]
    for s, _, _ in parts[1:]:
        common = np.intersect1d(common, s)
    every = np.unique(np.concatenate([s for s, _, _ in parts]))
    labels, total = None, np.zeros((len(common), parts[0][2].shape[1]))
    for s, y, p in parts:
        order = np.argsort(s, kind="stable")
        pos = order[np.searchsorted(s, common, sorter=order)]
        if labels is None:
            labels = y[pos]
        elif not np.array_equal(labels, y[pos]):
            raise BlendError("blended runs label the same beats differently; were they prepared from other data?")
        total += p[pos]
    return common, labels, total / len(parts), int(len(every) - len(common))


class _Predictor:
    """Each member's dataset, folds and loaded models, made once and shared across patients."""

    def __init__(self, members: list[Member]):
        self.members = members
        self.data: dict[PrepareConfig, BeatDataset] = {}
        self.tests: dict[str, dict[str, np.ndarray]] = {}
        self.models: dict[str, object] = {}

    def prepare(self) -> None:
        """Every member's beat table (from the cache when present), and its records checked."""
        for m in self.members:
            if m.cfg.prepare not in self.data:
                self.data[m.cfg.prepare] = prepare(m.cfg.prepare)
            ds = self.data[m.cfg.prepare]
            missing = sorted(m.patients - set(ds.records))
            if missing:
                raise BlendError(f"loso_runs: run {m.run_id!r} holds out {missing}, which its data "
                                 f"(records={m.cfg.prepare.records!r}) does not hold")
            self.tests[m.run_id] = {r: mask for f in plan_folds(ds, m.cfg) for r, mask in f.test.items()}

    def rows_of(self, m: Member, patient: str, samples: np.ndarray) -> np.ndarray:
        """The rows of ``m``'s beat table for ``patient``'s test beats at ``samples`` (sorted), in that order."""
        ds = self.data[m.cfg.prepare]
        rows = np.flatnonzero(self.tests[m.run_id][patient])
        rows = rows[np.argsort(ds.sample[rows], kind="stable")]
        return rows[np.isin(ds.sample[rows], samples)]

    def predict(self, m: Member, patient: str, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import mlflow.keras

        ds = self.data[m.cfg.prepare]
        uri = m.models[(patient, variant)][1]
        if uri not in self.models:
            self.models[uri] = mlflow.keras.load_model(uri)
        model = self.models[uri]
        rows = np.flatnonzero(self.tests[m.run_id][patient])
        logits = predict_logits(model, beat_source(ds, m.cfg.train.recent_reference), rows)
        return ds.sample[rows], ds.label[rows], softmax(logits)


def blend(loso_runs: str, data_dir: str | None = None, echo: bool = True) -> str:
    """Blend the LOSO runs ``loso_runs`` (comma-separated ids, same patients) into one logged LOSO
    run of the mean class probabilities; return its run id. ``data_dir``: where the records are
    (default: the runs' own, then ``$ECG_DATA_DIR``, then the download cache)."""
    ids = parse_run_ids(loso_runs)
    tracking.check_tracking_server()
    client = MlflowClient()
    given = LosoConfig(prepare=PrepareConfig(data_dir=data_dir or None))
    members = [load_member(client, rid, given) for rid in ids]
    patients = check_members(members)
    predictor = _Predictor(members)
    predictor.prepare()
    classes = predictor.data[members[0].cfg.prepare].classes
    first = members[0].cfg

    results: list[PatientResult] = []
    with tracking.run_to_log_into(members[0].experiment_id, "blend") as active:
        parent = active.info.run_id
        mlflow.set_tags({tracking.ROLE_TAG: "loso", BLEND_TAG: ",".join(ids),
                         **{f"{BLEND_TAG}.{i}": rid for i, rid in enumerate(ids)}})
        logged = client.get_run(parent).data.params
        params = {"loso_runs": ",".join(ids), "model": "blend", "records": first.prepare.records,
                  "label_scheme": first.prepare.label_scheme, "finetune_minutes": first.prepare.finetune_minutes,
                  "include_paced": first.prepare.include_paced, "evaluate_on": first.evaluate_on,
                  "holdout": ",".join(patients), "data_dir": data_dir or ""}
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items() if k not in logged})
        for patient in patients:
            for variant in VARIANTS:
                parts = [predictor.predict(m, patient, variant) for m in members]
                samples, y, probs, left_out = mean_probabilities(parts)
                pred = probs.argmax(axis=1).astype(np.int64)
                with mlflow.start_run(run_name=f"{patient}-{variant}", nested=True) as child:
                    mlflow.set_tags({tracking.ROLE_TAG: "variant", "patient": patient, "subject": subject_of(patient),
                                     "variant": variant, "loso_run_id": parent,
                                     "members": ",".join(m.models[(patient, variant)][0] for m in members)})
                    m, cm = log_test_results(y, pred, classes, f"{patient} {variant} (blend of {len(members)})")
                    mlflow.log_metric("test_beats_left_out", left_out)
                    # The first run's beat table names the blended beats (all members label them alike).
                    rows = predictor.rows_of(members[0], patient, samples)
                    log_predictions(predictions_table(predictor.data[members[0].cfg.prepare], rows, probs, pred))
                results.append(PatientResult(patient, variant, child.info.run_id, m, cm))
            if echo:
                t = next(r for r in results if r.record == patient and r.variant == "transfer")
                print(f"blend: patient {patient}: transfer accuracy {t.metrics['accuracy']:.4f}", flush=True)
        summary = aggregate(results, classes)
        mlflow.log_metrics(summary | {"n_patients": len(patients)})
    if echo:
        print_summary(summary)
        print(f"\nblend run {parent} of {', '.join(ids)}; compare it with: mlflow run . -e compare "
              f"-P loso_runs={ids[0]},{parent}")
    return parent


__all__ = ["BLEND_TAG", "BlendError", "Member", "blend", "check_members", "load_member", "mean_probabilities",
           "parse_run_ids", "softmax"]
