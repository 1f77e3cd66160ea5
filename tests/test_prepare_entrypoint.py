"""`mlflow run . -e prepare` end to end on tiny WFDB records, against a temporary SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ecg_mlflow.dataset import load
from wfdb_records import regular_beats, write_record

REPO = Path(__file__).resolve().parents[1]


def run_env(tmp_path: Path, uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=uri,
        ECG_CACHE_DIR=str(tmp_path / "cache"),
        # `python` in MLproject's command must be this interpreter, with its packages.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("ECG_DATA_DIR", None)
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("PYTHONPATH", None)  # the script must find the package by itself
    return env


def mlflow_run(tmp_path: Path, uri: str, *params: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "prepare", "--env-manager", "local",
            "--experiment-name", "prep"]
    for p in params:
        args += ["-P", p]
    return subprocess.run(args, cwd=tmp_path, env=run_env(tmp_path, uri), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture()
def tiny_db(tmp_path) -> Path:
    db = tmp_path / "db"
    write_record(db, "100", samples=regular_beats(360, 20), lead_names=("V5", "MLII"))
    write_record(db, "201", samples=regular_beats(360, 20, rr_s=0.6), lead_names=("V1", "V2"))
    return db


@pytest.mark.slow
def test_mlflow_run_prepare_logs_dataset_params_metrics_and_summary(tmp_path, tracking_uri, tiny_db):
    proc = mlflow_run(tmp_path, tracking_uri, "records=100,201", f"data_dir={tiny_db}",
                      "finetune_minutes=0.1", "window=160.0", "signal_filter=bandpass",
                      "window_offset=24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "records without an MLII lead" in proc.stdout and "201 (V1/V2)" in proc.stdout

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("prep")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert str(tmp_path) in run.info.artifact_uri  # artifacts land in the test's directory, not the repo
    parquet = next((tmp_path / "cache" / "beats").glob("beats-*.parquet"))
    ds = load(parquet)

    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.digest == ds.digest
    assert str(parquet) in inp.dataset.source
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "prepare"

    p, m = run.data.params, run.data.metrics
    assert p["records"] == "100,201" and p["window"] == "160.0"  # the entry point's own, from mlflow run
    assert p["data.records"] == "100,201" and p["data.window"] == "160" and p["data.digest"] == ds.digest
    assert p["data.missing_mlii"] == "201" and p["data.label_scheme"] == "aami"
    assert p["signal_filter"] == p["data.signal_filter"] == ds.meta["signal_filter"] == "bandpass"
    assert p["data.window_offset"] == "24" and ds.meta["window_offset"] == 24
    assert m["data.n_beats"] == len(ds) > 0 and m["data.n_records"] == 2
    assert m["data.n_finetune"] + m["data.n_test"] == len(ds) and m["data.n_finetune"] > 0
    assert m["data.dropped_edge"] == sum(d["edge"] for d in ds.meta["dropped"].values())

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"dataset_summary.csv", "dataset_summary.html"} <= names
    csv = client.download_artifacts(run.info.run_id, "dataset_summary.csv", str(tmp_path))
    summary = pd.read_csv(csv, dtype={"record": str, "subject": str})
    pd.testing.assert_frame_equal(summary, ds.summary(), check_dtype=False)
    html = Path(client.download_artifacts(run.info.run_id, "dataset_summary.html", str(tmp_path))).read_text()
    assert "<table" in html and ds.digest in html


@pytest.mark.slow
def test_mlflow_run_prepare_bad_parameter_fails_without_artifacts(tmp_path, tracking_uri, tiny_db):
    proc = mlflow_run(tmp_path, tracking_uri, "records=100", f"data_dir={tiny_db}", "window=160.5")
    assert proc.returncode != 0
    assert "prepare: error: window must be a positive whole number of samples, got '160.5'" in proc.stderr
    assert "Traceback" not in proc.stderr.split("prepare: error:")[0][-2000:]

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("prep")
    runs = client.search_runs([exp.experiment_id])
    assert runs and all(r.info.status != "FINISHED" for r in runs)
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all(client.list_artifacts(r.info.run_id) == [] for r in runs)


def test_script_reports_a_bad_file_in_one_line(tmp_path, tiny_db):
    # Run directly (no mlflow run, no installed package): one line on stderr, exit 1, nothing logged.
    (tiny_db / "201.dat").write_bytes(b"\x00" * 10)
    env = run_env(tmp_path, f"sqlite:///{tmp_path / 'never.db'}")
    proc = subprocess.run([sys.executable, str(REPO / "entrypoints" / "prepare.py"), "--data-dir", str(tiny_db),
                           "--records", "100,201", "--finetune-minutes", "0.1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: error:")
    assert f"{tiny_db / '201.dat'} is truncated" in lines[0]
    assert not (tmp_path / "never.db").exists()
