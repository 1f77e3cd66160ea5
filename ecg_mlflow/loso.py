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
minutes against the very same base models (:func:`reused_bases`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from urllib.parse import urlsplit, urlunsplit

import numpy as np

import mlflow
from mlflow import MlflowClient

from ecg_mlflow import executors
from ecg_mlflow import metrics as metrics_mod
from ecg_mlflow import registry, tracking
from ecg_mlflow.beats import REGULAR_IRREGULARITY
from ecg_mlflow.dataset import (BeatDataset, PrepareConfig, include_paced_from_param, log_to_mlflow, prepare,
                                window_from_param)
from ecg_mlflow.executors import ExecConfig, FoldOutcome, FoldTask
from ecg_mlflow.models import check_kernel_size, gate_premature, promote_early
from ecg_mlflow.predictions import log_predictions, predictions_table, softmax
from ecg_mlflow.records import RECORD_SETS
from ecg_mlflow.splits import Fold, group_fold, loso_folds, subject_groups, subject_of, validation_fold
from ecg_mlflow.tracking import logged_value
from ecg_mlflow.training import (FINETUNE_FIELDS, BeatSource, TrainConfig, early_normal_rows, early_threshold,
                                 fine_tune, model_input_names, predict_logits, premature_threshold, replay_rows,
                                 train_base, visible_gpus)

VARIANTS = ("no_transfer", "transfer")
EVALUATE_ON = ("test", "validation")
HEADLINE = ("veb_se", "veb_ppv", "veb_fpr", "sveb_se", "sveb_ppv", "sveb_fpr", "accuracy", "macro_f1")


@dataclass(frozen=True)
class LosoConfig:
    """Everything a LOSO run needs, as plain values."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    holdout: str | None = None  # subjects to hold out, comma-separated; None/'all' = every subject
    registry_prefix: str = "ecg"
    register: bool = True
    execution: ExecConfig = field(default_factory=ExecConfig)
    resume_run_id: str | None = None  # re-open this LOSO run and finish what it left undone
    base_folds: int = 0  # 0: one base model per held-out subject; k >= 2: k groups of subjects share one
    evaluate_on: str = "test"  # test | validation (second half of the fine-tune minutes; for model choice)
    base_run_id: str | None = None  # take this LOSO run's base models instead of training them

    def validated(self) -> "LosoConfig":
        self.prepare.validated()
        self.train.validated()
        self.execution.validated()
        check_kernel_size(self.train.kernel_size, self.prepare.window)
        if isinstance(self.base_folds, bool) or not isinstance(self.base_folds, int) or self.base_folds < 0 \
                or self.base_folds == 1:
            raise ValueError(f"base_folds must be 0 (one base model per subject) or a whole number >= 2, "
                             f"got {self.base_folds!r}")
        if self.evaluate_on not in EVALUATE_ON:
            raise ValueError(f"evaluate_on must be one of {list(EVALUATE_ON)}, got {self.evaluate_on!r}")
        if not self.registry_prefix or not all(c.isalnum() or c in "-_." for c in self.registry_prefix):
            raise ValueError(f"registry_prefix must be letters, digits, '-', '_' or '.', got {self.registry_prefix!r}")
        for name in ("resume_run_id", "base_run_id"):
            value = getattr(self, name)
            if value and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
                raise ValueError(f"{name} must be a run id (letters and digits), got {value!r}")
        return self

    def params(self) -> dict[str, object]:
        """Flat parameters for ``mlflow.log_params``."""
        p = {k: v for k, v in asdict(self.prepare).items() if k not in ("cache_dir", "download")}
        p.update(asdict(self.train))
        p.update(holdout=self.holdout or "all", registry_prefix=self.registry_prefix, base_folds=self.base_folds,
                 evaluate_on=self.evaluate_on, base_run_id=self.base_run_id)
        p.update(self.execution.params())
        return {k: ("" if v is None else v) for k, v in p.items()}

    @property
    def registers(self) -> bool:
        """Models go to the registry only from runs evaluated on test segments: validation runs
        exist to choose options, their models are not the experiment's."""
        return self.register and self.evaluate_on == "test"


@dataclass
class BaseModel:
    """A trained base model and where it was logged."""

    model: object
    subject: str
    run_id: str
    model_uri: str
    train_records: tuple[str, ...]


@dataclass
class PatientResult:
    record: str
    variant: str
    run_id: str
    metrics: dict[str, float]
    cm: np.ndarray


def holdout_subjects(ds: BeatDataset, holdout: str | None) -> list[str]:
    """Subjects to hold out: all of the dataset's, those named (a record id names its subject), or
    those of a record set (``half1``, ``half2``: :data:`ecg_mlflow.records.RECORD_SETS`)."""
    available = list(dict.fromkeys(subject_of(r) for r in ds.records))
    if holdout is None or holdout.strip().lower() in ("", "all"):
        return available
    names = RECORD_SETS.get(holdout.strip().lower()) or holdout.replace(",", " ").split()
    named = [subject_of(s) for s in names]
    unknown = [s for s in named if s not in available]
    if unknown:
        raise ValueError(f"holdout names subjects {unknown} that are not in the prepared records {ds.records}")
    return list(dict.fromkeys(named))


def plan_folds(ds: BeatDataset, cfg: LosoConfig, only: str | None = None) -> list[Fold]:
    """The folds of a LOSO run: one per held-out subject, or ``cfg.base_folds`` groups sharing a
    base model; with ``evaluate_on=validation`` each evaluates on the second half of the fine-tune
    minutes instead of the test part (see :mod:`ecg_mlflow.splits`). ``only``: just the fold of
    that name (a worker builds its own fold's masks, not every fold's)."""
    subjects = holdout_subjects(ds, cfg.holdout)
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
    model, _ = train_base(src, train_idx, len(ds.classes), cfg.train,
                          on_epoch=_epoch_printer(cfg.train.epochs, f"base {fold.subject}"))
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


def gate_sveb(ds: BeatDataset, fold: Fold, model, share: float):
    """``model`` behind :func:`ecg_mlflow.models.gate_premature`, its threshold the ``share``
    quantile of the earliness of the fold's training S beats (other subjects only); the threshold
    is logged to the active run as ``sveb_gate_threshold``."""
    code = ds.classes.index("S")
    threshold = premature_threshold(ds.rr_features(), ds.rr_long(), ds.label, np.flatnonzero(fold.train),
                                    code, share)
    mlflow.log_param("sveb_gate_threshold", round(threshold, 4))
    return gate_premature(model, threshold, code)


def promote_early_sveb(ds: BeatDataset, fold: Fold, model, share: float):
    """``model`` behind :func:`ecg_mlflow.models.promote_early` (N calls become S for beats early in a
    regular rhythm), its threshold the ``share`` quantile of the earliness of the fold's training N
    beats in regular rhythm (other subjects only); the threshold is logged to the active run as
    ``early_sveb_threshold``."""
    normal, sveb = ds.classes.index("N"), ds.classes.index("S")
    threshold = early_threshold(ds.rr_long(), ds.rr_irregular(), ds.label, np.flatnonzero(fold.train), normal, share)
    mlflow.log_param("early_sveb_threshold", round(threshold, 4))
    return promote_early(model, threshold, REGULAR_IRREGULARITY, normal, sveb)


def check_sveb_gate(cfg: LosoConfig, ds: BeatDataset, folds: list[Fold]) -> None:
    """``sveb_gate`` and ``early_sveb`` act on the AAMI scheme's S class and set their thresholds from
    each fold's training S beats (``sveb_gate``) or N beats in regular rhythm (``early_sveb``): refuse
    them (``ValueError`` naming the parameter) before any training when the scheme is another or a
    fold's training subjects have no such beat."""
    irregular = ds.rr_irregular()[:, 0] if cfg.train.early_sveb > 0 else None
    for name, share, cls in (("sveb_gate", cfg.train.sveb_gate, "S"), ("early_sveb", cfg.train.early_sveb, "N")):
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


def fit_transfer(ds: BeatDataset, fold: Fold, record: str, base: BaseModel, cfg: LosoConfig,
                 loso_run_id: str | None = None) -> PatientResult:
    """Re-train ``base``'s head on ``record``'s fine-tune part, evaluate on its test part, log to the
    active run (variant ``transfer``) and register the transfer model."""
    run_id = mlflow.active_run().info.run_id
    mlflow.set_tags(_variant_tags(record, "transfer", base, loso_run_id))
    src, ft_idx = beat_source(ds, cfg.train.recent_reference), np.flatnonzero(fold.finetune[record])
    # Replayed beats come from the fold's base-training rows: other subjects only.
    replay = replay_rows(ds.label, np.flatnonzero(fold.train), cfg.train.finetune_replay, cfg.train.seed)
    n_replay = {"n_finetune_beats": len(ft_idx), "n_replay_beats": len(replay)}
    if cfg.train.finetune_replay_early > 0:
        early = early_normal_rows(ds.label, ds.early(), np.flatnonzero(fold.train), ds.classes.index("N"),
                                  cfg.train.finetune_replay_early, cfg.train.seed, exclude=replay)
        replay = np.sort(np.concatenate([replay, early]))
        n_replay["n_replay_early_beats"] = len(early)
    mlflow.log_params(n_replay)
    model, _ = fine_tune(base.model, src, np.concatenate([ft_idx, replay]), cfg.train,
                         on_epoch=tracking.log_epoch_metrics)
    if cfg.train.sveb_gate > 0:
        model = gate_sveb(ds, fold, model, cfg.train.sveb_gate)
    if cfg.train.early_sveb > 0:
        model = promote_early_sveb(ds, fold, model, cfg.train.early_sveb)
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
    """The prepared dataset and folds of a validated ``cfg``, after the checks that need the data
    (record files, at least two subjects, thresholds that need training beats); ``ValueError`` or
    :class:`DataError` naming the culprit. Trains nothing."""
    ds = prepare(cfg.prepare, verbose=verbose)
    if len({subject_of(r) for r in ds.records}) < 2:
        raise ValueError(f"LOSO needs at least two subjects' records, got {ds.records}")
    folds = plan_folds(ds, cfg)
    check_sveb_gate(cfg, ds, folds)
    return ds, folds


def run_loso(cfg: LosoConfig) -> str:
    """Run the whole experiment under the active (or a new) MLflow run; returns the parent run id.

    Parameters, data files and the tracking server are checked before any training starts. The
    folds run on ``cfg.execution``'s executor. With ``cfg.resume_run_id`` the LOSO run of that id
    is re-opened with its own parameters and only its unfinished patients are run (see
    :func:`resume_plan`). Raises :class:`FoldsFailed` (the parent ended FAILED) when a fold failed.
    """
    cfg = cfg.validated()
    tracking.check_tracking_server()
    uri = mlflow.get_tracking_uri()
    executors.check_store_for_executor(uri, cfg.execution)
    executors.http_retry_defaults()
    previous = None
    if cfg.resume_run_id:
        previous = _loso_run(cfg.resume_run_id, "resume_run_id")
        cfg = config_for_resume(previous.data.params, cfg)
        # The folds left run at the thread count of those finished, whatever executor runs them now.
        cfg = replace(cfg, execution=replace(cfg.execution, threads=ran_threads(previous)))
    source = _loso_run(cfg.base_run_id, "base_run_id") if cfg.base_run_id else None
    if source is not None:
        check_base_settings(source, cfg)
    ds, folds = preflight(cfg, verbose=True)
    reused = reused_bases(source, ds, folds) if source is not None else {}
    executors.remember_dataset(ds)  # the sequential executor reuses it instead of reading the file
    client = MlflowClient()

    with _parent_run(cfg.resume_run_id) as parent:
        parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
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
        _end_stale_children(client, parent_id, experiment_id, "FAILED")

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
        _print_summary(summary)
    return parent_id


FAILED_TAG = "ecg.failed_patients"
EXECUTION_TAG = "ecg.execution"  # where and how the folds ran, in words (executor auto made concrete)
THREADS_TAG = "ecg.threads"  # the TensorFlow thread count every fold ran with (executors.fold_threads)
RESUMED_TAG = "ecg.resumed_run_id"


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


def _parent_run(resume_run_id: str | None):
    """The LOSO parent run: a new one, or the one being resumed, re-opened.

    Under ``mlflow run`` a resume gets a fresh run from ``mlflow run`` (``MLFLOW_RUN_ID``); that
    run must not become a second parent. It is tagged ``ecg.role=loso_resume`` and
    ``ecg.resumed_run_id=<id>`` and ended at once; the work goes on in the old parent.
    """
    if not resume_run_id:
        return mlflow.start_run(run_name="loso")
    pointer = os.environ.pop("MLFLOW_RUN_ID", None)
    active = mlflow.active_run()
    if active is not None and active.info.run_id != resume_run_id:
        pointer = active.info.run_id
        mlflow.end_run()
    if pointer and pointer != resume_run_id:
        client = MlflowClient()
        for key, value in {tracking.ROLE_TAG: "loso_resume", RESUMED_TAG: resume_run_id,
                           "mlflow.note.content": f"Resumes LOSO run {resume_run_id}; its results are there."}.items():
            client.set_tag(pointer, key, value)
        client.set_terminated(pointer, "FINISHED")
        print(f"loso: run {pointer} only points at the resumed run {resume_run_id} ({RESUMED_TAG})", flush=True)
    if mlflow.active_run() is not None:
        return contextlib.nullcontext(mlflow.active_run())
    return mlflow.start_run(run_id=resume_run_id)


def _loso_run(run_id: str, param: str):
    """The LOSO parent run ``run_id``; ``ValueError`` naming ``param`` (``resume_run_id`` or
    ``base_run_id``) when there is no such active LOSO run."""
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"{param} {run_id!r}: no such run in {mlflow.get_tracking_uri()} "
                         f"({exc.message.splitlines()[0]})") from None
    if run.data.tags.get(tracking.ROLE_TAG) != "loso":
        raise ValueError(f"{param} {run_id!r} is not a LOSO run (tag {tracking.ROLE_TAG}="
                         f"{run.data.tags.get(tracking.ROLE_TAG)!r}); give the id of a run tagged "
                         f"{tracking.ROLE_TAG}=loso")
    if run.info.lifecycle_stage != "active":
        raise ValueError(f"{param} {run_id!r} is deleted; restore it first")
    return run


def _param(parse, name: str, text: str):
    try:
        return parse(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ValueError(f"resume: the run's parameter {name}={text!r} cannot be read: {exc}") from None


# What a run that predates a TrainConfig field ran with, for fields whose default has changed since.
UNLOGGED_DEFAULTS: dict[str, object] = {"finetune_replay": 0, "dropout": 0.0}


def config_of_run(params: dict[str, str], given: LosoConfig) -> LosoConfig:
    """The :class:`LosoConfig` a LOSO run was started with, from its logged parameters (as
    ``mlflow run`` or :meth:`LosoConfig.params` wrote them), its ``threads`` included; machine
    settings (cache, download, executor, workers) and a given data directory come from ``given``."""
    from ecg_mlflow import cli

    d, t = PrepareConfig(), TrainConfig()
    get = lambda k, default: logged_value(str(params.get(k, default)))  # noqa: E731
    prep = PrepareConfig(
        data_dir=given.prepare.data_dir or (get("data_dir", "") or None),
        records=get("records", "all"),
        window=_param(window_from_param, "window", get("window", d.window)),
        label_scheme=get("label_scheme", d.label_scheme),
        # LosoConfig.params logs an unset include_paced (automatic) as ''.
        include_paced=_param(include_paced_from_param, "include_paced", get("include_paced", "auto") or "auto"),
        finetune_minutes=_param(cli.number("finetune_minutes"), "finetune_minutes",
                                get("finetune_minutes", d.finetune_minutes)),
        cache_dir=given.prepare.cache_dir, download=given.prepare.download)
    # Every TrainConfig field, read by the type of its default. A run from before a field existed
    # ran as the field's first default: the current one, or the old one where it has changed since.
    parsers = {bool: cli.boolean, int: cli.whole_number, float: cli.number}
    before = {f.name: getattr(t, f.name) for f in fields(TrainConfig)} | UNLOGGED_DEFAULTS
    train = TrainConfig(**{
        f.name: (_param(parsers[type(getattr(t, f.name))](f.name), f.name, get(f.name, before[f.name]))
                 if type(getattr(t, f.name)) in parsers else get(f.name, before[f.name]))
        for f in fields(TrainConfig)})
    # Thread count too: a fold's numbers repeat exactly only at the run's own count.
    threads = _param(cli.whole_number("threads"), "threads", get("threads", given.execution.threads))
    base_folds = _param(cli.whole_number("base_folds"), "base_folds", get("base_folds", 0))
    return replace(given, prepare=prep, train=train, holdout=get("holdout", "all"),
                   registry_prefix=get("registry_prefix", "ecg"), execution=replace(given.execution, threads=threads),
                   base_folds=base_folds, evaluate_on=get("evaluate_on", "test"),
                   base_run_id=get("base_run_id", "") or None)


def ran_threads(run) -> int:
    """The TensorFlow thread count a LOSO run's folds ran with: its ``ecg.threads`` tag, or for a run
    made before the tag its logged ``threads``, ``executor`` and ``workers`` by the rule of
    :func:`executors.fold_threads` on this machine's cores."""
    from ecg_mlflow import cli

    tags, params = run.data.tags, run.data.params
    if tags.get(THREADS_TAG, "").isdigit():
        return int(tags[THREADS_TAG])
    get = lambda k, default: logged_value(str(params.get(k, default))) or default  # noqa: E731
    threads, workers = (_param(cli.whole_number(k), k, get(k, d)) for k, d in (("threads", "0"), ("workers", "2")))
    return executors.fold_threads(ExecConfig(executor=get("executor", "sequential"), workers=max(workers, 1),
                                             threads=threads))


def run_settings(c: LosoConfig) -> dict[str, object]:
    """A run's parameters as one flat dict of comparable values, machine paths left out."""
    p = {k: v for k, v in asdict(c.prepare).items() if k not in ("data_dir", "cache_dir", "download")}
    p["records"] = p["records"] if p["records"] not in (None, "", "all") else "all"
    return {**p, **asdict(c.train), "holdout": (c.holdout or "all").lower(), "registry_prefix": c.registry_prefix,
            "threads": c.execution.threads, "base_folds": c.base_folds, "evaluate_on": c.evaluate_on,
            "base_run_id": c.base_run_id}


def config_for_resume(params: dict[str, str], given: LosoConfig) -> LosoConfig:
    """The resumed run's own configuration. A parameter given now that is not its default and
    differs from the run's is refused (``ValueError`` naming it): a resume cannot change the
    experiment half-way."""
    stored = config_of_run(params, given)
    now, before, dflt = run_settings(given), run_settings(stored), run_settings(LosoConfig())
    clash = [k for k in now if now[k] != dflt[k] and now[k] != before[k]]
    if clash:
        raise ValueError("resume_run_id: the run was started with " + ", ".join(f"{k}={before[k]!r}" for k in clash)
                         + f"; a resume continues with the run's own parameters: drop {', '.join(clash)} "
                         "(or start a new LOSO run)")
    return stored


def _stored_result(run) -> PatientResult:
    """A FINISHED variant run read back from the store: its test metrics (NaN = undefined, left out
    as :func:`metrics.evaluate` leaves it out) and its confusion matrix artifact."""
    m = {k[len("test_"):]: float(v) for k, v in run.data.metrics.items()
         if k.startswith("test_") and not math.isnan(v)}
    doc = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/confusion_matrix.json")
    return PatientResult(run.data.tags["patient"], run.data.tags["variant"], run.info.run_id, m,
                         np.asarray(doc["matrix"], dtype=np.int64))


def _children(client: MlflowClient, parent_id: str, experiment_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=50000,
                              order_by=["attributes.start_time DESC"])


def _end_stale_children(client: MlflowClient, parent_id: str, experiment_id: str, status: str) -> list[str]:
    """End every child still RUNNING/SCHEDULED (its process is gone) with ``status``; returns their names."""
    stale = [r for r in _children(client, parent_id, experiment_id) if r.info.status in ("RUNNING", "SCHEDULED")]
    for r in stale:
        client.set_terminated(r.info.run_id, status)
        print(f"loso: child run {r.info.run_name} ({r.info.run_id}) was left {r.info.status}; marked {status}",
              flush=True)
    return [r.info.run_name for r in stale]


def resume_plan(client: MlflowClient, parent_id: str, experiment_id: str, folds: list[Fold],
                reused: dict[str, tuple[str, str]] | None = None
                ) -> tuple[list[PatientResult], dict[str, tuple[frozenset, str | None, str | None] | None]]:
    """What a resumed run keeps and what it re-runs.

    Children left RUNNING by the interrupted process are marked KILLED. A (record, variant) with
    a FINISHED run is kept (its metrics and confusion matrix read back); per subject the plan is
    ``None`` when all its records' variants are kept, else (kept pairs, FINISHED base model URI or
    None, its run id) — a base model that did not finish is trained again, unless ``reused`` (the
    bases of the run's ``base_run_id``, :func:`reused_bases`) has one for the subject.
    """
    _end_stale_children(client, parent_id, experiment_id, "KILLED")
    finished = [r for r in _children(client, parent_id, experiment_id) if r.info.status == "FINISHED"]
    variants: dict[tuple[str, str], object] = {}
    for r in finished:  # newest first: the first one seen wins
        tags = r.data.tags
        if tags.get(tracking.ROLE_TAG) == "variant":
            variants.setdefault((tags.get("patient"), tags.get("variant")), r)
    bases = {**(reused or {}), **_finished_bases(finished, experiment_id)}
    kept: list[PatientResult] = []
    plan: dict[str, tuple[frozenset, str | None, str | None] | None] = {}
    for fold in folds:
        pairs = {(rec, v) for rec in fold.records for v in VARIANTS}
        done = frozenset(p for p in pairs if p in variants)
        kept += [_stored_result(variants[p]) for p in sorted(done)]
        if done == pairs:
            plan[fold.subject] = None
            continue
        base_uri, base_id = bases.get(fold.subject, (None, None))
        plan[fold.subject] = (done, base_uri, base_id)
        print(f"loso: resume subject {fold.subject}: {len(done)}/{len(pairs)} variant run(s) finished, "
              f"{'reusing base run ' + base_id if base_id else 'base model trained again'}", flush=True)
    return kept, plan


def _finished_bases(finished: list, experiment_id: str) -> dict[str, tuple[str, str]]:
    """Subject (or group) -> (model URI, run id) of the FINISHED base runs among ``finished``
    (newest first: the first one seen wins) that have a logged model."""
    bases: dict[str, tuple[str, str]] = {}
    for r in finished:
        subject = r.data.tags.get("subject")
        if r.data.tags.get(tracking.ROLE_TAG) != "base" or subject in bases:
            continue
        models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                             filter_string=f"source_run_id = '{r.info.run_id}'")
        if models:
            bases[subject] = (models[0].model_uri, r.info.run_id)
    return bases


def base_settings(cfg: LosoConfig) -> dict[str, object]:
    """Everything that decides a fold's base model: the data, every training parameter but the
    fine-tune ones, the grouping of subjects (and, with groups, which subjects are dealt)."""
    base = [f.name for f in fields(PrepareConfig) if f.name not in ("data_dir", "cache_dir", "download")]
    base += [f.name for f in fields(TrainConfig) if f.name not in FINETUNE_FIELDS]
    base += ["base_folds", "holdout"] if cfg.base_folds else ["base_folds"]
    every = run_settings(cfg)
    return {k: every[k] for k in base}


def check_base_settings(source, cfg: LosoConfig) -> None:
    """Refuse (``ValueError`` naming ``base_run_id`` and the parameters) to take the base models of
    LOSO run ``source`` when they were trained on other data or with other base-training
    parameters than ``cfg`` asks for."""
    theirs, ours = base_settings(config_of_run(source.data.params, cfg)), base_settings(cfg)
    differ = [k for k in ours if ours[k] != theirs.get(k)]
    if differ:
        raise ValueError(f"base_run_id {source.info.run_id!r}: its base models were trained with "
                         + ", ".join(f"{k}={theirs.get(k)!r}" for k in differ) + "; this run asks for "
                         + ", ".join(f"{k}={ours[k]!r}" for k in differ)
                         + ". Only fine-tune parameters (" + ", ".join(FINETUNE_FIELDS) + "), holdout, "
                         "evaluate_on and execution may differ")


def reused_bases(source, ds: BeatDataset, folds: list[Fold]) -> dict[str, tuple[str, str]]:
    """Fold -> (model URI, run id) of LOSO run ``source``'s base model for that fold. ``ValueError``
    naming ``base_run_id`` when the run prepared other data or has no FINISHED base model with a
    logged model for some fold (checked before any training)."""
    run_id = source.info.run_id
    if source.data.tags.get("dataset_digest") != ds.digest:
        raise ValueError(f"base_run_id {run_id!r} was run on a dataset with digest "
                         f"{source.data.tags.get('dataset_digest')!r}, this run's is {ds.digest!r}")
    finished = [r for r in _children(MlflowClient(), run_id, source.info.experiment_id)
                if r.info.status == "FINISHED"]
    bases = _finished_bases(finished, source.info.experiment_id)
    missing = [f.subject for f in folds if f.subject not in bases]
    if missing:
        raise ValueError(f"base_run_id {run_id!r} has no finished base model for {missing}; it has "
                         f"{sorted(bases) or 'none'}")
    return {f.subject: bases[f.subject] for f in folds}


def _public_uri(uri: str) -> str:
    """``uri`` without user name and password."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def resume_command(run_id: str, experiment_id: str, execution: ExecConfig, tracking_uri: str) -> str:
    """The command that resumes LOSO run ``run_id`` (from the project directory)."""
    extra = ""
    if execution.executor != "sequential":
        extra = "".join(f" -P {k}={shlex.quote(str(v))}" for k, v in execution.params().items() if v not in ("", 0.0))
    return (f"MLFLOW_TRACKING_URI={shlex.quote(_public_uri(tracking_uri))} mlflow run . -e loso --env-manager local "
            f"--experiment-id {experiment_id} -P resume_run_id={run_id}{extra}")


def _record_failure(parent_id: str, experiment_id: str, cfg: LosoConfig, subjects: list[str],
                    records: dict[str, tuple[str, ...]], errors: dict[str, str], uri: str) -> None:
    """Tag and log what failed, then raise :class:`FoldsFailed` (which ends the parent FAILED)."""
    patients = [r for s in subjects for r in records[s]]
    command = resume_command(parent_id, experiment_id, cfg.execution, uri)
    mlflow.set_tag(FAILED_TAG, ",".join(patients))
    mlflow.log_dict({"patients": patients, "subjects": subjects, "errors": errors, "resume_command": command,
                     "python_command": f"MLFLOW_TRACKING_URI={shlex.quote(_public_uri(uri))} python "
                                       f"entrypoints/loso.py --resume-run-id {parent_id}"},
                    "failed_patients.json")
    exc = FoldsFailed(parent_id, patients, errors, command)
    print(f"\n{exc}", flush=True)
    raise exc




def _print_summary(summary: dict[str, float]) -> None:
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
    ds = prepare(cfg.prepare, verbose=True)
    subjects = holdout_subjects(ds, holdout)
    if len(subjects) != 1:
        raise ValueError(f"holdout must name exactly one subject for train_base, got {holdout!r}")
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
    run = mlflow.get_run(run_id)
    if name in run.data.params:
        return run.data.params[name]
    parent = run.data.tags.get("mlflow.parentRunId")
    return mlflow.get_run(parent).data.params.get(name, default) if parent else default


def run_transfer(cfg: LosoConfig, base_model_uri: str, patient: str) -> list[PatientResult]:
    """Entry point ``transfer``: no-transfer and transfer runs for one patient from a given base model.

    The active (or a new) run, tagged ``ecg.role=patient``, holds the two variant runs.
    """
    cfg = cfg.validated()
    tracking.check_tracking_server()
    ds = prepare(cfg.prepare, verbose=True)
    if patient not in ds.records:
        raise ValueError(f"patient {patient!r} is not among the prepared records {ds.records}")
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
