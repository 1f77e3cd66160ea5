"""Leave-one-subject-out experiment: base model per held-out subject, no-transfer and transfer per record.

Run tree (see README, "What is logged where")::

    loso (parent, ecg.role=loso)
    ├── base-<subject>            ecg.role=base      base model, trained on every other subject
    ├── <record>-no_transfer      ecg.role=variant   base model on the record's test part
    └── <record>-transfer         ecg.role=variant   head re-trained on the record's fine-tune part,
                                                     evaluated on the very same test beats

The functions :func:`fit_base`, :func:`evaluate_no_transfer` and :func:`fit_transfer` log to the
*active* run, so the ``train_base`` and ``transfer`` entry points reuse them for single steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

import mlflow

from ecg_mlflow import metrics as metrics_mod
from ecg_mlflow import registry, tracking
from ecg_mlflow.dataset import BeatDataset, PrepareConfig, prepare
from ecg_mlflow.splits import Fold, loso_folds, subject_of
from ecg_mlflow.training import Progress, TrainConfig, fine_tune, predict_classes, train_base

VARIANTS = ("no_transfer", "transfer")
HEADLINE = ("veb_se", "veb_ppv", "veb_fpr", "sveb_se", "sveb_ppv", "sveb_fpr", "accuracy", "macro_f1")


@dataclass(frozen=True)
class LosoConfig:
    """Everything a LOSO run needs, as plain values."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    holdout: str | None = None  # subjects to hold out, comma-separated; None/'all' = every subject
    registry_prefix: str = "ecg"
    register: bool = True

    def validated(self) -> "LosoConfig":
        self.prepare.validated()
        self.train.validated()
        if not self.registry_prefix or not all(c.isalnum() or c in "-_." for c in self.registry_prefix):
            raise ValueError(f"registry_prefix must be letters, digits, '-', '_' or '.', got {self.registry_prefix!r}")
        return self

    def params(self) -> dict[str, object]:
        """Flat parameters for ``mlflow.log_params``."""
        p = {k: v for k, v in asdict(self.prepare).items() if k not in ("cache_dir", "download")}
        p.update(asdict(self.train))
        p.update(holdout=self.holdout or "all", registry_prefix=self.registry_prefix)
        return {k: ("" if v is None else v) for k, v in p.items()}


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
    """Subjects to hold out: all of the dataset's, or those named (a record id names its subject)."""
    available = list(dict.fromkeys(subject_of(r) for r in ds.records))
    if holdout is None or holdout.strip().lower() in ("", "all"):
        return available
    named = [subject_of(s) for s in holdout.replace(",", " ").split()]
    unknown = [s for s in named if s not in available]
    if unknown:
        raise ValueError(f"holdout names subjects {unknown} that are not in the prepared records {ds.records}")
    return list(dict.fromkeys(named))


def fit_base(ds: BeatDataset, fold: Fold, cfg: LosoConfig, loso_run_id: str | None = None) -> BaseModel:
    """Train the base model of ``fold`` on every other subject's beats; log it to the active run."""
    run_id = mlflow.active_run().info.run_id
    x, y = ds.x[fold.train], ds.label[fold.train]
    train_records = tuple(dict.fromkeys(ds.record[fold.train].tolist()))
    # Leakage guard: the held-out subject's records must not be among the training records.
    assert not set(train_records) & set(fold.records), "held-out subject leaked into base training"
    mlflow.set_tags({tracking.ROLE_TAG: "base", "subject": fold.subject,
                     "heldout_records": ",".join(fold.records), "train_records": ",".join(train_records)})
    mlflow.log_params({"n_train_beats": len(y), "n_train_records": len(train_records)})
    model, _ = train_base(x, y, len(ds.classes), cfg.train, on_epoch=tracking.log_epoch_metrics)
    model_uri = tracking.log_keras_model(model, x[:8])
    if cfg.register:
        registry.register(model_uri, registry.base_model_name(cfg.registry_prefix, fold.subject), {
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


def _log_test_results(ds: BeatDataset, mask: np.ndarray, pred: np.ndarray, title: str) -> tuple[dict, np.ndarray]:
    m, cm = metrics_mod.evaluate(ds.label[mask], pred, ds.classes)
    logged = with_missing_as_nan(m, test_metric_names(ds.classes))
    mlflow.log_metrics({f"test_{k}": v for k, v in logged.items()})
    tracking.log_confusion(cm, ds.classes, title=title)
    return m, cm


def _variant_tags(record: str, variant: str, base: BaseModel, loso_run_id: str | None) -> dict[str, str]:
    return {tracking.ROLE_TAG: "variant", "patient": record, "subject": subject_of(record), "variant": variant,
            "base_run_id": base.run_id, "base_model_uri": base.model_uri, "loso_run_id": loso_run_id or ""}


def evaluate_no_transfer(ds: BeatDataset, fold: Fold, record: str, base: BaseModel,
                         loso_run_id: str | None = None) -> PatientResult:
    """The base model on ``record``'s test part, logged to the active run (variant ``no_transfer``)."""
    mlflow.set_tags(_variant_tags(record, "no_transfer", base, loso_run_id))
    mask = fold.test[record]
    pred = predict_classes(base.model, ds.x[mask])
    m, cm = _log_test_results(ds, mask, pred, f"{record} no transfer")
    return PatientResult(record, "no_transfer", mlflow.active_run().info.run_id, m, cm)


def fit_transfer(ds: BeatDataset, fold: Fold, record: str, base: BaseModel, cfg: LosoConfig,
                 loso_run_id: str | None = None) -> PatientResult:
    """Re-train ``base``'s head on ``record``'s fine-tune part, evaluate on its test part, log to the
    active run (variant ``transfer``) and register the transfer model."""
    run_id = mlflow.active_run().info.run_id
    mlflow.set_tags(_variant_tags(record, "transfer", base, loso_run_id))
    ft = fold.finetune[record]
    mlflow.log_params({"n_finetune_beats": int(ft.sum())})
    model, _ = fine_tune(base.model, ds.x[ft], ds.label[ft], cfg.train, on_epoch=tracking.log_epoch_metrics)
    mask = fold.test[record]
    m, cm = _log_test_results(ds, mask, predict_classes(model, ds.x[mask]), f"{record} transfer")
    model_uri = tracking.log_keras_model(model, ds.x[ft][:8])
    if cfg.register:
        headline = {f"test_{k}": f"{m[k]:.4f}" for k in HEADLINE if k in m}
        registry.register(model_uri, registry.transfer_model_name(cfg.registry_prefix, record), {
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


def run_loso(cfg: LosoConfig) -> str:
    """Run the whole experiment under the active (or a new) MLflow run; returns the parent run id.

    Parameters, data files and the tracking server are checked before any training starts.
    """
    cfg = cfg.validated()
    tracking.check_tracking_server()
    ds = prepare(cfg.prepare, verbose=True)
    folds = loso_folds(ds.record, ds.part, holdout_subjects(ds, cfg.holdout))
    if len(ds.records) < 2:
        raise ValueError(f"LOSO needs at least two subjects' records, got {ds.records}")
    n_classes = len(ds.classes)
    progress = Progress(len(folds), "loso")
    results: list[PatientResult] = []

    with mlflow.start_run(run_name="loso") as parent:
        parent_id = parent.info.run_id
        mlflow.set_tags({tracking.ROLE_TAG: "loso", "label_scheme": ds.meta["label_scheme"],
                         "classes": ",".join(ds.classes), "dataset_digest": ds.digest})
        tracking.log_new_params(cfg.params())
        _log_dataset(ds)
        print(f"loso: {len(folds)} held-out subject(s), {len(ds)} beats, {n_classes} classes {ds.classes}, "
              f"parent run {parent_id}", flush=True)
        for fold in folds:
            progress.step(f"subject {fold.subject} (records {', '.join(fold.records)}): base training, "
                          f"{int(fold.train.sum())} beats x {cfg.train.epochs} epochs")
            with mlflow.start_run(run_name=f"base-{fold.subject}", nested=True):
                base = fit_base(ds, fold, cfg, parent_id)
            for record in fold.records:
                with mlflow.start_run(run_name=f"{record}-no_transfer", nested=True):
                    results.append(evaluate_no_transfer(ds, fold, record, base, parent_id))
                with mlflow.start_run(run_name=f"{record}-transfer", nested=True):
                    results.append(fit_transfer(ds, fold, record, base, cfg, parent_id))
                nt, tr = results[-2].metrics, results[-1].metrics
                print(f"    record {record}: accuracy {nt['accuracy']:.3f} -> {tr['accuracy']:.3f}, "
                      f"macro-F1 {nt.get('macro_f1', float('nan')):.3f} -> {tr.get('macro_f1', float('nan')):.3f}",
                      flush=True)
            progress.finish_step()
        summary = aggregate(results, ds.classes)
        mlflow.log_metrics(summary)
        for variant in VARIANTS:
            cm = sum(r.cm for r in results if r.variant == variant)
            tracking.log_confusion(cm, ds.classes, f"confusion_matrix_{variant}", f"all patients, {variant}")
        _print_summary(summary)
    return parent_id


def _log_dataset(ds: BeatDataset) -> None:
    # dataset.log_to_mlflow logs the dataset input, its parameters and summary table.
    from ecg_mlflow import dataset

    if hasattr(dataset, "log_to_mlflow"):
        dataset.log_to_mlflow(ds, context="loso")


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


def load_base(model_uri: str, patient: str) -> BaseModel:
    """Load a base model for ``patient``, refusing one whose training saw the patient's subject."""
    import mlflow.keras

    run_id = registry.source_run_id(model_uri)
    if run_id is None:
        raise ValueError(f"base_model_uri {model_uri!r}: expected runs:/<run id>/model or models:/<name>@<alias>")
    run = mlflow.get_run(run_id)
    subject = run.data.tags.get("subject")
    trained_on = run.data.tags.get("train_records", "").split(",")
    if subject != subject_of(patient) or any(subject_of(r) == subject_of(patient) for r in trained_on if r):
        raise ValueError(
            f"base model {model_uri} was trained with subject {subject_of(patient)} in its data or is not "
            f"tagged with its held-out subject (its subject tag: {subject!r}); use the base model that held out "
            f"patient {patient}, e.g. models:/<prefix>-base-{subject_of(patient)}@{registry.ALIAS}"
        )
    return BaseModel(mlflow.keras.load_model(model_uri), subject, run_id, model_uri,
                     tuple(r for r in trained_on if r))


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
    (fold,) = loso_folds(ds.record, ds.part, [subject_of(patient)])
    with mlflow.start_run(run_name=f"{patient}-patient") as run:
        mlflow.set_tags({tracking.ROLE_TAG: "patient", "patient": patient, "subject": subject_of(patient)})
        tracking.log_new_params(cfg.params() | {"base_model_uri": base_model_uri, "patient": patient})
        with mlflow.start_run(run_name=f"{patient}-no_transfer", nested=True):
            results = [evaluate_no_transfer(ds, fold, patient, base, run.info.run_id)]
        with mlflow.start_run(run_name=f"{patient}-transfer", nested=True):
            results.append(fit_transfer(ds, fold, patient, base, cfg, run.info.run_id))
    for r in results:
        print(f"transfer: patient {patient} {r.variant}: accuracy {r.metrics['accuracy']:.4f}")
    return results
