"""Nested cross-validation over option sets in one command: make the LOSO runs ``select`` needs, then choose.

:mod:`ecg_mlflow.selection` chooses among finished LOSO runs; an honest choice needs, beside each
candidate's run over all records (its figures), runs blind to each fold (its scores), one per
candidate and fold. Made by hand that is ``(k + 1) x`` candidates ``mlflow run`` commands and a
long ``scored_on``. Here one command plans them, reuses every finished run of the same options in
the experiment (so a second call, or one after an interruption, trains only what is missing),
runs the rest as ordinary LOSO runs nested under this run, and ends with the ``select`` choice.

For ``c`` candidates and ``k`` folds (``halves`` or a number 2..8) the plan holds, per candidate:

- ``figures``: a LOSO run over ``records`` with a base model per held-out subject (the estimate's
  counts come from these runs);
- ``scoring`` for each fold: a LOSO run over the records outside the fold (``-P records=...``, both
  records of subject 201 together) with ``scoring_base_folds`` groups sharing a base model, so no
  model that scores a fold's choice has read any of the fold's beats.

A candidate is a set of ``loso`` parameters, ``key=value`` separated by spaces (``""`` = the
defaults); ``common`` holds the parameters every run shares (e.g. ``finetune_minutes=5
executor=local workers=2 threads=1``). ``records``, ``holdout``, ``base_folds``, ``evaluate_on``,
``resume_run_id``, ``base_run_id`` and ``data_dir`` are this module's to set and refused there.
Scoring runs register their models under ``<registry_prefix>-scoring``, so the ``newest`` alias of
the experiment's own names keeps pointing at runs over all records. Runs of the plan that differ in
fine-tune options only (``sveb_gate``, ``finetune_epochs``, ...: :data:`ecg_mlflow.training.FINETUNE_FIELDS`)
share base models: the first trains them, the others take them (``base_run_id``), as a seed would
train the same ones again.

With ``seeds`` (``'42,7,123'``) the whole plan runs once per seed, and the choice takes each
candidate's runs under the seeds as replicas: a candidate replaces the first only if it scores
higher under each seed (:func:`ecg_mlflow.selection.choose`).

A run is reused (``reuse``: ``experiment``, the default, looks in this run's experiment; ``all`` in
every experiment; ``none`` trains everything) when it is a FINISHED LOSO run whose logged
parameters, read back as a :class:`~ecg_mlflow.loso.LosoConfig`, equal the planned run's (the
registry prefix and machine settings aside; the TensorFlow thread count its folds ran with
included, since a seed repeats only at equal counts: the run's ``ecg.threads`` tag against the
count the planned run's ``threads`` comes to under its executor, so ``threads=0`` under
``sequential`` (every core) is not ``threads=0`` under ``auto`` (cores / workers))
and whose dataset digest (records, window and its offset, label scheme, fine-tune minutes, signal
filter, format and every record file's checksum) is the planned one's. Reused runs stay where
they are; ``nested_plan.csv`` lists every run of the plan and whether it was reused.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from ecg_mlflow import cli, executors, lifetime, tracking
from ecg_mlflow.experiment import LosoConfig
from ecg_mlflow.loso import preflight
from ecg_mlflow.resume import (FAILED_TAG, base_settings, claim, config_of_run, end_orphaned_runs, ran_threads,
                               run_settings)
from ecg_mlflow.selection import (FEW_FOLDS, SelectError, SelectResult, blind_records, check_min_share, select,
                                  subject_folds)
from ecg_mlflow.splits import subject_of
from ecg_mlflow.tracking import logged_value

PROJECT_DIR = Path(__file__).resolve().parents[1]
# Parameters the plan sets for each run; a candidate or `common` may not.
PLANNED = ("data_dir", "records", "holdout", "base_folds", "evaluate_on", "resume_run_id", "base_run_id")
REUSE = ("experiment", "all", "none")  # where finished runs are looked for
NESTED_TAG = "ecg.nested"  # on each LOSO run this module started: "<nested run id> <role> <candidate> <fold>"


class NestedError(SelectError):
    """Bad input to a nested choice; the message names the culprit."""


class PlanRunFailed(RuntimeError):
    """A LOSO run of the plan failed; the message names it and its candidate and fold."""


class _Refusing(argparse.ArgumentParser):
    """An argument parser that raises instead of printing usage and exiting."""

    def error(self, message: str):
        raise NestedError(message)


@functools.cache
def _loso_keys() -> dict[str, str]:
    """``loso`` parameter name -> its command-line flag (``finetune_minutes`` -> ``--finetune-minutes``)."""
    return {k: "--" + k.replace("_", "-") for k in vars(cli.loso_parser().parse_args([]))}


def parse_options(text: str, what: str) -> dict[str, str]:
    """``'epochs=10 augment=0.1'`` -> ``{'epochs': '10', 'augment': '0.1'}`` (shell quoting allowed).
    Unknown or planned parameters, a pair without ``=`` or a parameter given twice are refused
    (:class:`NestedError` naming ``what`` and the culprit)."""
    keys = _loso_keys()
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise NestedError(f"{what}: cannot read {text!r} ({exc})") from None
    out: dict[str, str] = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise NestedError(f"{what}: expected key=value pairs separated by spaces, got {token!r}")
        if key in PLANNED:
            raise NestedError(f"{what}: {key} is set by the plan for each run (nested's own parameters: data_dir, "
                              f"records, folds, scoring_base_folds), not by candidates or common")
        if key not in keys:
            raise NestedError(f"{what}: {key!r} is not a loso parameter; expected one of "
                              f"{sorted(k for k in keys if k not in PLANNED)}")
        if key in out:
            raise NestedError(f"{what}: {key} is given twice")
        out[key] = value
    return out


def parse_candidates(text: str) -> list[dict[str, str]]:
    """Option sets separated by ``;`` (an empty one = the defaults); at least two."""
    sets = [parse_options(part, f"candidate {i}") for i, part in enumerate(text.split(";"))]
    if len(sets) < 2:
        raise NestedError(f"candidates: a choice needs at least two option sets separated by ';', got {text!r}")
    return sets


def parse_seeds(text: str, candidates: list[dict[str, str]], common: dict[str, str]) -> list[str]:
    """``'42,7,123'`` -> ``['42', '7', '123']``: the seeds every candidate runs under ('' = none, each
    run takes the ``seed`` of its options). Distinct whole numbers; then no candidate nor ``common``
    may set ``seed`` itself."""
    if not str(text).strip():
        return []
    seeds = [t.strip() for t in str(text).split(",")]
    bad = [t for t in seeds if not t.isdigit()]
    if bad:
        raise NestedError(f"seeds: expected whole numbers >= 0 separated by commas, got {bad} in {text!r}")
    seeds = [str(int(t)) for t in seeds]
    if len(set(seeds)) < len(seeds):
        raise NestedError(f"seeds: {text!r} lists a seed more than once")
    setting = ["common"] * ("seed" in common) + [f"candidate {i}" for i, c in enumerate(candidates) if "seed" in c]
    if setting:
        raise NestedError(f"seeds={text} runs every candidate under each seed, so seed may not be set in {setting[0]}")
    return seeds


def _label(options: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items()) or "(defaults)"


def to_argv(options: dict[str, str]) -> list[str]:
    """The ``entrypoints/loso.py`` arguments of a parameter dict."""
    keys = _loso_keys()
    return [x for k, v in options.items() for x in (keys[k], str(v))]


@dataclass
class PlannedRun:
    """One LOSO run of the plan. ``fold`` is '' for a figures run."""

    candidate: int
    role: str
    fold: str
    options: dict[str, str]  # the loso parameters it runs with
    seed: str = ""  # one of nested's ``seeds`` ('' without them)
    config: LosoConfig | None = None  # filled in by the checks
    digest: str = ""
    records: list[str] = field(default_factory=list)
    run_id: str | None = None
    reused: bool = False

    @property
    def what(self) -> str:
        return (f"candidate {self.candidate} {self.role}" + (f" without {self.fold}" if self.fold else "")
                + (f" seed {self.seed}" if self.seed else ""))


def comparable(cfg: LosoConfig, threads: int | None = None) -> dict[str, object]:
    """What decides a LOSO run's figures; records are in the dataset digest, which is compared apart,
    and base models taken from another run (``base_run_id``) are the ones it would have trained.
    ``threads``: the thread count its folds ran with (a finished run's :func:`ran_threads`); by
    default the count ``cfg`` gives them (:func:`executors.fold_threads`), since a seed repeats
    only at equal counts, and ``threads=0`` means another count under each executor."""
    s = run_settings(cfg) | {"threads": executors.fold_threads(cfg.execution) if threads is None else threads}
    return {k: v for k, v in s.items() if k not in ("registry_prefix", "records", "base_run_id")}


def base_key(r: PlannedRun) -> tuple:
    """What decides a planned run's base models: runs with equal keys can share them (they differ
    in fine-tune options only). The thread count is in it: a seed repeats only at equal counts."""
    return r.digest, executors.fold_threads(r.config.execution), tuple(sorted(base_settings(r.config).items()))


def base_source(client: MlflowClient, run_id: str) -> str:
    """The run whose base models a finished LOSO run used: itself, or the run it took them from."""
    return logged_value(client.get_run(run_id).data.params.get("base_run_id", "")) or run_id


def make_plan(candidates: list[dict[str, str]], common: dict[str, str], data_dir: str, records: str, folds: str,
              scoring_base_folds: int, seeds: list[str] | None = None) -> tuple[list[PlannedRun], dict[str, list[str]]]:
    """Every LOSO run of the plan (scoring runs fold by fold, then the figures runs; with ``seeds``
    (:func:`parse_seeds`) all of them once per seed, seed by seed) and the folds.
    Each planned run passes the checks a LOSO run makes before it trains (parameters, record files,
    subjects, thresholds; :func:`ecg_mlflow.loso.preflight`), and its dataset is prepared (cached
    for the run), before anything is trained or logged. :class:`NestedError` names the culprit."""
    if seeds:
        plans = [_plan(candidates, {**common, "seed": sd}, data_dir, records, folds, scoring_base_folds, sd)
                 for sd in seeds]
        return [r for runs, _ in plans for r in runs], plans[0][1]
    return _plan(candidates, common, data_dir, records, folds, scoring_base_folds, "")


def _plan(candidates: list[dict[str, str]], common: dict[str, str], data_dir: str, records: str, folds: str,
          scoring_base_folds: int, seed: str) -> tuple[list[PlannedRun], dict[str, list[str]]]:
    """:func:`make_plan` under one seed (``''``: the options' own)."""
    if str(folds).strip() == "subject":
        raise NestedError(f"folds=subject would need a scoring run per subject and candidate; use halves or a "
                          f"number of groups from 2 to {FEW_FOLDS}")
    if str(folds).strip().isdigit() and int(folds) > FEW_FOLDS:
        raise NestedError(f"folds={folds}: at most {FEW_FOLDS} folds (each costs a scoring run per candidate)")
    if isinstance(scoring_base_folds, bool) or not isinstance(scoring_base_folds, int) or scoring_base_folds < 0 \
            or scoring_base_folds == 1:
        raise NestedError(f"scoring_base_folds must be 0 (a base model per subject) or a whole number >= 2, "
                          f"got {scoring_base_folds!r}")
    place = {"data_dir": data_dir} if data_dir else {}
    runs = [PlannedRun(i, "figures", "", {**common, **c, **place, "records": records}, seed)
            for i, c in enumerate(candidates)]
    for r in runs:
        _check(r)
    for r in runs:
        same = [q.candidate for q in runs[:r.candidate] if comparable(q.config) == comparable(r.config)]
        if same:
            raise NestedError(f"candidate {r.candidate} ({_label(candidates[r.candidate])}) runs what candidate "
                              f"{same[0]} runs ({_label(candidates[same[0]])}); give each candidate other options")
    kept = runs[0].records
    for r in runs[1:]:
        if r.records != kept:
            raise NestedError(f"candidate {r.candidate} keeps records {r.records}, candidate 0 keeps {kept} "
                              "(include_paced or label_scheme differ); a choice compares candidates on the same patients")
    plan_folds = subject_folds(sorted({subject_of(r) for r in kept}), folds)
    blind = blind_records(kept, plan_folds)
    fewest = min(len({subject_of(r) for r in recs}) for recs in blind.values())
    if fewest < 2 or scoring_base_folds > fewest:
        raise NestedError(f"folds={folds}: the smallest scoring run (the records outside a fold) holds {fewest} "
                          f"subject(s); a LOSO run needs 2" + ("" if fewest < 2 else
                          f" and scoring_base_folds={scoring_base_folds} at most {fewest} (or 0)"))
    scoring = []
    for fold, recs in blind.items():
        for r in runs:
            opts = {**r.options, "records": ",".join(recs), "base_folds": str(scoring_base_folds),
                    "registry_prefix": r.config.registry_prefix + "-scoring"}
            scoring.append(_check(PlannedRun(r.candidate, "scoring", fold, opts, seed)))
    return scoring + runs, plan_folds


def _check(r: PlannedRun) -> PlannedRun:
    """Fill in a planned run's configuration, dataset digest and records, checked as a LOSO run checks them."""
    try:
        a = cli.loso_parser(parser_class=_Refusing).parse_args(to_argv(r.options))
        r.config = cli.loso_config(a).validated()
        ds, _ = preflight(r.config)
    except (NestedError, ValueError) as exc:  # DataError is a ValueError
        raise NestedError(f"{r.what}: {exc}") from None
    r.digest, r.records = ds.digest, list(ds.records)
    return r


def finished_loso_runs(client: MlflowClient, experiment_ids: list[str]) -> list:
    """The FINISHED LOSO runs of these experiments, newest first: what :func:`find_finished` looks in."""
    if not experiment_ids:
        return []
    return client.search_runs(experiment_ids, "tags.`ecg.role` = 'loso' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5000)


def find_finished(found: list, planned: PlannedRun) -> str | None:
    """The newest of ``found`` (finished LOSO runs, newest first) that ran the planned run's
    configuration on its dataset (see the module docstring), or ``None``."""
    want = comparable(planned.config)
    for run in found:
        if run.data.tags.get("dataset_digest") != planned.digest or FAILED_TAG in run.data.tags:
            continue
        try:
            have = comparable(config_of_run(run.data.params, planned.config), ran_threads(run))
        except ValueError:  # a parameter that cannot be read back: not this configuration
            continue
        if have == want:
            return run.info.run_id
    return None


def launch(planned: PlannedRun, parent_id: str, experiment_id: str) -> str:
    """Run ``entrypoints/loso.py`` for a planned run as a child process (as ``mlflow run`` would,
    in a run created here under the nested run); returns its run id. A run that fails is ended
    FAILED and raises :class:`PlanRunFailed` naming it."""
    client = MlflowClient()
    tag = f"{parent_id} {planned.role} {planned.candidate} {planned.fold or '-'}"
    run = client.create_run(experiment_id, run_name="loso", tags={"mlflow.parentRunId": parent_id, NESTED_TAG: tag})
    run_id = run.info.run_id
    # child_env: the LOSO process stops (and cleans up) if this one is killed without the chance to stop it.
    env = lifetime.child_env({**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": experiment_id,
                              "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()})
    cmd = [sys.executable, str(PROJECT_DIR / "entrypoints" / "loso.py"), *to_argv(planned.options)]
    proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_DIR)
    shared = f", base models of run {planned.options['base_run_id']}" if "base_run_id" in planned.options else ""
    print(f"nested: {planned.what}: run {run_id} (pid {proc.pid}{shared}): {shlex.join(cmd[1:])}", flush=True)
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM here: the LOSO run stops the same way (it cleans up), then this
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _end_if_running(client, run_id)
        raise
    if code != 0:
        _end_if_running(client, run_id)
        raise PlanRunFailed(f"{planned.what}: LOSO run {run_id} exited with status {code} (its output above says "
                          "why); runs already finished are reused when the same nested command runs again")
    return run_id


def _end_if_running(client: MlflowClient, run_id: str) -> None:
    """A LOSO run whose process ended without ending it (refused before it began, or killed) ends FAILED."""
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")


def plan_table(runs: list[PlannedRun], candidates: list[dict[str, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"candidate": r.candidate, "options": _label(candidates[r.candidate]), "seed": r.seed,
                          "role": r.role, "fold": r.fold, "records": r.options["records"],
                          "base_folds": r.config.base_folds,
                          "run_id": r.run_id or "", "reused": r.reused,
                          "base_models_of": r.options.get("base_run_id", "")} for r in runs])


def nested(candidates: str, common: str = "", data_dir: str = "", records: str = "all", folds: str = "4",
           scoring_base_folds: int = 4, reuse: str = "experiment", n_boot: int = 10_000, seed: int = 0,
           seeds: str = "", min_share: float = 0.0) -> SelectResult:
    """Plan, reuse or run, and choose (see the module docstring). ``seed`` seeds the bootstrap;
    ``seeds`` (e.g. ``'42,7,123'``) runs the whole plan under each seed, and a candidate then
    replaces the first only if it scores higher under each (:func:`ecg_mlflow.selection.choose`);
    ``min_share`` > 0 asks it also to be higher in that share of paired subject resamples.
    Bad input raises :class:`NestedError` before any run is written; returns the ``select``
    result, logged in the active run (the one ``mlflow run`` made) or a new one."""
    if reuse not in REUSE:
        raise NestedError(f"reuse must be one of {list(REUSE)}, got {reuse!r}")
    check_min_share(min_share, NestedError)
    sets = parse_candidates(candidates)
    shared = parse_options(common, "common")
    run_seeds = parse_seeds(seeds, sets, shared)
    runs, plan_folds = make_plan(sets, shared, data_dir, records, folds, scoring_base_folds, run_seeds)
    tracking.check_tracking_server()
    for r in runs:
        executors.check_store_for_executor(mlflow.get_tracking_uri(), r.config.execution)
    client = MlflowClient()
    with tracking.run_to_log_into("0", "nested") as active:
        parent_id, experiment_id = active.info.run_id, active.info.experiment_id
        logged = client.get_run(parent_id).data.params
        params = {"candidates": candidates, "common": common, "data_dir": data_dir, "records": records,
                  "folds": folds, "scoring_base_folds": scoring_base_folds, "reuse": reuse, "seeds": seeds,
                  "min_share": min_share}
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        mlflow.set_tag(NESTED_TAG, "true")
        claim(parent_id)
        end_orphaned_runs(client, experiment_id, skip=(parent_id,))
        where = {"experiment": [experiment_id], "none": [],
                 "all": [e.experiment_id for e in client.search_experiments()]}[reuse]
        found = finished_loso_runs(client, where)  # one search for the whole plan
        for r in runs:
            r.run_id = find_finished(found, r)
            r.reused = r.run_id is not None
        todo = [r for r in runs if not r.reused]
        print(f"nested: {len(sets)} candidates x {len(plan_folds)} folds ({', '.join(plan_folds)})"
              + (f" x {len(run_seeds)} seeds ({', '.join(run_seeds)})" if run_seeds else "") + ": "
              f"{len(runs)} LOSO runs, {len(runs) - len(todo)} reused, {len(todo)} to run; nested run {parent_id}",
              flush=True)
        for r in runs:
            if r.reused:
                print(f"nested: {r.what}: reusing run {r.run_id}", flush=True)
        # Runs that differ in fine-tune options only share base models: the first one trains them.
        bases = {base_key(r): base_source(client, r.run_id) for r in reversed(runs) if r.reused}
        for r in todo:
            source = bases.get(base_key(r))
            if source:
                r.options["base_run_id"] = source
            r.run_id = launch(r, parent_id, experiment_id)
            bases.setdefault(base_key(r), source or r.run_id)
        order = list(dict.fromkeys(r.seed for r in runs))

        def entries(role: str) -> str:
            """select's form: per candidate its runs of ``role`` joined by "+", one part per seed joined by "/"."""
            return ",".join("/".join("+".join(r.run_id for r in runs if (r.role, r.candidate, r.seed) == (role, i, sd))
                                     for sd in order) for i in range(len(sets)))

        result = select(entries("figures"), folds=folds, n_boot=n_boot, seed=seed, scored_on=entries("scoring"),
                        min_share=min_share)
        mlflow.log_text(plan_table(runs, sets).to_csv(index=False), "nested_plan.csv")
    return result
