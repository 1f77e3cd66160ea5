"""Shared fixtures: the real MIT-BIH data, a shared dataset cache, temporary tracking stores."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path | None:
    env = os.environ.get("ECG_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "mitdb")
    for c in candidates:
        if (c / "100.hea").is_file():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def mitdb_dir() -> Path:
    """The real MIT-BIH database (ECG_DATA_DIR or ../shared/data/mitdb); skips when absent."""
    d = _real_data_dir()
    if d is None:
        pytest.skip("MIT-BIH database not found: set ECG_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """The ECG_CACHE_DIR of the whole session (CI sets one; else a temporary one)."""
    env = os.environ.get("ECG_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("ecg-cache")


@pytest.fixture(scope="session")
def dataset_cache(cache_root) -> Path:
    """One prepared-dataset cache for the whole session, so real data is prepared once."""
    return cache_root / "beats"


def entry_env(tracking_uri: str, data_dir: Path, cache_root: Path, **extra: str) -> dict[str, str]:
    """Environment for running an entry point as a subprocess: this interpreter's bin first on
    PATH (``mlflow run --env-manager local`` calls plain ``python``), the store, data and cache."""
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_TRACKING_URI=tracking_uri, ECG_DATA_DIR=str(data_dir), ECG_CACHE_DIR=str(cache_root),
               PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def run_script_in_process(script: Path, argv: list[str], monkeypatch, capsys, **env: str) -> tuple[int, str]:
    """Run an entry-point script as ``python script argv...`` would, but in this process (no
    interpreter and TensorFlow start-up, seconds each); returns (exit status, stderr). The script
    must exit through ``sys.exit``, as ``cli.run_main`` does on bad input."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout first
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    return exc.value.code, capsys.readouterr().err


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh embedded SQLite tracking store; artifacts land under tmp_path (the cwd)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def loso_in_fresh_store(tmp: Path, experiment: str, cfg):
    """A LOSO run of ``cfg`` (:class:`ecg_mlflow.experiment.LosoConfig`) in this process, in a fresh
    SQLite store under ``tmp`` (the cwd meanwhile, so artifacts land there), in a new experiment
    ``experiment``; yields (tracking URI, LOSO run id, client) with the store still the current one,
    and resets the tracking URI after."""
    import mlflow
    from mlflow import MlflowClient

    from ecg_mlflow.loso import run_loso

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(k, raising=False)
        mlflow.set_tracking_uri(uri)
        mp.setenv("MLFLOW_EXPERIMENT_ID", MlflowClient(uri).create_experiment(experiment))
        loso_run = run_loso(cfg)
        mp.delenv("MLFLOW_EXPERIMENT_ID")
        yield uri, loso_run, MlflowClient(uri)
    mlflow.set_tracking_uri(None)
