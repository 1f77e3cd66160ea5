"""Leave-one-subject-out experiment: base model per held-out subject, no-transfer and transfer per record.

Run tree (see README, "What is logged where")::

    loso (parent, ecg.role=loso)
    ├── base-<subject>            ecg.role=base      base model, trained on every other subject
    ├── <record>-no_transfer      ecg.role=variant   base model on the record's test part
    └── <record>-transfer         ecg.role=variant   head re-trained on the record's fine-tune part,
                                                     evaluated on the very same test beats

The functions :func:`fit_base`, :func:`evaluate_no_transfer` and :func:`fit_transfer` log to the
*active* run, so the ``train_base`` and ``transfer`` entry points reuse them for single steps.

Quick runs and honest model choice: ``base_folds=k`` deals the held-out subjects into ``k`` groups
that share one base model each (trained on every subject outside the group), and
``evaluate_on=validation`` fine-tunes on the first half of each record's fine-tune minutes and
evaluates on the second half, never reading a test part (:func:`plan_folds`).

:func:`run_fold` is one held-out subject (or group); :mod:`ecg_mlflow.executors` runs the folds
in this process, in local worker processes or as Ray tasks, each fold logging its own child runs
(executor ``auto`` is made concrete once the folds and their base training are known). A run
whose folds failed ends FAILED, naming the patients; ``resume_run_id`` re-opens it and re-runs
only what did not finish (:func:`run_loso`). ``base_run_id`` takes the base models of an earlier
LOSO run with the same data and base-training parameters, so transfer options can be tried in
minutes against the very same base models.

The configuration and result types are in :mod:`ecg_mlflow.experiment`. Reading finished runs
back (what a resume keeps, the base models a ``base_run_id`` lends, the configuration a run was
started with) is in :mod:`ecg_mlflow.resume`.
"""

from __future__ import annotations

import contextlib
import shlex
import time
import traceback
from dataclasses import replace
from typing import Any, Callable

import numpy as np

import mlflow
from mlflow import MlflowClient

from ecg_mlflow import executors
from ecg_mlflow import metrics as metrics_mod
from ecg_mlflow import registry, tracking
from ecg_mlflow.beats import ATRIAL_RHYTHMS, REGULAR_IRREGULARITY
from ecg_mlflow.dataset import BeatDataset, PrepareConfig, log_to_mlflow, prepare, select_records
from ecg_mlflow.executors import FoldOutcome, FoldTask
from ecg_mlflow.experiment import HEADLINE, VARIANTS, BaseModel, LosoConfig, PatientResult
from ecg_mlflow.models import (EARLY_REFERENCES, REGULAR_MEASURES, gate_irregular, gate_premature, promote_early,
                               veto_atrial)
from ecg_mlflow.predictions import log_predictions, predictions_table, softmax
from ecg_mlflow.records import RECORD_SETS, resolve_data_dir
from ecg_mlflow.resume import (EXECUTION_TAG, FAILED_TAG, THREADS_TAG, check_base_settings, check_not_running,
                               claim, config_for_resume, end_orphaned_runs, end_stale_children, loso_run,
                               parent_run, public_uri, ran_threads, resume_command, resume_plan, reused_bases)
from ecg_mlflow.splits import Fold, group_fold, loso_folds, subject_groups, subject_of, validation_fold
from ecg_mlflow.training import (BeatSource, atrial_threshold, early_normal_rows, early_threshold, fine_tune,
                                 fit_atrial_detector, head_features, irregular_threshold, model_input_names,
                                 nearest_replay_rows, predict_logits, premature_rows, premature_threshold,
                                 replay_rows, train_base, visible_gpus)


def holdout_subjects(records: list[str], holdout: str | None) -> list[str]:
    """Subjects to hold out among those of ``records``: all of them, those named (a record id names
    its subject), or those of a record set (``half1``, ``half2``: :data:`ecg_mlflow.records.RECORD_SETS`)."""
    available = list(dict.fromkeys(subject_of(r) for r in records))
    if holdout is None or holdout.strip().lower() in ("", "all"):
        return available
    names = RECORD_SETS.get(holdout.strip().lower()) or holdout.replace(",", " ").split()
    named = [subject_of(s) for s in names]
    unknown = [s for s in named if s not in available]
    if unknown:
        raise ValueError(f"holdout names subjects {unknown} that are not in the prepared records {list(records)}")
    return list(dict.fromkeys(named))


def records_to_prepare(cfg: PrepareConfig) -> list[str]:
    """The records ``prepare`` reads for ``cfg``, known before any is read or downloaded: the checks
    that need only their names (two subjects, ``holdout``, ``patient``) run on them first."""
    return select_records(cfg, resolve_data_dir(cfg.data_dir))[0]


def plan_folds(ds: BeatDataset, cfg: LosoConfig, only: str | None = None) -> list[Fold]:
    """The folds of a LOSO run: one per held-out subject, or ``cfg.base_folds`` groups sharing a
    base model; with ``evaluate_on=validation`` each evaluates on the second half of the fine-tune
    minutes instead of the test part (see :mod:`ecg_mlflow.splits`). ``only``: just the fold of
    that name (a worker builds its own fold's masks, not every fold's)."""
    subjects = holdout_subjects(ds.records, cfg.holdout)
    if cfg.base_folds:
        groups = subject_groups(subjects, cfg.base_folds)
        folds = [group_fold(ds.record, ds.part, name, members) for name, members in groups.items()
                 if only is None or name == only]
    else:
        folds = loso_folds(ds.record, ds.part, [only] if only is not None else subjects)
    if cfg.evaluate_on == "validation":
        folds = [validation_fold(f, ds.time_s, cfg.prepare.finetune_minutes) for f in folds]
    return folds


def register_once(model_uri: str, name: str, tags: dict[str, object]) -> str:
    """Register ``model_uri`` as a version of ``name``, unless this LOSO run already holds one.

    Called after the run's model is logged and its metrics are in. A version tagged with the same
    ``loso_run_id`` that belongs to this very run is kept (nothing registered twice); one that
    belongs to an earlier attempt that did not finish (a killed worker, an interrupted run now
    being resumed) is deleted first, so each LOSO run keeps exactly one version per name.
    """
    loso_run_id, run_id = str(tags.get("loso_run_id") or ""), str(tags.get("run_id") or "")
    if loso_run_id:
        client = MlflowClient()
        for v in client.search_model_versions(f"name = '{name}' and tags.loso_run_id = '{loso_run_id}'"):
            if v.run_id == run_id or client.get_run(v.run_id).info.status == "FINISHED":
                return str(v.version)
            client.delete_model_version(name, v.version)
            print(f"    registry: removed {name} version {v.version} of unfinished run {v.run_id}", flush=True)
    return registry.register(model_uri, name, tags)


def beat_source(ds: BeatDataset, recent_reference: str = "all") -> BeatSource:
    """The dataset's beats as tensors, made once per dataset object and ``recent_reference`` (once
    per process in workers) and shared by every fold: folds select rows by index, nothing copies
    the beat array."""
    sources = ds.__dict__.setdefault("_beat_sources", {})  # cached on the dataset, which each process loads once
    if recent_reference not in sources:
        sources[recent_reference] = BeatSource.from_dataset(ds, recent_reference)
    return sources[recent_reference]


def _epoch_printer(total: int, label: str):
    """Per-epoch callback: log the metrics to the active run and print a progress line."""
    start = time.monotonic()

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        tracking.log_epoch_metrics(epoch, logs)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items())
        print(f"      {label} epoch {epoch + 1}/{total}: {shown} ({time.monotonic() - start:.0f} s)", flush=True)

    return on_epoch


def fit_base(ds: BeatDataset, fold: Fold, cfg: LosoConfig, loso_run_id: str | None = None) -> BaseModel:
    """Train the base model of ``fold`` on every other subject's beats; log it to the active run."""
    run_id = mlflow.active_run().info.run_id
    src, train_idx = beat_source(ds, cfg.train.recent_reference), np.flatnonzero(fold.train)
    train_records = tuple(dict.fromkeys(ds.record[fold.train].tolist()))
    # Leakage guard: the held-out subject's records must not be among the training records.
    assert not set(train_records) & set(fold.records), "held-out subject leaked into base training"
    mlflow.set_tags({tracking.ROLE_TAG: "base", "subject": fold.subject,
                     "heldout_records": ",".join(fold.records), "train_records": ",".join(train_records)})
    mlflow.log_params({"n_train_beats": len(train_idx), "n_train_records": len(train_records)})
    groups = ds.subject if cfg.train.subject_balance > 0 else None
    model, _ = train_base(src, train_idx, len(ds.classes), cfg.train,
                          on_epoch=_epoch_printer(cfg.train.epochs, f"base {fold.subject}"), groups=groups)
    model_uri = tracking.log_keras_model(model, src.inputs(train_idx[:8], model_input_names(model)))
    if cfg.registers:
        register_once(model_uri, registry.base_model_name(cfg.registry_prefix, fold.subject), {
            "subject": fold.subject, "run_id": run_id, "loso_run_id": loso_run_id or "",
            "train_records": ",".join(train_records), "dataset_digest": ds.digest,
        })
    return BaseModel(model, fold.subject, run_id, model_uri, train_records)


def test_metric_names(classes: list[str]) -> list[str]:
    """Every test metric a variant run logs (without the ``test_`` prefix), whatever its values."""
    per_class = [f"{kind}_{metrics_mod.metric_name(c)}" for c in classes for kind in ("precision", "recall")]
    return ["accuracy", "macro_f1", "n_beats", *per_class, *metrics_mod.EC57_COUNTS, *metrics_mod.EC57_STATS]


def with_missing_as_nan(values: dict[str, float], names: list[str]) -> dict[str, float]:
    """``values`` over exactly ``names``: a statistic without a denominator is logged as NaN, so both
    variants carry identical metric names and the value reads as missing (never as 0)."""
    return {k: float(values.get(k, np.nan)) for k in names}


def log_test_results(y_true: np.ndarray, pred: np.ndarray, classes: list[str], title: str) -> tuple[dict, np.ndarray]:
    """Test metrics ``test_*`` (NaN where undefined) and ``confusion_matrix.json``/``.png`` of labels
    ``y_true`` and predictions ``pred`` (both ``(n,)`` class codes), logged to the active run."""
    m, cm = metrics_mod.evaluate(y_true, pred, classes)
    logged = with_missing_as_nan(m, test_metric_names(classes))
    mlflow.log_metrics({f"test_{k}": v for k, v in logged.items()})
    tracking.log_confusion(cm, classes, title=title)
    return m, cm


def _evaluate(ds: BeatDataset, mask: np.ndarray, model, src: BeatSource, title: str) -> tuple[dict, np.ndarray]:
    """``model``'s calls on the beats of ``mask``: test metrics, confusion matrix and
    ``predictions.csv`` (each beat's rhythm, class, call and class probabilities), logged to the active run."""
    rows = np.flatnonzero(mask)
    logits = predict_logits(model, src, rows)
    pred = np.argmax(logits, axis=1).astype(np.int64)
    m, cm = log_test_results(ds.label[rows], pred, ds.classes, title)
    log_predictions(predictions_table(ds, rows, softmax(logits), pred))
    return m, cm


def _variant_tags(record: str, variant: str, base: BaseModel, loso_run_id: str | None) -> dict[str, str]:
    return {tracking.ROLE_TAG: "variant", "patient": record, "subject": subject_of(record), "variant": variant,
            "base_run_id": base.run_id, "base_model_uri": base.model_uri, "loso_run_id": loso_run_id or ""}


def evaluate_no_transfer(ds: BeatDataset, fold: Fold, record: str, base: BaseModel,
                         loso_run_id: str | None = None, recent_reference: str = "all") -> PatientResult:
    """The base model on ``record``'s test part, logged to the active run (variant ``no_transfer``);
    ``recent_reference``: the one the base model was trained with (:class:`TrainConfig`)."""
    mlflow.set_tags(_variant_tags(record, "no_transfer", base, loso_run_id))
    m, cm = _evaluate(ds, fold.test[record], base.model, beat_source(ds, recent_reference), f"{record} no transfer")
    return PatientResult(record, "no_transfer", mlflow.active_run().info.run_id, m, cm)


# The three transfer rules below read their rhythm features from the dataset's beat source
# (src.rhythm_np), made once per dataset, not again for every fold.
def gate_sveb(ds: BeatDataset, src: BeatSource, fold: Fold, model, share: float):
    """``model`` behind :func:`ecg_mlflow.models.gate_premature`, its threshold the ``share``
    quantile of the earliness of the fold's training S beats (other subjects only); the threshold
    is logged to the active run as ``sveb_gate_threshold``."""
    code = ds.classes.index("S")
    threshold = premature_threshold(src.rhythm_np["rr"], src.rhythm_np["rr_long"], ds.label,
                                    np.flatnonzero(fold.train), code, share)
    mlflow.log_param("sveb_gate_threshold", round(threshold, 4))
    return gate_premature(model, threshold, code)


def gate_irregular_sveb(ds: BeatDataset, src: BeatSource, fold: Fold, model, share: float,
                        measure: str = "successive"):
    """``model`` behind :func:`ecg_mlflow.models.gate_irregular` (no S calls where the rhythm before a
    beat is irregular), its threshold the ``share`` quantile of the irregularity before the fold's
    training S beats (other subjects only); the threshold is logged to the active run as
    ``sveb_regular_threshold``. ``measure``: the irregularity read (:data:`ecg_mlflow.models.REGULAR_MEASURES`)."""
    code, name = ds.classes.index("S"), REGULAR_MEASURES[measure]
    threshold = irregular_threshold(src.rhythm_np[name][:, 0], ds.label, np.flatnonzero(fold.train), code, share)
    mlflow.log_param("sveb_regular_threshold", round(threshold, 4))
    return gate_irregular(model, threshold, code, measure=name)


def promote_early_sveb(ds: BeatDataset, src: BeatSource, fold: Fold, model, share: float, rate: float = 0.0,
                       reference: str = "mean"):
    """``model`` behind :func:`ecg_mlflow.models.promote_early` (N calls become S for beats early in a
    regular rhythm and, with ``rate`` > 0, at a local heart rate of at least ``rate`` beats a minute),
    its threshold the ``share`` quantile of the earliness of the fold's training N beats in regular
    rhythm (other subjects only); the threshold is logged to the active run as
    ``early_sveb_threshold``. ``reference``: earliness is the previous RR over the five-minute
    ``mean`` or ``median`` RR (:data:`ecg_mlflow.models.EARLY_REFERENCES`)."""
    normal, sveb = ds.classes.index("N"), ds.classes.index("S")
    name = EARLY_REFERENCES[reference]
    threshold = early_threshold(src.rhythm_np[name], src.rhythm_np["rr_irregular"], ds.label,
                                np.flatnonzero(fold.train), normal, share)
    mlflow.log_param("early_sveb_threshold", round(threshold, 4))
    return promote_early(model, threshold, REGULAR_IRREGULARITY, normal, sveb, fast_rr=60.0 / rate if rate else 0.0,
                         reference=name)


def veto_atrial_sveb(ds: BeatDataset, src: BeatSource, fold: Fold, model, share: float, seed: int):
    """``model`` behind :func:`ecg_mlflow.models.veto_atrial` (no S calls where the rhythm before a beat
    reads as atrial fibrillation or flutter), its detector trained on the fold's training subjects'
    beats against their reference rhythm (other subjects only), its threshold the ``1 - share``
    quantile of the detector's logits over their S beats; the threshold is logged to the active run
    as ``sveb_af_threshold``. Folds with the same training subjects (``base_folds``) share one
    detector, trained once per process."""
    train = np.flatnonzero(fold.train)
    detector = _per_base_fold(src, "_atrial_detectors", (train.tobytes(), seed),
                              lambda: fit_atrial_detector(src, train, np.isin(ds.rhythm, ATRIAL_RHYTHMS), seed))
    code = ds.classes.index("S")
    threshold = atrial_threshold(detector, src, ds.label, train, code, share)
    mlflow.log_param("sveb_af_threshold", round(threshold, 4))
    return veto_atrial(model, detector, threshold, code)


def _per_base_fold(src: BeatSource, name: str, key: tuple, make: Callable[[], Any]) -> Any:
    """What ``make()`` gives for ``key``, made once per process and kept on ``src`` under ``name``:
    the records of a base fold (``base_folds``) share its base model and training rows and come one
    after another in one process, so each of them reads what the first made. One key at a time, so
    a process never holds more than one base fold's worth."""
    cache = src.__dict__.setdefault(name, {})
    if key not in cache:
        cache.clear()
        cache[key] = make()
    return cache[key]


def training_features(base: BaseModel, src: BeatSource, train_idx: np.ndarray) -> np.ndarray:
    """:func:`ecg_mlflow.training.head_features` of ``base`` over the fold's training rows
    ``train_idx``, ``(len(train_idx), d)``: what ``finetune_replay_select=nearest`` measures each
    patient's distance on. Computed once per base model and process (:func:`_per_base_fold`): about
    ``4 * d`` bytes a row, 0.1 to 0.2 GB for a base model trained on half the records or more."""
    return _per_base_fold(src, "_head_features", (base.model_uri, train_idx.tobytes()),
                          lambda: head_features(base.model, src, train_idx))


def check_sveb_gate(cfg: LosoConfig, ds: BeatDataset, folds: list[Fold]) -> None:
    """``finetune_premature`` makes S beats of the AAMI scheme's N and S rows: refuse it under another
    scheme. ``sveb_gate``, ``sveb_regular``, ``early_sveb`` and ``sveb_af`` act on the AAMI scheme's S class
    and set their thresholds from each fold's training S beats (``sveb_gate``, ``sveb_regular``,
    ``sveb_af``) or N beats in regular rhythm (``early_sveb``); ``sveb_af`` also trains a detector on
    their beats in and out of atrial fibrillation or flutter: refuse them (``ValueError`` naming the
    parameter) before any training when the scheme is another or a fold's training subjects have no
    such beats."""
    if cfg.train.finetune_premature > 0 and ds.meta["label_scheme"] != "aami":
        raise ValueError(f"finetune_premature={cfg.train.finetune_premature} needs label_scheme=aami (its N and S "
                         f"classes), got {ds.meta['label_scheme']!r}")
    irregular = ds.rr_irregular()[:, 0] if cfg.train.early_sveb > 0 else None
    for name, share, cls in (("sveb_gate", cfg.train.sveb_gate, "S"), ("sveb_regular", cfg.train.sveb_regular, "S"),
                             ("early_sveb", cfg.train.early_sveb, "N"), ("sveb_af", cfg.train.sveb_af, "S")):
        if share <= 0:
            continue
        if ds.meta["label_scheme"] != "aami":
            raise ValueError(f"{name}={share} needs label_scheme=aami (its S class), "
                             f"got {ds.meta['label_scheme']!r}")
        code = ds.classes.index(cls)
        what = "S beat" if cls == "S" else "N beat in regular rhythm"
        for fold in folds:
            usable = fold.train & (ds.label == code)
            if cls == "N":
                usable &= irregular < REGULAR_IRREGULARITY
            if not usable.any():
                raise ValueError(f"{name}={share}: the training subjects of fold {fold.subject} "
                                 f"have no {what} to set the threshold from; add records or set {name}=0")
            atrial = np.isin(ds.rhythm[fold.train], ATRIAL_RHYTHMS) if name == "sveb_af" else None
            if atrial is not None and (atrial.all() or not atrial.any()):
                raise ValueError(f"{name}={share}: the training subjects of fold {fold.subject} have "
                                 f"{'only' if atrial.any() else 'no'} beats in atrial fibrillation or flutter "
                                 f"(reference rhythm {' or '.join(ATRIAL_RHYTHMS)}) to train its detector on; "
                                 f"add records or set {name}=0")


def fit_transfer(ds: BeatDataset, fold: Fold, record: str, base: BaseModel, cfg: LosoConfig,
                 loso_run_id: str | None = None) -> PatientResult:
    """Re-train ``base``'s head on ``record``'s fine-tune part, evaluate on its test part, log to the
    active run (variant ``transfer``) and register the transfer model."""
    run_id = mlflow.active_run().info.run_id
    mlflow.set_tags(_variant_tags(record, "transfer", base, loso_run_id))
    src, ft_idx = beat_source(ds, cfg.train.recent_reference), np.flatnonzero(fold.finetune[record])
    # Replayed beats come from the fold's base-training rows: other subjects only.
    train_idx = np.flatnonzero(fold.train)
    if cfg.train.finetune_replay_select == "nearest":
        centre = head_features(base.model, src, ft_idx).mean(axis=0)
        replay = nearest_replay_rows(ds.label, train_idx, training_features(base, src, train_idx), centre,
                                     cfg.train.finetune_replay)
    else:
        replay = replay_rows(ds.label, train_idx, cfg.train.finetune_replay, cfg.train.seed)
    n_replay = {"n_finetune_beats": len(ft_idx), "n_replay_beats": len(replay)}
    if cfg.train.finetune_replay_early > 0:
        early = early_normal_rows(ds.label, ds.early(), train_idx, ds.classes.index("N"),
                                  cfg.train.finetune_replay_early, cfg.train.seed, exclude=replay)
        replay = np.sort(np.concatenate([replay, early]))
        n_replay["n_replay_early_beats"] = len(early)
    rows = np.concatenate([ft_idx, replay])
    rhythm_rows = None
    if cfg.train.finetune_premature > 0:
        shapes, rhythms = premature_rows(ds.label, ft_idx, train_idx, ds.classes.index("N"),
                                         ds.classes.index("S"), cfg.train.finetune_premature, cfg.train.seed)
        rhythm_rows = np.concatenate([rows, rhythms])
        rows = np.concatenate([rows, shapes])
        n_replay["n_premature_beats"] = len(shapes)
    mlflow.log_params(n_replay)
    model, _ = fine_tune(base.model, src, rows, cfg.train, on_epoch=tracking.log_epoch_metrics,
                         rhythm_idx=rhythm_rows)
    if cfg.train.sveb_gate > 0:
        model = gate_sveb(ds, src, fold, model, cfg.train.sveb_gate)
    if cfg.train.sveb_regular > 0:
        model = gate_irregular_sveb(ds, src, fold, model, cfg.train.sveb_regular, cfg.train.regular_measure)
    if cfg.train.early_sveb > 0:
        model = promote_early_sveb(ds, src, fold, model, cfg.train.early_sveb, cfg.train.early_sveb_rate,
                                   cfg.train.early_reference)
    if cfg.train.sveb_af > 0:  # last: no rule above calls S in fibrillation or flutter
        model = veto_atrial_sveb(ds, src, fold, model, cfg.train.sveb_af, cfg.train.seed)
    m, cm = _evaluate(ds, fold.test[record], model, src, f"{record} transfer")
    model_uri = tracking.log_keras_model(model, src.inputs(ft_idx[:8], model_input_names(model)))
    if cfg.registers:
        headline = {f"test_{k}": f"{m[k]:.4f}" for k in HEADLINE if k in m}
        register_once(model_uri, registry.transfer_model_name(cfg.registry_prefix, record), {
            "patient": record, "subject": subject_of(record), "run_id": run_id, "loso_run_id": loso_run_id or "",
            "base_model_uri": base.model_uri, "base_run_id": base.run_id, "dataset_digest": ds.digest, **headline,
        })
    return PatientResult(record, "transfer", run_id, m, cm)


def aggregate(results: list[PatientResult], classes: list[str]) -> dict[str, float]:
    """Parent metrics ``gross_<variant>_<stat>`` and ``avg_<variant>_<stat>`` over patients."""
    out: dict[str, float] = {}
    for variant in VARIANTS:
        rs = [r for r in results if r.variant == variant]
        if not rs:
            continue
        agg = metrics_mod.gross_and_average([r.metrics for r in rs], [r.cm for r in rs], classes)
        names = [f"{kind}_{stat}" for kind in ("gross", "avg") for stat in metrics_mod.SUMMARY_STATS]
        for key, value in with_missing_as_nan(agg, names).items():
            kind, stat = key.split("_", 1)  # 'gross_veb_se' -> ('gross', 'veb_se')
            out[f"{kind}_{variant}_{stat}"] = float(value)
    return out


class FoldsFailed(RuntimeError):
    """Some folds failed; the LOSO run ended FAILED. ``patients``: the records to resume;
    ``command``: how to resume."""

    def __init__(self, run_id: str, patients: list[str], errors: dict[str, str], command: str):
        self.run_id, self.patients, self.errors, self.command = run_id, patients, errors, command
        lines = [f"loso run {run_id} FAILED: {len(errors)} fold(s) did not finish, patients {','.join(patients)}"]
        lines += [f"  subject {s}: {e}" for s, e in errors.items()]
        lines += ["resume it (finished patients are kept, the rest re-run) with:", f"  {command}"]
        super().__init__("\n".join(lines))


@contextlib.contextmanager
def _child_run(name: str, task: FoldTask):
    """A child run of the LOSO parent: nested when the parent is active in this process (sequential),
    else started with ``parent_run_id`` (a worker), which sets the same ``mlflow.parentRunId`` tag."""
    with mlflow.start_run(run_name=name, experiment_id=task.experiment_id, parent_run_id=task.parent_run_id,
                          nested=mlflow.active_run() is not None) as run:
        yield run


def run_fold(task: FoldTask) -> FoldOutcome:
    """One held-out subject, in whatever process the executor chose: the base model (or the FINISHED
    one ``task`` names), then each record's variants not in ``task.done``; every run logged by this
    process to ``task.tracking_uri`` under the parent. Never raises for the fold's own failure: the
    run in progress ends FAILED and the outcome carries the error."""
    cfg: LosoConfig = task.config
    mlflow.set_tracking_uri(task.tracking_uri)
    ds = executors.worker_dataset(task.dataset_path)
    (fold,) = plan_folds(ds, cfg, only=task.subject)
    outcome = FoldOutcome(task.subject)
    try:
        if task.base_model_uri:
            base = load_base(task.base_model_uri, *fold.records)
            print(f"    subject {fold.subject}: reusing finished base model {task.base_model_uri}", flush=True)
        else:
            with _child_run(f"base-{fold.subject}", task):
                base = fit_base(ds, fold, cfg, task.parent_run_id)
        for record in fold.records:
            for variant in VARIANTS:
                if (record, variant) in task.done:
                    continue
                with _child_run(f"{record}-{variant}", task):
                    if variant == "no_transfer":
                        result = evaluate_no_transfer(ds, fold, record, base, task.parent_run_id,
                                                      cfg.train.recent_reference)
                    else:
                        result = fit_transfer(ds, fold, record, base, cfg, task.parent_run_id)
                outcome.results.append(result)
            _print_record(record, [r for r in outcome.results if r.record == record])
    except Exception as exc:
        traceback.print_exc()
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


def _print_record(record: str, results: list[PatientResult]) -> None:
    by = {r.variant: r.metrics for r in results}
    if set(by) == set(VARIANTS):
        nt, tr = by["no_transfer"], by["transfer"]
        print(f"    record {record}: accuracy {nt['accuracy']:.3f} -> {tr['accuracy']:.3f}, "
              f"macro-F1 {nt.get('macro_f1', float('nan')):.3f} -> {tr.get('macro_f1', float('nan')):.3f}",
              flush=True)
    else:  # a resumed fold that re-ran only one variant
        for variant, m in by.items():
            print(f"    record {record} {variant}: accuracy {m['accuracy']:.3f}", flush=True)


def preflight(cfg: LosoConfig, verbose: bool = False) -> tuple[BeatDataset, list[Fold]]:
    """The prepared dataset and folds of a validated ``cfg``, after the checks: first those that need
    only the records' names (at least two subjects, ``holdout``), before any record is read or
    downloaded, then those that need the data (record files, thresholds that need training beats);
    ``ValueError`` or :class:`DataError` naming the culprit. Trains nothing."""
    records = records_to_prepare(cfg.prepare)
    if len({subject_of(r) for r in records}) < 2:
        raise ValueError(f"LOSO needs at least two subjects' records, got {records}")
    holdout_subjects(records, cfg.holdout)
    ds = prepare(cfg.prepare, verbose=verbose)
    folds = plan_folds(ds, cfg)
    check_sveb_gate(cfg, ds, folds)
    return ds, folds


def run_loso(cfg: LosoConfig) -> str:
    """Run the whole experiment under the active (or a new) MLflow run; returns the parent run id.

    Parameters, data files and the tracking server are checked before any training starts. The
    folds run on ``cfg.execution``'s executor. With ``cfg.resume_run_id`` the LOSO run of that id
    is re-opened with its own parameters and only its unfinished patients are run (see
    :func:`ecg_mlflow.resume.resume_plan`). Raises :class:`FoldsFailed` (the parent ended FAILED)
    when a fold failed.
    """
    cfg = cfg.validated()
    tracking.check_tracking_server()
    uri = mlflow.get_tracking_uri()
    executors.check_store_for_executor(uri, cfg.execution)
    executors.http_retry_defaults()
    previous = None
    if cfg.resume_run_id:
        previous = loso_run(cfg.resume_run_id, "resume_run_id")
        check_not_running(previous)
        cfg = config_for_resume(previous.data.params, cfg)
        # The folds left run at the thread count of those finished, whatever executor runs them now.
        cfg = replace(cfg, execution=replace(cfg.execution, threads=ran_threads(previous)))
    source = loso_run(cfg.base_run_id, "base_run_id") if cfg.base_run_id else None
    if source is not None:
        check_base_settings(source, cfg)
    ds, folds = preflight(cfg, verbose=True)
    reused = reused_bases(source, ds, folds) if source is not None else {}
    executors.remember_dataset(ds)  # the sequential executor reuses it instead of reading the file
    client = MlflowClient()

    with parent_run(cfg.resume_run_id) as parent:
        parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
        claim(parent_id)
        end_orphaned_runs(client, experiment_id, skip=(parent_id,))
        done_results: list[PatientResult] = []
        plan = {fold.subject: (frozenset(), *reused.get(fold.subject, (None, None))) for fold in folds}
        if previous is None:
            mlflow.set_tags({tracking.ROLE_TAG: "loso", "label_scheme": ds.meta["label_scheme"],
                             "classes": ",".join(ds.classes), "dataset_digest": ds.digest,
                             "evaluated_on": cfg.evaluate_on})
            tracking.log_new_params(cfg.params())
            log_to_mlflow(ds, context="loso")  # dataset input, data.* params, summary table
        else:
            done_results, plan = resume_plan(client, parent_id, experiment_id, folds, reused)
            tracking.log_new_params(cfg.params())
        todo = [f for f in folds if plan[f.subject] is not None]
        n_held = len({subject_of(r) for f in folds for r in f.records})
        print(f"loso: {n_held} held-out subject(s) in {len(folds)} fold(s), evaluated on {cfg.evaluate_on}, "
              f"{len(ds)} beats, {len(ds.classes)} classes {ds.classes}, "
              f"parent run {parent_id}" + (f" (resumed: {len(folds) - len(todo)} subject(s) already finished)"
                                           if previous is not None else ""), flush=True)
        n_train = {f.subject: int(f.train.sum()) for f in folds}
        # Executor auto: folds side by side when there is enough base training to pay for the pool.
        # Decided on the whole run, not on what is left of it, so that a resumed run takes the pool
        # (or not) as the original did.
        work = sum(n_train[f.subject] for f in folds if f.subject not in reused) * cfg.train.epochs * cfg.train.ensemble
        execution = executors.resolve(cfg.execution, len(folds), work, uri, gpus=visible_gpus())
        how = executors.describe(execution)
        mlflow.set_tags({EXECUTION_TAG: how, THREADS_TAG: executors.fold_threads(execution)})
        print(f"loso: folds run {how}" + (" (executor auto)" if cfg.execution.executor == "auto" else ""), flush=True)

        outcomes: dict[str, FoldOutcome] = {}
        clock = _Clock(len(todo))
        records = {f.subject: f.records for f in folds}

        def on_start(task: FoldTask) -> None:
            what = f"reusing base model {task.base_model_uri}" if task.base_model_uri else \
                f"base training, {n_train[task.subject]} beats x {cfg.train.epochs} epochs"
            print(f"[loso {clock.started + 1}/{clock.total}] subject {task.subject} (records "
                  f"{', '.join(records[task.subject])}): {what} | {clock.times()}", flush=True)
            clock.started += 1

        def on_done(task: FoldTask, outcome: FoldOutcome) -> None:
            outcomes[task.subject] = outcome
            clock.done += 1
            state = f"failed ({outcome.error})" if outcome.error else "finished"
            print(f"[loso] subject {task.subject} {state} [{outcome.worker}]; {clock.done}/{clock.total} folds "
                  f"done | {clock.times()}", flush=True)

        # No private server when a resume finds nothing left to run.
        store = executors.concurrent_store(uri, execution) if todo else contextlib.nullcontext(uri)
        with store as worker_uri:
            tasks = [FoldTask(dataset_path=str(ds.path), subject=f.subject, config=cfg, parent_run_id=parent_id,
                              experiment_id=experiment_id, tracking_uri=worker_uri, done=plan[f.subject][0],
                              base_model_uri=plan[f.subject][1], base_run_id=plan[f.subject][2],
                              threads=execution.resolved_threads, env=executors.forwarded_env())
                     for f in todo]
            executors.make_executor(execution).run(run_fold, tasks, on_done, on_start)
        mlflow.set_tracking_uri(uri)
        # A worker that died left its run RUNNING; no fold of this run is running any more.
        end_stale_children(client, parent_id, experiment_id, "FAILED")

        failed = {s: o.error or "no outcome" for s, o in outcomes.items() if o.error}
        failed.update({f.subject: "never ran" for f in todo if f.subject not in outcomes})
        if failed:
            _record_failure(parent_id, experiment_id, cfg, sorted(failed), records, failed, uri)
        if previous is not None and FAILED_TAG in previous.data.tags:
            client.delete_tag(parent_id, FAILED_TAG)  # every patient has finished now
        results = done_results + [r for o in outcomes.values() for r in o.results]
        results.sort(key=lambda r: (ds.records.index(r.record), VARIANTS.index(r.variant)))
        summary = aggregate(results, ds.classes)
        mlflow.log_metrics(summary)
        for variant in VARIANTS:
            cm = sum(r.cm for r in results if r.variant == variant)
            tracking.log_confusion(cm, ds.classes, f"confusion_matrix_{variant}", f"all patients, {variant}")
        print_summary(summary)
    return parent_id


class _Clock:
    """Elapsed time and an estimate of the time left, from folds finished so far."""

    def __init__(self, total: int):
        self.total, self.started, self.done, self.start = total, 0, 0, time.monotonic()

    def times(self) -> str:
        elapsed = time.monotonic() - self.start
        text = f"elapsed {_fmt(elapsed)}"
        if self.done:
            text += f", about {_fmt(elapsed / self.done * (self.total - self.done))} left"
        return text


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _record_failure(parent_id: str, experiment_id: str, cfg: LosoConfig, subjects: list[str],
                    records: dict[str, tuple[str, ...]], errors: dict[str, str], uri: str) -> None:
    """Tag and log what failed, then raise :class:`FoldsFailed` (which ends the parent FAILED)."""
    patients = [r for s in subjects for r in records[s]]
    command = resume_command(parent_id, experiment_id, cfg.execution, uri)
    mlflow.set_tag(FAILED_TAG, ",".join(patients))
    mlflow.log_dict({"patients": patients, "subjects": subjects, "errors": errors, "resume_command": command,
                     "python_command": f"MLFLOW_TRACKING_URI={shlex.quote(public_uri(uri))} python "
                                       f"entrypoints/loso.py --resume-run-id {parent_id}"},
                    "failed_patients.json")
    exc = FoldsFailed(parent_id, patients, errors, command)
    print(f"\n{exc}", flush=True)
    raise exc


def print_summary(summary: dict[str, float]) -> None:
    """The gross and average EC57 statistics of both variants (``aggregate``'s keys), as a table in %."""
    print("\nEC57 statistics (gross = summed confusion counts, avg = mean over patients), %:")
    print(f"{'':24s}" + "".join(f"{v:>14s}" for v in VARIANTS))
    for kind in ("gross", "avg"):
        for stat in HEADLINE:
            vals = [summary.get(f"{kind}_{v}_{stat}", np.nan) for v in VARIANTS]
            print(f"{kind + ' ' + stat:24s}" + "".join(f"{100 * x:14.2f}" if np.isfinite(x) else f"{'-':>14s}"
                                                      for x in vals))


def run_train_base(cfg: LosoConfig, holdout: str) -> BaseModel:
    """Entry point ``train_base``: the base model for one held-out subject, in the active (or a new) run."""
    cfg = cfg.validated()
    tracking.check_tracking_server()
    subjects = holdout_subjects(records_to_prepare(cfg.prepare), holdout)
    if len(subjects) != 1:
        raise ValueError(f"holdout must name exactly one subject for train_base, got {holdout!r}")
    ds = prepare(cfg.prepare, verbose=True)
    (fold,) = loso_folds(ds.record, ds.part, subjects)
    if not fold.train.any():
        raise ValueError(f"no training beats left after holding out subject {fold.subject}: add records")
    with mlflow.start_run(run_name=f"base-{fold.subject}"):
        tracking.log_new_params(cfg.params() | {"holdout": fold.subject})
        base = fit_base(ds, fold, cfg)
    print(f"train_base: subject {fold.subject}, model {base.model_uri}")
    return base


def load_base(model_uri: str, *patients: str) -> BaseModel:
    """Load a base model for ``patients``, refusing one whose training saw any of their subjects or
    that was not trained to hold them out (its ``subject`` tag, or for a group of subjects its
    ``heldout_records`` tag)."""
    import mlflow.keras

    run_id = registry.source_run_id(model_uri)
    if run_id is None:
        raise ValueError(f"base_model_uri {model_uri!r}: expected runs:/<run id>/model or models:/<name>@<alias>")
    tags = mlflow.get_run(run_id).data.tags
    subject = tags.get("subject")
    trained_on = tuple(r for r in tags.get("train_records", "").split(",") if r)
    held = tags.get("heldout_records", "").split(",")
    for patient in patients:
        leaky = any(subject_of(r) == subject_of(patient) for r in trained_on)
        if leaky or not (subject == subject_of(patient) or patient in held):
            raise ValueError(
                f"base model {model_uri} was trained with subject {subject_of(patient)} in its data or is not "
                f"tagged with its held-out subject (its subject tag: {subject!r}); use the base model that held "
                f"out patient {patient}, e.g. models:/<prefix>-base-{subject_of(patient)}@{registry.ALIAS}"
            )
    return BaseModel(mlflow.keras.load_model(model_uri), subject, run_id, model_uri, trained_on)


def base_training_param(run_id: str, name: str, default: str) -> str:
    """A training parameter of the run that trained a base model: its own (``train_base``) or its
    LOSO parent's (a LOSO base run logs none of its own); ``default`` for runs from before it existed."""
    return tracking.params_with_parent(mlflow.get_run(run_id)).get(name, default)


def run_transfer(cfg: LosoConfig, base_model_uri: str, patient: str) -> list[PatientResult]:
    """Entry point ``transfer``: no-transfer and transfer runs for one patient from a given base model.

    The active (or a new) run, tagged ``ecg.role=patient``, holds the two variant runs.
    """
    cfg = cfg.validated()
    tracking.check_tracking_server()
    records = records_to_prepare(cfg.prepare)
    if patient not in records:
        raise ValueError(f"patient {patient!r} is not among the prepared records {records}")
    ds = prepare(cfg.prepare, verbose=True)
    base = load_base(base_model_uri, patient)
    trained = base_training_param(base.run_id, "recent_reference", "all")
    if trained != cfg.train.recent_reference:
        raise ValueError(f"recent_reference={cfg.train.recent_reference!r}: base model {base_model_uri} was trained "
                         f"with recent_reference={trained!r}, and its recent input must be made the same way")
    (fold,) = loso_folds(ds.record, ds.part, [subject_of(patient)])
    check_sveb_gate(cfg, ds, [fold])
    with mlflow.start_run(run_name=f"{patient}-patient") as run:
        mlflow.set_tags({tracking.ROLE_TAG: "patient", "patient": patient, "subject": subject_of(patient)})
        tracking.log_new_params(cfg.params() | {"base_model_uri": base_model_uri, "patient": patient})
        with mlflow.start_run(run_name=f"{patient}-no_transfer", nested=True):
            results = [evaluate_no_transfer(ds, fold, patient, base, run.info.run_id, cfg.train.recent_reference)]
        with mlflow.start_run(run_name=f"{patient}-transfer", nested=True):
            results.append(fit_transfer(ds, fold, patient, base, cfg, run.info.run_id))
    for r in results:
        print(f"transfer: patient {patient} {r.variant}: accuracy {r.metrics['accuracy']:.4f}")
    return results
