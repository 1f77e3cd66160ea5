"""Transfer against no-transfer across patients, read from the runs of one or more LOSO experiments.

Everything is read through the MLflow API, never from local files: the LOSO parent run
(tag ``ecg.role=loso``), its variant children (``ecg.role=variant``; tags ``patient``,
``subject``, ``variant``; metrics ``test_*``) and each child's ``confusion_matrix.json``.

For each LOSO run the comparison holds

- a per-patient table: no-transfer, transfer and their difference (transfer - no-transfer)
  for the headline metrics :data:`HEADLINE`;
- an aggregate table: EC57 *gross* statistics (from the confusion counts ``test_veb_tp`` ...
  summed over patients; accuracy and macro-F1 from the summed confusion matrices) and
  *average* statistics (mean over the patients where the statistic is defined), per variant,
  cross-checked against the parent's logged ``gross_<variant>_<stat>``;
- paired statistics per headline metric over the patients where both variants define it:
  Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped), the
  matched-pairs rank-biserial correlation and a seeded percentile bootstrap 95% CI of the
  mean difference, with ``n`` (and the patients left out) reported per metric;
- gross statistics with subject-bootstrap intervals (:mod:`ecg_mlflow.uncertainty`): VEB and
  SVEB Se and +P of each variant, their smallest, and transfer - no-transfer, each with a
  percentile 95% CI from resampling subjects;
- figures: sorted per-patient difference bars, no-transfer against transfer scatter plots,
  and the summed confusion matrices of both variants;
- errors by rhythm: per variant and reference rhythm (sinus, atrial fibrillation, flutter, ...),
  the V and S beats found, missed and falsely called, from each child's ``predictions.csv``
  (:mod:`ecg_mlflow.predictions`; left out, with a note, for runs logged before predictions were).

Several LOSO runs on the same patients (say two option sets) are also compared with the first
one: the difference of each gross statistic and of their smallest, with a paired
subject-bootstrap CI, so that one can tell a gain from the luck of a few records.

:func:`compare` validates every LOSO run first (unknown id, not a LOSO run, not FINISHED,
no variant children each raise :class:`CompareError` naming the run), then writes one
``compare`` run (tag ``ecg.role=compare``, ``loso_run_ids``, ``loso_run_id.<i>``) with a
self-contained HTML report, CSV/JSON tables and PNG figures, and prints the summary.

Rates are fractions in [0, 1] in the CSV/JSON files (as logged in MLflow) and percent in the
HTML report and the terminal. A statistic with no denominator (logged as NaN, or not logged)
is missing (empty in CSV, ``null`` in JSON, an em dash in the report), never zero.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scipy import stats

from ecg_mlflow import figures, tracking, uncertainty
from ecg_mlflow.metrics import EC57_COUNTS, SUMMARY_STATS, classification_metrics, confusion, ec57_counts, ec57_stats
from ecg_mlflow.predictions import PREDICTIONS_FILE, error_counts, read_predictions
from ecg_mlflow.splits import patient_key

VARIANTS: tuple[str, ...] = ("no_transfer", "transfer")
HEADLINE: tuple[str, ...] = ("accuracy", "macro_f1", "veb_se", "veb_ppv", "sveb_se", "sveb_ppv")
DEFAULT_EXPERIMENT = "ecg-loso"
WORST_SOURCES = 10  # (record, rhythm) pairs the report lists as where most transfer errors are
N_BOOT = 10_000
CI_LEVEL = 0.95
# LOSO parameters shown next to each run's name (those present in the run).
KEY_PARAMS: tuple[str, ...] = ("model", "label_scheme", "finetune_minutes", "records", "epochs",
                               "finetune_epochs", "window", "include_paced", "seed")
LABELS: dict[str, str] = {
    "accuracy": "Accuracy", "macro_f1": "Macro-F1", "veb_se": "VEB Se", "veb_ppv": "VEB +P",
    "veb_fpr": "VEB FPR", "sveb_se": "SVEB Se", "sveb_ppv": "SVEB +P", "sveb_fpr": "SVEB FPR",
    "no_transfer": "no transfer", "transfer": "transfer", "smallest": "smallest of the four",
}
# Published patient-specific results on the AAMI classes, in percent, as commonly cited (gross
# statistics). Their protocols differ from ours (our base model is trained leave-one-subject-out
# and the head re-trained on the first `finetune_minutes` of the record): read them as context,
# not as a like-for-like benchmark. The papers' own tables were not read here; later papers'
# comparison tables give other figures for two of them (README, "Results").
PUBLISHED: tuple[dict[str, object], ...] = (
    {"study": "Kiranyaz et al. 2016, IEEE TBME (1D CNN)",
     "protocol": "patient-specific training on the first 5 min of each record; gross; as commonly cited (record "
                 "set not checked against the paper; a 2017 comparison table gives 95.0 / 89.5 / 64.6 / 62.1)",
     "veb_se": 93.9, "veb_ppv": 90.6, "sveb_se": 60.3, "sveb_ppv": 63.5},
    {"study": "Jiang & Kong 2007, IEEE TNN (block-based neural network)",
     "protocol": "patient-specific training on the first 5 min; gross; as commonly cited, on 24 test records (not "
                 "checked against the paper; a 2017 comparison table gives 86.6 / 89.4 / 50.6 / 68.0)",
     "veb_se": 94.3, "veb_ppv": 95.8, "sveb_se": 74.9, "sveb_ppv": 78.8},
    {"study": "Zhai & Tin 2018, IEEE Access (2D CNN, dual-beat coupling)",
     "protocol": "patient-specific training on the first 5 min of each record (following Kiranyaz et al.); "
                 "gross; record set as in the paper",
     "veb_se": 93.8, "veb_ppv": 92.4, "sveb_se": 76.8, "sveb_ppv": 74.0},
)


class CompareError(ValueError):
    """Bad input to the comparison (a run id, an experiment); the message names the culprit."""


# --------------------------------------------------------------------------------------------
# Reading LOSO runs
# --------------------------------------------------------------------------------------------

@dataclass
class LosoRun:
    """One LOSO parent run and what the comparison needs from its variant children.

    children: one row per (patient, variant): ``patient``, ``subject``, ``variant``, ``run_id``
    and one float column per ``test_*`` metric without the prefix (NaN = not logged).
    cms: variant -> confusion matrix ``(k, k)`` summed over that variant's children.
    predictions: variant -> the children's ``predictions.csv`` stacked (column ``patient`` added);
    empty when a child of that variant logged none. without_predictions: children that logged none.
    """

    run_id: str
    name: str
    experiment_id: str
    params: dict[str, str]
    parent_metrics: dict[str, float]
    children: pd.DataFrame
    labels: list[str]
    cms: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)
    without_predictions: int = 0

    @property
    def label(self) -> str:
        """The run name with its key parameters, e.g. ``'loso-3 (label_scheme=aami, ...)'``."""
        keys = [f"{k}={self.params[k]}" for k in KEY_PARAMS if k in self.params]
        return f"{self.name} ({', '.join(keys)})" if keys else self.name


def _in_patient_order(children: pd.DataFrame) -> pd.DataFrame:
    """Variant runs sorted by patient (:func:`patient_key`), then variant, re-indexed."""
    order = children.patient.map(patient_key)
    return children.assign(_key=order).sort_values(["_key", "variant"]).drop(columns="_key").reset_index(drop=True)


def resolve_experiment(client: MlflowClient, experiment: str):
    """The experiment called ``experiment`` (a name, or else an id)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        with contextlib.suppress(MlflowException):
            exp = client.get_experiment(experiment)
    if exp is None:
        raise CompareError(f"experiment: no experiment named (or with id) {experiment!r} in the tracking "
                           f"store {mlflow.get_tracking_uri()}")
    return exp


def default_loso_run(client: MlflowClient, experiment: str = "") -> str:
    """The newest FINISHED run tagged ``ecg.role=loso``.

    Searched in ``experiment`` when given, else in the active experiment
    (``MLFLOW_EXPERIMENT_ID`` / ``MLFLOW_EXPERIMENT_NAME``, as ``mlflow run`` sets it) and then
    in ``ecg-loso`` (where ``make loso`` logs), so a plain ``mlflow run . -e compare`` finds it.
    """
    if experiment:
        candidates = [resolve_experiment(client, experiment)]
    else:
        candidates = []
        for env in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            if os.environ.get(env):
                with contextlib.suppress(CompareError):
                    candidates.append(resolve_experiment(client, os.environ[env]))
        exp = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        if exp is not None:
            candidates.append(exp)
    for exp in candidates:
        found = client.search_runs([exp.experiment_id],
                                   "tags.`ecg.role` = 'loso' and attributes.status = 'FINISHED'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0].info.run_id
    searched = ", ".join(repr(e.name) for e in candidates) or f"none (no {DEFAULT_EXPERIMENT!r} experiment)"
    raise CompareError(f"loso_runs: none given and no FINISHED run tagged ecg.role=loso in the experiments "
                       f"searched: {searched}; pass loso_runs=<run id> or experiment=<name>")


def parse_run_ids(loso_runs: str) -> list[str]:
    """Analyses from a comma-separated string: each a run id, or run ids joined by ``+`` to pool
    (see :func:`pool`), returned as written (``'a+b'``). A run may be in several analyses
    (``a+b,a+c``: one half's run beside two choices for the other half), but not twice in one
    pool, and no analysis may be listed twice."""
    ids = ["+".join(p.strip() for p in r.split("+")) for r in loso_runs.split(",") if r.strip()]
    if "" in [p for r in ids for p in r.split("+")]:
        raise CompareError(f"loso_runs {loso_runs!r} has an empty run id around a '+'")
    for r in ids:
        parts = r.split("+")
        dupes = sorted({p for p in parts if parts.count(p) > 1})
        if dupes:
            raise CompareError(f"loso_runs {r!r} pools run(s) {dupes} more than once")
    same = [frozenset(r.split("+")) for r in ids]
    repeated = sorted({r for r, k in zip(ids, same) if same.count(k) > 1})
    if repeated:
        raise CompareError(f"loso_runs lists the analysis {repeated} more than once")
    return ids


def pool(runs: list[LosoRun]) -> LosoRun:
    """One analysis of LOSO runs that held out different patients, e.g. one run per half of the
    subjects with options chosen on the other half: their variant runs side by side and their
    confusion matrices summed. The pooled run has no parent metrics of its own; a parameter the
    runs disagree on reads ``a | b``. Patients and labels are checked first."""
    if len(runs) == 1:
        return runs[0]
    what = " + ".join(f"{r.run_id!r}" for r in runs)
    for r in runs[1:]:
        if r.labels != runs[0].labels:
            raise CompareError(f"loso_runs {what}: run {r.run_id!r} has labels {r.labels}, "
                               f"run {runs[0].run_id!r} has {runs[0].labels}; only runs of one label scheme pool")
    seen: dict[str, str] = {}
    for r in runs:
        for p in r.children.patient.unique():
            if p in seen:
                raise CompareError(f"loso_runs {what}: patient {p} is in both run {seen[p]!r} and run "
                                   f"{r.run_id!r}; pooled runs must hold out different patients")
            seen[p] = r.run_id
    keys = dict.fromkeys(k for r in runs for k in r.params)
    params = {k: " | ".join(dict.fromkeys(r.params.get(k, "") for r in runs)) for k in keys}
    children = _in_patient_order(pd.concat([r.children for r in runs], ignore_index=True))
    return LosoRun(run_id="+".join(r.run_id for r in runs), name=" + ".join(r.name for r in runs),
                   experiment_id=runs[0].experiment_id, params=params, parent_metrics={}, children=children,
                   labels=runs[0].labels, cms={v: sum(r.cms[v] for r in runs) for v in VARIANTS},
                   notes=[n for r in runs for n in r.notes],
                   # A pool counts errors by rhythm only when every pooled run logged predictions.
                   predictions={v: pd.DataFrame() if any(r.without_predictions for r in runs)
                                else pd.concat([r.predictions[v] for r in runs], ignore_index=True) for v in VARIANTS},
                   without_predictions=sum(r.without_predictions for r in runs))


def _read_predictions(run_id: str, where: str, labels: list[str], cm: np.ndarray) -> pd.DataFrame | None:
    """A child's ``predictions.csv`` (None if it logged none), checked against its confusion matrix."""
    try:
        table = read_predictions(run_id)
    except (MlflowException, OSError, ValueError) as e:
        raise CompareError(f"{where}: cannot read its {PREDICTIONS_FILE} artifact ({e})") from e
    if table is None:
        return None
    code = {c: i for i, c in enumerate(labels)}
    try:
        y, p = table["label"].map(code), table["predicted"].map(code)
        ok = not (y.isna().any() or p.isna().any())
        ok = ok and np.array_equal(confusion(y.to_numpy(int), p.to_numpy(int), len(labels)), cm)
    except KeyError as e:
        raise CompareError(f"{where}: its {PREDICTIONS_FILE} lacks the column {e}") from e
    if not ok:
        raise CompareError(f"{where}: its {PREDICTIONS_FILE} does not add up to its confusion_matrix.json")
    return table


def _read_confusion(run_id: str, where: str, tmp: Path) -> tuple[list[str], np.ndarray]:
    """``confusion_matrix.json`` of a child run, through the artifact API: (labels, ``(k, k)`` int64)."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="confusion_matrix.json",
                                                   dst_path=str(tmp / run_id))
        doc = json.loads(Path(path).read_text())
        labels = [str(c) for c in doc["labels"]]
        cm = np.asarray(doc["matrix"], dtype=np.int64)
    except (MlflowException, OSError, ValueError, KeyError, TypeError) as e:
        raise CompareError(f"{where}: cannot read its confusion_matrix.json artifact ({e})") from e
    if cm.shape != (len(labels), len(labels)) or (cm < 0).any():
        raise CompareError(f"{where}: confusion_matrix.json must hold a ({len(labels)}, {len(labels)}) matrix "
                           f"of non-negative counts for labels {labels}, got shape {cm.shape}")
    return labels, cm


def load_loso_run(client: MlflowClient, run_id: str, with_predictions: bool = True) -> LosoRun:
    """Validate a LOSO parent run and read its variant children and their confusion matrices (and,
    with ``with_predictions``, their ``predictions.csv``; without, ``predictions`` stays empty)."""
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise CompareError(f"loso_runs: run {run_id!r} not found in the tracking store "
                           f"{mlflow.get_tracking_uri()}") from e
    name = run.info.run_name or run_id
    what = f"run {run_id!r} ({name})"
    role = run.data.tags.get("ecg.role")
    if role != "loso":
        raise CompareError(f"loso_runs: {what} is not a LOSO run: its tag ecg.role is {role!r}, expected 'loso'")
    if run.info.status != "FINISHED":
        raise CompareError(f"loso_runs: LOSO {what} has status {run.info.status}, expected FINISHED "
                           f"(wait for it to end, or pick a finished run)")

    # All experiments: a child started without an experiment id may sit outside its parent's.
    df = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.`ecg.role` = 'variant'",
        output_format="pandas")
    if df.empty:
        raise CompareError(f"loso_runs: LOSO {what} has no variant runs (children tagged ecg.role=variant)")

    notes: list[str] = []
    rows = []
    for _, r in df.iterrows():
        child = f"variant run {r['run_id']!r} of LOSO {what}"
        if r["status"] != "FINISHED":
            notes.append(f"left out {child}: status {r['status']}")
            continue
        tags = {k: r.get(f"tags.{k}") for k in ("patient", "subject", "variant")}
        missing = [k for k, v in tags.items() if not isinstance(v, str) or not v]
        if missing:
            raise CompareError(f"{child} lacks the tag(s) {missing}")
        if tags["variant"] not in VARIANTS:
            notes.append(f"left out {child}: unknown variant {tags['variant']!r}")
            continue
        row = {**tags, "run_id": r["run_id"]}
        row.update({c[len("metrics.test_"):]: float(v) for c, v in r.items()
                    if c.startswith("metrics.test_") and v is not None and not pd.isna(v)})
        absent = [f"test_{k}" for k in EC57_COUNTS if k not in row]
        if absent:
            raise CompareError(f"{child} (patient {tags['patient']}) lacks the metrics {absent}")
        rows.append(row)
    children = pd.DataFrame(rows)
    if children.empty:
        raise CompareError(f"loso_runs: LOSO {what} has no FINISHED variant runs")
    dup = children[children.duplicated(["patient", "variant"], keep=False)]
    if not dup.empty:
        p, v = dup.iloc[0][["patient", "variant"]]
        raise CompareError(f"LOSO {what} has {int(((children.patient == p) & (children.variant == v)).sum())} "
                           f"variant runs for patient {p} variant {v}, expected one")
    for v in VARIANTS:
        if not (children.variant == v).any():
            raise CompareError(f"loso_runs: LOSO {what} has no {v} variant runs, so there is nothing to compare")
    children = _in_patient_order(children)

    # Summed confusion matrices, read through the artifact API; every child must use one label set.
    labels: list[str] | None = None
    cms: dict[str, np.ndarray] = {}
    tables: dict[str, list[pd.DataFrame]] = {v: [] for v in VARIANTS}
    without = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _, c in children.iterrows():
            where = f"variant run {c.run_id!r} (patient {c.patient}, {c.variant}) of LOSO {what}"
            lab, cm = _read_confusion(c.run_id, where, Path(tmp))
            if labels is None:
                labels = lab
            elif lab != labels:
                raise CompareError(f"{where}: confusion matrix labels {lab} differ from its siblings' {labels}")
            cms[c.variant] = cms.get(c.variant, 0) + cm
            # The logged counts must be those of the logged matrix: a mismatch means a logging fault.
            logged = {k: int(c[k]) for k in EC57_COUNTS}
            if logged != ec57_counts(cm, labels):
                notes.append(f"{where}: logged test_veb_*/test_sveb_* counts differ from its confusion matrix")
            if not with_predictions:
                continue
            table = _read_predictions(c.run_id, where, labels, cm)
            if table is None:
                without += 1
            else:
                tables[c.variant].append(table.assign(patient=c.patient))
    if without:
        notes.append(f"{without} of {len(children)} variant runs of LOSO {what} logged no {PREDICTIONS_FILE} "
                     "(logged before per-beat predictions were), so errors by rhythm are left out")
    predictions = {v: pd.concat(t, ignore_index=True) if t and not without else pd.DataFrame()
                   for v, t in tables.items()}
    return LosoRun(run_id=run_id, name=name, experiment_id=run.info.experiment_id, params=dict(run.data.params),
                   parent_metrics=dict(run.data.metrics), children=children, labels=labels or [], cms=cms,
                   notes=notes, predictions=predictions, without_predictions=without)


# --------------------------------------------------------------------------------------------
# Tables and statistics
# --------------------------------------------------------------------------------------------

def per_patient_table(run: LosoRun, metrics: tuple[str, ...] = HEADLINE) -> pd.DataFrame:
    """One row per patient (index ``patient``): ``subject`` and, per metric ``m``,
    ``m_no_transfer``, ``m_transfer``, ``m_diff`` (transfer - no-transfer; NaN unless both defined)."""
    c = run.children
    out = pd.DataFrame(index=pd.Index(sorted(c.patient.unique(), key=patient_key), name="patient"))
    out["subject"] = c.drop_duplicates("patient").set_index("patient").subject.reindex(out.index)
    for m in metrics:
        for v in VARIANTS:
            col = c[c.variant == v].set_index("patient")
            out[f"{m}_{v}"] = (col[m] if m in col else pd.Series(dtype=float)).reindex(out.index).astype(float)
        out[f"{m}_diff"] = out[f"{m}_transfer"] - out[f"{m}_no_transfer"]
    return out


def gross_counts(run: LosoRun, variant: str) -> dict[str, int]:
    """The EC57 counts ``test_veb_tp`` ... of one variant's children, summed over patients."""
    c = run.children[run.children.variant == variant]
    return {k: int(c[k].sum()) for k in EC57_COUNTS}


def aggregate_table(run: LosoRun) -> pd.DataFrame:
    """Per statistic (index :data:`SUMMARY_STATS`), for each variant ``v``: ``gross_v`` (EC57 rates
    from the summed counts; accuracy and macro-F1 from the summed confusion matrix), ``avg_v``
    (mean over patients where defined), ``n_v`` (those patients) and ``parent_gross_v`` (the
    LOSO run's logged ``gross_<v>_<stat>``, NaN if absent); then ``gross_diff``, ``avg_diff``."""
    out = pd.DataFrame(index=pd.Index(SUMMARY_STATS, name="statistic"))
    for v in VARIANTS:
        counts = gross_counts(run, v)
        gross = {**ec57_stats(counts), **classification_metrics(run.cms[v], run.labels)}
        if counts != ec57_counts(run.cms[v], run.labels):
            run.notes.append(f"{v}: counts summed over patients differ from those of the summed confusion matrix")
        c = run.children[run.children.variant == v]
        out[f"gross_{v}"] = [gross.get(s, np.nan) for s in SUMMARY_STATS]
        out[f"avg_{v}"] = [c[s].mean() if s in c and c[s].notna().any() else np.nan for s in SUMMARY_STATS]
        out[f"n_{v}"] = [int(c[s].notna().sum()) if s in c else 0 for s in SUMMARY_STATS]
        out[f"parent_gross_{v}"] = [run.parent_metrics.get(f"gross_{v}_{s}", np.nan) for s in SUMMARY_STATS]
        for s in SUMMARY_STATS:
            if f"gross_{v}_{s}" not in run.parent_metrics:
                continue  # not logged: nothing to check
            ours, logged = out.at[s, f"gross_{v}"], out.at[s, f"parent_gross_{v}"]
            if not np.isclose(ours, logged, rtol=0, atol=1e-9, equal_nan=True):  # NaN = undefined on both sides
                run.notes.append(f"cross-check: gross {v} {s} recomputed from the children is {ours:.6g}, "
                                 f"the LOSO run logged {logged:.6g}")
    out["gross_diff"] = out.gross_transfer - out.gross_no_transfer
    out["avg_diff"] = out.avg_transfer - out.avg_no_transfer
    return out


def subject_count_table(run: LosoRun, variant: str) -> pd.DataFrame:
    """The EC57 counts of one variant summed by subject: index ``subject`` (sorted), columns
    :data:`~ecg_mlflow.metrics.EC57_COUNTS`, int64."""
    c = run.children[run.children.variant == variant]
    subjects, counts = uncertainty.subject_counts(list(c.subject), c[list(EC57_COUNTS)].to_numpy())
    return pd.DataFrame(counts, index=pd.Index(subjects, name="subject"), columns=list(EC57_COUNTS))


def _aligned_counts(tables: list[pd.DataFrame]) -> list[np.ndarray]:
    """Count tables on the union of their subjects (a subject a table lacks counts zero)."""
    subjects = sorted(set().union(*(t.index for t in tables)))
    return [t.reindex(subjects, fill_value=0).to_numpy() for t in tables]


def gross_ci_table(run: LosoRun, n_boot: int = N_BOOT, seed: int = 0, level: float = CI_LEVEL) -> pd.DataFrame:
    """Gross statistics with subject-bootstrap intervals, per statistic of
    :data:`~ecg_mlflow.uncertainty.STATISTICS` (index): for each variant ``v`` ``gross_v``,
    ``ci_low_v``, ``ci_high_v``; then ``diff`` (transfer - no transfer), ``diff_ci_low``,
    ``diff_ci_high`` and ``share_transfer_higher`` (share of resamples where transfer is higher),
    all on the same resamples of the run's subjects (:func:`uncertainty.resample_weights`)."""
    nt, tr = _aligned_counts([subject_count_table(run, v) for v in VARIANTS])
    weights = uncertainty.resample_weights(len(nt), n_boot, seed)
    paired = uncertainty.paired_interval(nt, tr, weights, level)
    out = pd.DataFrame(index=pd.Index(uncertainty.STATISTICS, name="statistic"))
    for v, counts in zip(VARIANTS, (nt, tr)):
        ci = uncertainty.gross_interval(counts, weights, level)
        for j, col in enumerate((f"gross_{v}", f"ci_low_{v}", f"ci_high_{v}")):
            out[col] = [ci[k][j] for k in out.index]
    for col, key in (("diff", "diff"), ("diff_ci_low", "ci_low"), ("diff_ci_high", "ci_high"),
                     ("share_transfer_higher", "share_b_higher")):
        out[col] = [paired[k][key] for k in out.index]
    return out


@dataclass
class RunDifferences:
    """Each later LOSO run against the first, on the same patients (:func:`run_differences`).

    table: one row per (``run``, ``variant``, ``statistic``): ``first`` and ``this`` (gross values),
    ``diff`` (this - first), ``ci_low``, ``ci_high`` (paired subject bootstrap) and
    ``share_higher`` (share of resamples where this run is higher). skipped: why a run has no rows.
    """

    table: pd.DataFrame
    skipped: list[str]


def run_differences(analyses: list["Analysis"], n_boot: int = N_BOOT, seed: int = 0,
                    level: float = CI_LEVEL) -> RunDifferences:
    """Gross statistics of each later run minus those of ``analyses[0]``, with paired
    subject-bootstrap CIs; only runs that hold exactly the first run's patients are compared."""
    rows, skipped = [], []
    if len(analyses) < 2:
        return RunDifferences(pd.DataFrame(rows), skipped)
    first = analyses[0]
    patients = set(first.per_patient.index)
    first_counts = {v: subject_count_table(first.run, v) for v in VARIANTS}
    for i, a in enumerate(analyses[1:], start=1):
        theirs = set(a.per_patient.index)
        if theirs != patients:
            only = sorted(theirs ^ patients, key=patient_key)
            skipped.append(f"[{i}] holds other patients than [0] (differing: {', '.join(only[:8])}"
                           f"{' ...' if len(only) > 8 else ''}): no paired difference")
            continue
        for v in VARIANTS:
            c0, ci = _aligned_counts([first_counts[v], subject_count_table(a.run, v)])
            weights = uncertainty.resample_weights(len(c0), n_boot, seed)
            for k, d in uncertainty.paired_interval(c0, ci, weights, level).items():
                rows.append({"run": i, "loso_run_id": a.run.run_id, "variant": v, "statistic": k,
                             "first": d["a"], "this": d["b"], "diff": d["diff"], "ci_low": d["ci_low"],
                             "ci_high": d["ci_high"], "share_higher": d["share_b_higher"]})
    return RunDifferences(pd.DataFrame(rows), skipped)


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of differences ``d`` ``(n,)``:
    ``(R+ - R-) / (R+ + R-)`` with ``R±`` the rank sums of ``|d|`` (average ranks for ties) over
    positive / negative differences; zero differences are dropped as in the Wilcoxon test.
    In [-1, 1]; +1 = every non-zero difference favours the second variant. NaN if all are zero."""
    d = np.asarray(d, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return math.nan
    ranks = stats.rankdata(np.abs(d))
    r_plus, r_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((r_plus - r_minus) / (r_plus + r_minus))


def bootstrap_ci(d: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``d`` ``(n,)``, resampling patients with replacement.

    Reproducible: resample indices are ``np.random.default_rng(seed).integers(0, n, (n_boot, n))``.
    """
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive number of resamples, got {n_boot}")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_test(no_transfer: np.ndarray, transfer: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, float]:
    """Paired comparison of one metric over patients; both arrays ``(n,)``, NaN = undefined.

    Patients where either value is NaN are left out (``n_left_out``). Returns ``n``,
    ``n_left_out``, ``n_nonzero`` (pairs with a non-zero difference), the means, ``mean_diff``
    (transfer - no-transfer), its bootstrap CI ``ci_low``/``ci_high``, the Wilcoxon signed-rank
    statistic ``wilcoxon_W`` and two-sided ``p_value`` (NaN when n < 2), and ``rank_biserial``.
    """
    a, b = np.asarray(no_transfer, dtype=np.float64), np.asarray(transfer, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"no_transfer and transfer must be 1-D of one length, got {a.shape} and {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    d = b - a
    out = {"n": float(d.size), "n_left_out": float((~ok).sum()), "n_nonzero": float((d != 0).sum()),
           "mean_no_transfer": math.nan, "mean_transfer": math.nan, "mean_diff": math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "wilcoxon_W": math.nan, "p_value": math.nan,
           "rank_biserial": rank_biserial(d)}
    if d.size == 0:
        return out
    out.update(mean_no_transfer=float(a.mean()), mean_transfer=float(b.mean()), mean_diff=float(d.mean()))
    out["ci_low"], out["ci_high"] = bootstrap_ci(d, n_boot, seed)
    if d.size < 2:  # one patient: no test (scipy refuses one pair)
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-zero differences: scipy warns, returns p = 1
        res = stats.wilcoxon(b, a)
    out["wilcoxon_W"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


def paired_tests(per_patient: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0,
                 metrics: tuple[str, ...] = HEADLINE) -> pd.DataFrame:
    """:func:`paired_test` for each metric (index) of a :func:`per_patient_table`."""
    rows = {m: paired_test(per_patient[f"{m}_no_transfer"].to_numpy(), per_patient[f"{m}_transfer"].to_numpy(),
                           n_boot, seed) for m in metrics}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "metric"
    for c in ("n", "n_left_out", "n_nonzero"):
        out[c] = out[c].astype(int)
    return out


# --------------------------------------------------------------------------------------------
# One LOSO run's analysis
# --------------------------------------------------------------------------------------------

@dataclass
class Analysis:
    """Tables (fractions) and figures (PNG bytes) of one LOSO run."""

    run: LosoRun
    per_patient: pd.DataFrame
    aggregate: pd.DataFrame
    tests: pd.DataFrame
    figures: dict[str, bytes]
    gross_ci: pd.DataFrame
    by_rhythm: pd.DataFrame = field(default_factory=pd.DataFrame)
    by_record_rhythm: pd.DataFrame = field(default_factory=pd.DataFrame)


def rhythm_table(run: LosoRun, by: tuple[str, ...] = ("rhythm",)) -> pd.DataFrame:
    """:func:`ecg_mlflow.predictions.error_counts` of each variant's stacked predictions per ``by``
    (rhythm, or record and rhythm), the variants stacked (column ``variant``); empty when the run's
    children logged no predictions."""
    parts = [error_counts(run.predictions[v], run.labels, by).assign(variant=v)
             for v in VARIANTS if not run.predictions.get(v, pd.DataFrame()).empty]
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True)
    return out[["variant", *[c for c in out.columns if c != "variant"]]]


def analyse(run: LosoRun, n_boot: int = N_BOOT, seed: int = 0) -> Analysis:
    """Tables, statistics and figures of one LOSO run."""
    pp = per_patient_table(run)
    agg = aggregate_table(run)
    tests = paired_tests(pp, n_boot, seed)
    gross_ci = gross_ci_table(run, n_boot, seed)
    figs: dict[str, bytes] = {}
    bars, scatter = {}, {}
    for m in HEADLINE:
        both = pp[[f"{m}_no_transfer", f"{m}_transfer"]].dropna()
        bars[LABELS[m]] = (list(both.index), 100 * (both.iloc[:, 1] - both.iloc[:, 0]).to_numpy())
        scatter[LABELS[m]] = (100 * both.iloc[:, 0].to_numpy(), 100 * both.iloc[:, 1].to_numpy())
    for name, fig in (
        ("difference_bars", figures.plot_difference_bars(bars, "transfer - no transfer (percentage points)",
                                                         f"Per-patient difference: {run.name}")),
        ("scatter", figures.plot_paired_scatter(scatter, "no transfer (%)", "transfer (%)",
                                                f"No transfer against transfer: {run.name}")),
        ("confusion", figures.plot_confusion_pair({LABELS[v]: run.cms[v] for v in VARIANTS}, run.labels,
                                                  f"Confusion matrices summed over patients: {run.name}")),
    ):
        figs[name] = figures.to_png(fig)
        plt.close(fig)
    return Analysis(run, pp, agg, tests, figs, gross_ci, rhythm_table(run), rhythm_table(run, ("record", "rhythm")))


# --------------------------------------------------------------------------------------------
# Presentation: percent tables for the terminal and HTML
# --------------------------------------------------------------------------------------------

def _pct(x: float, digits: int = 1, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:+.{digits}f}" if signed else f"{100 * x:.{digits}f}"


def _num(x: float, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ci(lo: float, hi: float, signed: bool = False) -> str:
    return f"[{_pct(lo, signed=signed)}, {_pct(hi, signed=signed)}]"


def display_per_patient(a: Analysis) -> pd.DataFrame:
    """The per-patient table in percent, with aggregate rows (gross, average) at the bottom."""
    cols = pd.MultiIndex.from_tuples([(LABELS[m], h) for m in HEADLINE for h in ("NT", "T", "Δ")])
    rows, index = [], []
    for p, r in a.per_patient.iterrows():
        rows.append([_pct(r[f"{m}_{k}"], signed=(k == "diff")) for m in HEADLINE
                     for k in ("no_transfer", "transfer", "diff")])
        index.append(str(p))
    for kind, name in (("gross", "gross (pooled)"), ("avg", "average")):
        g = a.aggregate
        rows.append([_pct(g.at[m, f"{kind}_{k}"], signed=(k == "diff")) for m in HEADLINE
                     for k in ("no_transfer", "transfer", "diff")])
        index.append(name)
    return pd.DataFrame(rows, index=pd.Index(index, name="patient"), columns=cols)


def display_aggregate(a: Analysis) -> pd.DataFrame:
    """Gross and average statistics per variant, in percent, with n patients and the parent's value."""
    g = a.aggregate
    out = pd.DataFrame(index=[LABELS[s] for s in SUMMARY_STATS])
    for kind in ("gross", "avg"):
        for v in (*VARIANTS, "diff"):
            head = f"{kind} {LABELS.get(v, 'Δ (pp)')}"
            out[head] = [_pct(g.at[s, f"{kind}_{v}"], signed=(v == "diff")) for s in SUMMARY_STATS]
    for v in VARIANTS:
        out[f"n {LABELS[v]}"] = [str(int(g.at[s, f"n_{v}"])) for s in SUMMARY_STATS]
    for v in VARIANTS:
        out[f"logged gross {LABELS[v]}"] = [_pct(g.at[s, f"parent_gross_{v}"]) for s in SUMMARY_STATS]
    return out


def display_by_rhythm(a: Analysis) -> pd.DataFrame:
    """Errors by reference rhythm per variant: counts, and Se / +P in percent."""
    return _display_errors(a.by_rhythm, ["rhythm"], with_records=True)


def display_worst_sources(a: Analysis, n: int = WORST_SOURCES) -> pd.DataFrame:
    """The ``n`` (record, rhythm) pairs with the most transfer errors (V and S beats missed or falsely
    called, all four summed), in percent like :func:`display_by_rhythm`."""
    t = a.by_record_rhythm
    if t.empty:
        return t
    t = t[t.variant == "transfer"]
    errors = t[["veb_missed", "veb_false", "sveb_missed", "sveb_false"]].sum(axis=1)
    t = t.assign(errors=errors)[errors > 0].sort_values(["errors", "record", "rhythm"],
                                                        ascending=[False, True, True]).head(n)
    return _display_errors(t, ["record", "rhythm"], with_records=False)


def _display_errors(t: pd.DataFrame, keys: list[str], with_records: bool) -> pd.DataFrame:
    if t.empty:
        return t
    t = t.reset_index(drop=True)
    out = pd.DataFrame({"variant": [LABELS[v] for v in t.variant], **{k: t[k] for k in keys}, "beats": t.beats})
    if with_records:
        out["records"] = t.records
    for kind, name in (("veb", "VEB"), ("sveb", "SVEB")):
        for col in ("beats", "found", "missed", "false"):
            out[f"{name} {col}"] = t[f"{kind}_{col}"].astype(int)
        out[f"{name} Se"] = [_pct(x) for x in t[f"{kind}_se"]]
        out[f"{name} +P"] = [_pct(x) for x in t[f"{kind}_ppv"]]
    return out.set_index(["variant", *keys])


def display_tests(a: Analysis) -> pd.DataFrame:
    """Paired statistics per headline metric; means and CI in percent (points)."""
    t = a.tests
    level = int(round(100 * CI_LEVEL))
    cols = {
        "n": t.n.astype(str), "left out": t.n_left_out.astype(str),
        "mean NT (%)": t.mean_no_transfer.map(_pct), "mean T (%)": t.mean_transfer.map(_pct),
        "mean Δ (pp)": t.mean_diff.map(lambda x: _pct(x, signed=True)),
        f"{level}% CI (pp)": [_ci(lo, hi, signed=True) for lo, hi in zip(t.ci_low, t.ci_high)],
        "Wilcoxon W": t.wilcoxon_W.map(lambda x: _num(x, ".1f")),
        "p": t.p_value.map(lambda x: _num(x, ".3g")),
        "rank-biserial r": t.rank_biserial.map(lambda x: _num(x, "+.2f")),
    }
    return pd.DataFrame({k: list(v) for k, v in cols.items()},
                        index=pd.Index([LABELS[m] for m in t.index], name="metric"))


def display_gross_ci(a: Analysis) -> pd.DataFrame:
    """Gross statistics and their subject-bootstrap CIs, in percent; Δ in points."""
    g = a.gross_ci
    level = int(round(100 * CI_LEVEL))
    out = pd.DataFrame(index=pd.Index([LABELS[s] for s in g.index], name="statistic"))
    for v in VARIANTS:
        out[LABELS[v]] = [_pct(x) for x in g[f"gross_{v}"]]
        out[f"{LABELS[v]} {level}% CI"] = [_ci(lo, hi) for lo, hi in zip(g[f"ci_low_{v}"], g[f"ci_high_{v}"])]
    out["Δ (pp)"] = [_pct(x, signed=True) for x in g["diff"]]
    out[f"Δ {level}% CI"] = [_ci(lo, hi, signed=True) for lo, hi in zip(g.diff_ci_low, g.diff_ci_high)]
    out["resamples T > NT"] = [_num(100 * x, ".1f") + " %" if not math.isnan(x) else "—"
                               for x in g.share_transfer_higher]
    return out


def display_run_differences(d: RunDifferences, analyses: list[Analysis]) -> pd.DataFrame:
    """:func:`run_differences` in percent: one row per (run, variant, statistic)."""
    level = int(round(100 * CI_LEVEL))
    if d.table.empty:
        return pd.DataFrame()
    t = d.table
    return pd.DataFrame({
        "run": [f"[{i}] {analyses[i].run.name}" for i in t.run], "variant": [LABELS[v] for v in t.variant],
        "statistic": [LABELS[k] for k in t.statistic], "[0] (%)": t["first"].map(_pct),
        "this run (%)": t["this"].map(_pct), "Δ (pp)": t["diff"].map(lambda x: _pct(x, signed=True)),
        f"Δ {level}% CI": [_ci(lo, hi, signed=True) for lo, hi in zip(t.ci_low, t.ci_high)],
        "resamples higher": [_num(100 * x, ".1f") + " %" if not math.isnan(x) else "—" for x in t.share_higher],
    }).set_index(["run", "variant", "statistic"])


def side_by_side(analyses: list[Analysis]) -> pd.DataFrame:
    """Gross and average statistics (fractions) of each LOSO run (columns = run labels)."""
    data = {}
    for i, a in enumerate(analyses):
        col = {}
        for s in SUMMARY_STATS:
            for kind in ("gross", "avg"):
                for v in VARIANTS:
                    col[f"{kind}_{v}_{s}"] = a.aggregate.at[s, f"{kind}_{v}"]
        data[f"[{i}] {a.run.label}"] = col
    out = pd.DataFrame(data)
    out.index.name = "statistic"
    return out


def display_side_by_side(analyses: list[Analysis]) -> pd.DataFrame:
    """:func:`side_by_side` in percent with readable row names; columns = ``[i] run name``."""
    sbs = side_by_side(analyses).map(_pct)
    sbs.index = [f"{LABELS[s]}, {kind} {LABELS[v]}" for s in SUMMARY_STATS for kind in ("gross", "avg")
                 for v in VARIANTS]
    return sbs


def published_table(analyses: list[Analysis]) -> pd.DataFrame:
    """Published results (as commonly cited) and our gross statistics, in percent."""
    rows = [{"study": p["study"], "protocol": p["protocol"],
             **{LABELS[k]: f"{p[k]:.1f}" for k in ("veb_se", "veb_ppv", "sveb_se", "sveb_ppv")}}
            for p in PUBLISHED]
    for i, a in enumerate(analyses):
        ft = a.run.params.get("finetune_minutes")
        for v in VARIANTS:
            proto = f"LOSO base model; {LABELS[v]}" + (f"; head re-trained on the first {ft} min" if
                                                       v == "transfer" and ft else "")
            rows.append({"study": f"this project [{i}] {a.run.name}, {LABELS[v]}", "protocol": proto + "; gross",
                         **{LABELS[k]: _pct(a.aggregate.at[k, f"gross_{v}"])
                            for k in ("veb_se", "veb_ppv", "sveb_se", "sveb_ppv")}})
    return pd.DataFrame(rows).set_index("study")


# --------------------------------------------------------------------------------------------
# Report files
# --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.note { color: #8a5a00; } img { max-width: 100%; margin: 0.5em 0; } code { background: #f4f4f4; }
section { border-top: 2px solid #ddd; margin-top: 2em; }
"""


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(escape=True, border=0, na_rep="—")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_html(analyses: list[Analysis], n_boot: int, seed: int, differences: RunDifferences | None = None) -> str:
    """The self-contained report: every table inline, every figure a base64 PNG."""
    e = html.escape
    level = int(round(100 * CI_LEVEL))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Transfer against no transfer</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Patient-specific transfer against no transfer</h1>",
        f"<p>Generated {e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))} from the tracking store "
        f"<code>{e(mlflow.get_tracking_uri())}</code>. LOSO runs: "
        + ", ".join(f"<code>{e(a.run.run_id)}</code> ({e(a.run.name)})" for a in analyses) + ".</p>",
        "<p>Rates in percent; Δ = transfer − no transfer in percentage points (pp). <b>Gross</b>: EC57 "
        "statistics of the confusion counts summed over patients; <b>average</b>: mean of per-patient values "
        "over the patients where the statistic is defined. A statistic with no denominator (e.g. VEB Se for a "
        "patient without V beats) is missing (—), never zero, and that patient is left out of that metric's "
        f"test. Paired tests: Wilcoxon signed-rank (two-sided, zero differences dropped), matched-pairs "
        f"rank-biserial correlation r (positive favours transfer), and a percentile bootstrap {level}% CI of "
        f"the mean difference over patients ({n_boot} resamples, seed {seed}). The means in the paired table "
        f"are over those n patients; the averages in the gross/average table over every patient where the "
        f"variant defines the statistic.</p>",
        "<h2>Published patient-specific results</h2>",
        "<p>As commonly cited (gross statistics, percent). Their protocols differ from ours (record sets, "
        "training data, minutes of patient data): context, not a like-for-like benchmark.</p>",
        _table_html(published_table(analyses)),
    ]
    if len(analyses) > 1:
        parts += ["<h2>LOSO runs side by side</h2>", _table_html(display_side_by_side(analyses))]
    if differences is not None and len(analyses) > 1:
        parts += ["<h2>Against run [0]</h2>",
                  "<p>Gross statistics of each later run minus those of run [0] on the same patients, with a paired "
                  f"percentile bootstrap {level}% CI from resampling subjects (both runs on the same resamples; "
                  f"{n_boot} resamples, seed {seed}), and the share of resamples in which the later run is higher. "
                  "An interval that spans zero says that the subjects drawn decide the sign.</p>"]
        if not differences.table.empty:
            parts.append(_table_html(display_run_differences(differences, analyses)))
        parts += [f"<p class='note'>{e(n)}</p>" for n in differences.skipped]
    for i, a in enumerate(analyses):
        r = a.run
        params = ", ".join(f"{k}={e(str(r.params[k]))}" for k in KEY_PARAMS if k in r.params)
        n_pat = len(a.per_patient)
        parts += [
            f"<section><h2>[{i}] {e(r.name)}</h2>",
            f"<p>LOSO run <code>{e(r.run_id)}</code> (experiment {e(r.experiment_id)}); {params or 'no key params'}; "
            f"{n_pat} patients; classes {e(' '.join(r.labels))}.</p>",
        ]
        parts += [f"<p class='note'>{e(n)}</p>" for n in r.notes]
        parts += [
            "<h3>Paired statistics over patients</h3>", _table_html(display_tests(a)),
            "<h3>Gross statistics with subject-bootstrap intervals</h3>",
            f"<p>Percentile bootstrap {level}% CI from resampling the run's subjects with replacement (records of "
            "one subject together) and recomputing each gross statistic from the summed counts; Δ = transfer − "
            "no transfer on the same resamples.</p>",
            _table_html(display_gross_ci(a)),
            "<h3>Gross and average statistics</h3>", _table_html(display_aggregate(a)),
            "<h3>Per patient</h3>", "<p>NT = no transfer, T = transfer, Δ = T − NT (pp).</p>",
            _table_html(display_per_patient(a)),
            "<h3>Errors by rhythm</h3>",
            "<p>Test beats grouped by the reference rhythm in force (MIT-BIH rhythm annotations: N sinus, AFIB "
            "atrial fibrillation, AFL atrial flutter, SVTA supraventricular tachyarrhythmia, NOD nodal rhythm, B / T "
            "ventricular bigeminy / trigeminy, AB atrial bigeminy, ...; (none) before a record's first one); "
            "found / missed / false = EC57 TP / FN / FP, so each count column adds up to the gross count.</p>",
            (_table_html(display_by_rhythm(a)) + f"<h4>Where most transfer errors are: the {WORST_SOURCES} "
             "records and rhythms with the most (all in <code>tables/errors_by_record_rhythm.csv</code>)</h4>"
             + _table_html(display_worst_sources(a)) if not a.by_rhythm.empty
             else f"<p class='note'>No {PREDICTIONS_FILE} in this run's variant runs.</p>"),
            "<h3>Figures</h3>",
            _img(a.figures["difference_bars"], "per-patient differences"),
            _img(a.figures["scatter"], "no transfer against transfer"),
            _img(a.figures["confusion"], "summed confusion matrices"),
            "</section>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_report(analyses: list[Analysis], out: Path, n_boot: int, seed: int,
                 differences: RunDifferences | None = None) -> None:
    """Write ``report.html``, ``summary.json``, ``tables/*.csv`` and ``figures/*.png`` under ``out``.

    CSV/JSON hold fractions (as logged in MLflow); tables of several LOSO runs are stacked with
    a ``loso_run_id`` column.
    """
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    differences = differences if differences is not None else run_differences(analyses, n_boot, seed)
    (out / "report.html").write_text(render_html(analyses, n_boot, seed, differences), encoding="utf-8")

    def stacked(attr: str) -> pd.DataFrame:
        return pd.concat([getattr(a, attr).reset_index().assign(loso_run_id=a.run.run_id) for a in analyses],
                         ignore_index=True)

    stacked("per_patient").to_csv(out / "tables" / "per_patient.csv", index=False)
    stacked("aggregate").to_csv(out / "tables" / "aggregate.csv", index=False)
    stacked("tests").to_csv(out / "tables" / "paired_tests.csv", index=False)
    stacked("gross_ci").to_csv(out / "tables" / "gross_ci.csv", index=False)
    if not differences.table.empty:
        differences.table.to_csv(out / "tables" / "run_differences.csv", index=False)
    for attr, name in (("by_rhythm", "errors_by_rhythm"), ("by_record_rhythm", "errors_by_record_rhythm")):
        pd.concat([getattr(a, attr).assign(loso_run_id=a.run.run_id) for a in analyses],
                  ignore_index=True).to_csv(out / "tables" / f"{name}.csv", index=False)
    side_by_side(analyses).to_csv(out / "tables" / "side_by_side.csv")
    pd.DataFrame(PUBLISHED).to_csv(out / "tables" / "published.csv", index=False)
    summary = {
        "tracking_uri": mlflow.get_tracking_uri(), "n_boot": n_boot, "seed": seed, "ci_level": CI_LEVEL,
        "published_as_commonly_cited": list(PUBLISHED),
        "loso_runs": [{
            "run_id": a.run.run_id, "name": a.run.name, "experiment_id": a.run.experiment_id,
            "params": a.run.params, "labels": a.run.labels, "notes": a.run.notes,
            "confusion_matrices": {v: a.run.cms[v].tolist() for v in VARIANTS},
            "per_patient": a.per_patient.reset_index().to_dict(orient="records"),
            "aggregate": a.aggregate.to_dict(orient="index"),
            "paired_tests": a.tests.to_dict(orient="index"),
            "gross_ci": a.gross_ci.to_dict(orient="index"),
            "errors_by_rhythm": a.by_rhythm.to_dict(orient="records"),
        } for a in analyses],
        "run_differences": differences.table.to_dict(orient="records"),
        "run_differences_skipped": differences.skipped,
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1, ensure_ascii=False))
    for i, a in enumerate(analyses):
        for name, png in a.figures.items():
            (out / "figures" / f"{i}_{name}.png").write_bytes(png)


def summary_text(analyses: list[Analysis], differences: RunDifferences | None = None) -> str:
    """The terminal summary: per LOSO run the paired statistics, the gross/average table and the
    gross statistics' intervals; then the runs side by side and against the first."""
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_colwidth", 60):
        parts = []
        for i, a in enumerate(analyses):
            parts += [f"=== [{i}] {a.run.label}  run {a.run.run_id}, {len(a.per_patient)} patients ===",
                      "Paired statistics (transfer - no transfer):", display_tests(a).to_string(), "",
                      "Gross and average statistics (%):", display_aggregate(a).to_string(), "",
                      "Gross statistics with subject-bootstrap CIs (%):", display_gross_ci(a).to_string(), ""]
            if not a.by_rhythm.empty:
                parts += ["Errors by reference rhythm:", display_by_rhythm(a).to_string(), "",
                          f"The {WORST_SOURCES} records and rhythms with the most transfer errors:",
                          display_worst_sources(a).to_string(), ""]
            parts += [f"note: {n}" for n in a.run.notes]
        if len(analyses) > 1:
            parts += ["=== LOSO runs side by side (%) ===", display_side_by_side(analyses).to_string(), ""]
        if differences is not None and len(analyses) > 1:
            parts.append("=== Against run [0], paired subject bootstrap ===")
            if not differences.table.empty:
                parts.append(display_run_differences(differences, analyses).to_string())
            parts += [f"note: {n}" for n in differences.skipped] + [""]
        parts += ["=== Published (as commonly cited) and ours, gross (%) ===",
                  published_table(analyses).drop(columns="protocol").to_string()]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# The entry point's work
# --------------------------------------------------------------------------------------------

@dataclass
class CompareResult:
    run_id: str
    analyses: list[Analysis]
    differences: RunDifferences


def compare(loso_runs: str = "", experiment: str = "", n_boot: int = N_BOOT, seed: int = 0,
            echo: bool = True) -> CompareResult:
    """Compare transfer against no-transfer for the given LOSO runs; log a ``compare`` run.

    ``loso_runs``: comma-separated LOSO parent run ids, ``a+b`` pooling runs of different patients
    into one analysis (:func:`pool`); empty = the newest FINISHED LOSO run of ``experiment`` (see
    :func:`default_loso_run`). Every run is validated before anything is written.
    """
    if not isinstance(n_boot, int) or n_boot < 1:
        raise CompareError(f"bootstrap must be a positive whole number of resamples, got {n_boot!r}")
    if not isinstance(seed, int) or seed < 0:
        raise CompareError(f"seed must be a non-negative whole number, got {seed!r}")
    client = MlflowClient()
    ids = parse_run_ids(loso_runs) or [default_loso_run(client, experiment)]
    # All validated (and pools checked) before any run is written.
    runs = [pool([load_loso_run(client, part) for part in rid.split("+")]) for rid in ids]
    analyses = [analyse(r, n_boot, seed) for r in runs]
    differences = run_differences(analyses, n_boot, seed)

    with tracking.run_to_log_into(runs[0].experiment_id, "compare") as active, tempfile.TemporaryDirectory() as tmp:
        run_id = active.info.run_id
        mlflow.set_tags({"ecg.role": "compare", "loso_run_ids": ",".join(ids),
                         **{f"loso_run_id.{i}": rid for i, rid in enumerate(ids)}})
        logged = MlflowClient().get_run(run_id).data.params
        params = {"loso_runs": ",".join(ids), "experiment": experiment, "bootstrap": n_boot, "seed": seed}
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})  # `mlflow run` logged its own
        metrics = {}
        for i, a in enumerate(analyses):
            for m, row in a.tests.iterrows():
                for k in ("mean_diff", "ci_low", "ci_high", "p_value", "rank_biserial", "n"):
                    if not math.isnan(float(row[k])):
                        metrics[f"loso{i}_{m}_{k}"] = float(row[k])
            for k, row in a.gross_ci.iterrows():
                for v in VARIANTS:
                    for col, suffix in ((f"gross_{v}", ""), (f"ci_low_{v}", "_ci_low"), (f"ci_high_{v}", "_ci_high")):
                        if not math.isnan(float(row[col])):
                            metrics[f"loso{i}_gross_{v}_{k}{suffix}"] = float(row[col])
        for _, row in differences.table.iterrows():
            for col in ("diff", "ci_low", "ci_high"):
                if not math.isnan(float(row[col])):
                    metrics[f"loso{row.run}_vs_loso0_{row.variant}_{row.statistic}_{col}"] = float(row[col])
        mlflow.log_metrics(metrics)
        write_report(analyses, Path(tmp), n_boot, seed, differences)
        mlflow.log_artifacts(tmp)
    if echo:
        print(summary_text(analyses, differences))
        print(f"\ncompare run {run_id}: artifacts report.html, summary.json, tables/, figures/")
    return CompareResult(run_id, analyses, differences)
