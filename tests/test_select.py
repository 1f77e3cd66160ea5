"""The `select` entry point: each subject's figures from the candidate chosen on the other subjects.

Candidates are LOSO runs logged with known confusion matrices into a real SQLite store
(tests/loso_runs.py); the choices are checked against a straight recomputation here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ecg_mlflow.analysis import LosoRun
from ecg_mlflow import selection as S
from ecg_mlflow import uncertainty as U
from ecg_mlflow.metrics import EC57_COUNTS, ec57_counts
from ecg_mlflow.splits import subject_of
from loso_runs import CLASSES, N, V, log_loso, patient_cms

REPO = Path(__file__).resolve().parents[1]
N_BOOT = 500


def counts_table(rows: dict[str, list[int]]) -> pd.DataFrame:
    """EC57 counts by subject from ``{subject: [veb_tp, veb_fn, veb_fp, veb_tn, sveb_tp, ...]}``."""
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(EC57_COUNTS)).rename_axis("subject")


def row(veb: tuple[int, int, int], sveb: tuple[int, int, int]) -> list[int]:
    """Counts from (tp, fn, fp) of VEB and SVEB; true negatives do not enter the rule."""
    return [*veb, 1000, *sveb, 1000]


def by_subject(cms: dict[str, dict[str, np.ndarray]], variant: str = "transfer") -> dict[str, np.ndarray]:
    """Each subject's EC57 counts, straight from the logged confusion matrices."""
    out: dict[str, np.ndarray] = {}
    for p, v in cms.items():
        c = np.array([ec57_counts(v[variant], CLASSES)[k] for k in EC57_COUNTS])
        out[subject_of(p)] = out.get(subject_of(p), 0) + c
    return out


# --------------------------------------------------------------------------------------------
# Folds and the choice
# --------------------------------------------------------------------------------------------

def test_fold_schemes():
    subjects = ["208", "100", "101", "105", "201"]
    assert S.subject_folds(subjects, "subject") == {s: [s] for s in ["100", "101", "105", "201", "208"]}
    halves = S.subject_folds(subjects, "halves")
    assert halves == {"half1": ["101", "201", "208"], "half2": ["100", "105"]}
    assert S.subject_folds(subjects, "2") == {"group1of2": ["100", "105", "208"], "group2of2": ["101", "201"]}
    for bad, words in (("1", "whole number >= 2"), ("x", "'x'"), ("6", "more folds than the 5 subjects")):
        with pytest.raises(S.SelectError, match=words):
            S.subject_folds(subjects, bad)
    with pytest.raises(S.SelectError, match=r"\['999'\] are in neither"):
        S.subject_folds(subjects + ["999"], "halves")
    with pytest.raises(S.SelectError, match="only 1 fold"):
        S.subject_folds(["100", "105"], "halves")
    # The records a scoring run blind to each fold runs over: 202 leaves with its subject 201.
    records = ["208", "100", "101", "105", "201", "202"]
    assert S.blind_records(records, S.subject_folds(subjects, "2")) == {
        "group1of2": ["101", "201", "202"], "group2of2": ["100", "105", "208"]}
    assert S.blind_records(records, halves) == {"half1": ["100", "105"], "half2": ["101", "201", "202", "208"]}


def test_each_subject_takes_the_candidate_best_on_the_others():
    # Candidate 0 is fine everywhere but on SVEB of subject c; candidate 1 finds c's S beats and
    # errs on a: where c counts (the folds of a and b) 1 wins; on a and b alone 0 does.
    good, poor = row((90, 10, 5), (80, 20, 10)), row((90, 10, 5), (10, 90, 10))
    zero = counts_table({"a": good, "b": good, "c": poor})
    one = counts_table({"a": row((50, 50, 40), (80, 20, 10)), "b": good, "c": row((90, 10, 5), (85, 15, 5))})
    sel = S.cross_fitted_choice([zero, one], S.subject_folds(["a", "b", "c"], "subject"))
    for s in "abc":
        others = [t for t in "abc" if t != s]
        scores = [S.score(t.loc[others].sum().to_numpy()) for t in (zero, one)]
        assert sel.folds.loc[s, "chosen"] == int(np.argmax(scores))
        assert sel.folds.loc[s, ["score_0", "score_1"]].tolist() == pytest.approx(scores)
        pick = (zero, one)[sel.folds.loc[s, "chosen"]]
        assert sel.per_subject.loc[s, list(EC57_COUNTS)].tolist() == pick.loc[s].tolist()
    assert sel.folds.chosen.tolist() == [1, 1, 0]  # a, b, c
    assert sel.pooled.sum(axis=0).tolist() == (one.loc["a"] + one.loc["b"] + zero.loc["c"]).tolist()


def test_a_subjects_own_figures_never_enter_its_choice():
    rng = np.random.default_rng(1)
    subjects = [str(100 + i) for i in range(8)]
    tables = [counts_table({s: row(tuple(rng.integers(1, 100, 3)), tuple(rng.integers(1, 100, 3)))
                            for s in subjects}) for _ in range(3)]
    plan = S.subject_folds(subjects, "subject")
    before = S.cross_fitted_choice(tables, plan)
    for s in subjects:  # make each subject perfect under the candidate it was not given, in turn
        changed = [t.copy() for t in tables]
        for i, t in enumerate(changed):
            if i != before.folds.loc[s, "chosen"]:
                t.loc[s] = row((500, 0, 0), (500, 0, 0))
        after = S.cross_fitted_choice(changed, plan)
        assert after.folds.loc[s, "chosen"] == before.folds.loc[s, "chosen"]


def test_ties_go_to_the_first_candidate_and_undefined_never_wins():
    good = row((90, 10, 5), (80, 20, 10))
    t = counts_table({"a": good, "b": good, "c": good})
    sel = S.cross_fitted_choice([t, t.copy()], S.subject_folds(list(t.index), "subject"))
    assert (sel.folds.chosen == 0).all()
    no_s = counts_table({"a": row((90, 10, 5), (0, 0, 0)), "b": row((99, 1, 0), (0, 0, 0)), "c": good})
    sel = S.cross_fitted_choice([no_s, t], S.subject_folds(list(t.index), "subject"))
    assert sel.folds.loc["c", "score_0"] == -math.inf and sel.folds.loc["c", "chosen"] == 1
    with pytest.raises(S.SelectError, match="fold c: no candidate has all four"):
        S.cross_fitted_choice([no_s, no_s.copy()], S.subject_folds(list(t.index), "subject"))


def _duplicated(tables: list[pd.DataFrame], plan: dict[str, list[str]], drawn: np.ndarray,
                subjects: list[str]) -> tuple[list[pd.DataFrame], dict[str, list[str]]]:
    """The tables and folds of one resample written out: a subject drawn k times as k subjects."""
    copies = {s: [f"{s}#{k}" for k in range(n)] for s, n in zip(subjects, drawn)}
    out = [counts_table({c: t.loc[s].tolist() for s in subjects for c in copies[s]}) for t in tables]
    return out, {name: [c for s in members for c in copies[s]] for name, members in plan.items()}


@pytest.mark.parametrize("folds, seeds", [("subject", 1), ("2", 1), ("3", 1), ("3", 3)])
def test_the_bootstrap_makes_the_choice_again_on_each_resample(folds, seeds):
    """With ``seeds`` > 1 each candidate has that many replicas and the seed rule chooses."""
    rng = np.random.default_rng(3 if seeds == 1 else 8)
    subjects = [str(100 + i) for i in range(9)]
    reps = [[counts_table({s: row(tuple(rng.integers(1, 100, 3)), tuple(rng.integers(1, 100, 3)))
                           for s in subjects}) for _ in range(seeds)] for _ in range(3)]
    tables = [r[0] for r in reps] if seeds == 1 else reps  # one replica: the plain tables
    plan = S.subject_folds(subjects, folds)
    sel = S.cross_fitted_choice(tables, plan)
    # Every subject drawn once is the data itself: the choices and counts made on the data.
    once = S.choice_bootstrap(sel, np.ones((1, len(subjects)), np.int64))
    assert once.chosen[0].tolist() == sel.folds.chosen.tolist()
    assert once.counts[0].tolist() == sel.pooled.sum(axis=0).tolist()
    # Each resample equals the choice made on that resample written out subject by subject.
    weights = U.resample_weights(len(subjects), 40, seed=5)
    boot = S.choice_bootstrap(sel, weights)
    for b in range(len(weights)):
        dup = [_duplicated(r, plan, weights[b], subjects) for r in reps]
        dup_plan = {k: v for k, v in dup[0][1].items() if v}  # a fold not drawn at all adds nothing
        if len(dup_plan) == 1:  # nothing outside the one fold drawn to choose on: candidate 0, as for a tie
            assert boot.counts[b].tolist() == (weights[b] @ sel.counts[0]).tolist()
            continue
        again = S.cross_fitted_choice([d[0] for d in dup], dup_plan)
        assert boot.counts[b].tolist() == again.pooled.sum(axis=0).tolist()
        for f, name in enumerate(sel.folds.index):
            if name in dup_plan:
                assert boot.chosen[b, f] == again.folds.loc[name, "chosen"]
    assert boot.kept(sel).shape == (len(plan),) and ((0 <= boot.kept(sel)) & (boot.kept(sel) <= 1)).all()
    assert len(set(boot.chosen.ravel().tolist())) > 1  # the resamples do not all choose alike


def test_the_bootstrap_scores_on_the_blind_runs():
    good, poor = row((90, 10, 5), (80, 20, 10)), row((50, 50, 5), (10, 90, 10))
    plan = {"g1": ["a", "b"], "g2": ["c", "d"]}
    tables = [counts_table({s: good for s in "abcd"}), counts_table({s: poor for s in "abcd"})]
    worse = S.ScoringRun(counts_table({s: row((70, 30, 5), (60, 40, 10)) for s in "abcd"}),
                         {s: frozenset("abcd") - {s} for s in "abcd"})
    inside = [S.ScoringRun(counts_table({s: good for s in m}), {s: frozenset(m) - {s} for s in m})
              for m in plan.values()]
    sel = S.cross_fitted_choice(tables, plan, [[worse], inside])
    weights = U.resample_weights(4, 300, seed=0)
    boot = S.choice_bootstrap(sel, weights)
    # Candidate 1 wins on its blind runs in every resample that draws a subject outside the fold (on
    # its own table it would lose every one); with none drawn there is nothing to choose on.
    outside_drawn = np.stack([weights[:, 2:].sum(1) > 0, weights[:, :2].sum(1) > 0], axis=1)
    assert outside_drawn.mean() > 0.8
    assert (boot.chosen[outside_drawn] == 1).all() and (boot.chosen[~outside_drawn] == 0).all()


def test_the_interval_of_the_choice_holds_its_spread():
    rng = np.random.default_rng(0)
    subjects = [str(100 + i) for i in range(12)]
    base = {s: row(tuple(rng.integers(60, 100, 3)), tuple(rng.integers(40, 100, 3))) for s in subjects}
    steady = counts_table(base)
    # Candidate 1 misses and errs far less everywhere: every resample chooses it.
    better = counts_table({s: [v[0], 1, 1, v[3], v[4], 1, 1, v[7]] for s, v in base.items()})
    sel = S.cross_fitted_choice([steady, better], S.subject_folds(subjects, "3"))
    table, boot = S.estimate_table(sel, ["a", "b"], n_boot=400, seed=2)
    assert (boot.kept(sel) == 1).all()
    assert table.iloc[-1].smallest_ci_low == pytest.approx(table.iloc[1].smallest_ci_low)
    # Candidate 1 wins through one subject alone (a huge SVEB haul there, poor elsewhere): the
    # choice flips in resamples without that subject, and the interval spreads beyond the fixed one.
    lucky = counts_table({s: (row((60, 40, 30), (900, 0, 0)) if s == "100" else row((60, 40, 30), (5, 95, 30)))
                          for s in subjects})
    sel = S.cross_fitted_choice([steady, lucky], S.subject_folds(subjects, "3"))
    table, boot = S.estimate_table(sel, ["a", "b"], n_boot=400, seed=2)
    kept = boot.kept(sel)
    assert (kept < 1).any() and (kept > 0).all()
    weights = U.resample_weights(len(subjects), 400, seed=2)
    fixed = U.gross_interval(sel.pooled, weights)["smallest"]
    last = table.iloc[-1]
    assert last.smallest == pytest.approx(fixed[0])  # the point estimate is the data's choice
    assert (last.smallest_ci_low, last.smallest_ci_high) != pytest.approx(fixed[1:])


# --------------------------------------------------------------------------------------------
# Replicas: each candidate under several seeds
# --------------------------------------------------------------------------------------------

def test_one_replica_is_the_plain_largest_score_ties_to_the_first():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 4, (4, 1, 500)).astype(float)  # many ties
    scores[rng.random(scores.shape) < 0.2] = -math.inf
    scores[rng.random(scores.shape) < 0.1] = math.nan  # undefined, as rates give it
    plain = np.argmax(np.where(np.isfinite(scores[:, 0]), scores[:, 0], -np.inf), axis=0)
    assert S.choose(scores).tolist() == plain.tolist()
    assert len(set(plain.tolist())) == 4  # every candidate wins somewhere: the comparison can fail


def seeded(*smallest_sveb_se: float) -> list[pd.DataFrame]:
    """A candidate's replicas, one per seed, on subjects a-d: every subject's SVEB Se is the given
    value (the smallest of its four statistics), so that is the replica's score on any subjects."""
    return [counts_table({s: row((95, 5, 1), (int(100 * v), 100 - int(100 * v), 1)) for s in "abcd"})
            for v in smallest_sveb_se]


def test_a_candidate_replaces_the_first_only_if_higher_under_every_seed():
    plan = S.subject_folds(list("abcd"), "2")
    incumbent = seeded(0.70, 0.85, 0.70)
    lucky = seeded(0.95, 0.84, 0.90)  # far higher on the mean, lower under the second seed
    steady = seeded(0.72, 0.86, 0.71)  # a little higher under each
    sel = S.cross_fitted_choice([incumbent, lucky], plan)
    assert sel.folds.chosen.tolist() == [0, 0]
    assert sel.folds.score_1.tolist() == pytest.approx([(0.95 + 0.84 + 0.90) / 3] * 2)
    assert sel.folds[["score_0_1", "score_1_1"]].iloc[0].tolist() == pytest.approx([0.85, 0.84])
    # The same seed alone would take it: the rule is what keeps the incumbent.
    assert S.cross_fitted_choice([incumbent[0], lucky[0]], plan).folds.chosen.tolist() == [1, 1]
    sel = S.cross_fitted_choice([incumbent, lucky, steady], plan)
    assert sel.folds.chosen.tolist() == [2, 2]
    # A subject's figures are its chosen candidate's, summed over the seeds; each seed's alone too.
    for s in "abcd":
        assert sel.per_subject.loc[s, list(EC57_COUNTS)].tolist() == sum(t.loc[s] for t in steady).tolist()
    for k in range(3):
        assert sel.replica_pooled(k).tolist() == steady[k].to_numpy().tolist()
    # Of several higher under every seed, the largest mean wins.
    better = seeded(0.80, 0.90, 0.75)
    assert S.cross_fitted_choice([incumbent, steady, better], plan).folds.chosen.tolist() == [2, 2]
    with pytest.raises(S.SelectError, match=r"the same number of replicas, got \[3, 2\]"):
        S.cross_fitted_choice([incumbent, steady[:2]], plan)
    with pytest.raises(S.SelectError, match="scored_on must give each candidate's 3 replica"):
        S.cross_fitted_choice([incumbent, steady], plan, [[[S.ScoringRun(t, {}) for t in incumbent[:2]]],
                                                          [[S.ScoringRun(t, {}) for t in steady[:2]]]])


def test_the_share_clause_keeps_out_a_gain_that_rests_on_one_subject():
    """``min_share``: a candidate higher only through one subject is higher in the resamples that draw
    that subject and ties in the rest; one higher on every subject is higher in all of them."""
    subjects = [str(100 + i) for i in range(22)]
    plan = {"g1": subjects[:11], "g2": subjects[11:]}  # 105 is in g1, so it scores g2's choice
    usual = row((95, 5, 1), (70, 30, 1))  # SVEB Se (0.70) is the smallest statistic on any subjects
    incumbent = counts_table({s: usual for s in subjects})
    narrow = counts_table({s: row((95, 5, 1), (100, 0, 1)) if s == "105" else usual for s in subjects})
    broad = counts_table({s: row((95, 5, 1), (72, 28, 1)) for s in subjects})
    plain = S.cross_fitted_choice([incumbent, narrow], plan)
    assert plain.folds.chosen.tolist() == [0, 1] and "share_1" not in plain.folds  # g1: a tie, g2: higher
    sel = S.cross_fitted_choice([incumbent, narrow], plan, min_share=0.9, n_boot=N_BOOT, seed=3)
    assert sel.folds.chosen.tolist() == [0, 0]
    # The share is that of the resamples of g1's subjects drawing 105, and compare's "resamples higher".
    weights = U.resample_weights(11, N_BOOT, 3)
    share = sel.folds.loc["g2", "share_1"]
    assert share == pytest.approx((weights[:, subjects.index("105")] > 0).mean())
    assert 0.5 < share < 0.8
    rows = [t.loc[plan["g1"]].to_numpy() for t in (incumbent, narrow)]
    assert share == pytest.approx(U.paired_interval(*rows, weights)["smallest"]["share_b_higher"])
    assert sel.folds.loc["g1", "share_1"] == 0  # a tie in every resample of g2's subjects
    assert S.cross_fitted_choice([incumbent, narrow], plan, min_share=share, n_boot=N_BOOT,
                                 seed=3).folds.chosen.tolist() == [0, 1]  # at the share it passes
    wide = S.cross_fitted_choice([incumbent, narrow, broad], plan, min_share=0.9, n_boot=N_BOOT)
    assert wide.folds.chosen.tolist() == [2, 2] and (wide.folds.share_2 == 1).all()
    # The interval makes the whole choice again, the clause included, within each resample: without
    # the clause g2 takes the narrow candidate whenever a resample draws 105; with it, only where a
    # resample draws 105 so often that most resamples of it do too.
    drawn = U.resample_weights(len(subjects), 400, 2)[:, subjects.index("105")]
    took = {}
    for clause in (0.0, 0.9):
        sel = S.cross_fitted_choice([incumbent, narrow], plan, min_share=clause, n_boot=N_BOOT)
        _, boot = S.estimate_table(sel, ["a", "b"], n_boot=400, seed=2)
        assert (boot.chosen[drawn == 0, 1] == 0).all()
        took[clause] = boot.chosen[:, 1] == 1
    assert (took[0.0] == (drawn > 0)).all()
    assert took[0.9].mean() < 0.5 * took[0.0].mean() and not (took[0.9] & ~took[0.0]).any()
    assert drawn[took[0.9]].mean() > drawn[took[0.0] & ~took[0.9]].mean()  # drawn more often where it passes
    _, boot = S.estimate_table(wide, ["a", "b", "c"], n_boot=400, seed=2)
    assert (boot.chosen != 0).all()  # the broad gain passes in every resample (or the narrow one beats it)
    with pytest.raises(S.SelectError, match="min_share must be a share of resamples from 0 to 1, got 1.5"):
        S.cross_fitted_choice([incumbent, narrow], plan, min_share=1.5)


def test_the_share_clause_holds_under_every_seed():
    scores = np.array([[[0.70], [0.70]], [[0.75], [0.72]], [[0.80], [0.71]]])  # (candidate, seed, fold)
    shares = np.array([[[np.nan], [np.nan]], [[0.95], [0.91]], [[0.99], [0.60]]])
    assert S.choose(scores).tolist() == [2]  # the larger mean, higher under both seeds
    assert S.choose(scores, shares, 0.9).tolist() == [1]  # 2 is not higher often enough under the second
    assert S.choose(scores, shares, 0.92).tolist() == [0]
    shares[1, 1, 0] = np.nan  # no resample where both are defined: never passes
    assert S.choose(scores, shares, 0.5).tolist() == [2]


def test_candidates_must_hold_the_same_subjects():
    good = row((90, 10, 5), (80, 20, 10))
    a, b = counts_table({"x": good, "y": good}), counts_table({"x": good, "z": good})
    with pytest.raises(S.SelectError, match=r"candidate 1 holds other subjects .*\['z'\] more, lacks \['y'\]"):
        S.cross_fitted_choice([a, b], S.subject_folds(["x", "y"], "subject"))
    with pytest.raises(S.SelectError, match="at least two candidates"):
        S.cross_fitted_choice([a], S.subject_folds(["x", "y"], "subject"))


def test_a_fold_is_scored_on_the_runs_blind_to_it():
    good, poor = row((90, 10, 5), (80, 20, 10)), row((50, 50, 5), (10, 90, 10))
    plan = {"g1": ["a", "b"], "g2": ["c", "d"]}
    # Runs over all subjects: each base model saw every other subject.
    everyone = S.ScoringRun(counts_table({s: poor for s in "abcd"}), {s: frozenset("abcd") - {s} for s in "abcd"})
    total, verdict = S.fold_counts([everyone], ["c", "d"], {"a", "b"}, "x")
    assert verdict == "no" and total.tolist() == (2 * np.array(poor)).tolist()
    # Runs over the other fold only (as in quarters: each fold's scores from the run without it);
    # they overlap the full run in patients, and the blind one is taken wherever it holds the subject.
    inside = {g: S.ScoringRun(counts_table({s: good for s in m}), {s: frozenset(m) - {s} for s in m})
              for g, m in plan.items()}
    for runs in ([everyone, inside["g2"]], [inside["g2"], everyone]):
        total, verdict = S.fold_counts(runs, ["c", "d"], {"a", "b"}, "x")
        assert verdict == "yes" and total.tolist() == (2 * np.array(good)).tolist()
    untold = S.ScoringRun(counts_table({s: poor for s in "abcd"}), dict.fromkeys("abcd"))
    assert S.fold_counts([untold], ["c", "d"], {"a", "b"}, "x")[1] == "unknown"
    assert S.fold_counts([untold, everyone], ["c", "d"], {"a", "b"}, "x")[1] == "unknown"  # the first holding
    assert S.fold_counts([everyone, untold], ["c", "d"], {"a", "b"}, "x")[1] == "no"
    with pytest.raises(S.SelectError, match="x: no run holds subject c"):
        S.fold_counts([inside["g1"]], ["c", "d"], {"a", "b"}, "x")
    # The choice follows the blind runs: candidate 1 scores well only where it was run without the fold.
    tables = [counts_table({s: good for s in "abcd"}), counts_table({s: poor for s in "abcd"})]
    worse = S.ScoringRun(counts_table({s: row((70, 30, 5), (60, 40, 10)) for s in "abcd"}), everyone.trained_on)
    sel = S.cross_fitted_choice(tables, plan, [[worse], [everyone, *inside.values()]])
    assert sel.folds.chosen.tolist() == [1, 1]  # on the blind runs candidate 1 holds the better counts
    assert sel.folds.scored_without_fold.tolist() == ["no", "no"]  # candidate 0 was scored on a full run
    assert sel.pooled.sum(axis=0).tolist() == (4 * np.array(poor)).tolist()  # the figures are the tables'


# --------------------------------------------------------------------------------------------
# Against a real store
# --------------------------------------------------------------------------------------------

def _candidates() -> list[dict[str, dict[str, np.ndarray]]]:
    """Three option sets on the same patients; the second calls fewer false V on 105 and 208."""
    first, second, third = patient_cms(0), patient_cms(0), patient_cms(7)
    for p in ("105", "208"):
        second[p]["transfer"][N, V] = 0
    return [first, second, third]


def test_select_logs_the_cross_fitted_estimate(tracking_uri, capsys, monkeypatch):
    cands = _candidates()
    traced = []  # the per-subject trace is made once and serves the artifacts and the summary
    monkeypatch.setattr(S, "choice_differences", lambda sel, f=S.choice_differences: traced.append(1) or f(sel))
    # Spelled as `mlflow run` logs them (1, auto, '') or as a run that nested started does (1.0, ''):
    # the same options.
    spelled = [("1", "auto", "5", "''"), ("1.0", "", "5.0", ""), ("1", "auto", "5", "''")]
    ids = [log_loso(c, name=f"cand{i}", params={"label_scheme": "aami", "model": "rr_cnn", "sveb_gate": gate,
                                                "executor": f"local{i}", "finetune_blend": blend,
                                                "include_paced": paced, "finetune_minutes": minutes,
                                                "data_dir": data_dir})
           for i, (c, gate, (blend, paced, minutes, data_dir)) in enumerate(zip(cands, ("0", "0.99", "0.99"), spelled))]
    res = S.select(",".join(ids), n_boot=N_BOOT, seed=1)
    assert len(traced) == 1
    # Candidates are named by the options they differ in (not by where they ran, nor by spelling).
    assert res.table.candidate.iloc[:3].tolist() == [f"{ids[0]} sveb_gate=0", f"{ids[1]} sveb_gate=0.99",
                                                      f"{ids[2]} sveb_gate=0.99"]
    # An option one run did not log (made before it existed) is left out of that run's label.
    runs = [LosoRun(i, i, "0", {"model": "rr_cnn", **extra}, {}, pd.DataFrame(), [], {}) for i, extra in
            (("a", {"lr_schedule": "cosine"}), ("b", {}), ("c", {"lr_schedule": "constant", "kernel_size": "11"}))]
    assert S.candidate_labels(["a", "b", "c"], runs) == [
        "a lr_schedule=cosine", "b (did not log kernel_size, lr_schedule)", "c kernel_size=11, lr_schedule=constant"]
    # The choices, recomputed straight from the confusion matrices.
    counts = [by_subject(c) for c in cands]
    subjects = sorted(counts[0])
    expected = {}
    for s in subjects:
        scores = [S.score(sum(c[t] for t in subjects if t != s)) for c in counts]
        expected[s] = int(np.argmax(scores))
    assert res.selection.per_subject.chosen.to_dict() == expected
    pooled = sum(counts[expected[s]][s] for s in subjects)
    rates = U.rates(pooled)
    last = res.table.iloc[-1]
    assert last.candidate == "cross-fitted choice"
    for k in U.STATISTICS:
        assert last[k] == pytest.approx(float(rates[k]))
        assert last[f"{k}_ci_low"] <= last[k] <= last[f"{k}_ci_high"]
    for i, c in enumerate(counts):  # each candidate's own row: its figures on all subjects
        assert res.table.iloc[i]["smallest"] == pytest.approx(float(U.rates(sum(c.values()))["smallest"]))
    assert res.table.folds_chosen.iloc[:3].sum() == len(subjects)

    run = MlflowClient().get_run(res.run_id)
    assert run.data.tags["ecg.role"] == "select" and run.data.tags["loso_run_ids"] == ",".join(ids)
    assert run.data.params["folds"] == "subject"
    assert run.data.metrics["selected_smallest"] == pytest.approx(float(rates["smallest"]))
    assert run.data.metrics["selected_smallest_vs_0"] == pytest.approx(
        float(rates["smallest"] - U.rates(sum(counts[0].values()))["smallest"]))
    path = Path(mlflow.artifacts.download_artifacts(run_id=res.run_id))
    doc = json.loads((path / "estimate.json").read_text())
    assert doc["counts"] == dict(zip(EC57_COUNTS, pooled.tolist()))
    logged = pd.read_csv(path / "per_subject.csv", dtype={"subject": str}).set_index("subject")
    assert logged.chosen.to_dict() == expected
    assert {"choices.csv", "estimate.csv", "summary.txt"} <= {p.name for p in path.iterdir()}
    # How often each fold's choice stands when the subjects are resampled, as the interval was made.
    choices = pd.read_csv(path / "choices.csv", dtype={"fold": str}).set_index("fold")
    weights = U.resample_weights(len(subjects), N_BOOT, 1)
    boot = S.choice_bootstrap(res.selection, weights)
    assert choices.kept.to_numpy() == pytest.approx(boot.kept(res.selection), abs=1e-9)
    assert doc["choice_kept_in_resamples"] == pytest.approx(choices.kept.round(4).to_dict())
    assert (last.smallest_ci_low, last.smallest_ci_high) == pytest.approx(
        U.gross_interval(res.selection.pooled, weights, resampled=boot.counts)["smallest"][1:])
    out = capsys.readouterr().out
    assert "Cross-fitted choice over 5 folds (subject)" in out
    assert "made again in" in out and "each fold's choice made again in" not in out  # few folds: one line each

    # Where the choice differs from [0], recomputed: each subject that took another candidate whose
    # V or S counts differ there, by how much, largest move first.
    at = {k: EC57_COUNTS.index(k) for k in ("veb_tp", "veb_fp", "sveb_tp", "sveb_fp")}
    want = {s: counts[expected[s]][s] - counts[0][s] for s in subjects if expected[s] != 0}
    want = {s: d for s, d in want.items() if any(d[i] for i in at.values())}
    assert want, "the candidates must give the choice something to differ by"
    moved = S.choice_differences(res.selection)
    assert set(moved.index) == set(want)
    for s, d in want.items():
        assert moved.at[s, "chosen"] == expected[s]
        assert {k: moved.at[s, f"{k}_diff"] for k in at} == {k: d[i] for k, i in at.items()}
        assert moved.at[s, "sveb_tp_first"] == counts[0][s][at["sveb_tp"]]
    assert list(moved.moved) == sorted((sum(abs(d[i]) for i in at.values()) for d in want.values()), reverse=True)
    logged = pd.read_csv(path / "choice_vs_first_by_subject.csv", dtype={"subject": str}).set_index("subject")
    assert logged.index.tolist() == moved.index.tolist() and (logged.to_numpy() == moved.to_numpy()).all()
    assert [r["subject"] for r in doc["choice_vs_first_by_subject"]] == moved.index.tolist()
    top = moved.index[0]
    line = next(x for x in out.splitlines() if x.startswith(f"{top} ") and "[" in x)
    a, b = moved.at[top, "sveb_tp_first"], moved.at[top, "sveb_tp_this"]
    assert f"[{expected[top]}]" in line and (f"{a} → {b} ({b - a:+d})" if a != b else f" {a} ") in line
    assert "where the choice differs from [0]" in out


def test_halves_and_pooled_candidates(tracking_uri):
    cands = _candidates()
    half1 = [p for p in cands[0] if p in ("101", "201", "202", "208")]
    ids = []
    for c in cands[:2]:  # each candidate as two runs, one per half, pooled with +
        a = log_loso({p: c[p] for p in half1})
        b = log_loso({p: c[p] for p in c if p not in half1})
        ids.append(f"{a}+{b}")
    res = S.select(",".join(ids), folds="halves", n_boot=N_BOOT)
    counts = [by_subject(c) for c in cands[:2]]
    h1, h2 = ["101", "201", "208"], ["100", "105"]
    for fold, other in ((h1, h2), (h2, h1)):
        best = int(np.argmax([S.score(sum(c[s] for s in other)) for c in counts]))
        assert set(res.selection.per_subject.loc[fold, "chosen"]) == {best}


def test_runs_that_never_read_a_half_score_its_choice(tracking_uri, capsys):
    """The halves as README "Choosing options across halves" runs them: each candidate scored on
    runs inside each half, its figures taken from runs over all records."""
    cands = _candidates()[:2]
    half1, half2 = ["101", "201", "202", "208"], ["100", "105"]
    everyone = {p: [q for q in cands[0] if subject_of(q) != subject_of(p)] for p in cands[0]}

    def inside(half):
        return {p: [q for q in half if subject_of(q) != subject_of(p)] for p in half}

    applied = [log_loso(c, trained_on=everyone) for c in cands]
    # Inside the halves candidate 1 scores better where candidate 0 does over all records.
    scored_cms = [cands[1], cands[0]]
    scored = [f"{log_loso({p: c[p] for p in half1}, trained_on=inside(half1))}+"
              f"{log_loso({p: c[p] for p in half2}, trained_on=inside(half2))}" for c in scored_cms]
    res = S.select(",".join(applied), folds="halves", scored_on=",".join(scored), n_boot=N_BOOT)
    counts, score_counts = [by_subject(c) for c in cands], [by_subject(c) for c in scored_cms]
    h1, h2 = ["101", "201", "208"], ["100", "105"]
    for name, fold, other in (("half1", h1, h2), ("half2", h2, h1)):
        best = int(np.argmax([S.score(sum(c[s] for s in other)) for c in score_counts]))
        assert res.selection.folds.loc[name, "chosen"] == best
        assert res.selection.folds.loc[name, "scored_without_fold"] == "yes"
        for s in fold:  # the figures are the applied runs' own
            assert res.selection.per_subject.loc[s, list(EC57_COUNTS)].tolist() == counts[best][s].tolist()
    out = capsys.readouterr().out
    assert "yes in 2 fold(s)" in out and "-P records=" not in out  # blind already: no runs to suggest
    run = MlflowClient().get_run(res.run_id)
    assert run.data.tags["scored_without_fold"] == "yes" and run.data.params["scored_on"] == ",".join(scored)

    # A scoring entry may join runs that overlap in patients (a pool may not): each fold takes the
    # counts of the run blind to it, so adding the full runs changes nothing.
    overlapping = [f"{entry}+{full}" for entry, full in zip(scored, applied)]
    again = S.select(",".join(applied), folds="halves", scored_on=",".join(overlapping), n_boot=N_BOOT, echo=False)
    assert again.selection.folds.equals(res.selection.folds)

    capsys.readouterr()
    plain = S.select(",".join(applied), folds="halves", n_boot=N_BOOT)
    assert set(plain.selection.folds.scored_without_fold) == {"no"}  # full LOSO runs saw the other half
    # ... and the summary names the runs that would close that path: the halves' records above.
    out = capsys.readouterr().out
    assert "without half1: -P records=100,105\n" in out and "without half2: -P records=101,201,202,208\n" in out
    doc = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=plain.run_id, artifact_path="estimate.json"))
                     .read_text())
    assert doc["records_without_fold"] == {"half1": half2, "half2": half1}
    untold = ",".join(log_loso(c) for c in cands)  # runs whose base runs say nothing of their training
    assert set(S.select(untold, n_boot=N_BOOT, echo=False).selection.folds.scored_without_fold) == {"unknown"}
    with pytest.raises(S.SelectError, match="one entry per candidate: 2 candidates, 1 entries"):
        S.select(",".join(applied), folds="halves", scored_on=scored[0])


def test_select_over_seeds_applies_the_rule_and_reports_each_seed(tracking_uri, capsys):
    """Each candidate as runs under seeds 42 and 7 (``a/b``): the choice is recomputed here from the
    confusion matrices with the rule, and the estimate is given pooled and per seed."""
    by_seed = {"42": _candidates(), "7": [patient_cms(11), patient_cms(0), patient_cms(7)]}
    for p in ("105", "208"):
        by_seed["7"][1][p]["transfer"][N, V] = 0

    def logged(i: int, sd: str, **extra) -> str:
        params = {"label_scheme": "aami", "model": "rr_cnn", "seed": sd, "sveb_gate": str(i), **extra}
        return log_loso(by_seed.get(sd, by_seed["42"])[i], params=params)

    ids = [[logged(i, sd) for sd in ("42", "7")] for i in range(3)]
    res = S.select(",".join("/".join(r) for r in ids), folds="2", n_boot=N_BOOT, seed=1)
    counts = {sd: [by_subject(c) for c in cands] for sd, cands in by_seed.items()}
    subjects = sorted(counts["42"][0])
    plan = S.subject_folds(subjects, "2")
    expected, means = {}, {}
    for name, members in plan.items():
        scores = np.array([[S.score(sum(counts[sd][i][t] for t in subjects if t not in members))
                            for sd in ("42", "7")] for i in range(3)])
        expected[name] = int(S.choose(scores))
        assert res.selection.folds.loc[name, "chosen"] == expected[name]
        assert res.selection.folds.loc[name, ["score_1_0", "score_1_1"]].tolist() == pytest.approx(scores[1])
        means[name] = int(np.argmax(scores.mean(axis=1)))
    # One fold takes a candidate higher under both seeds; in the other the best mean is lower under
    # seed 7, so the incumbent stays: the data exercise both sides of the rule.
    assert expected == {"group1of2": 2, "group2of2": 0} and means == {"group1of2": 2, "group2of2": 2}
    pick = {s: expected[f] for f, members in plan.items() for s in members}
    pooled = sum(counts[sd][pick[s]][s] for sd in ("42", "7") for s in subjects)
    last = res.table.iloc[-1]
    assert last.smallest == pytest.approx(float(U.rates(pooled)["smallest"]))
    # the candidates are labelled by their first replica's options, not by the seed they share
    assert res.table.candidate.iloc[1] == f"{ids[1][0]}/{ids[1][1]} sveb_gate=1"
    doc = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=res.run_id, artifact_path="estimate.json"))
                     .read_text())
    assert doc["seeds"] == ["42", "7"] and "higher under each of seeds 42, 7" in doc["rule"]
    for sd in ("42", "7"):
        alone = U.rates(sum(counts[sd][pick[s]][s] for s in subjects))
        assert doc["estimate_per_seed"][sd]["smallest"] == pytest.approx(float(alone["smallest"]))
    out = capsys.readouterr().out
    assert "pooled over the 2 seeds' runs" in out and "cross-fitted choice under seed 7 alone: " in out
    # the trace of the choice against [0]: group1of2's subjects, counts summed over both seeds
    moved = S.choice_differences(res.selection)
    members = set(plan["group1of2"])
    assert set(moved.index) <= members and (moved.chosen == 2).all() and len(moved)
    for s in moved.index:
        both = [counts[sd][i][s] for sd in ("42", "7") for i in (0, 2)]
        assert moved.at[s, "sveb_fp_diff"] == (both[1] + both[3] - both[0] - both[2])[EC57_COUNTS.index("sveb_fp")]
    assert "moved most, summed over the 2 seeds):" in out

    def selects() -> int:
        return len(mlflow.search_runs(search_all_experiments=True, filter_string="tags.`ecg.role` = 'select'"))

    before = selects()
    other = logged(1, "123")
    for runs, culprit in [
            (f"{ids[0][0]}/{ids[0][1]},{ids[1][0]}", r"the same number of replicas .* got \[2, 1\]"),
            (f"{ids[0][0]}/{ids[0][1]},{ids[1][0]}/{other}", r"candidate 1: replicas .* ran with seeds \['42', "
                                                             r"'123'\], candidate 0's with \['42', '7'\]"),
            (f"{ids[0][0]}/{ids[0][1]},{ids[1][1]}/{ids[1][0]}", "replica k of every candidate must run under the "
                                                                 "same seed"),
            (f"{ids[0][0]}/{ids[0][1]},{ids[1][0]}/{ids[2][1]}", "has sveb_gate=2, replica .* sveb_gate=1; replicas "
                                                                 "differ in the seed only"),
            (f"{ids[0][0]}/{ids[0][0]},{ids[1][0]}/{ids[1][1]}", "more than once"),
            (f"{ids[0][0]}/,{ids[1][0]}/{ids[1][1]}", "an empty replica")]:
        with pytest.raises(S.SelectError, match=culprit):
            S.select(runs, folds="2")
    twice = logged(0, "42", executor="local")  # the same seed twice in one candidate
    with pytest.raises(S.SelectError, match=r"repeat a seed \(\['42', '42'\]\)"):
        S.select(f"{ids[0][0]}/{twice},{ids[1][0]}/{ids[1][1]}", folds="2")
    with pytest.raises(S.SelectError, match=r"scored_on entry 1: run .* \(replica 1\) ran with seed '42'"):
        S.select(",".join("/".join(r) for r in ids[:2]), folds="2",
                 scored_on=f"{ids[0][0]}/{ids[0][1]},{ids[1][0]}/{ids[1][0]}+{ids[1][1]}")
    assert selects() == before
    # A replica made before an option existed did not log it: only options both logged must agree.
    older = log_loso(by_seed["7"][0], params={"label_scheme": "aami", "seed": "7", "sveb_gate": "0"})
    S.select(f"{ids[0][0]}/{older},{ids[1][0]}/{ids[1][1]}", folds="2", n_boot=N_BOOT, echo=False)


def test_select_applies_the_share_clause_and_logs_the_shares(tracking_uri, capsys):
    """``min_share``: each fold's shares recomputed here from the confusion matrices on the same
    resamples, the choice by the rule with the clause, and the clause in the logged rule."""
    cands = _candidates()
    ids = [log_loso(c, params={"label_scheme": "aami", "sveb_gate": str(i)}) for i, c in enumerate(cands)]
    res = S.select(",".join(ids), n_boot=N_BOOT, seed=4, min_share=0.9)
    counts = [by_subject(c) for c in cands]
    subjects = sorted(counts[0])
    passed = []
    for s in subjects:
        others = [t for t in subjects if t != s]
        rows = np.array([[[c[t] for t in others]] for c in counts])  # (candidate, seed, subject, 8)
        shares = S.resample_shares(rows, U.resample_weights(len(others), N_BOOT, 4))
        scores = np.array([[S.score(rows[i, 0].sum(axis=0))] for i in range(len(cands))])
        fold = res.selection.folds.loc[s]
        assert [fold.share_1, fold.share_2] == pytest.approx(shares[1:, 0].tolist(), nan_ok=True)
        assert fold.chosen == int(S.choose(scores, shares, 0.9))
        passed.append(int(S.choose(scores)) != fold.chosen)
    assert any(passed)  # somewhere the clause keeps out the candidate the plain rule takes
    path = Path(mlflow.artifacts.download_artifacts(run_id=res.run_id))
    choices = pd.read_csv(path / "choices.csv", dtype={"fold": str}).set_index("fold")
    assert choices.share_2.tolist() == pytest.approx(res.selection.folds.share_2.tolist(), nan_ok=True)
    doc = json.loads((path / "estimate.json").read_text())
    assert doc["min_share"] == 0.9 and "in at least 90 % of paired resamples" in doc["rule"]
    assert MlflowClient().get_run(res.run_id).data.params["min_share"] == "0.9"
    out = capsys.readouterr().out
    assert "in at least 90 % of paired resamples" in out
    assert f"  100: [{res.selection.folds.loc['100', 'chosen']}] for 100 (made again in" in out
    assert f"higher than [0] in [1] {100 * res.selection.folds.loc['100', 'share_1']:.1f}%, [2] " in out
    with pytest.raises(S.SelectError, match="min_share must be a share of resamples from 0 to 1"):
        S.select(",".join(ids), min_share=-0.1)


def test_bad_input_is_refused_before_anything_is_written(tracking_uri):
    cands = _candidates()
    first, second = log_loso(cands[0]), log_loso(cands[1])
    fewer = log_loso({p: cands[1][p] for p in ("100", "101", "105")})
    before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(S.SelectError, match="at least two candidates"):
        S.select(first)
    with pytest.raises(S.SelectError, match="candidate 1 holds other subjects"):
        S.select(f"{first},{fewer}")
    with pytest.raises(S.SelectError, match="folds must be one of"):
        S.select(f"{first},{second}", folds="quarters")
    with pytest.raises(S.CompareError, match="'nosuchrun' not found"):  # compare's own check of a run
        S.select(f"{first},nosuchrun")
    assert len(mlflow.search_runs(search_all_experiments=True)) == before


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_mlflow_run_select_end_to_end_and_a_bad_run(tracking_uri):
    cands = _candidates()
    ids = [log_loso(c) for c in cands[:2]]
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "select", "--env-manager", "local",
         "-P", f"loso_runs={','.join(ids)}", "-P", "folds=2", "-P", "bootstrap=200"],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`ecg.role` = 'select'")
    assert len(runs) == 1
    run = MlflowClient().get_run(runs.run_id.iloc[0])
    assert run.data.tags.get("mlflow.project.entryPoint") == "select" and run.info.status == "FINISHED"
    assert "Cross-fitted choice over 2 folds (2)" in proc.stdout

    before = len(mlflow.search_runs(search_all_experiments=True))
    script = REPO / "entrypoints" / "select_options.py"
    proc = subprocess.run([sys.executable, str(script), "--loso-runs", f"{ids[0]},bogus"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "'bogus'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(script), "--loso-runs", ",".join(ids), "--min-share", "90"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2 and "min_share must be a share from 0 to 1 (0.9 for 90 %), got '90'" in proc.stderr
    assert len(mlflow.search_runs(search_all_experiments=True)) == before
