"""The ``compare`` entry point: transfer against no-transfer for one or more LOSO runs, analysed
by :mod:`ecg_mlflow.analysis`, presented as percent tables (terminal and HTML) and logged as a
``compare`` run.

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
import html
import json
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from ecg_mlflow import tracking
from ecg_mlflow.analysis import (CI_LEVEL, HEADLINE, KEY_PARAMS, LABELS, N_BOOT, VARIANTS, Analysis, CompareError,
                                 RunDifferences, analyse, default_loso_run, load_loso_run, parse_run_ids, pool,
                                 moved_columns, run_differences)
from ecg_mlflow.metrics import SUMMARY_STATS
from ecg_mlflow.predictions import PREDICTIONS_FILE

WORST_SOURCES = 10  # (record, rhythm) pairs the report lists as where most transfer errors are
MOVED_PATIENTS = 10  # patients per later run and variant that the report lists as where its difference comes from

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
    out["Δ without one subject"] = _without_one(g.diff_without_one, g.without_subject)
    return out


def _without_one(diffs: pd.Series, subjects: pd.Series) -> list[str]:
    """``+1.21 (209)``: the difference in points without the subject it rests on most."""
    return [f"{_pct(d, signed=True)} ({s})" if s else "—" for d, s in zip(diffs, subjects)]


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
        "Δ without one subject": _without_one(t.diff_without_one, t.without_subject),
    }).set_index(["run", "variant", "statistic"])


def display_patient_differences(d: RunDifferences, analyses: list[Analysis], n: int = MOVED_PATIENTS) -> pd.DataFrame:
    """Where each later run's difference comes from: per (run, variant) the ``n`` patients whose V
    and S counts moved most (``d.by_patient``), each count as ``first → this (±diff)``."""
    t = d.by_patient
    if t.empty:
        return pd.DataFrame()
    t = t.groupby(["run", "variant"], sort=True, group_keys=False).head(n)
    return pd.DataFrame({
        "run": [f"[{i}] {analyses[i].run.name}" for i in t.run], "variant": [LABELS[v] for v in t.variant],
        "patient": t.patient, **moved_columns(t),
    }).set_index(["run", "variant", "patient"])


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
        if not differences.by_patient.empty:
            parts += [f"<h3>Where the differences come from</h3><p>The {MOVED_PATIENTS} patients per run and "
                      "variant whose V and S beats found and false calls moved most against run [0] "
                      "(all of them in <code>tables/run_differences_by_patient.csv</code>).</p>",
                      _table_html(display_patient_differences(differences, analyses))]
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
    if not differences.by_patient.empty:
        differences.by_patient.to_csv(out / "tables" / "run_differences_by_patient.csv", index=False)
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
        "run_differences_by_patient": differences.by_patient.to_dict(orient="records"),
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
            if not differences.by_patient.empty:
                parts += ["", f"Where the differences come from: the {MOVED_PATIENTS} patients per run and variant "
                              "whose counts moved most (all in tables/run_differences_by_patient.csv):",
                          display_patient_differences(differences, analyses).to_string()]
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
