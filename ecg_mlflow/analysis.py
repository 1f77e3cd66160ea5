"""Transfer against no-transfer across patients: the analysis, read from the runs of one or more
LOSO experiments. :mod:`ecg_mlflow.compare` presents it and logs it as a ``compare`` run;
:mod:`ecg_mlflow.selection` reads runs through it too.

Everything is read through the MLflow API, never from local files: the LOSO parent run
(tag ``ecg.role=loso``), its variant children (``ecg.role=variant``; tags ``patient``,
``subject``, ``variant``; metrics ``test_*``) and each child's ``confusion_matrix.json``.

For each LOSO run the analysis (:func:`analyse`) holds

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
one (:func:`run_differences`): the difference of each gross statistic and of their smallest,
with a paired subject-bootstrap CI, so that one can tell a gain from the luck of a few records.

Rates are fractions in [0, 1], as logged in MLflow. A statistic with no denominator (logged as
NaN, or not logged) is missing (NaN), never zero.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scipy import stats

from ecg_mlflow import figures, uncertainty
from ecg_mlflow.metrics import EC57_COUNTS, SUMMARY_STATS, classification_metrics, confusion, ec57_counts, ec57_stats
from ecg_mlflow.predictions import PREDICTIONS_FILE, error_counts, read_predictions
from ecg_mlflow.splits import patient_key

VARIANTS: tuple[str, ...] = ("no_transfer", "transfer")
HEADLINE: tuple[str, ...] = ("accuracy", "macro_f1", "veb_se", "veb_ppv", "sveb_se", "sveb_ppv")
DEFAULT_EXPERIMENT = "ecg-loso"
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


def _aligned_counts(tables: list[pd.DataFrame]) -> tuple[list[str], list[np.ndarray]]:
    """The union of the tables' subjects (sorted), and each count table on them (a subject a table
    lacks counts zero)."""
    subjects = sorted(set().union(*(t.index for t in tables)))
    return subjects, [t.reindex(subjects, fill_value=0).to_numpy() for t in tables]


def _subject_at(subjects: list[str], row: int) -> str:
    """:func:`uncertainty.without_one`'s row as a subject id; ``""`` for its "none" (-1)."""
    return subjects[row] if row >= 0 else ""


def gross_ci_table(run: LosoRun, n_boot: int = N_BOOT, seed: int = 0, level: float = CI_LEVEL) -> pd.DataFrame:
    """Gross statistics with subject-bootstrap intervals, per statistic of
    :data:`~ecg_mlflow.uncertainty.STATISTICS` (index): for each variant ``v`` ``gross_v``,
    ``ci_low_v``, ``ci_high_v``; then ``diff`` (transfer - no transfer), ``diff_ci_low``,
    ``diff_ci_high`` and ``share_transfer_higher`` (share of resamples where transfer is higher),
    all on the same resamples of the run's subjects (:func:`uncertainty.resample_weights`); and
    ``diff_without_one`` with ``without_subject``: the difference with the one subject left out
    whose absence brings it nearest to zero (:func:`uncertainty.without_one`)."""
    subjects, (nt, tr) = _aligned_counts([subject_count_table(run, v) for v in VARIANTS])
    weights = uncertainty.resample_weights(len(nt), n_boot, seed)
    paired = uncertainty.paired_interval(nt, tr, weights, level)
    out = pd.DataFrame(index=pd.Index(uncertainty.STATISTICS, name="statistic"))
    for v, counts in zip(VARIANTS, (nt, tr)):
        ci = uncertainty.gross_interval(counts, weights, level)
        for j, col in enumerate((f"gross_{v}", f"ci_low_{v}", f"ci_high_{v}")):
            out[col] = [ci[k][j] for k in out.index]
    for col, key in (("diff", "diff"), ("diff_ci_low", "ci_low"), ("diff_ci_high", "ci_high"),
                     ("share_transfer_higher", "share_b_higher"), ("diff_without_one", "without_one")):
        out[col] = [paired[k][key] for k in out.index]
    out["without_subject"] = [_subject_at(subjects, paired[k]["without_one_at"]) for k in out.index]
    return out


@dataclass
class RunDifferences:
    """Each later LOSO run against the first, on the same patients (:func:`run_differences`).

    table: one row per (``run``, ``variant``, ``statistic``): ``first`` and ``this`` (gross values),
    ``diff`` (this - first), ``ci_low``, ``ci_high`` (paired subject bootstrap), ``share_higher``
    (share of resamples where this run is higher), and ``diff_without_one`` with ``without_subject``
    (the difference without the one subject it rests on most, :func:`uncertainty.without_one`).
    skipped: why a run has no rows.
    by_patient: where each difference comes from (:func:`patient_differences`), the runs stacked.
    """

    table: pd.DataFrame
    skipped: list[str]
    by_patient: pd.DataFrame = field(default_factory=pd.DataFrame)


# The counts patient_differences compares: V and S beats found (tp) and called falsely (fp).
MOVED_COUNTS: tuple[str, ...] = ("veb_tp", "veb_fp", "sveb_tp", "sveb_fp")


def count_differences(first: pd.DataFrame, this: pd.DataFrame) -> pd.DataFrame:
    """Where a difference between two tables of EC57 counts comes from: ``first`` and ``this`` hold
    :data:`~ecg_mlflow.metrics.EC57_COUNTS` on the same index (patients or subjects). Per index
    entry with any change: ``veb`` and ``sveb`` (its V and S beats, tp + fn, as in ``first``), and for
    each of :data:`MOVED_COUNTS` ``<count>_first``, ``<count>_this`` and ``<count>_diff``; ``moved``,
    the sum of the absolute differences, orders the rows (largest first, then by
    :func:`~ecg_mlflow.splits.patient_key`). ``ValueError`` when the indexes differ."""
    if set(first.index) != set(this.index):
        raise ValueError(f"the tables hold other patients or subjects: "
                         f"{sorted(set(first.index) ^ set(this.index), key=patient_key)}")
    a, b = first, this.reindex(first.index)
    out = pd.DataFrame({"veb": (a.veb_tp + a.veb_fn).astype(np.int64),
                        "sveb": (a.sveb_tp + a.sveb_fn).astype(np.int64)}, index=a.index)
    for k in MOVED_COUNTS:
        out[f"{k}_first"], out[f"{k}_this"] = a[k].astype(np.int64), b[k].astype(np.int64)
        out[f"{k}_diff"] = out[f"{k}_this"] - out[f"{k}_first"]
    out["moved"] = out[[f"{k}_diff" for k in MOVED_COUNTS]].abs().sum(axis=1)
    out = out[out.moved > 0]
    order = sorted(out.index, key=lambda p: (-out.at[p, "moved"], patient_key(p)))
    return out.loc[order]


def patient_differences(first: LosoRun, this: LosoRun, variant: str) -> pd.DataFrame:
    """Where a difference between two runs on the same patients comes from: :func:`count_differences`
    of ``variant``'s EC57 counts per patient (index ``patient``), with each patient's ``subject``. A
    gain in SVEB Se that is one record's, or false S calls that move in one record's fibrillation,
    show at the top."""
    def counts(run: LosoRun) -> pd.DataFrame:
        return run.children[run.children.variant == variant].set_index("patient")

    a = counts(first)
    out = count_differences(a[list(EC57_COUNTS)], counts(this)[list(EC57_COUNTS)]).rename_axis("patient")
    out.insert(0, "subject", a.subject.reindex(out.index))
    return out


def moved_columns(t: pd.DataFrame) -> dict[str, list]:
    """The display columns of :func:`count_differences` rows: each patient's or subject's V and S
    beats, and each count of :data:`MOVED_COUNTS` as ``first → this (±diff)`` (the count alone where
    it did not move)."""
    def moved(k: str) -> list[str]:
        return [f"{a} → {b} ({b - a:+d})" if a != b else f"{a}" for a, b in zip(t[f"{k}_first"], t[f"{k}_this"])]

    return {"S beats": list(t.sveb), "S found": moved("sveb_tp"), "false S": moved("sveb_fp"),
            "V beats": list(t.veb), "V found": moved("veb_tp"), "false V": moved("veb_fp")}


def run_differences(analyses: list["Analysis"], n_boot: int = N_BOOT, seed: int = 0,
                    level: float = CI_LEVEL) -> RunDifferences:
    """Gross statistics of each later run minus those of ``analyses[0]``, with paired
    subject-bootstrap CIs; only runs that hold exactly the first run's patients are compared."""
    rows, skipped, moved = [], [], []
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
            subjects, (c0, ci) = _aligned_counts([first_counts[v], subject_count_table(a.run, v)])
            weights = uncertainty.resample_weights(len(c0), n_boot, seed)
            for k, d in uncertainty.paired_interval(c0, ci, weights, level).items():
                rows.append({"run": i, "loso_run_id": a.run.run_id, "variant": v, "statistic": k,
                             "first": d["a"], "this": d["b"], "diff": d["diff"], "ci_low": d["ci_low"],
                             "ci_high": d["ci_high"], "share_higher": d["share_b_higher"],
                             "diff_without_one": d["without_one"],
                             "without_subject": _subject_at(subjects, d["without_one_at"])})
            moved.append(patient_differences(first.run, a.run, v).reset_index()
                         .assign(run=i, loso_run_id=a.run.run_id, variant=v))
    by_patient = pd.concat(moved, ignore_index=True) if moved else pd.DataFrame()
    return RunDifferences(pd.DataFrame(rows), skipped, by_patient)


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
