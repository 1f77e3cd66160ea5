"""The `nested` entry point: the LOSO runs a blind choice needs, planned, checked, reused or run, then `select`.

The plan and its refusals are checked on real records without training; the whole command runs on
six real subjects with tiny models: one of its LOSO runs killed, then nested itself stopped with
SIGTERM, then killed with SIGKILL (its LOSO run stops by itself), then run to the end (the finished
run reused, the rest made), once more through `mlflow run` (everything reused, nothing trained), and
then under two seeds (one seed's runs reused).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from conftest import entry_env, run_script_in_process
from ecg_mlflow import nested as N
from ecg_mlflow.executors import ExecConfig
from ecg_mlflow.loso import LosoConfig
from ecg_mlflow.resume import THREADS_TAG, ran_threads
from ecg_mlflow.selection import SelectError, choose, select
from ecg_mlflow.splits import subject_of

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "entrypoints" / "nested.py"
RECORDS = "100,101,103,105,201,202"  # five subjects (201 = 202); folds=2 deals them 100 103 201 | 101 105
COMMON = "epochs=1 finetune_epochs=2 finetune_minutes=5 seed=7"
CANDIDATES = "; kernel_size=5"  # the defaults (incumbent), and one other option set
# The whole command: six subjects with S and V beats on either side of folds=2 (118 200 209 | 119 201 232),
# so each candidate's four statistics are defined outside each fold and a choice can be made.
E2E_RECORDS = "118,119,200,201,202,209,232"
E2E_CANDIDATES = "; finetune_epochs=1"  # fine-tune options only: candidate 1 takes candidate 0's base models


# ---------------------------------------------------------------------------------------------
# parsing: no data needed


def test_options_are_loso_parameters_as_key_value_pairs():
    assert N.parse_options("epochs=10  augment=0.1 recent_reference='ontime'", "common") == {
        "epochs": "10", "augment": "0.1", "recent_reference": "ontime"}
    assert N.parse_options("finetune-minutes=5", "common") == {"finetune_minutes": "5"}
    assert N.parse_options("", "common") == {}
    assert N.to_argv({"finetune_minutes": "5", "model": "rr_cnn"}) == ["--finetune-minutes", "5", "--model", "rr_cnn"]


@pytest.mark.parametrize("text, culprit", [
    ("epochz=3", "'epochz' is not a loso parameter"),
    ("records=100,101", "records is set by the plan"),
    ("base_folds=4", "base_folds is set by the plan"),
    ("epochs 3", "expected key=value pairs"),
    ("epochs=3 epochs=4", "epochs is given twice"),
    ("model='rr_cnn", "cannot read"),
])
def test_bad_options_are_refused_naming_them(text, culprit):
    with pytest.raises(N.NestedError, match=re.escape(culprit)) as exc:
        N.parse_options(text, "candidate 1")
    assert str(exc.value).startswith("candidate 1: ")


def test_every_loso_parameter_is_an_option_or_the_plans():
    import yaml

    params = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["loso"]["parameters"]
    assert set(N.PLANNED) <= set(params)
    for key in params:
        if key in N.PLANNED:
            with pytest.raises(N.NestedError, match=f"{key} is set by the plan"):
                N.parse_options(f"{key}=1", "common")
        else:
            assert N.parse_options(f"{key}=1", "common") == {key: "1"}


def test_candidates_need_two_sets():
    assert N.parse_candidates(" ; sveb_gate=0.99") == [{}, {"sveb_gate": "0.99"}]
    with pytest.raises(N.NestedError, match="at least two option sets"):
        N.parse_candidates("epochs=3")


def test_seeds_are_distinct_whole_numbers_and_the_plans_alone():
    sets = N.parse_candidates(CANDIDATES)
    assert N.parse_seeds(" 42, 7,0123", sets, {}) == ["42", "7", "123"]
    assert N.parse_seeds("", sets, {"seed": "7"}) == []
    for text, common, cands, culprit in [
            ("42,x", {}, sets, "seeds: expected whole numbers >= 0 separated by commas, got ['x']"),
            ("42,-1", {}, sets, "got ['-1']"),
            ("7,07", {}, sets, "lists a seed more than once"),
            ("7,8", {"seed": "7"}, sets, "seed may not be set in common"),
            ("7,8", {}, N.parse_candidates("; seed=3"), "seed may not be set in candidate 1")]:
        with pytest.raises(N.NestedError, match=re.escape(culprit)):
            N.parse_seeds(text, cands, common)


# ---------------------------------------------------------------------------------------------
# the plan on real records: nothing trained


pytest_realdata = pytest.mark.realdata


@pytest.fixture()
def data_env(mitdb_dir, cache_root, monkeypatch):
    monkeypatch.setenv("ECG_DATA_DIR", str(mitdb_dir))
    monkeypatch.setenv("ECG_CACHE_DIR", str(cache_root))
    return mitdb_dir


@pytest_realdata
def test_plan_scores_each_fold_on_runs_without_its_records(data_env):
    sets = N.parse_candidates(CANDIDATES)
    runs, folds = N.make_plan(sets, N.parse_options(COMMON, "common"), "", RECORDS, "2", 2)
    assert folds == {"group1of2": ["100", "103", "201"], "group2of2": ["101", "105"]}
    scoring = [r for r in runs if r.role == "scoring"]
    figures = [r for r in runs if r.role == "figures"]
    assert [(r.fold, r.candidate) for r in scoring] == [("group1of2", 0), ("group1of2", 1),
                                                        ("group2of2", 0), ("group2of2", 1)]
    assert [r.candidate for r in figures] == [0, 1] and runs[-2:] == figures
    all_records = ["100", "101", "103", "105", "201", "202"]
    for r in figures:
        assert r.records == all_records and r.config.base_folds == 0 and r.config.registry_prefix == "ecg"
        assert r.options["records"] == RECORDS
    for r in scoring:
        inside = {subject_of(x) for x in r.records}
        assert inside == {subject_of(x) for x in all_records} - set(folds[r.fold])  # 202 goes with 201
        assert r.config.base_folds == 2 and r.config.registry_prefix == "ecg-scoring"
        assert r.config.train.epochs == 1 and r.config.prepare.finetune_minutes == 5
    assert {r.config.train.kernel_size for r in runs if r.candidate == 1} == {5}
    assert {r.config.train.kernel_size for r in runs if r.candidate == 0} == {3}
    # a run's digest is the one its LOSO run will log: the same records give the same digest
    assert figures[0].digest == figures[1].digest != scoring[0].digest
    assert scoring[0].digest == scoring[1].digest


@pytest_realdata
def test_seeds_plan_every_run_once_per_seed(data_env):
    sets, common = N.parse_candidates(CANDIDATES), N.parse_options(COMMON.replace(" seed=7", ""), "common")
    runs, folds = N.make_plan(sets, common, "", RECORDS, "2", 2, ["7", "8"])
    one, _ = N.make_plan(sets, N.parse_options(COMMON, "common"), "", RECORDS, "2", 2)
    assert len(runs) == 2 * len(one) == 12
    assert folds == {"group1of2": ["100", "103", "201"], "group2of2": ["101", "105"]}
    assert [r.seed for r in runs] == ["7"] * 6 + ["8"] * 6
    for r in runs:
        assert r.config.train.seed == int(r.seed) and r.options["seed"] == r.seed
        assert r.what.endswith(f" seed {r.seed}")
    # under seed 7 the plan is the one that seed=7 in common makes, run for run
    assert [(r.role, r.fold, r.candidate, r.options, r.digest) for r in runs[:6]] == \
        [(r.role, r.fold, r.candidate, r.options, r.digest) for r in one]
    assert [N.comparable(r.config) for r in runs[:6]] == [N.comparable(r.config) for r in one]
    assert all(N.comparable(a.config) != N.comparable(b.config) for a, b in zip(runs[:6], runs[6:]))


@pytest_realdata
@pytest.mark.parametrize("candidates, folds, base_folds, culprit", [
    (CANDIDATES, "subject", 2, "folds=subject would need a scoring run per subject"),
    (CANDIDATES, "9", 2, "folds=9: at most 8 folds"),
    (CANDIDATES, "2", 3, "holds 2 subject(s); a LOSO run needs 2 and scoring_base_folds=3 at most 2"),
    ("; epochs=-1", "2", 2, "candidate 1 figures: epochs"),
    ("; kernel_size=40", "2", 2, "candidate 1 figures: kernel_size"),
    ("; label_scheme=raw sveb_gate=0.5", "2", 2, "candidate 1 figures: sveb_gate=0.5 needs label_scheme=aami"),
    ("epochs=3 augment=0.1; epochs=5; augment=0.1 epochs=3", "2", 2, "candidate 2 (augment=0.1 epochs=3) runs what "
     "candidate 0 runs (epochs=3 augment=0.1)"),
    ("; epochs=1 kernel_size=3", "2", 2, "candidate 1 (epochs=1 kernel_size=3) runs what candidate 0 runs"),
])
def test_bad_plans_are_refused_before_any_run(candidates, folds, base_folds, culprit, data_env):
    with pytest.raises(N.NestedError, match=re.escape(culprit)):
        N.make_plan(N.parse_candidates(candidates), N.parse_options(COMMON, "common"), "", RECORDS, folds, base_folds)


@pytest_realdata
def test_halves_score_each_half_on_runs_over_the_other(data_env):
    runs, folds = N.make_plan(N.parse_candidates(CANDIDATES), {}, "", RECORDS, "halves", 0)
    assert folds == {"half1": ["101", "201"], "half2": ["100", "103", "105"]}
    assert {(r.fold, tuple(r.records)) for r in runs if r.role == "scoring"} == {
        ("half1", ("100", "103", "105")), ("half2", ("101", "201", "202"))}
    with pytest.raises(SelectError, match=r"folds=halves: .* make only 1 fold"):  # records of half2 only
        N.make_plan(N.parse_candidates(CANDIDATES), {}, "", "100,103,105", "halves", 0)


@pytest_realdata
def test_bad_input_exits_2_and_writes_nothing(tracking_uri, data_env, monkeypatch, capsys):
    argv = ["--candidates", "; model=bogus", "--common", COMMON, "--records", RECORDS, "--folds", "2",
            "--scoring-base-folds", "2"]
    code, err = run_script_in_process(SCRIPT, argv, monkeypatch, capsys)
    assert code == 2 and "candidate 1 figures" in err and "bogus" in err, err
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    code, err = run_script_in_process(SCRIPT, [*argv[:1], "; epochs=2", *argv[2:], "--reuse", "sometimes"],
                                      monkeypatch, capsys)
    assert code == 2 and "reuse must be one of ['experiment', 'all', 'none']" in err, err
    code, err = run_script_in_process(SCRIPT, [*argv[:1], "; epochs=2", *argv[2:], "--min-share", "90"],
                                      monkeypatch, capsys)
    assert code == 2 and "min_share must be a share from 0 to 1 (0.9 for 90 %), got '90'" in err, err
    with pytest.raises(N.NestedError, match="min_share must be a share of resamples from 0 to 1"):
        N.nested("; epochs=2", common=COMMON, records=RECORDS, folds="2", scoring_base_folds=2, min_share=-0.5)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


# ---------------------------------------------------------------------------------------------
# reuse: a finished run counts only at the thread count its folds ran with


def _finished_loso_run(client: MlflowClient, experiment_id: str, executor: str, threads: int,
                       tag: int | None) -> str:
    """A FINISHED LOSO run in the store with the default options, logged as ``mlflow run`` logs them
    (``executor`` and ``threads`` as given), and the ``ecg.threads`` tag where ``tag`` is given."""
    params = LosoConfig(execution=ExecConfig(executor=executor, threads=threads)).params()
    tags = {"ecg.role": "loso", "dataset_digest": "d"} | ({THREADS_TAG: str(tag)} if tag is not None else {})
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id)
    return run_id


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: every rule gives one thread")
@pytest.mark.parametrize("planned_executor, executor, threads, tag, reused", [
    # planned under auto, threads=0: cores / 2 per fold
    ("auto", "auto", 0, None, True),  # made before the tag: auto's rule on this machine
    ("auto", "local", 0, None, True),
    ("auto", "sequential", 0, None, False),  # every core in one process
    ("auto", "sequential", "share", None, True),  # the same count, given
    ("auto", "sequential", 0, "share", True),  # the tag says what the folds ran with
    ("auto", "auto", 0, "cores", False),  # e.g. made on a machine with twice the cores
    # planned one after another, threads=0: every core
    ("sequential", "sequential", 0, None, True),
    ("sequential", "auto", 0, None, False),
    ("sequential", "auto", "cores", None, True),
])
def test_reuse_counts_the_threads_the_folds_ran_with(tracking_uri, planned_executor, executor, threads, tag, reused):
    cores = os.cpu_count()
    count = {"share": cores // 2, "cores": cores, 0: 0, None: None}
    client = MlflowClient()
    experiment_id = client.create_experiment("threads")
    run_id = _finished_loso_run(client, experiment_id, executor, count[threads], count[tag])
    planned = N.PlannedRun(0, "figures", "", {}, config=LosoConfig(execution=ExecConfig(executor=planned_executor)),
                           digest="d")
    found = N.finished_loso_runs(client, [experiment_id])
    assert [r.info.run_id for r in found] == [run_id]
    assert N.find_finished(found, planned) == (run_id if reused else None)
    # nothing else stands between it and reuse: given the count it ran with, it is reused
    same = N.PlannedRun(0, "figures", "", {}, digest="d", config=LosoConfig(
        execution=ExecConfig(executor=planned_executor, threads=ran_threads(found[0]))))
    assert N.find_finished(found, same) == run_id


def test_base_models_are_shared_at_equal_thread_counts_however_given():
    cores = os.cpu_count() or 1

    def key(**execution):
        return N.base_key(N.PlannedRun(0, "figures", "", {}, digest="d",
                                       config=LosoConfig(execution=ExecConfig(**execution))))

    assert key(executor="auto") == key(executor="local") == key(executor="sequential", threads=max(1, cores // 2))
    assert key(executor="sequential") == key(executor="auto", threads=cores)
    if cores >= 2:
        assert key(executor="auto") != key(executor="sequential")


# ---------------------------------------------------------------------------------------------
# the whole command: killed half-way, run again, run a third time


def _loso_runs(client: MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], "tags.`ecg.role` = 'loso'")


def _nested_runs(client: MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], "tags.`ecg.nested` = 'true'", order_by=["attributes.start_time ASC"])


def _estimate(client: MlflowClient, run_id: str) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, "estimate.json")).read_text())


def _interrupt_at(args: list[str], env: dict[str, str], out: Path, nth: int, interrupt) -> tuple:
    """Start nested, wait for its ``nth`` LOSO run to start, give it 3 s, then call
    ``interrupt(loso pid, nested pid)``; returns (finished process, [(run id, pid), ...] started, output)."""
    with open(out, "w") as fo:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=out.parent, stdout=fo,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400
        while len(started := re.findall(r"run ([0-9a-f]{32}) \(pid (\d+)", out.read_text())) < nth:
            assert proc.poll() is None, out.read_text()[-4000:]
            assert time.monotonic() < deadline, f"timed out waiting for LOSO run {nth}"
            time.sleep(0.2)
        time.sleep(3)  # let it get going
        interrupt(int(started[nth - 1][1]), proc.pid)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, [(run, int(pid)) for run, pid in started], out.read_text()


@pytest.mark.slow
@pytest_realdata
def test_nested_runs_the_plan_resumes_by_reuse_and_matches_select(tmp_path, mitdb_dir, cache_root):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = entry_env(uri, mitdb_dir, cache_root, MLFLOW_EXPERIMENT_NAME="nested-test")
    args = ["--candidates", E2E_CANDIDATES, "--common", COMMON, "--records", E2E_RECORDS, "--folds", "2",
            "--scoring-base-folds", "2"]

    # 1. its second LOSO run killed: that run and the nested run end FAILED, nothing chosen, exit 1
    proc, started, text = _interrupt_at(args, env, tmp_path / "first.txt", 2, lambda pid, _: os.kill(pid, signal.SIGKILL))
    done_run, killed_run = started[0][0], started[1][0]
    assert proc.returncode == 1, text[-4000:]
    assert f"candidate 1 scoring without group1of2: LOSO run {killed_run} exited with status -9" in text
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("nested-test").experiment_id
    (first,) = _nested_runs(client, exp)
    assert first.info.status == "FAILED"
    assert client.list_artifacts(first.info.run_id) == []  # no half-written choice
    assert client.get_run(killed_run).info.status == "FAILED"
    finished = {r.info.run_id for r in _loso_runs(client, exp) if r.info.status == "FINISHED"}
    assert finished == {done_run}
    assert client.get_run(done_run).data.tags["mlflow.parentRunId"] == first.info.run_id

    # 1b. SIGTERM to nested itself during its first new LOSO run: that run is stopped the same way
    # (its process ends, its run FAILED), the nested run ends FAILED, exit 130
    proc, started, text = _interrupt_at(args, env, tmp_path / "second.txt", 1,
                                        lambda _, nested_pid: os.kill(nested_pid, signal.SIGTERM))
    assert proc.returncode == 130, text[-4000:]
    assert "1 reused, 5 to run" in text and "error: interrupted" in text
    stopped_run, stopped_pid = started[0]
    assert not Path(f"/proc/{stopped_pid}").exists()
    assert client.get_run(stopped_run).info.status == "FAILED"
    assert _nested_runs(client, exp)[1].info.status == "FAILED"
    assert {r.info.run_id for r in _loso_runs(client, exp) if r.info.status == "FINISHED"} == finished

    # 1c. SIGKILL to nested itself: it cleans up nothing, but its LOSO run sees it gone and stops as on
    # SIGTERM (its process ends, its run FAILED); the nested run stays RUNNING, as after any kill
    proc, started, text = _interrupt_at(args, env, tmp_path / "third.txt", 1,
                                        lambda _, nested_pid: os.kill(nested_pid, signal.SIGKILL))
    assert proc.returncode == -signal.SIGKILL, text[-4000:]
    orphan_run, orphan_pid = started[0]
    deadline = time.monotonic() + 120
    while Path(f"/proc/{orphan_pid}").exists() or client.get_run(orphan_run).info.status == "RUNNING":
        assert time.monotonic() < deadline, "the LOSO run of a killed nested did not stop"
        time.sleep(0.5)
    assert client.get_run(orphan_run).info.status == "FAILED"
    assert _nested_runs(client, exp)[2].info.status == "RUNNING"

    # 2. the same command: the finished run is reused, the other five are made
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "6 LOSO runs, 1 reused, 5 to run" in proc.stdout
    # the nested run killed in 1c, left RUNNING, is found with its process gone and ended
    killed = _nested_runs(client, exp)[2]
    assert killed.info.status == "KILLED"
    assert f"run {killed.info.run_name} ({killed.info.run_id}) was left RUNNING by process" in proc.stdout
    assert f"candidate 0 scoring without group1of2: reusing run {done_run}" in proc.stdout
    second = _nested_runs(client, exp)[3]
    assert second.info.status == "FINISHED" and second.data.tags["ecg.role"] == "select"
    plan = pd.read_csv(client.download_artifacts(second.info.run_id, "nested_plan.csv"), dtype={"records": str})
    assert len(plan) == 6 and plan.reused.tolist() == [True] + [False] * 5
    loso = {r.info.run_id: r for r in _loso_runs(client, exp)}
    for row in plan.itertuples():
        run = loso[row.run_id]
        assert run.info.status == "FINISHED"
        assert run.data.params["base_folds"] == ("2" if row.role == "scoring" else "0")
        assert run.data.params["finetune_epochs"] == ("1" if row.candidate == 1 else "2")
        if not row.reused:
            assert run.data.tags["mlflow.parentRunId"] == second.info.run_id
        # candidate 1 differs in a fine-tune option only: it fine-tunes candidate 0's base models
        bases = client.search_runs([exp], f"tags.mlflow.parentRunId = '{row.run_id}' and tags.`ecg.role` = 'base'")
        twin = plan[(plan.role == row.role) & (plan.fold.fillna("") == ("" if pd.isna(row.fold) else row.fold))
                    & (plan.candidate == 0)].run_id.item()
        if row.candidate == 1:
            assert run.data.params["base_run_id"] == twin == row.base_models_of and bases == []
        else:
            assert run.data.params["base_run_id"] == "" and len(bases) == (2 if row.role == "scoring" else 6)
    choices = pd.read_csv(client.download_artifacts(second.info.run_id, "choices.csv"))
    assert set(choices.scored_without_fold) == {"yes"}  # every fold scored on base models blind to it
    # the choice is select's on the same runs, in the same order
    figures = plan[plan.role == "figures"].sort_values("candidate").run_id.tolist()
    scoring = ["+".join(plan[(plan.role == "scoring") & (plan.candidate == i)].run_id) for i in (0, 1)]
    mlflow.set_tracking_uri(uri)
    try:
        again = select(",".join(figures), folds="2", n_boot=10_000, seed=0, scored_on=",".join(scoring), echo=False)
    finally:
        mlflow.set_tracking_uri(None)
    estimate = _estimate(client, second.info.run_id)
    assert {k: _estimate(client, again.run_id)[k] for k in ("estimate", "counts")} == \
        {k: estimate[k] for k in ("estimate", "counts")}
    # scoring runs register under their own prefix; the experiment's names come from the figures runs
    names = {m.name for m in client.search_registered_models()}
    assert "ecg-transfer-118" in names and "ecg-scoring-transfer-118" in names
    newest = client.get_model_version_by_alias("ecg-transfer-118", "newest")
    assert client.get_run(newest.run_id).data.tags["mlflow.parentRunId"] == figures[1]

    # 3. through `mlflow run`: every run reused, nothing trained, the same estimate; a share clause of
    # 1 % reaches select and, as a candidate higher on the data is higher in far more resamples than
    # that, leaves the choice as it was
    n_loso = len(_loso_runs(client, exp))
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "nested", "--env-manager", "local",
           "--experiment-name", "nested-test", "-P", f"candidates={E2E_CANDIDATES}", "-P", f"common={COMMON}",
           "-P", f"records={E2E_RECORDS}", "-P", "folds=2", "-P", "scoring_base_folds=2", "-P", "min_share=0.01"]
    env.pop("MLFLOW_EXPERIMENT_NAME")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "6 LOSO runs, 6 reused, 0 to run" in proc.stdout
    assert len(_loso_runs(client, exp)) == n_loso
    third = _nested_runs(client, exp)[4]
    with_clause = _estimate(client, third.info.run_id)
    assert with_clause.pop("min_share") == 0.01 and "in at least 1 % of paired resamples" in with_clause.pop("rule")
    assert with_clause == {k: v for k, v in estimate.items() if k not in ("min_share", "rule")}

    # 4. under seeds 7 and 8: the seed-7 runs are the ones above (reused), the seed-8 ones are made
    # (candidate 1 again on candidate 0's base models), and a candidate must score higher under both
    unseeded = COMMON.replace(" seed=7", "")
    args = ["--candidates", E2E_CANDIDATES, "--common", unseeded, "--records", E2E_RECORDS, "--folds", "2",
            "--scoring-base-folds", "2", "--seeds", "7,8"]
    env["MLFLOW_EXPERIMENT_NAME"] = "nested-test"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "x 2 seeds (7, 8): 12 LOSO runs, 6 reused, 6 to run" in proc.stdout
    fourth = _nested_runs(client, exp)[5]
    plan = pd.read_csv(client.download_artifacts(fourth.info.run_id, "nested_plan.csv"), dtype={"seed": str})
    assert plan.seed.tolist() == ["7"] * 6 + ["8"] * 6 and plan.reused.tolist() == [True] * 6 + [False] * 6
    for row in plan[(plan.seed == "8") & (plan.candidate == 1)].itertuples():
        twin = plan[(plan.seed == "8") & (plan.candidate == 0) & (plan.role == row.role)
                    & (plan.fold.fillna("") == ("" if pd.isna(row.fold) else row.fold))].run_id.item()
        assert row.base_models_of == twin
        assert client.get_run(row.run_id).data.params["seed"] == "8"
    doc = _estimate(client, fourth.info.run_id)
    assert doc["seeds"] == ["7", "8"] and set(doc["estimate_per_seed"]) == {"7", "8"}
    choices = pd.read_csv(client.download_artifacts(fourth.info.run_id, "choices.csv"))
    for c in choices.itertuples():
        scores = np.array([[getattr(c, f"score_{i}_{k}") for k in (0, 1)] for i in (0, 1)])
        assert c.chosen == int(choose(scores))

    def replicas(role: str, i: int) -> str:
        return "/".join("+".join(plan[(plan.role == role) & (plan.candidate == i) & (plan.seed == sd)].run_id)
                        for sd in ("7", "8"))

    mlflow.set_tracking_uri(uri)
    try:
        again = select(f"{replicas('figures', 0)},{replicas('figures', 1)}", folds="2", n_boot=10_000, seed=0,
                       scored_on=f"{replicas('scoring', 0)},{replicas('scoring', 1)}", echo=False)
    finally:
        mlflow.set_tracking_uri(None)
    assert {k: _estimate(client, again.run_id)[k] for k in ("estimate", "counts", "estimate_per_seed")} == \
        {k: doc[k] for k in ("estimate", "counts", "estimate_per_seed")}
