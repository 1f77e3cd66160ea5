"""LOSO at scale and under faults, on real records and real stores.

- the local process pool and a local Ray instance give exactly the numbers of the sequential run
  (same seed, same TensorFlow thread count), with the same run tree and registry layout;
- executor auto takes the pool only where it pays, and a resume decides as the whole run did;
- a LOSO process killed during the second patient is resumed: nothing missing, nothing twice (and
  not while it still runs; once it is gone, its RUNNING run is marked KILLED);
- a worker process killed mid-fold fails only its fold, the parent ends FAILED naming the patient
  and the resume command, and that command (through ``mlflow run``) finishes the run;
- a real ``mlflow server`` stopped and restarted while a fold logs: every metric arrives;
- SIGTERM stops the workers and the private tracking server, and fails the run; after SIGKILL
  they end by themselves.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlflow
from mlflow import MlflowClient

from conftest import REPO, entry_env
from ecg_mlflow.dataset import PrepareConfig
from ecg_mlflow import executors, resume
from ecg_mlflow.executors import ExecConfig
from ecg_mlflow.loso import LosoConfig, register_once, run_loso
from ecg_mlflow.training import TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

RECORDS, HOLDOUT = "100,101,103", "100,101"  # two folds; 103 only ever trains
PATIENTS = ["100", "101"]
EPOCHS, FT_EPOCHS, SEED = 1, 2, 7
# Executors are compared at one TensorFlow thread per fold: equal thread counts repeat bit-exactly.
ARGS = ["--records", RECORDS, "--holdout", HOLDOUT, "--epochs", str(EPOCHS), "--finetune-epochs", str(FT_EPOCHS),
        "--seed", str(SEED), "--threads", "1"]
LOSO = [sys.executable, str(REPO / "entrypoints" / "loso.py")]


# --------------------------------------------------------------------------------------------
# helpers


def snapshot(uri: str, parent_id: str) -> dict:
    """Everything a LOSO run left in the store, keyed for comparison across runs."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=1000)
    out = {"parent": parent, "children": kids, "variants": {}, "bases": {}}
    for r in kids:
        if r.info.status != "FINISHED":
            continue
        tags = r.data.tags
        if tags.get("ecg.role") == "variant":
            key = (tags["patient"], tags["variant"])
            assert key not in out["variants"], f"two FINISHED runs for {key}"
            hist = [m.value for m in client.get_metric_history(r.info.run_id, "finetune_loss")]
            out["variants"][key] = ({k: v for k, v in r.data.metrics.items() if k.startswith("test_")}, hist)
        elif tags.get("ecg.role") == "base":
            assert tags["subject"] not in out["bases"], f"two FINISHED base runs for {tags['subject']}"
            out["bases"][tags["subject"]] = [m.value for m in client.get_metric_history(r.info.run_id, "loss")]
    out["summary"] = {k: v for k, v in parent.data.metrics.items() if k.startswith(("gross_", "avg_"))}
    return out


def same_number(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_same_results(got: dict, want: dict) -> None:
    """Identical per-patient test metrics, training histories and parent aggregates."""
    assert sorted(got["variants"]) == sorted(want["variants"]) == [(p, v) for p in PATIENTS
                                                                   for v in ("no_transfer", "transfer")]
    for key, (metrics, hist) in want["variants"].items():
        g_metrics, g_hist = got["variants"][key]
        assert g_metrics.keys() == metrics.keys(), key
        bad = [k for k in metrics if not same_number(g_metrics[k], metrics[k])]
        assert not bad, (key, {k: (g_metrics[k], metrics[k]) for k in bad})
        assert g_hist == hist, key
    assert got["bases"] == want["bases"]  # per-epoch training loss, bit for bit
    assert got["summary"].keys() == want["summary"].keys() and len(want["summary"]) == 32
    assert all(same_number(got["summary"][k], v) for k, v in want["summary"].items())


def assert_clean_tree_and_registry(uri: str, parent_id: str) -> None:
    """Parent FINISHED; nothing RUNNING; one FINISHED base per subject and run per patient/variant;
    exactly one registered version per model name for this LOSO run, pointing at that run."""
    snap = snapshot(uri, parent_id)
    assert snap["parent"].info.status == "FINISHED"
    assert "ecg.failed_patients" not in snap["parent"].data.tags
    assert not [r.info.run_name for r in snap["children"] if r.info.status in ("RUNNING", "SCHEDULED")]
    assert sorted(snap["bases"]) == PATIENTS
    client = MlflowClient(uri)
    finished = {(r.data.tags.get("patient") or r.data.tags.get("subject"), r.data.tags["ecg.role"],
                 r.data.tags.get("variant")): r.info.run_id for r in snap["children"] if r.info.status == "FINISHED"}
    for p in PATIENTS:
        for name, key in ((f"ecg-transfer-{p}", (p, "variant", "transfer")), (f"ecg-base-{p}", (p, "base", None))):
            versions = client.search_model_versions(f"name = '{name}' and tags.loso_run_id = '{parent_id}'")
            assert [v.run_id for v in versions] == [finished[key]], name
            assert client.get_model_version_by_alias(name, "newest").run_id == finished[key]


def store_runs(db: Path) -> dict[str, str]:
    """run name -> status, read straight from the SQLite file (works while another process writes)."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            return dict(con.execute("SELECT name, status FROM runs ORDER BY start_time"))
    except sqlite3.OperationalError:  # tables not created yet
        return {}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def config(mitdb_dir: Path, cache_root: Path, **execution) -> LosoConfig:
    return LosoConfig(prepare=PrepareConfig(data_dir=str(mitdb_dir), records=RECORDS, cache_dir=str(cache_root / "beats")),
                      train=TrainConfig(epochs=EPOCHS, finetune_epochs=FT_EPOCHS, seed=SEED), holdout=HOLDOUT,
                      execution=ExecConfig(**{"threads": 1, **execution}))


def parent_id_of(uri: str) -> str:
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`ecg.role` = 'loso'")
    return run.info.run_id


# --------------------------------------------------------------------------------------------
# the sequential reference


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, mitdb_dir, cache_root):
    """The sequential run, in a fresh process (so TensorFlow starts with the configured threads)."""
    tmp = tmp_path_factory.mktemp("seq")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    t0 = time.monotonic()
    proc = subprocess.run([*LOSO, *ARGS], env=entry_env(uri, mitdb_dir, cache_root), cwd=tmp,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"sequential LOSO: {time.monotonic() - t0:.1f} s")
    return uri, snapshot(uri, parent_id_of(uri))


@pytest.fixture
def auto_takes_the_pool(monkeypatch):
    """Executor auto as on a machine with cores to spare, for tiny runs: the tests' runs read far
    fewer beats than its threshold, so it is lowered and they take the pool."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("executor auto runs folds side by side only with two cores or more")
    monkeypatch.setattr(executors, "AUTO_MIN_WORK", 0)


@pytest.mark.parametrize("executor", ["local", "ray", "auto"])
def test_parallel_executors_repeat_the_sequential_run(executor, sequential, tracking_uri, mitdb_dir, cache_root,
                                                      capsys, request):
    if executor == "ray":
        pytest.importorskip("ray")
    if executor == "auto":
        request.getfixturevalue("auto_takes_the_pool")
    t0 = time.monotonic()
    parent_id = run_loso(config(mitdb_dir, cache_root, executor=executor, workers=2))
    print(f"{executor} LOSO: {time.monotonic() - t0:.1f} s")
    out = capsys.readouterr().out
    # the folds ran in two other processes, each logging through the private server
    pids = set(re.findall(r"subject \d+ finished \[pid (\d+)\]", out))
    assert len(pids) == 2 and str(os.getpid()) not in pids, out[-3000:]
    assert "private tracking server" in out
    assert_same_results(snapshot(tracking_uri, parent_id), sequential[1])
    assert_clean_tree_and_registry(tracking_uri, parent_id)
    parent = MlflowClient(tracking_uri).get_run(parent_id)
    assert parent.data.params["executor"] == executor and parent.data.params["threads"] == "1"
    how = parent.data.tags["ecg.execution"]
    assert ("Ray" in how) if executor == "ray" else how.startswith("on a local pool of 2 worker processes, 1 "), how


def test_the_sequential_reference_ran_in_one_process_though_auto(sequential):
    """The entry point's default executor is auto; the tiny reference run is below its threshold."""
    parent = sequential[1]["parent"]
    assert parent.data.params["executor"] == "auto"
    assert parent.data.tags["ecg.execution"] == "one after another in this process, 1 TensorFlow thread(s) per fold"


def test_auto_resume_decides_as_the_whole_run_did(tracking_uri, mitdb_dir, cache_root, auto_takes_the_pool):
    """A resume with one fold left takes the pool and thread count the whole run took, so the
    re-run patient's figures are the first attempt's to the bit; so does a resume told to run the
    folds left on another executor, whose own rule would give another thread count."""
    from dataclasses import replace

    cfg = config(mitdb_dir, cache_root, executor="auto", threads=0)
    parent_id = run_loso(cfg)
    client = MlflowClient(tracking_uri)
    n = executors.fold_threads(ExecConfig(executor="auto"))  # cores / 2 workers
    how = client.get_run(parent_id).data.tags["ecg.execution"]
    assert how == f"on a local pool of 2 worker processes, {n} TensorFlow thread(s) per fold", how
    assert client.get_run(parent_id).data.tags["ecg.threads"] == str(n)
    exp = client.get_run(parent_id).info.experiment_id
    (first,) = client.search_runs([exp], "tags.patient = '101' and tags.variant = 'transfer'")
    want = {k: v for k, v in first.data.metrics.items() if k.startswith("test_")}
    want_fine = [m.value for m in client.get_metric_history(first.info.run_id, "finetune_loss")]
    attempts = [first.info.run_id]

    def interrupt_and_resume(execution: ExecConfig) -> None:
        """Leave patient 101's newest transfer run and the parent unfinished, as an interruption
        does; resume; the patient's new run repeats the first attempt's figures to the bit."""
        client.set_terminated(attempts[-1], "FAILED")
        client.set_terminated(parent_id, "FAILED")
        assert run_loso(replace(cfg, resume_run_id=parent_id, execution=execution)) == parent_id
        (again,) = client.search_runs([exp], "tags.patient = '101' and tags.variant = 'transfer' and "
                                             "attributes.status = 'FINISHED'")
        assert again.info.run_id not in attempts
        attempts.append(again.info.run_id)
        got = {k: v for k, v in again.data.metrics.items() if k.startswith("test_")}
        assert got.keys() == want.keys() and all(same_number(got[k], want[k]) for k in want)
        assert [m.value for m in client.get_metric_history(again.info.run_id, "finetune_loss")] == want_fine

    interrupt_and_resume(cfg.execution)
    assert client.get_run(parent_id).data.tags["ecg.execution"] == how
    # Once more on a pool of one worker: at threads=0 that rule gives every core, but the folds left
    # run at the count the finished ones ran with.
    interrupt_and_resume(replace(cfg.execution, executor="local", workers=1))
    tags = client.get_run(parent_id).data.tags
    assert tags["ecg.execution"] == f"on a local pool of 1 worker processes, {n} TensorFlow thread(s) per fold"
    assert tags["ecg.threads"] == str(n)


SQLITE_FILE = "sqlite:////tmp/x/mlflow.db"
ENOUGH = executors.AUTO_MIN_WORK


@pytest.mark.parametrize("given, folds, work, uri, cores, gpus, want", [
    # enough folds, cores and work, no GPU: folds side by side, threads given or cores / workers
    ({}, 43, 80 * ENOUGH, SQLITE_FILE, 2, 0, ("local", 2, 1)),
    ({}, 43, ENOUGH, "http://127.0.0.1:5000", 16, 0, ("local", 2, 8)),
    ({"workers": 4}, 3, ENOUGH, SQLITE_FILE, 16, 0, ("local", 3, 4)),
    ({"workers": 4, "threads": 2}, 43, ENOUGH, SQLITE_FILE, 6, 0, ("local", 3, 2)),
    # otherwise one after another, at the thread count the pool would have had
    ({}, 1, 80 * ENOUGH, SQLITE_FILE, 2, 0, ("sequential", 2, 1)),
    ({}, 43, ENOUGH - 1, SQLITE_FILE, 2, 0, ("sequential", 2, 1)),
    ({}, 43, 80 * ENOUGH, SQLITE_FILE, 1, 0, ("sequential", 2, 1)),
    ({"threads": 2}, 43, 80 * ENOUGH, SQLITE_FILE, 2, 0, ("sequential", 2, 2)),
    ({}, 43, 80 * ENOUGH, SQLITE_FILE, 16, 1, ("sequential", 2, 8)),
    ({}, 43, 80 * ENOUGH, "sqlite://", 2, 0, ("sequential", 2, 1)),
    ({}, 43, 80 * ENOUGH, "sqlite:///:memory:", 2, 0, ("sequential", 2, 1)),
    ({"workers": 1}, 43, 80 * ENOUGH, SQLITE_FILE, 2, 0, ("sequential", 1, 2)),
])
def test_auto_runs_folds_side_by_side_only_where_it_pays(given, folds, work, uri, cores, gpus, want):
    got = executors.resolve(ExecConfig(executor="auto", **given), folds, work, uri, cores=cores, gpus=gpus)
    assert (got.executor, got.workers, got.threads) == want


@pytest.mark.parametrize("given, cores, want", [
    ({"executor": "sequential"}, 2, 2),  # TensorFlow's own default: every core
    ({"executor": "sequential", "threads": 1}, 2, 1),
    ({"executor": "auto"}, 2, 1),
    ({"executor": "auto"}, 16, 8),
    ({"executor": "local", "workers": 4}, 6, 1),
    ({"executor": "local", "workers": 1}, 4, 4),
    ({"executor": "ray", "workers": 3, "threads": 2}, 16, 2),
    ({"executor": "auto", "workers": 4}, 2, 1),  # at least one
])
def test_fold_threads_is_the_count_each_executor_runs_folds_at(given, cores, want):
    assert executors.fold_threads(ExecConfig(**given), cores=cores) == want


def test_resolve_leaves_a_named_executor_alone():
    for name in ("sequential", "local", "ray"):
        cfg = ExecConfig(executor=name)
        assert executors.resolve(cfg, 43, 80 * ENOUGH, "sqlite://", cores=1, gpus=1) is cfg
    with pytest.raises(ValueError, match="auto"):
        ExecConfig(executor="auto").resolved_threads


# --------------------------------------------------------------------------------------------
# resume


def test_killed_run_is_resumed_without_gaps_or_duplicates(sequential, tmp_path, mitdb_dir, cache_root):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = entry_env(uri, mitdb_dir, cache_root)
    proc = subprocess.Popen([*LOSO, *ARGS], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # the second patient's base model is being trained: kill the whole process, no clean-up
        wait_for(lambda: store_runs(db).get("base-101") == "RUNNING", 300, "base-101 to start", proc)
        # while its process lives (stopped here, so that it cannot finish meanwhile) the run is not resumed
        os.kill(proc.pid, signal.SIGSTOP)
        before = store_runs(db)
        refused = subprocess.run([*LOSO, "--resume-run-id", parent_id_of(uri)], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stderr[-4000:]
        assert f"is still running: process {proc.pid} on this host" in refused.stderr
        assert store_runs(db) == before  # nothing written
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    runs = store_runs(db)
    assert runs["loso"] == "RUNNING" and runs["base-101"] == "RUNNING" and runs["100-transfer"] == "FINISHED"
    assert "101-transfer" not in runs
    parent_id = parent_id_of(uri)
    # the next loso or nested in the experiment finds the run's process gone and ends it, and its child
    client = MlflowClient(uri)
    assert resume.end_orphaned_runs(client, client.get_run(parent_id).info.experiment_id) == [parent_id]
    runs = store_runs(db)
    assert runs["loso"] == "KILLED" and runs["base-101"] == "KILLED" and runs["100-transfer"] == "FINISHED"

    # resume with the run id only: parameters come from the run itself
    proc = subprocess.run([*LOSO, "--resume-run-id", parent_id], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resume subject 100" not in proc.stdout  # fully finished: not even looked at again
    assert "resume subject 101: 0/2 variant run(s) finished, base model trained again" in proc.stdout

    assert_clean_tree_and_registry(uri, parent_id)
    snap = snapshot(uri, parent_id)
    stale = [r for r in snap["children"] if r.info.status != "FINISHED"]
    assert [(r.info.run_name, r.info.status) for r in stale] == [("base-101", "KILLED")]
    assert len(snap["children"]) == 7  # 6 finished + the killed attempt
    # all patients, old and new, in the parent's aggregates: identical to the uninterrupted run
    assert_same_results(snap, sequential[1])


def test_a_dead_worker_fails_its_fold_and_the_printed_command_resumes(sequential, tmp_path, mitdb_dir,
                                                                      cache_root):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = entry_env(uri, mitdb_dir, cache_root)
    log_out, log_err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(log_out, "w") as fo, open(log_err, "w") as fe:  # files, not pipes: nothing blocks the child
        proc = subprocess.Popen([*LOSO, *ARGS, "--executor", "local", "--workers", "2"], env=env, cwd=tmp_path,
                                stdout=fo, stderr=fe, text=True)
    try:
        found: list[int] = []

        def announced() -> bool:
            found[:] = [int(p) for p in re.findall(r"subject 101 -> worker pid (\d+)", log_out.read_text())]
            return bool(found)

        wait_for(announced, 300, "the worker of subject 101", proc)
        pid = found[0]
        wait_for(lambda: store_runs(db).get("base-101") == "RUNNING", 300, "base-101 to start", proc)
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log_err.read_text()
    assert proc.returncode == 1, err[-4000:]
    assert f"worker process pid {pid} died (exit code -9)" in err
    assert "patients 101" in err
    (command,) = [line.strip() for line in err.splitlines() if "mlflow run . -e loso" in line]
    assert command.startswith("MLFLOW_TRACKING_URI=") and "-P resume_run_id=" in command

    client = MlflowClient(uri)
    parent_id = parent_id_of(uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED" and parent.data.tags["ecg.failed_patients"] == "101"
    failed = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/failed_patients.json")
    assert failed["patients"] == ["101"] and failed["resume_command"] == command
    runs = store_runs(db)
    assert runs["base-101"] == "FAILED" and runs["100-transfer"] == "FINISHED"
    assert "RUNNING" not in runs.values()

    # the exact printed command (through `mlflow run`) finishes the run
    proc = subprocess.run(command, shell=True, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_clean_tree_and_registry(uri, parent_id)
    assert_same_results(snapshot(uri, parent_id), sequential[1])
    # the run `mlflow run` made is only a pointer: no children, not a second LOSO parent
    (pointer,) = client.search_runs([parent.info.experiment_id], "tags.`ecg.role` = 'loso_resume'")
    assert pointer.data.tags["ecg.resumed_run_id"] == parent_id and pointer.info.status == "FINISHED"
    assert not client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{pointer.info.run_id}'")


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(int(d.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_loso_leaves_no_workers_nor_private_server(sig, tmp_path, mitdb_dir, cache_root):
    """SIGTERM (a process manager, `timeout`, `nested` stopping a LOSO run) cleans up as Ctrl-C does:
    the workers and the private tracking server (its own process group) are gone, the parent run
    ends FAILED, exit status 130. SIGKILL gives the process no chance to clean up, yet its workers
    and its server (and the server's guard) notice it gone and end; its run stays RUNNING, as after
    any kill, for `resume_run_id`."""
    db = tmp_path / "mlflow.db"
    env = entry_env(f"sqlite:///{db}", mitdb_dir, cache_root)
    log_out = tmp_path / "stdout.txt"
    with open(log_out, "w") as fo:
        proc = subprocess.Popen([*LOSO, *ARGS, "--executor", "local", "--workers", "2"], env=env, cwd=tmp_path,
                                stdout=fo, stderr=subprocess.STDOUT, text=True)
    try:
        ports: list[int] = []

        def serving() -> bool:
            ports[:] = [int(p) for p in re.findall(r"private tracking server at http://127.0.0.1:(\d+)",
                                                   log_out.read_text())]
            return bool(ports) and "-> worker pid" in log_out.read_text()

        wait_for(serving, 300, "the private server and a worker", proc)
        workers = [int(p) for p in re.findall(r"-> worker pid (\d+)", log_out.read_text())]
        assert _listening(ports[0]) and _processes_naming(f"--port {ports[0]}")
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_out.read_text()
    if sig == signal.SIGTERM:  # cleaned up before it exited
        assert proc.returncode == 130, text[-4000:]
        assert "error: interrupted" in text
        assert not _listening(ports[0]) and _processes_naming(f"--port {ports[0]}") == []
        assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
        assert store_runs(db)["loso"] == "FAILED"
    else:  # cleaned up by what it left behind, within seconds
        assert proc.returncode == -signal.SIGKILL
        wait_for(lambda: not _listening(ports[0]) and _processes_naming(f"--port {ports[0]}") == [], 60,
                 "the private server and its guard to end")
        wait_for(lambda: all(not Path(f"/proc/{pid}").exists() for pid in workers), 60, "the workers to end")
        assert store_runs(db)["loso"] == "RUNNING"


def test_register_once_replaces_the_version_of_an_unfinished_attempt(tracking_uri):
    """A version registered by an attempt that never finished is replaced, not duplicated; a
    second call from the same run registers nothing."""
    import keras

    from ecg_mlflow import tracking

    model = keras.Sequential([keras.Input((4, 2)), keras.layers.Flatten(), keras.layers.Dense(2)])
    x = np.zeros((2, 4, 2), np.float32)
    client = MlflowClient()
    with mlflow.start_run() as loso:
        uris = {}
        for attempt in ("killed", "finished"):
            with mlflow.start_run(nested=True) as run:
                uris[attempt] = (run.info.run_id, tracking.log_keras_model(model, x))
                register_once(uris[attempt][1], "m", {"loso_run_id": loso.info.run_id, "run_id": run.info.run_id})
            if attempt == "killed":
                client.set_terminated(run.info.run_id, "KILLED")
        again = register_once(uris["finished"][1], "m", {"loso_run_id": loso.info.run_id,
                                                         "run_id": uris["finished"][0]})
    versions = client.search_model_versions("name = 'm'")
    assert [(str(v.version), v.run_id) for v in versions] == [("2", uris["finished"][0])] and again == "2"
    assert str(client.get_model_version_by_alias("m", "newest").version) == "2"


@pytest.mark.parametrize("params, culprit", [
    ({"resume_run_id": "0123456789abcdef0123456789abcdef"}, "no such run"),
    ({"resume_run_id": "x y"}, "resume_run_id"),
    ({"executor": "threads"}, "executor"),
    ({"workers": 0}, "workers"),
    ({"threads": -1}, "threads"),
    ({"ray_gpus_per_task": -1}, "ray_gpus_per_task"),
])
def test_bad_execution_parameters_are_named_before_work(params, culprit, tracking_uri, mitdb_dir, cache_root):
    execution = {k: v for k, v in params.items() if k != "resume_run_id"}
    cfg = config(mitdb_dir, cache_root, **execution)
    if "resume_run_id" in params:
        from dataclasses import replace

        cfg = replace(cfg, resume_run_id=params["resume_run_id"])
    with pytest.raises(ValueError, match=culprit):
        run_loso(cfg)
    assert not MlflowClient().search_runs(["0"])


def test_resume_refuses_changed_parameters(sequential, mitdb_dir, cache_root):
    from dataclasses import replace

    uri, snap = sequential
    mlflow.set_tracking_uri(uri)
    try:
        cfg = replace(config(mitdb_dir, cache_root), train=TrainConfig(epochs=3, seed=SEED),
                      resume_run_id=snap["parent"].info.run_id)
        with pytest.raises(ValueError, match=r"epochs=1.*drop epochs"):
            run_loso(cfg)
    finally:
        mlflow.set_tracking_uri(None)


# --------------------------------------------------------------------------------------------
# base models taken from an earlier run


def _in_store_of(uri: str, monkeypatch) -> None:
    """Work in the sequential run's store, from its directory (where its artifacts live)."""
    monkeypatch.chdir(Path(uri.removeprefix("sqlite:///")).parent)
    mlflow.set_tracking_uri(uri)


def test_base_run_id_takes_that_runs_base_models_and_retrains_only_the_heads(sequential, mitdb_dir, cache_root,
                                                                            monkeypatch):
    from dataclasses import replace

    uri, snap = sequential
    source = snap["parent"].info.run_id
    _in_store_of(uri, monkeypatch)
    try:
        cfg = replace(config(mitdb_dir, cache_root), base_run_id=source,
                      train=TrainConfig(epochs=EPOCHS, finetune_epochs=3, finetune_replay=10, seed=SEED))
        parent_id = run_loso(cfg)
    finally:
        mlflow.set_tracking_uri(None)
    got = snapshot(uri, parent_id)
    assert got["parent"].info.status == "FINISHED" and got["parent"].data.params["base_run_id"] == source
    assert not got["bases"]  # no base model trained
    source_bases = {r.data.tags["subject"]: r.info.run_id for r in snap["children"]
                    if r.data.tags.get("ecg.role") == "base"}
    for r in got["children"]:
        assert r.data.tags["base_run_id"] == source_bases[r.data.tags["patient"]]
    for p in PATIENTS:
        # the very same base model on the very same test beats
        nt, want = got["variants"][(p, "no_transfer")][0], snap["variants"][(p, "no_transfer")][0]
        assert nt.keys() == want.keys() and all(same_number(nt[k], want[k]) for k in want)
        assert len(got["variants"][(p, "transfer")][1]) == 3 != len(snap["variants"][(p, "transfer")][1])


def _transfer_on_same_bases(sequential, mitdb_dir, cache_root, monkeypatch, **train):
    """Re-run the sequential LOSO on its own base models with transfer options ``train``. Checks that
    the no-transfer results do not move (the base models are the same) and returns the prepared
    dataset and, per transfer run, (patient, its params, its loaded model, its test rows)."""
    from dataclasses import replace

    import mlflow.keras

    from ecg_mlflow.dataset import prepare

    uri, snap = sequential
    _in_store_of(uri, monkeypatch)
    try:
        cfg = replace(config(mitdb_dir, cache_root), base_run_id=snap["parent"].info.run_id,
                      train=TrainConfig(epochs=EPOCHS, finetune_epochs=FT_EPOCHS, seed=SEED, **train))
        got = snapshot(uri, run_loso(cfg))
        ds = prepare(cfg.prepare)
        transfers = [(r.data.tags["patient"], r.data.params, mlflow.keras.load_model(f"runs:/{r.info.run_id}/model"),
                      np.flatnonzero((ds.record == r.data.tags["patient"]) & (ds.part == "test")))
                     for r in got["children"] if r.data.tags.get("variant") == "transfer"]
    finally:
        mlflow.set_tracking_uri(None)
    for p in PATIENTS:  # the base models are the same: no-transfer results do not move
        nt, want = got["variants"][(p, "no_transfer")][0], snap["variants"][(p, "no_transfer")][0]
        assert all(same_number(nt[k], want[k]) for k in want)
    return ds, transfers


def test_sveb_gate_keeps_transfer_from_calling_s_on_beats_that_are_not_early(sequential, mitdb_dir, cache_root,
                                                                             monkeypatch):
    from ecg_mlflow.loso import beat_source
    from ecg_mlflow.models import model_input_names

    share = 0.5  # a gate that many test beats fail, so it shows
    ds, transfers = _transfer_on_same_bases(sequential, mitdb_dir, cache_root, monkeypatch, sveb_gate=share)
    earliest = np.minimum(ds.rr_features()[:, 0], ds.rr_long()[:, 0])
    s = ds.classes.index("S")
    for patient, params, model, rows in transfers:
        # the threshold comes from the other subjects' S beats: here record 103's and the other patient's
        train = (ds.record != patient) & (ds.label == s)
        assert float(params["sveb_gate_threshold"]) == pytest.approx(np.quantile(earliest[train], share), abs=1e-4)
        assert "rr_long" in model_input_names(model)
        pred = np.argmax(model.predict(beat_source(ds).inputs(rows, model_input_names(model)), verbose=0), 1)
        late = earliest[rows] > float(params["sveb_gate_threshold"]) + 1e-3
        assert late.sum() > 100 and not (pred[late] == s).any()


@pytest.mark.parametrize("measure, reads", [("successive", "rr_irregular"), ("lagged", "rr_lagged")])
def test_sveb_regular_keeps_transfer_from_calling_s_after_an_irregular_rhythm(measure, reads, sequential, mitdb_dir,
                                                                               cache_root, monkeypatch):
    import keras

    from ecg_mlflow.loso import beat_source
    from ecg_mlflow.models import model_input_names

    share = 0.5  # a gate that many test beats fail, so it shows
    ds, transfers = _transfer_on_same_bases(sequential, mitdb_dir, cache_root, monkeypatch, sveb_regular=share,
                                            regular_measure=measure)
    irregular = getattr(ds, reads)()[:, 0]
    s = ds.classes.index("S")
    for patient, params, model, rows in transfers:
        # the threshold comes from the other subjects' S beats
        train = (ds.record != patient) & (ds.label == s)
        assert float(params["sveb_regular_threshold"]) == pytest.approx(np.quantile(irregular[train], share), abs=1e-4)
        assert reads in model_input_names(model)
        logits = model.predict(beat_source(ds).inputs(rows, model_input_names(model)), verbose=0)
        threshold = float(params["sveb_regular_threshold"])
        gated, open_ = irregular[rows] > threshold + 1e-3, irregular[rows] < threshold - 1e-3
        assert gated.sum() > 100 and open_.sum() > 100 and not (np.argmax(logits, 1)[gated] == s).any()
        # against the same model without the gate (its inner model): the S logit drops exactly where gated
        inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        plain = inner.predict(beat_source(ds).inputs(rows, model_input_names(inner)), verbose=0)
        assert (logits[gated, s] < plain[gated, s] - 1000).all()
        np.testing.assert_allclose(logits[open_], plain[open_], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reference, reads", [("mean", "rr_long"), ("median", "rr_median")])
def test_early_sveb_makes_transfer_call_s_for_early_beats_in_regular_rhythm(reference, reads, sequential, mitdb_dir,
                                                                          cache_root, monkeypatch):
    import keras

    from ecg_mlflow.beats import REGULAR_IRREGULARITY
    from ecg_mlflow.loso import beat_source
    from ecg_mlflow.models import model_input_names

    share = 0.2  # a threshold that many test beats pass, so it shows
    ds, transfers = _transfer_on_same_bases(sequential, mitdb_dir, cache_root, monkeypatch, early_sveb=share,
                                            early_reference=reference)
    earliness, regular = getattr(ds, reads)()[:, 0], ds.rr_irregular()[:, 0] < REGULAR_IRREGULARITY
    other = (ds.rr_long() if reads == "rr_median" else ds.rr_median())[:, 0]
    n, s = ds.classes.index("N"), ds.classes.index("S")
    checked = told_apart = 0
    for patient, params, model, rows in transfers:
        # the threshold comes from the other subjects' N beats in regular rhythm
        train = (ds.record != patient) & (ds.label == n) & regular
        threshold = float(params["early_sveb_threshold"])
        assert threshold == pytest.approx(np.quantile(earliness[train], share), abs=1e-4)
        assert {reads, "rr_irregular"} <= set(model_input_names(model))
        pred = np.argmax(model.predict(beat_source(ds).inputs(rows, model_input_names(model)), verbose=0), 1)
        acts = (earliness[rows] < threshold - 1e-3) & regular[rows]
        assert acts.sum() > 20 and not (pred[acts] == n).any()
        # the same model without the promotion (its inner model) called some of them N
        inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        plain = np.argmax(inner.predict(beat_source(ds).inputs(rows, model_input_names(inner)), verbose=0), 1)
        np.testing.assert_array_equal(pred[acts & (plain == n)], s)
        np.testing.assert_array_equal(pred[~acts & (earliness[rows] >= threshold)],
                                      plain[~acts & (earliness[rows] >= threshold)])
        checked += int((acts & (plain == n)).sum())
        # beats the rule would treat otherwise had it read the other reference: the test tells them apart
        told_apart += int((acts != ((other[rows] < threshold) & regular[rows]) & (plain == n)).sum())
    assert checked > 0 and told_apart > 0


def test_early_sveb_rate_keeps_early_sveb_to_beats_of_a_fast_rhythm(sequential, mitdb_dir, cache_root, monkeypatch):
    import keras

    from ecg_mlflow.beats import REGULAR_IRREGULARITY
    from ecg_mlflow.loso import beat_source
    from ecg_mlflow.models import model_input_names

    # 70 beats a minute: record 100 beats at about 76, 101 at about 62, so both sides of the rate show
    share, rate = 0.2, 70
    ds, transfers = _transfer_on_same_bases(sequential, mitdb_dir, cache_root, monkeypatch, early_sveb=share,
                                            early_sveb_rate=rate)
    earliness, regular = ds.rr_long()[:, 0], ds.rr_irregular()[:, 0] < REGULAR_IRREGULARITY
    local_rr = ds.rr_features()[:, 2]
    n, s = ds.classes.index("N"), ds.classes.index("S")
    promoted = kept = 0
    for patient, params, model, rows in transfers:
        threshold = float(params["early_sveb_threshold"])  # as without the rate: the rate is a further condition
        train = (ds.record != patient) & (ds.label == n) & regular
        assert threshold == pytest.approx(np.quantile(earliness[train], share), abs=1e-4)
        assert {"rr", "rr_long", "rr_irregular"} <= set(model_input_names(model))
        pred = np.argmax(model.predict(beat_source(ds).inputs(rows, model_input_names(model)), verbose=0), 1)
        inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        plain = np.argmax(inner.predict(beat_source(ds).inputs(rows, model_input_names(inner)), verbose=0), 1)
        early = (earliness[rows] < threshold - 1e-3) & regular[rows]
        fast = local_rr[rows] < 60 / rate - 1e-3
        np.testing.assert_array_equal(pred[early & fast & (plain == n)], s)
        # early beats of a slower rhythm keep the model's call, N included
        slow = local_rr[rows] >= 60 / rate
        np.testing.assert_array_equal(pred[slow], plain[slow])
        promoted += int((early & fast & (plain == n)).sum())
        kept += int((early & slow & (plain == n)).sum())
    assert promoted > 0 and kept > 0


def test_recent_reference_ontime_reaches_training_and_evaluation(sequential, mitdb_dir, cache_root, monkeypatch):
    from dataclasses import replace

    import mlflow.keras

    from ecg_mlflow.dataset import prepare
    from ecg_mlflow.loso import base_training_param, beat_source
    from ecg_mlflow.models import model_input_names

    uri, _ = sequential
    _in_store_of(uri, monkeypatch)
    try:
        cfg = replace(config(mitdb_dir, cache_root),
                      train=TrainConfig(epochs=EPOCHS, finetune_epochs=FT_EPOCHS, seed=SEED, model="recent_cnn",
                                        recent_reference="ontime"))
        got = snapshot(uri, run_loso(cfg))
        ds = prepare(cfg.prepare)
        ontime, everyone = beat_source(ds, "ontime"), beat_source(ds, "all")
        assert beat_source(ds, "ontime") is ontime  # made once per dataset and reference
        base_runs = [r.info.run_id for r in got["children"] if r.data.tags.get("ecg.role") == "base"]
        assert base_runs and all(base_training_param(b, "recent_reference", "all") == "ontime" for b in base_runs)
        for r in got["children"]:
            if r.data.tags.get("variant") != "transfer":
                continue
            model = mlflow.keras.load_model(f"runs:/{r.info.run_id}/model")
            names = model_input_names(model)
            assert "recent" in names
            rows = np.flatnonzero((ds.record == r.data.tags["patient"]) & (ds.part == "test"))
            early = ds.rr_long()[rows, 0] < 0.9
            a, b = ontime.inputs(rows, names)["recent"], everyone.inputs(rows, names)["recent"]
            # The references differ where early beats were among the 20 before, so the check below can fail.
            assert early.sum() > 0 and not np.allclose(np.asarray(a), np.asarray(b))
            pred = np.argmax(model.predict(ontime.inputs(rows, names), verbose=0), 1)
            # The logged test figures are those of the on-time references.
            assert r.data.metrics["test_accuracy"] == pytest.approx((pred == ds.label[rows]).mean(), abs=1e-9)
    finally:
        mlflow.set_tracking_uri(None)


def test_subject_balance_weighs_base_training_by_subject_not_by_record(tmp_path, mitdb_dir, cache_root, monkeypatch):
    from dataclasses import replace

    from ecg_mlflow.dataset import prepare
    from ecg_mlflow.loso import beat_source
    from ecg_mlflow.training import train_base

    # 100 held out; its base model trains on 103 and on 201 and 202, two records of one subject: weighing
    # by record (three groups) would train another model than weighing by subject (two).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    cfg = replace(config(mitdb_dir, cache_root), holdout="100",
                  prepare=PrepareConfig(data_dir=str(mitdb_dir), records="100,103,201,202",
                                        cache_dir=str(cache_root / "beats")),
                  train=TrainConfig(epochs=EPOCHS, finetune_epochs=1, seed=SEED, subject_balance=1.0))
    try:
        got = snapshot(uri, run_loso(cfg))
    finally:
        mlflow.set_tracking_uri(None)
    assert got["parent"].info.status == "FINISHED" and got["parent"].data.params["subject_balance"] == "1.0"
    logged = got["bases"]["100"]
    ds = prepare(cfg.prepare)
    train_idx, src = np.flatnonzero(ds.subject != "100"), beat_source(ds, "all")
    assert set(ds.record[train_idx]) == {"103", "201", "202"}

    def loss(groups, power=1.0):
        train = replace(cfg.train, subject_balance=power)
        return train_base(src, train_idx, len(ds.classes), train, groups=groups)[1]["loss"]

    assert logged == loss(ds.subject)  # the LOSO run's base model is the one weighed by subject, to the bit
    assert logged != loss(ds.record)
    assert logged != loss(None, power=0.0)


@pytest.mark.parametrize("change, culprit", [
    ({"train": TrainConfig(epochs=2, seed=SEED)}, r"trained with epochs=1; this run asks for epochs=2"),
    ({"holdout": "100,103"}, r"no finished base model for \['103'\]"),
    ({"base_run_id": "0123456789abcdef0123456789abcdef"}, "base_run_id .*no such run"),
])
def test_base_run_id_refuses_other_base_training_before_work(change, culprit, sequential, mitdb_dir, cache_root,
                                                            monkeypatch):
    from dataclasses import replace

    uri, snap = sequential
    _in_store_of(uri, monkeypatch)
    client = MlflowClient(uri)
    runs = lambda: len(client.search_runs([e.experiment_id for e in client.search_experiments()]))  # noqa: E731
    before = runs()
    try:
        cfg = replace(config(mitdb_dir, cache_root), base_run_id=snap["parent"].info.run_id)
        with pytest.raises(ValueError, match=culprit):
            run_loso(replace(cfg, **change))
    finally:
        mlflow.set_tracking_uri(None)
    assert runs() == before


# --------------------------------------------------------------------------------------------
# a tracking server that restarts


def test_fold_rides_out_a_tracking_server_restart(tmp_path, mitdb_dir, cache_root):
    from ecg_mlflow.server import free_port, start_server

    # Enough base epochs (a fraction of a second each on these records) that some are still to be
    # logged during the restart's seconds, whichever of them the server stops after.
    epochs, ft_epochs = 20, 4
    db = tmp_path / "mlflow.db"
    port = free_port()
    store = dict(port=port, backend_store_uri=f"sqlite:///{db}", artifacts_destination=str(tmp_path / "art"),
                 log_path=tmp_path / "server.log")
    server = start_server(**store)
    env = entry_env(server.url, mitdb_dir, cache_root)
    args = ["--records", RECORDS, "--holdout", "100", "--epochs", str(epochs), "--finetune-epochs", str(ft_epochs)]
    proc = subprocess.Popen([*LOSO, *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def logging_epochs() -> bool:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
                return con.execute("SELECT count(*) FROM metrics WHERE key = 'loss'").fetchone()[0] >= 1

        wait_for(logging_epochs, 300, "the base run's first epoch", proc)
        down = time.time() * 1000
        server.stop()
        time.sleep(3)
        server = start_server(**store)
        up = time.time() * 1000
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, out[-4000:]

    client = MlflowClient(f"sqlite:///{db}")
    runs = {r.info.run_name: r for r in client.search_runs(["0"])}
    assert {n: r.info.status for n, r in runs.items()} == {n: "FINISHED" for n in
                                                           ("loso", "base-100", "100-no_transfer", "100-transfer")}
    history = {(name, key): client.get_metric_history(runs[name].info.run_id, key)
               for name, key in (("base-100", "loss"), ("base-100", "accuracy"), ("100-transfer", "finetune_loss"),
                                 ("100-transfer", "finetune_accuracy"))}
    for (name, key), hist in history.items():
        want = epochs if name.startswith("base") else ft_epochs
        assert sorted(m.step for m in hist) == list(range(want)), (name, key)
    for name in ("100-no_transfer", "100-transfer"):
        assert {"test_accuracy", "test_macro_f1", "test_veb_tp", "test_sveb_fpr"} <= runs[name].data.metrics.keys()
    assert "gross_transfer_accuracy" in runs["loso"].data.metrics
    # something was logged while the server was down: the restart really hit a logging fold
    stamps = [m.timestamp for hist in history.values() for m in hist]
    stamps += [r.info.start_time for r in runs.values()]
    assert any(down <= s <= up for s in stamps), (down, up, sorted(stamps))
