"""The `compare` entry point on LOSO runs logged with known metrics into a real SQLite store.

`log_loso` (tests/loso_runs.py) builds the run tree of the tracking contract (README, "What is logged where")
through the MLflow API: a parent tagged ecg.role=loso and variant children with the tags,
`test_*` metrics and `confusion_matrix.json` that the LOSO experiment logs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from ecg_mlflow import analysis as A
from ecg_mlflow import compare as C
from ecg_mlflow import figures
from ecg_mlflow import uncertainty as U
from ecg_mlflow.metrics import EC57_COUNTS, SUMMARY_STATS, ec57_counts, ec57_stats, metrics_from_cm
from loso_runs import CLASSES, RHYTHMS, N, S, V, log_loso, patient_cms, predictions_of

REPO = Path(__file__).resolve().parents[1]
N_BOOT = 2000  # fewer resamples than the default keeps the tests fast; the code path is the same


def known(cms, patient: str, variant: str, metric: str) -> float:
    """What the builder logged as ``test_<metric>`` (NaN when not logged)."""
    return metrics_from_cm(cms[patient][variant], CLASSES).get(metric, math.nan)


def n_runs() -> int:
    return len(mlflow.search_runs(search_all_experiments=True))


@pytest.fixture()
def cms():
    return patient_cms(0)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty, fully migrated SQLite store, made once: creating the tables takes seconds."""
    db = tmp_path_factory.mktemp("store") / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture()
def tracking_uri(tracking_uri, empty_store) -> str:
    """conftest's fresh store per test, started from a copy of the migrated empty store."""
    shutil.copyfile(empty_store, tracking_uri.removeprefix("sqlite:///"))
    return tracking_uri


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def test_tables_hold_the_logged_values(tracking_uri, cms):
    loso_id = log_loso(cms)
    res = C.compare(loso_runs=loso_id, n_boot=N_BOOT, echo=False)
    (a,) = res.analyses
    pp = a.per_patient
    assert list(pp.index) == sorted(cms, key=int)
    assert pp.loc["202", "subject"] == "201"
    for p in cms:
        for m in C.HEADLINE:
            nt, t = known(cms, p, "no_transfer", m), known(cms, p, "transfer", m)
            for col, want in ((f"{m}_no_transfer", nt), (f"{m}_transfer", t), (f"{m}_diff", t - nt)):
                got = pp.at[p, col]
                assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want), (p, col)
    # Missing statistics stay missing, never zero.
    assert math.isnan(pp.at["100", "veb_se_transfer"]) and math.isnan(pp.at["100", "veb_ppv_no_transfer"])
    assert math.isnan(pp.at["101", "sveb_se_transfer"]) and math.isnan(pp.at["101", "sveb_ppv_no_transfer"])
    assert pp.at["101", "sveb_ppv_transfer"] == 0.0 and math.isnan(pp.at["101", "sveb_ppv_diff"])

    agg = a.aggregate
    for v in C.VARIANTS:
        total = sum(cms[p][v] for p in cms)
        counts = {k: sum(int(known(cms, p, v, k)) for p in cms) for k in EC57_COUNTS}
        assert counts == ec57_counts(total, CLASSES)
        gross = ec57_stats(counts)
        gross["accuracy"] = np.trace(total) / total.sum()
        for s in SUMMARY_STATS:
            values = [known(cms, p, v, s) for p in cms]
            present = [x for x in values if not math.isnan(x)]
            assert agg.at[s, f"avg_{v}"] == pytest.approx(np.mean(present))
            assert agg.at[s, f"n_{v}"] == len(present)
            if s in gross:
                assert agg.at[s, f"gross_{v}"] == pytest.approx(gross[s])
            assert agg.at[s, f"parent_gross_{v}"] == pytest.approx(agg.at[s, f"gross_{v}"])
    assert agg.at["veb_se", "n_transfer"] == len(cms) - 1  # patient 100 has no V beats
    assert agg.at["sveb_se", "n_no_transfer"] == len(cms) - 1  # patient 101 has no S beats
    np.testing.assert_allclose(agg.gross_diff, agg.gross_transfer - agg.gross_no_transfer)
    assert a.run.notes == []  # logged counts, matrices and parent metrics all agree
    np.testing.assert_array_equal(a.run.cms["transfer"], sum(cms[p]["transfer"] for p in cms))


def test_parent_gross_cross_check_flags_a_mismatch(tracking_uri, cms):
    # Runs that leave undefined statistics out (rather than logging NaN) read the same.
    loso_id = log_loso(cms, parent_metrics=False, undefined="absent")
    MlflowClient().log_metric(loso_id, "gross_transfer_veb_se", 0.123)
    (a,) = C.compare(loso_runs=loso_id, n_boot=N_BOOT, echo=False).analyses
    assert math.isnan(a.per_patient.at["100", "veb_se_transfer"])
    assert a.per_patient.at["105", "veb_se_diff"] == pytest.approx(
        known(cms, "105", "transfer", "veb_se") - known(cms, "105", "no_transfer", "veb_se"))
    assert math.isnan(a.aggregate.at["veb_ppv", "parent_gross_transfer"])  # not logged: not checked
    assert len(a.run.notes) == 1 and "gross transfer veb_se" in a.run.notes[0] and "0.123" in a.run.notes[0]


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

def test_paired_statistics_match_scipy(tracking_uri, cms):
    loso_id = log_loso(cms)
    (a,) = C.compare(loso_runs=loso_id, n_boot=N_BOOT, seed=3, echo=False).analyses
    for m in C.HEADLINE:
        nt = np.array([known(cms, p, "no_transfer", m) for p in sorted(cms, key=int)])
        t = np.array([known(cms, p, "transfer", m) for p in sorted(cms, key=int)])
        ok = ~(np.isnan(nt) | np.isnan(t))
        row = a.tests.loc[m]
        assert row.n == ok.sum() and row.n_left_out == (~ok).sum()
        d = t[ok] - nt[ok]
        assert row.mean_diff == pytest.approx(d.mean())
        ref = stats.wilcoxon(t[ok], nt[ok])
        assert row.wilcoxon_W == pytest.approx(ref.statistic) and row.p_value == pytest.approx(ref.pvalue)
        # Rank-biserial from scipy's one-sided statistic R+ (zero differences dropped):
        # r = (R+ - R-) / (R+ + R-), R+ + R- = n'(n' + 1) / 2.
        nz = int((d != 0).sum())
        r_plus = stats.wilcoxon(t[ok], nt[ok], alternative="greater").statistic
        total = nz * (nz + 1) / 2
        assert row.rank_biserial == pytest.approx((2 * r_plus - total) / total)
        # The documented resampling recipe reproduces the CI exactly.
        idx = np.random.default_rng(3).integers(0, d.size, (N_BOOT, d.size))
        assert (row.ci_low, row.ci_high) == pytest.approx(tuple(np.percentile(d[idx].mean(1), [2.5, 97.5])))
    assert a.tests.loc["veb_se"].n == len(cms) - 1 and a.tests.loc["sveb_ppv"].n_left_out == 1
    # What the report and the terminal show: the same numbers, rates in percent.
    shown = C.display_tests(a).loc["VEB Se"]
    row = a.tests.loc["veb_se"]
    assert shown["n"] == str(len(cms) - 1) and shown["left out"] == "1"
    assert shown["p"] == f"{row.p_value:.3g}" and shown["rank-biserial r"] == f"{row.rank_biserial:+.2f}"
    assert shown["mean Δ (pp)"] == f"{100 * row.mean_diff:+.1f}"
    assert shown["95% CI (pp)"] == f"[{100 * row.ci_low:+.1f}, {100 * row.ci_high:+.1f}]"
    assert shown["mean T (%)"] == f"{100 * row.mean_transfer:.1f}"


def test_bootstrap_ci_agrees_with_scipy_and_is_seeded():
    d = np.random.default_rng(7).normal(0.05, 0.1, 40)
    lo, hi = A.bootstrap_ci(d, 10_000, seed=0)
    ref = stats.bootstrap((d,), np.mean, n_resamples=10_000, method="percentile", rng=1).confidence_interval
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert abs(lo - ref.low) < 0.15 * se and abs(hi - ref.high) < 0.15 * se
    assert lo < d.mean() < hi
    assert A.bootstrap_ci(d, 10_000, seed=0) == (lo, hi)
    assert A.bootstrap_ci(d, 10_000, seed=1) != (lo, hi)
    assert A.bootstrap_ci(np.array([0.2]), 100) == (0.2, 0.2)
    assert all(math.isnan(x) for x in A.bootstrap_ci(np.array([]), 100))


def test_paired_test_edge_cases():
    # Hand example: d = +0.1, -0.2, +0.3, 0 -> ranks of |d| (zero dropped) 1, 2, 3; R+ = 4, R- = 2.
    out = A.paired_test(np.array([0.5, 0.5, 0.2, 0.4, np.nan]), np.array([0.6, 0.3, 0.5, 0.4, 0.9]), n_boot=200)
    assert out["n"] == 4 and out["n_left_out"] == 1 and out["n_nonzero"] == 3
    assert out["rank_biserial"] == pytest.approx((4 - 2) / 6)
    assert out["mean_diff"] == pytest.approx(0.2 / 4)
    same = A.paired_test(np.array([0.5, 0.7]), np.array([0.5, 0.7]), n_boot=200)
    assert same["mean_diff"] == 0.0 and same["p_value"] == 1.0 and math.isnan(same["rank_biserial"])
    # One patient (a short run where one record has V beats): means and CI, no test.
    one = A.paired_test(np.array([0.5, np.nan]), np.array([0.8, 0.9]), n_boot=200)
    assert one["n"] == 1 and one["mean_diff"] == pytest.approx(0.3) and one["ci_low"] == pytest.approx(0.3)
    assert math.isnan(one["p_value"]) and math.isnan(one["wilcoxon_W"]) and one["rank_biserial"] == 1.0
    none = A.paired_test(np.array([np.nan, 0.5]), np.array([0.5, np.nan]), n_boot=200)
    assert none["n"] == 0 and none["n_left_out"] == 2
    assert all(math.isnan(none[k]) for k in ("mean_diff", "ci_low", "p_value", "wilcoxon_W", "rank_biserial"))
    with pytest.raises(ValueError, match="one length"):
        A.paired_test(np.zeros(2), np.zeros(3))


def test_gross_statistics_carry_subject_bootstrap_intervals(tracking_uri, cms):
    loso_id = log_loso(cms)
    res = C.compare(loso_runs=loso_id, n_boot=N_BOOT, seed=2, echo=False)
    (a,) = res.analyses
    g = a.gross_ci
    # Subjects are drawn, not records: 201 and 202 are one subject.
    counts = {v: A.subject_count_table(a.run, v) for v in C.VARIANTS}
    assert list(counts["transfer"].index) == ["100", "101", "105", "201", "208"]
    assert counts["transfer"].loc["201"].tolist() == [
        int(known(cms, "201", "transfer", k) + known(cms, "202", "transfer", k)) for k in EC57_COUNTS]
    weights = U.resample_weights(5, N_BOOT, seed=2)  # the documented resamples
    for v in C.VARIANTS:
        ref = U.gross_interval(counts[v].to_numpy(), weights)
        for k in U.STATISTICS:
            want = a.aggregate.at[k, f"gross_{v}"] if k != U.SMALLEST else \
                min(a.aggregate.at[r, f"gross_{v}"] for r in U.RATES)
            assert g.at[k, f"gross_{v}"] == pytest.approx(want)
            assert (g.at[k, f"ci_low_{v}"], g.at[k, f"ci_high_{v}"]) == pytest.approx(ref[k][1:])
            assert g.at[k, f"ci_low_{v}"] <= g.at[k, f"gross_{v}"] <= g.at[k, f"ci_high_{v}"]
    np.testing.assert_allclose(g["diff"], g.gross_transfer - g.gross_no_transfer)
    paired = U.paired_interval(counts["no_transfer"].to_numpy(), counts["transfer"].to_numpy(), weights)
    assert g.at["sveb_ppv", "diff_ci_low"] == pytest.approx(paired["sveb_ppv"]["ci_low"])
    assert g.at["sveb_ppv", "share_transfer_higher"] == pytest.approx(paired["sveb_ppv"]["share_b_higher"])
    assert g.at["sveb_ppv", "diff_without_one"] == pytest.approx(paired["sveb_ppv"]["without_one"])
    assert g.at["sveb_ppv", "without_subject"] == counts["transfer"].index[paired["sveb_ppv"]["without_one_at"]]
    assert (g.ci_high_transfer - g.ci_low_transfer).max() > 0.01  # five subjects leave real intervals
    # Logged, written and shown as computed.
    metrics = MlflowClient().get_run(res.run_id).data.metrics
    assert metrics["loso0_gross_transfer_sveb_ppv_ci_low"] == pytest.approx(g.at["sveb_ppv", "ci_low_transfer"])
    assert metrics["loso0_gross_no_transfer_smallest"] == pytest.approx(g.at["smallest", "gross_no_transfer"])
    csv = pd.read_csv(_artifact(res.run_id, "tables/gross_ci.csv")).set_index("statistic")
    assert csv.at["smallest", "ci_high_transfer"] == pytest.approx(g.at["smallest", "ci_high_transfer"])
    assert "Gross statistics with subject-bootstrap intervals" in _artifact(res.run_id, "report.html").read_text()
    shown = C.display_gross_ci(a).loc["SVEB +P"]
    assert shown["transfer 95% CI"] == f"[{100 * g.at['sveb_ppv', 'ci_low_transfer']:.1f}, " \
                                       f"{100 * g.at['sveb_ppv', 'ci_high_transfer']:.1f}]"
    assert res.differences.table.empty and res.differences.skipped == []  # one run: nothing to pair


def test_runs_on_the_same_patients_are_compared_with_the_first(tracking_uri, cms, capsys):
    first = log_loso(cms, name="pick")
    worse = {p: {v: m.copy() for v, m in d.items()} for p, d in cms.items()}
    for d in worse.values():
        d["transfer"][N, S] += 20  # 20 more false S calls in every patient, nothing else changed
    second = log_loso(worse, name="candidate")
    other = log_loso({p: cms[p] for p in ("100", "101")}, name="other patients")
    res = C.compare(loso_runs=f"{first},{second},{other}", n_boot=N_BOOT)
    t = res.differences.table
    assert set(t.run) == {1} and len(t) == len(C.VARIANTS) * len(U.STATISTICS)
    row = t[(t.variant == "transfer") & (t.statistic == "sveb_ppv")].iloc[0]
    a0, a1 = (a.aggregate.at["sveb_ppv", "gross_transfer"] for a in res.analyses[:2])
    assert row["first"] == pytest.approx(a0) and row["this"] == pytest.approx(a1)
    assert row["diff"] == pytest.approx(a1 - a0) and row.ci_high < 0 and row.share_higher == 0
    # Every patient lost alike, so leaving one out still loses; the one left out is named.
    assert row.diff_without_one < 0 and row.without_subject in set(res.analyses[0].per_patient.index)
    assert C.display_run_differences(res.differences, res.analyses).loc[("[1] candidate", "transfer", "SVEB +P"),
                                                                        "Δ without one subject"] == \
        f"{100 * row.diff_without_one:+.1f} ({row.without_subject})"
    assert t[t.statistic == "veb_se"].without_subject.eq("").all()  # no difference: nobody to name
    assert (t[t.statistic == "veb_se"]["diff"] == 0).all()
    nt = t[t.variant == "no_transfer"]
    assert (nt["diff"] == 0).all() and (nt.ci_low == 0).all() and (nt.ci_high == 0).all()
    assert len(res.differences.skipped) == 1 and res.differences.skipped[0].startswith("[2] holds other patients")
    assert "105" in res.differences.skipped[0]
    metrics = MlflowClient().get_run(res.run_id).data.metrics
    assert metrics["loso1_vs_loso0_transfer_sveb_ppv_ci_high"] == pytest.approx(row.ci_high)
    assert not any(k.startswith("loso2_vs_") for k in metrics)
    csv = pd.read_csv(_artifact(res.run_id, "tables/run_differences.csv"))
    assert len(csv) == len(t) and set(csv.loso_run_id) == {second}
    report = _artifact(res.run_id, "report.html").read_text()
    assert "Against run [0]" in report and "[2] holds other patients" in report
    out = capsys.readouterr().out
    assert "Against run [0], paired subject bootstrap" in out and "[1] candidate" in out


def test_each_difference_is_traced_to_the_patients_whose_counts_moved(tracking_uri, cms, capsys):
    first = log_loso(cms, name="pick")
    moved = {p: {v: m.copy() for v, m in d.items()} for p, d in cms.items()}
    p_big, p_small = "105", "208"
    assert moved[p_big]["transfer"][S, S] >= 5 and moved[p_small]["transfer"][N, N] >= 3
    moved[p_big]["transfer"][S, S] -= 5  # five S beats found in the first run are called N
    moved[p_big]["transfer"][S, N] += 5
    moved[p_small]["transfer"][N, N] -= 3  # three more false V calls
    moved[p_small]["transfer"][N, V] += 3
    second = log_loso(moved, name="candidate")
    res = C.compare(loso_runs=f"{first},{second}", n_boot=N_BOOT)
    t = res.differences.by_patient
    # only the two patients that moved, larger move first, counts as logged by each run
    assert list(t.patient) == [p_big, p_small] and set(t.variant) == {"transfer"} and set(t.run) == {1}
    big, small = t.iloc[0], t.iloc[1]
    assert (big.sveb_tp_first, big.sveb_tp_this, big.sveb_tp_diff) == (cms[p_big]["transfer"][S, S],
                                                                       cms[p_big]["transfer"][S, S] - 5, -5)
    counted = ec57_counts(cms[p_big]["transfer"], CLASSES)
    assert big.sveb == counted["sveb_tp"] + counted["sveb_fn"] and big.subject == p_big
    assert (big.veb_tp_diff, big.veb_fp_diff, big.sveb_fp_diff, big.moved) == (0, 0, 0, 5)
    assert (small.veb_fp_diff, small.moved) == (3, 3) and small.veb_fp_first == ec57_counts(
        cms[p_small]["transfer"], CLASSES)["veb_fp"]
    shown = C.display_patient_differences(res.differences, res.analyses)
    first_s = cms[p_big]["transfer"][S, S]
    assert shown.loc[("[1] candidate", "transfer", p_big), "S found"] == f"{first_s} → {first_s - 5} (-5)"
    csv = pd.read_csv(_artifact(res.run_id, "tables/run_differences_by_patient.csv"), dtype={"patient": str})
    assert list(csv.patient) == [p_big, p_small] and list(csv.moved) == [5, 3]
    assert "Where the differences come from" in _artifact(res.run_id, "report.html").read_text()
    assert "Where the differences come from" in capsys.readouterr().out
    # the same runs the other way round: the same patients, the signs turned
    back = A.patient_differences(res.analyses[1].run, res.analyses[0].run, "transfer")
    assert list(back.index) == [p_big, p_small] and back.at[p_big, "sveb_tp_diff"] == 5
    assert A.patient_differences(res.analyses[0].run, res.analyses[0].run, "transfer").empty


# --------------------------------------------------------------------------------------------
# The compare run: artifacts, tags, several LOSO runs, default run
# --------------------------------------------------------------------------------------------

def _artifact(run_id: str, path: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def test_compare_run_artifacts_and_links(tracking_uri, cms, capsys):
    loso_id = log_loso(cms, predictions=False)
    res = C.compare(loso_runs=loso_id, n_boot=N_BOOT)
    run = MlflowClient().get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == MlflowClient().get_run(loso_id).info.experiment_id
    assert run.data.tags["ecg.role"] == "compare"
    assert run.data.tags["loso_run_ids"] == loso_id and run.data.tags["loso_run_id.0"] == loso_id
    a = res.analyses[0]
    assert run.data.metrics["loso0_accuracy_mean_diff"] == pytest.approx(a.tests.at["accuracy", "mean_diff"])
    assert run.data.metrics["loso0_veb_se_n"] == len(cms) - 1

    report = _artifact(res.run_id, "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3 and "<script" not in report
    assert "Kiranyaz" in report and "Jiang &amp; Kong" in report and "Zhai &amp; Tin" in report
    assert loso_id in report and "gross (pooled)" in report
    # A percent value from the per-patient table, formatted as the report shows it.
    assert f"{100 * known(cms, '208', 'transfer', 'accuracy'):.1f}" in report

    pp = pd.read_csv(_artifact(res.run_id, "tables/per_patient.csv"), dtype={"patient": str, "subject": str})
    assert (pp.loso_run_id == loso_id).all()
    pd.testing.assert_frame_equal(pp.drop(columns="loso_run_id").set_index("patient"), a.per_patient,
                                  check_names=False, check_dtype=False)
    tests = pd.read_csv(_artifact(res.run_id, "tables/paired_tests.csv")).set_index("metric")
    assert tests.at["veb_se", "p_value"] == pytest.approx(a.tests.at["veb_se", "p_value"])
    summary = json.loads(_artifact(res.run_id, "summary.json").read_text())
    s0 = summary["loso_runs"][0]
    assert s0["run_id"] == loso_id and s0["aggregate"]["veb_se"]["gross_transfer"] == pytest.approx(
        a.aggregate.at["veb_se", "gross_transfer"])
    assert s0["per_patient"][0]["patient"] == "100" and s0["per_patient"][0]["veb_se_transfer"] is None
    for name in ("difference_bars", "scatter", "confusion"):
        png = _artifact(res.run_id, f"figures/0_{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"

    out = capsys.readouterr().out
    assert "Paired statistics" in out and "VEB Se" in out and res.run_id in out
    assert f"{100 * a.aggregate.at['veb_se', 'gross_transfer']:.1f}" in out
    # Runs logged before per-beat predictions: said so, and no table made up.
    assert a.by_rhythm.empty and any("logged no predictions.csv" in n for n in a.run.notes)
    assert "No predictions.csv" in report and "Errors by reference rhythm" not in out


def test_errors_by_rhythm_count_each_rhythm_and_add_up_to_the_gross_counts(tracking_uri, cms, capsys):
    loso_id = log_loso(cms)
    res = C.compare(loso_runs=loso_id, n_boot=N_BOOT)
    a = res.analyses[0]
    t = a.by_rhythm
    assert sorted(t.variant.unique()) == sorted(C.VARIANTS) and not a.run.notes
    for v in C.VARIANTS:
        # Counted here from the tables as logged, by EC57's rules: a Q beat called S is no false S,
        # an F beat called V no false V.
        logged = pd.concat([predictions_of(cms[p][v], p, int(p)) for p in cms])
        rows = t[t.variant == v].set_index("rhythm")
        assert sorted(rows.index) == sorted(RHYTHMS)
        for rhythm, g in logged.groupby("rhythm"):
            r = rows.loc[rhythm]
            assert r.beats == len(g) and r.records == g.record.nunique()
            assert r.sveb_found == ((g.label == "S") & (g.predicted == "S")).sum()
            assert r.sveb_missed == ((g.label == "S") & (g.predicted != "S")).sum()
            assert r.sveb_false == ((g.predicted == "S") & g.label.isin(["N", "V", "F"])).sum()
            assert r.veb_found == ((g.label == "V") & (g.predicted == "V")).sum()
            assert r.veb_false == ((g.predicted == "V") & g.label.isin(["N", "S"])).sum()
            assert r.sveb_ppv == pytest.approx(r.sveb_found / (r.sveb_found + r.sveb_false))
        gross = ec57_counts(a.run.cms[v], CLASSES)
        for kind in ("veb", "sveb"):
            for col, key in (("found", "tp"), ("missed", "fn"), ("false", "fp")):
                assert rows[f"{kind}_{col}"].sum() == gross[f"{kind}_{key}"]
    # Per record and rhythm: each patient's own counts, adding up to the rhythm table.
    rr = a.by_record_rhythm
    t105 = rr[(rr.variant == "transfer") & (rr.record.astype(str) == "105")].set_index("rhythm")
    g105 = predictions_of(cms["105"]["transfer"], "105", 105)
    for rhythm, g in g105.groupby("rhythm"):
        assert t105.at[rhythm, "sveb_false"] == ((g.predicted == "S") & g.label.isin(["N", "V", "F"])).sum()
    counts = [c for c in rr.columns if c.endswith(("_beats", "_found", "_missed", "_false"))] + ["beats"]
    summed = rr.groupby(["variant", "rhythm"])[counts].sum().sort_index()
    pd.testing.assert_frame_equal(summed, t.set_index(["variant", "rhythm"])[counts].sort_index(), check_dtype=False)
    worst = C.display_worst_sources(a)
    errors = (rr.veb_missed + rr.veb_false + rr.sveb_missed + rr.sveb_false)[rr.variant == "transfer"]
    assert len(worst) == min(C.WORST_SOURCES, int((errors > 0).sum()))
    top = worst.iloc[0]
    assert top[["VEB missed", "VEB false", "SVEB missed", "SVEB false"]].sum() == errors.max()
    csv = pd.read_csv(_artifact(res.run_id, "tables/errors_by_record_rhythm.csv"), dtype={"record": str})
    assert len(csv) == len(rr) and set(csv.record) == set(cms)
    csv = pd.read_csv(_artifact(res.run_id, "tables/errors_by_rhythm.csv"))
    assert (csv.loso_run_id == loso_id).all() and len(csv) == len(t)
    assert csv.sveb_false.tolist() == t.sveb_false.tolist()
    assert "Errors by rhythm" in _artifact(res.run_id, "report.html").read_text()
    out = capsys.readouterr().out
    assert "Errors by reference rhythm" in out and "most transfer errors" in out
    # Pooled halves count as the whole.
    half1 = log_loso({p: cms[p] for p in ("100", "201", "202")})
    half2 = log_loso({p: cms[p] for p in ("101", "105", "208")})
    pooled = C.compare(loso_runs=f"{half1}+{half2}", n_boot=N_BOOT, echo=False).analyses[0].by_rhythm
    key = ["variant", "rhythm"]
    pd.testing.assert_frame_equal(pooled.sort_values(key, ignore_index=True), t.sort_values(key, ignore_index=True))
    # A pool with a run logged before predictions has no rhythm table, rather than half of one.
    old = log_loso({p: cms[p] for p in ("101", "105", "208")}, predictions=False)
    mixed = C.compare(loso_runs=f"{half1}+{old}", n_boot=N_BOOT, echo=False).analyses[0]
    assert mixed.by_rhythm.empty and any("logged no predictions.csv" in n for n in mixed.run.notes)


def test_predictions_that_do_not_add_up_to_the_confusion_matrix_are_named(tracking_uri, cms):
    loso_id = log_loso(cms)
    client = MlflowClient()
    (child,) = client.search_runs([client.get_run(loso_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{loso_id}' and tags.patient = '105' "
                                  "and tags.variant = 'transfer'")
    table = predictions_of(cms["105"]["transfer"], "105", 105)
    table.loc[table.label == "S", "predicted"] = "N"  # one row's call changed is enough; all are
    client.log_text(child.info.run_id, table.to_csv(index=False), "predictions.csv")
    before = n_runs()
    with pytest.raises(C.CompareError, match=rf"{child.info.run_id}.*105.*predictions.csv does not add up"):
        C.compare(loso_runs=loso_id, n_boot=N_BOOT, echo=False)
    assert n_runs() == before


def test_several_loso_runs_side_by_side(tracking_uri, cms):
    first = log_loso(cms, name="loso-5min", params={"label_scheme": "aami", "finetune_minutes": 5, "model": "a"})
    second = log_loso(patient_cms(1), name="loso-10min",
                      params={"label_scheme": "aami", "finetune_minutes": 10, "model": "b"})
    res = C.compare(loso_runs=f"{first}, {second}", n_boot=N_BOOT, echo=False)
    tags = MlflowClient().get_run(res.run_id).data.tags
    assert tags["loso_run_ids"] == f"{first},{second}"
    assert tags["loso_run_id.0"] == first and tags["loso_run_id.1"] == second
    sbs = pd.read_csv(_artifact(res.run_id, "tables/side_by_side.csv"), index_col=0)
    assert list(sbs.columns) == ["[0] loso-5min (model=a, label_scheme=aami, finetune_minutes=5)",
                                 "[1] loso-10min (model=b, label_scheme=aami, finetune_minutes=10)"]
    for col, a in zip(sbs.columns, res.analyses):
        assert sbs.at["gross_transfer_veb_se", col] == pytest.approx(a.aggregate.at["veb_se", "gross_transfer"])
    assert res.analyses[0].aggregate.at["accuracy", "gross_transfer"] != \
        res.analyses[1].aggregate.at["accuracy", "gross_transfer"]
    report = _artifact(res.run_id, "report.html").read_text()
    assert "LOSO runs side by side" in report and report.count("<section>") == 2
    assert "finetune_minutes=10" in report and report.count("data:image/png;base64,") == 6
    pp = pd.read_csv(_artifact(res.run_id, "tables/per_patient.csv"))
    assert sorted(pp.loso_run_id.unique()) == sorted([first, second])


def test_runs_of_different_patients_pool_into_one_analysis(tracking_uri, cms):
    half1 = {p: cms[p] for p in ("100", "201", "202")}
    half2 = {p: cms[p] for p in ("101", "105", "208")}
    a = log_loso(half1, params={"label_scheme": "aami", "finetune_minutes": 5, "class_weight": "sqrt"})
    b = log_loso(half2, params={"label_scheme": "aami", "finetune_minutes": 5, "class_weight": "none"})
    whole = log_loso(cms)
    res = C.compare(loso_runs=f"{a} + {b},{whole}", n_boot=N_BOOT, echo=False)
    pooled, single = res.analyses
    assert pooled.run.run_id == f"{a}+{b}" and list(pooled.per_patient.index) == sorted(cms, key=int)
    pd.testing.assert_frame_equal(pooled.per_patient, single.per_patient)
    for v in C.VARIANTS:
        np.testing.assert_array_equal(pooled.run.cms[v], sum(cms[p][v] for p in cms))
        pd.testing.assert_series_equal(pooled.aggregate[f"gross_{v}"], single.aggregate[f"gross_{v}"])
    assert pooled.run.params["class_weight"] == "sqrt | none" and pooled.run.params["finetune_minutes"] == "5"
    assert MlflowClient().get_run(res.run_id).data.tags["loso_run_id.0"] == f"{a}+{b}"
    # One half's run beside two choices for the other half: a run may sit in two pools.
    c = log_loso({p: cms[p] for p in ("101", "105", "208")}, params={"label_scheme": "aami", "class_weight": "sqrt"})
    res = C.compare(loso_runs=f"{a}+{b},{a}+{c}", n_boot=N_BOOT, echo=False)
    assert [x.run.run_id for x in res.analyses] == [f"{a}+{b}", f"{a}+{c}"]
    with pytest.raises(C.CompareError, match=r"analysis .* more than once"):
        C.compare(loso_runs=f"{a}+{b},{b}+{a}", n_boot=N_BOOT, echo=False)


def test_pooled_runs_must_hold_out_different_patients(tracking_uri, cms):
    a = log_loso({p: cms[p] for p in ("100", "101")})
    b = log_loso({p: cms[p] for p in ("101", "105")})
    before = n_runs()
    with pytest.raises(C.CompareError, match=r"patient 101 is in both run"):
        C.compare(loso_runs=f"{a}+{b}", n_boot=N_BOOT, echo=False)
    with pytest.raises(C.CompareError, match=r"more than once"):
        C.compare(loso_runs=f"{a}+{a}", n_boot=N_BOOT, echo=False)
    with pytest.raises(C.CompareError, match=r"empty run id"):
        C.compare(loso_runs=f"{a}+", n_boot=N_BOOT, echo=False)
    assert n_runs() == before  # nothing written


def test_default_is_the_newest_finished_loso_run(tracking_uri, cms):
    tiny = {p: cms[p] for p in ("105", "208")}
    log_loso(tiny, name="older")
    newest = log_loso(tiny, name="newer")
    unfinished = log_loso(tiny, name="newest-but-running")
    MlflowClient().update_run(unfinished, status="RUNNING")
    log_loso(tiny, experiment="elsewhere", name="other-experiment")
    assert A.default_loso_run(MlflowClient()) == newest
    res = C.compare(n_boot=N_BOOT, echo=False)
    assert MlflowClient().get_run(res.run_id).data.tags["loso_run_ids"] == newest
    with pytest.raises(C.CompareError, match="'nope'"):
        C.compare(experiment="nope", echo=False)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the run, and no compare run written
# --------------------------------------------------------------------------------------------

def test_bad_loso_runs_are_rejected_before_anything_is_written(tracking_uri, cms):
    client = MlflowClient()
    cms = {p: cms[p] for p in ("105", "208")}
    good = log_loso(cms)
    not_loso = log_loso(cms, role="base", name="a-base-run")
    with mlflow.start_run(run_name="no-tag") as r:
        pass
    untagged = r.info.run_id
    unfinished = log_loso(cms, name="still-running")
    client.update_run(unfinished, status="RUNNING")
    failed = log_loso(cms, name="crashed")
    client.set_terminated(failed, status="FAILED")
    with mlflow.start_run(run_name="empty-loso") as r:
        mlflow.set_tag("ecg.role", "loso")
    empty = r.info.run_id
    one_sided = log_loso(cms, name="no-transfer-only", variants=("no_transfer",))
    before = n_runs()
    cases = [
        ("0123456789abcdef0123456789abcdef", "not found"),
        (not_loso, "not a LOSO run: its tag ecg.role is 'base'"),
        (untagged, "not a LOSO run: its tag ecg.role is None"),
        (unfinished, "status RUNNING, expected FINISHED"),
        (failed, "status FAILED, expected FINISHED"),
        (empty, "has no variant runs"),
        (one_sided, "has no transfer variant runs"),
    ]
    for bad, message in cases:
        # A bad run next to a good one: nothing is written for the good one either.
        with pytest.raises(C.CompareError, match=message) as err:
            C.compare(loso_runs=f"{good},{bad}", n_boot=N_BOOT, echo=False)
        assert bad in str(err.value)
    with pytest.raises(C.CompareError, match="more than once"):
        C.compare(loso_runs=f"{good},{good}", echo=False)
    assert n_runs() == before
    assert mlflow.search_runs(search_all_experiments=True, filter_string="tags.`ecg.role` = 'compare'").empty


def test_no_loso_run_anywhere(tracking_uri):
    with pytest.raises(C.CompareError, match="no FINISHED run tagged ecg.role=loso"):
        C.compare(echo=False)


def test_a_child_without_its_confusion_matrix(tracking_uri, cms):
    loso_id = log_loso({"100": cms["100"]})
    child = mlflow.search_runs(search_all_experiments=True,
                               filter_string=f"tags.mlflow.parentRunId = '{loso_id}'").run_id.iloc[0]
    Path(MlflowClient().get_run(child).info.artifact_uri.removeprefix("file://"), "confusion_matrix.json").unlink()
    with pytest.raises(C.CompareError, match=f"{child}.*confusion_matrix.json"):
        C.compare(loso_runs=loso_id, echo=False)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def test_figures():
    fig = figures.plot_difference_bars({"VEB Se": (["100", "101", "105"], [3.0, -2.0, 1.0])}, "pp", "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["101", "105", "100"]  # sorted ascending
    assert [p.get_width() for p in ax.patches] == [-2.0, 1.0, 3.0]
    plt.close(fig)
    fig = figures.plot_paired_scatter({"Accuracy": ([50.0, 90.0], [60.0, 80.0])}, "NT", "T", "t")
    ax = fig.axes[0]
    diag = ax.lines[0].get_xydata()
    assert (diag[:, 0] == diag[:, 1]).all()  # the y = x line
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), [[50, 60], [90, 80]])
    plt.close(fig)
    fig = figures.plot_confusion_pair({"a": np.eye(2, dtype=int), "b": 2 * np.eye(2, dtype=int)}, ["N", "S"], "t")
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The entry point, end to end
# --------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    """The test's store only, and this interpreter's `python` first on PATH (`mlflow run` calls `python`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_mlflow_run_compare_end_to_end(tracking_uri, cms):
    loso_id = log_loso(cms)
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "compare", "--env-manager", "local",
         "-P", f"loso_runs={loso_id}", "-P", "bootstrap=500"],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paired statistics" in proc.stdout
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`ecg.role` = 'compare'")
    assert len(runs) == 1
    run = MlflowClient().get_run(runs.run_id.iloc[0])
    assert run.info.status == "FINISHED" and run.data.tags["loso_run_id.0"] == loso_id
    assert run.data.tags.get("mlflow.project.entryPoint") == "compare"  # the run `mlflow run` created
    assert run.data.params["bootstrap"] == "500"
    names = {f.path for f in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"report.html", "summary.json", "tables", "figures"} <= names


def test_entry_point_script_rejects_a_bad_run(tracking_uri, cms):
    not_loso = log_loso({"105": cms["105"]}, role="variant")
    before = n_runs()
    proc = subprocess.run([sys.executable, str(REPO / "entrypoints" / "compare.py"), "--loso-runs", not_loso],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and not_loso in proc.stderr and "Traceback" not in proc.stderr
    assert n_runs() == before
