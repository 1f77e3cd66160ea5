"""ecg_mlflow.server: the command line it builds, the auth config it writes, a real authenticated
server on a free loopback port, and the ``python -m ecg_mlflow.server`` CLI."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from ecg_mlflow import server as srv

REPO = Path(__file__).resolve().parents[1]
ADMIN, PASSWORD = "ecg-admin", "pw%with-percent#1"  # '%' and '#' must survive the ini round trip


def test_server_command_line(tmp_path):
    cmd = srv.server_command("127.0.0.1", 5123, "sqlite:///x.db", str(tmp_path / "art"), workers=2,
                             auth=True, allowed_hosts="mlflow:5000", python="py")
    assert cmd[:4] == ["py", "-m", "mlflow", "server"]
    opts = dict(zip(cmd[4::1], cmd[5::1]))
    assert opts["--host"] == "127.0.0.1" and opts["--port"] == "5123" and opts["--workers"] == "2"
    assert opts["--backend-store-uri"] == "sqlite:///x.db"
    assert opts["--artifacts-destination"] == str((tmp_path / "art").resolve())
    assert opts["--allowed-hosts"] == "mlflow:5000" and opts["--app-name"] == "basic-auth"
    assert "--serve-artifacts" in cmd
    plain = srv.server_command(port=5000, artifacts_destination="s3://bucket/")
    assert "--app-name" not in plain and "--allowed-hosts" not in plain
    assert plain[plain.index("--artifacts-destination") + 1] == "s3://bucket/"


@pytest.mark.parametrize("kwargs, message", [
    ({"port": 0}, "port"),
    ({"port": 70000}, "port"),
    ({"backend_store_uri": "./mlruns"}, "backend_store_uri"),
    ({"backend_store_uri": "file:///tmp/mlruns"}, "backend_store_uri"),
    ({"workers": 0}, "workers"),
    ({"artifacts_destination": ""}, "artifacts_destination"),
])
def test_server_command_rejects_bad_settings(kwargs, message):
    with pytest.raises(srv.ServerError, match=message):
        srv.server_command(**kwargs)


def test_free_port_is_bindable():
    port = srv.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_auth_config_is_private_and_read_back_by_mlflow(tmp_path, monkeypatch):
    path = srv.write_auth_config(tmp_path, ADMIN, PASSWORD, "sqlite:///auth.db", "EDIT")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # MLflow's own reader must see exactly the values given (its parser interpolates '%').
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    cfg = read_auth_config()
    assert (cfg.admin_username, cfg.admin_password) == (ADMIN, PASSWORD)
    assert (cfg.database_uri, cfg.default_permission) == ("sqlite:///auth.db", "EDIT")


@pytest.mark.parametrize("user, password, permission, message", [
    ("", PASSWORD, "READ", "ECG_MLFLOW_ADMIN_USER"),
    (ADMIN, "", "READ", "ECG_MLFLOW_ADMIN_PASSWORD"),
    (ADMIN, "short", "READ", "at least 12"),
    (ADMIN, "two\nlines-password", "READ", "line breaks"),
    (ADMIN, PASSWORD, "ALL", "default_permission"),
])
def test_auth_config_rejects_bad_values(tmp_path, user, password, permission, message):
    with pytest.raises(srv.ServerError, match=message):
        srv.write_auth_config(tmp_path, user, password, default_permission=permission)
    assert not (tmp_path / "basic_auth.ini").exists()


def test_auth_mode_needs_credentials_before_starting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECG_MLFLOW_ADMIN")}
    t0 = time.monotonic()
    with pytest.raises(srv.ServerError, match="ECG_MLFLOW_ADMIN_USER and ECG_MLFLOW_ADMIN_PASSWORD"):
        srv.start_server(port=None, backend_store_uri=f"sqlite:///{tmp_path}/m.db",
                         artifacts_destination=str(tmp_path / "art"), auth=True, env=env)
    assert time.monotonic() - t0 < 2, "the missing password must be reported before the server starts"


@pytest.mark.slow
def test_authenticated_server_refuses_anonymous_requests(tmp_path, monkeypatch):
    env = {**os.environ, "ECG_MLFLOW_ADMIN_USER": ADMIN, "ECG_MLFLOW_ADMIN_PASSWORD": PASSWORD}
    server = srv.start_server(
        backend_store_uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts_destination=str(tmp_path / "art"),
        auth=True, auth_database_uri=f"sqlite:///{tmp_path}/auth.db", env=env, log_path=tmp_path / "server.log",
    )
    try:
        assert server.auth_config_dir is not None
        assert stat.S_IMODE(server.auth_config_dir.stat().st_mode) == 0o700
        ini = server.auth_config_dir / "basic_auth.ini"
        assert stat.S_IMODE(ini.stat().st_mode) == 0o600
        api = f"{server.url}/api/2.0/mlflow/experiments/search"
        assert requests.get(api, params={"max_results": 5}, timeout=30).status_code == 401
        assert requests.get(api, params={"max_results": 5}, auth=(ADMIN, "wrong-password-1"), timeout=30).status_code == 401
        ok = requests.get(api, params={"max_results": 5}, auth=(ADMIN, PASSWORD), timeout=30)
        assert ok.status_code == 200 and "experiments" in ok.json()

        # The MLflow client authenticates from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(MlflowException):
            MlflowClient(server.url).create_experiment("refused")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        client = MlflowClient(server.url)
        exp_id = client.create_experiment("with-credentials")
        run = client.create_run(exp_id)
        client.log_metric(run.info.run_id, "x", 1.5)
        got = requests.get(f"{server.url}/api/2.0/mlflow/runs/get", params={"run_id": run.info.run_id},
                           auth=(ADMIN, PASSWORD), timeout=30).json()
        assert got["run"]["data"]["metrics"][0]["value"] == 1.5
    finally:
        auth_dir = server.auth_config_dir
        server.stop()
    assert server.process.returncode is not None
    assert not auth_dir.exists(), "the auth config (admin password) must be deleted when the server stops"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/health", timeout=5)


@pytest.mark.slow
def test_cli_starts_a_server_and_stops_on_sigterm(tmp_path):
    port = srv.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ecg_mlflow.server", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", str(tmp_path / "art"),
         "--log-file", str(tmp_path / "server.log")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        first = proc.stdout.readline()  # printed once /health answers
        assert re.search(rf"at http://127\.0\.0\.1:{port}\b", first), first + proc.stdout.read() if proc.poll() else first
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in proc.stdout.readline()
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).text.strip() == "OK"
        exps = requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                            params={"max_results": 5}, timeout=30).json()["experiments"]
        assert exps[0]["artifact_location"].startswith("mlflow-artifacts:")  # artifacts are proxied
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
