"""Shared fixtures: the real MIT-BIH data, a shared dataset cache, temporary tracking stores."""

from __future__ import annotations

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
def dataset_cache(tmp_path_factory) -> Path:
    """One prepared-dataset cache for the whole session, so real data is prepared once."""
    env = os.environ.get("ECG_CACHE_DIR")
    return Path(env) / "beats" if env else tmp_path_factory.mktemp("ecg-cache")


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
