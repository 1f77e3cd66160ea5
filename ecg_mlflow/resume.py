"""A LOSO run read back from the store: the configuration it ran with, what a resume of it keeps
and runs again, and the base models another run may take from it.

:func:`config_of_run` turns a run's logged parameters back into a :class:`LosoConfig`, which
``resume_run_id``, ``base_run_id``, ``nested`` and ``blend`` all need; :func:`resume_plan` reads
the finished variant runs back (their metrics and confusion matrices) and says what each subject
still has to run; :func:`reused_bases` finds the finished base models of a ``base_run_id``. The
tags a LOSO parent run carries about how it ran live here too, beside the code that reads them.

A run killed outside ``mlflow run`` (SIGKILL, the out-of-memory killer) cannot end itself and stays
RUNNING. Each ``loso`` and ``nested`` run is tagged with the process that runs it
(:data:`PROCESS_TAG`): :func:`check_not_running` refuses to resume a run whose process still runs
here, and :func:`end_orphaned_runs` marks KILLED the runs whose process here is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
from dataclasses import asdict, fields, replace
from urllib.parse import urlsplit, urlunsplit

import numpy as np

import mlflow
from mlflow import MlflowClient

from ecg_mlflow import cli, executors, lifetime, tracking
from ecg_mlflow.dataset import (
    BeatDataset, PrepareConfig, include_paced_from_param, window_from_param, window_offset_from_param,
)
from ecg_mlflow.executors import ExecConfig
from ecg_mlflow.experiment import VARIANTS, LosoConfig, PatientResult
from ecg_mlflow.splits import Fold
from ecg_mlflow.tracking import logged_value
from ecg_mlflow.training import FINETUNE_FIELDS, TrainConfig

FAILED_TAG = "ecg.failed_patients"
EXECUTION_TAG = "ecg.execution"  # where and how the folds ran, in words (executor auto made concrete)
THREADS_TAG = "ecg.threads"  # the TensorFlow thread count every fold ran with (executors.fold_threads)
RESUMED_TAG = "ecg.resumed_run_id"
PROCESS_TAG = "ecg.process"  # "<host> <pid> <start>" of the process that runs the run (lifetime.process_token)


def parent_run(resume_run_id: str | None):
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


def loso_run(run_id: str, param: str):
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
    d, t = PrepareConfig(), TrainConfig()
    get = lambda k, default: logged_value(str(params.get(k, default)))  # noqa: E731
    prep = PrepareConfig(
        data_dir=given.prepare.data_dir or (get("data_dir", "") or None),
        records=get("records", "all"),
        window=_param(window_from_param, "window", get("window", d.window)),
        window_offset=_param(window_offset_from_param, "window_offset", get("window_offset", 0)),
        label_scheme=get("label_scheme", d.label_scheme),
        # LosoConfig.params logs an unset include_paced (automatic) as ''.
        include_paced=_param(include_paced_from_param, "include_paced", get("include_paced", "auto") or "auto"),
        finetune_minutes=_param(cli.number("finetune_minutes"), "finetune_minutes",
                                get("finetune_minutes", d.finetune_minutes)),
        signal_filter=get("signal_filter", "none"),  # a run from before the option read the raw signal
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


def children(client: MlflowClient, parent_id: str, experiment_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=50000,
                              order_by=["attributes.start_time DESC"])


def claim(run_id: str) -> None:
    """Tag run ``run_id`` with this process (:data:`PROCESS_TAG`), so that a later process can tell
    whether the run is still at work."""
    MlflowClient().set_tag(run_id, PROCESS_TAG, lifetime.process_token())


def _pid(token: str) -> str:
    parts = token.split()
    return parts[1] if len(parts) > 1 else "?"


def check_not_running(run, param: str = "resume_run_id") -> None:
    """Refuse (``ValueError`` naming the process) to resume a RUNNING run whose process still runs
    on this host: two processes would run the same patients into one run. A run of another host's
    process cannot be checked from here; that is said, and the resume goes on."""
    token = run.data.tags.get(PROCESS_TAG, "")
    if run.info.status != "RUNNING" or not token or token == lifetime.process_token():
        return  # not running, from before the tag, or this very process
    alive = lifetime.process_alive(token)
    if alive:
        raise ValueError(f"{param} {run.info.run_id!r} is still running: process {_pid(token)} on this host "
                         f"({PROCESS_TAG}={token!r}); let it finish, or stop it (kill {_pid(token)}) and resume then")
    if alive is None:
        print(f"loso: run {run.info.run_id} is RUNNING under process {_pid(token)} of host {token.split()[0]!r}, "
              "which this host cannot see; resuming it as if that process had ended", flush=True)


def end_orphaned_runs(client: MlflowClient, experiment_id: str, skip: tuple[str, ...] = ()) -> list[str]:
    """End KILLED every RUNNING run of the experiment (but ``skip``) whose process (:data:`PROCESS_TAG`)
    ran on this host and is gone, and its children left RUNNING; returns the ids of the runs ended.
    A run without the tag, or of another host's process, is left as it is."""
    ended = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50000):
        token = run.data.tags.get(PROCESS_TAG, "")
        if run.info.run_id in skip or not token or lifetime.process_alive(token) is not False:
            continue
        if client.get_run(run.info.run_id).info.status != "RUNNING":
            continue  # ended meanwhile, as the child of a run ended before it
        end_stale_children(client, run.info.run_id, experiment_id, "KILLED")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
        again = (f"; resume it with resume_run_id={run.info.run_id}"
                 if run.data.tags.get(tracking.ROLE_TAG) == "loso" else "")
        print(f"run {run.info.run_name} ({run.info.run_id}) was left RUNNING by process {_pid(token)}, which is "
              f"gone; marked KILLED{again}", flush=True)
    return ended


def end_stale_children(client: MlflowClient, parent_id: str, experiment_id: str, status: str) -> list[str]:
    """End every child still RUNNING/SCHEDULED (its process is gone) with ``status``; returns their names.
    A child tagged with a process that still runs here (a ``nested`` run's LOSO run) is left to end itself."""
    stale = [r for r in children(client, parent_id, experiment_id) if r.info.status in ("RUNNING", "SCHEDULED")
             and not lifetime.process_alive(r.data.tags.get(PROCESS_TAG, ""))]
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
    end_stale_children(client, parent_id, experiment_id, "KILLED")
    finished = [r for r in children(client, parent_id, experiment_id) if r.info.status == "FINISHED"]
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
    finished = [r for r in children(MlflowClient(), run_id, source.info.experiment_id)
                if r.info.status == "FINISHED"]
    bases = _finished_bases(finished, source.info.experiment_id)
    missing = [f.subject for f in folds if f.subject not in bases]
    if missing:
        raise ValueError(f"base_run_id {run_id!r} has no finished base model for {missing}; it has "
                         f"{sorted(bases) or 'none'}")
    return {f.subject: bases[f.subject] for f in folds}


def public_uri(uri: str) -> str:
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
    return (f"MLFLOW_TRACKING_URI={shlex.quote(public_uri(tracking_uri))} mlflow run . -e loso --env-manager local "
            f"--experiment-id {experiment_id} -P resume_run_id={run_id}{extra}")
