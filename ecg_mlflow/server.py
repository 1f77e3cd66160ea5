"""Start and stop a local MLflow tracking server (no Docker needed).

One command starts ``mlflow server`` on the loopback interface with a SQL backend store
(SQLite by default, PostgreSQL when given a ``postgresql://`` URI) and a local artifact store
that the server proxies (``--serve-artifacts``), so clients need only the HTTP address::

    python -m ecg_mlflow.server --port 5000
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 mlflow run . -e loso --env-manager local

With ``--auth`` the server runs MLflow's ``basic-auth`` app. Its admin account comes from the
environment (``ECG_MLFLOW_ADMIN_USER``, ``ECG_MLFLOW_ADMIN_PASSWORD``); the auth config file that
MLflow reads (``MLFLOW_AUTH_CONFIG_PATH``) is written at start-up into a private temporary
directory (mode 0700, file 0600) and removed when the server stops. Clients authenticate with
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.

The same functions start the throwaway servers of the test suite.
"""

from __future__ import annotations

import argparse
import configparser
import os
import shutil
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ecg_mlflow.lifetime import guarded

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_BACKEND_STORE_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACTS_DESTINATION = "mlartifacts"
DEFAULT_AUTH_DATABASE_URI = "sqlite:///mlflow-auth.db"
ADMIN_USER_ENV = "ECG_MLFLOW_ADMIN_USER"
ADMIN_PASSWORD_ENV = "ECG_MLFLOW_ADMIN_PASSWORD"
MIN_PASSWORD_LENGTH = 12  # MLflow's own minimum for basic-auth passwords
AUTH_PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
# Backends that `mlflow server` can run migrations on (the file store is refused here on purpose).
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


class ServerError(RuntimeError):
    """The tracking server could not be configured, started or reached."""


@dataclass
class TrackingServer:
    """A running ``mlflow server`` subprocess and what is needed to reach and stop it."""

    process: subprocess.Popen
    host: str
    port: int
    log_path: Path
    auth_config_dir: Path | None = None
    command: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The tracking URI clients use, e.g. ``http://127.0.0.1:5000``."""
        return f"http://{self.host}:{self.port}"

    def log_tail(self, n_chars: int = 4000) -> str:
        """The last ``n_chars`` of the server's combined stdout/stderr log."""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after ``timeout``) and clean up."""
        stop_server(self, timeout=timeout)


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(port: int) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ServerError(f"port must be an integer in 1..65535, got {port!r}")
    return port


def _check_backend_store_uri(uri: str) -> str:
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if "://" not in uri or scheme not in _SQL_SCHEMES:
        raise ServerError(
            f"backend_store_uri must be a SQL database URI ({', '.join(s + '://' for s in _SQL_SCHEMES)}), "
            f"got {uri!r}"
        )
    return uri


def server_command(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    backend_store_uri: str = DEFAULT_BACKEND_STORE_URI,
    artifacts_destination: str = DEFAULT_ARTIFACTS_DESTINATION,
    *,
    workers: int = 1,
    auth: bool = False,
    allowed_hosts: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The ``mlflow server`` command line (argv list) for these settings.

    Artifacts are always proxied (``--serve-artifacts``): runs log to ``mlflow-artifacts:/`` and
    the server stores them under ``artifacts_destination`` (a local directory, or ``s3://...``).
    ``workers`` defaults to 1: one process answers a single user and keeps memory low.
    """
    _check_port(port)
    _check_backend_store_uri(backend_store_uri)
    if not isinstance(workers, int) or workers < 1:
        raise ServerError(f"workers must be a positive integer, got {workers!r}")
    if not artifacts_destination:
        raise ServerError("artifacts_destination must be a directory or an s3:// URI, got ''")
    destination = artifacts_destination
    if "://" not in destination:
        # A plain directory: absolute, so the server's working directory does not matter.
        destination = str(Path(destination).expanduser().resolve())
    cmd = [
        python, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        "--backend-store-uri", backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination", destination,
    ]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def write_auth_config(
    directory: str | os.PathLike,
    admin_username: str,
    admin_password: str,
    database_uri: str = DEFAULT_AUTH_DATABASE_URI,
    default_permission: str = "READ",
) -> Path:
    """Write the ``basic-auth`` ini file MLflow reads via ``MLFLOW_AUTH_CONFIG_PATH``; returns its path.

    The file holds the admin password, so it is created with mode 0600 (never readable by others,
    not even for an instant). ``default_permission`` is what every signed-in user gets on resources
    they have no explicit grant for.
    """
    if not admin_username:
        raise ServerError(f"auth needs an admin user name: set {ADMIN_USER_ENV}")
    if not admin_password:
        raise ServerError(f"auth needs an admin password: set {ADMIN_PASSWORD_ENV}")
    if len(admin_password) < MIN_PASSWORD_LENGTH:
        # MLflow refuses to create the admin with a shorter one; say so before starting anything.
        raise ServerError(
            f"{ADMIN_PASSWORD_ENV} must be at least {MIN_PASSWORD_LENGTH} characters, got {len(admin_password)}"
        )
    if default_permission not in AUTH_PERMISSIONS:
        raise ServerError(
            f"default_permission must be one of {AUTH_PERMISSIONS}, got {default_permission!r}"
        )
    for name, value in (("admin user name", admin_username), ("admin password", admin_password)):
        # An ini value cannot hold a line break, and surrounding blanks would be stripped on read.
        if "\n" in value or "\r" in value or value != value.strip():
            raise ServerError(f"the {name} must not contain line breaks or leading/trailing blanks")
    # MLflow reads the file with '%'-interpolation, so a literal '%' is written as '%%'.
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {
        "default_permission": default_permission,
        "database_uri": database_uri.replace("%", "%%"),
        "admin_username": admin_username.replace("%", "%%"),
        "admin_password": admin_password.replace("%", "%%"),
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    path = Path(directory) / "basic_auth.ini"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        config.write(f)
    os.chmod(path, 0o600)  # also when the file existed with looser bits
    return path


def wait_until_healthy(
    url: str, timeout: float = 90.0, process: subprocess.Popen | None = None, log_path: Path | None = None
) -> None:
    """Poll ``<url>/health`` until it answers 200 ``OK``; raise :class:`ServerError` on time-out or exit."""
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:] if log_path and log_path.exists() else ""
            raise ServerError(f"mlflow server exited with code {process.returncode} before {url}/health answered:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
                last_error = f"HTTP {resp.status}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-4000:] if log_path and log_path.exists() else ""
    raise ServerError(f"{url}/health did not answer within {timeout:.0f} s ({last_error}):\n{tail}")


def start_server(
    host: str = DEFAULT_HOST,
    port: int | None = None,
    backend_store_uri: str = DEFAULT_BACKEND_STORE_URI,
    artifacts_destination: str = DEFAULT_ARTIFACTS_DESTINATION,
    *,
    workers: int = 1,
    auth: bool = False,
    auth_database_uri: str = DEFAULT_AUTH_DATABASE_URI,
    default_permission: str = "READ",
    allowed_hosts: str | None = None,
    env: dict[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
    timeout: float = 90.0,
    cwd: str | os.PathLike | None = None,
) -> TrackingServer:
    """Start ``mlflow server`` as a subprocess and return once ``/health`` answers.

    ``port=None`` picks a free port. With ``auth=True`` the admin account is read from
    ``ECG_MLFLOW_ADMIN_USER`` / ``ECG_MLFLOW_ADMIN_PASSWORD`` in ``env`` (default: ``os.environ``).
    The server's output goes to ``log_path`` (default: a file in a temporary directory).
    """
    env = dict(os.environ if env is None else env)
    # The job runner (GenAI scorers, trace roll-ups) starts several extra worker processes that
    # this project never uses; off unless the caller turns it on.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    port = free_port(host) if port is None else _check_port(port)
    cmd = server_command(
        host, port, backend_store_uri, artifacts_destination,
        workers=workers, auth=auth, allowed_hosts=allowed_hosts,
    )
    auth_dir: Path | None = None
    if auth:
        # Validate before creating anything, so a missing password fails fast and leaves nothing behind.
        user, password = env.get(ADMIN_USER_ENV, ""), env.get(ADMIN_PASSWORD_ENV, "")
        if not user or not password:
            raise ServerError(f"auth needs {ADMIN_USER_ENV} and {ADMIN_PASSWORD_ENV} in the environment")
        auth_dir = Path(tempfile.mkdtemp(prefix="ecg-mlflow-auth-"))  # mkdtemp: mode 0700
        ini = write_auth_config(auth_dir, user, password, auth_database_uri, default_permission)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        # basic-auth signs CSRF tokens with this key; all workers inherit the same one. A key made
        # per start-up only means browser sessions do not survive a restart.
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        # MLflow lets these override the file; drop them so the file written above is what counts.
        env.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)
        env.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="ecg-mlflow-server-")) / "server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if "://" not in artifacts_destination:
        Path(artifacts_destination).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "wb") as log:
            # Under a guard (ecg_mlflow.lifetime) that ends the server and its worker processes
            # together when stopped, or when this process is gone (even killed with SIGKILL); in a
            # new session, so a terminal's Ctrl-C reaches this process and not the server.
            process = subprocess.Popen(
                guarded(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
    except BaseException:
        if auth_dir is not None:
            shutil.rmtree(auth_dir, ignore_errors=True)  # it holds the admin password
        raise
    server = TrackingServer(process, host, port, log_path, auth_dir, cmd)
    try:
        wait_until_healthy(server.url, timeout=timeout, process=process, log_path=log_path)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: TrackingServer, timeout: float = 15.0) -> None:
    """Stop the server (SIGTERM to its guard, which ends the server's process group within
    :data:`ecg_mlflow.lifetime.GRACE_S`, less than ``timeout``; SIGKILL if the guard has not ended by
    then) and delete its auth config directory. A guard that ended by itself already killed what its
    server left."""
    proc = server.process
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    if server.auth_config_dir is not None:
        shutil.rmtree(server.auth_config_dir, ignore_errors=True)
        server.auth_config_dir = None


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """CLI: start a local tracking server in the foreground until Ctrl-C."""
    p = argparse.ArgumentParser(
        prog="python -m ecg_mlflow.server",
        description="Start a local MLflow tracking server (UI + REST API + proxied artifacts).",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--backend-store-uri", default=DEFAULT_BACKEND_STORE_URI,
                   help="sqlite:///file.db or postgresql://user:pw@host:port/db (default: %(default)s)")
    p.add_argument("--artifacts-destination", default=DEFAULT_ARTIFACTS_DESTINATION,
                   help="directory or s3://bucket/ the server stores artifacts in (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default: %(default)s)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host headers to accept (default: MLflow's, localhost + private IPs)")
    p.add_argument("--auth", action="store_true",
                   help=f"basic-auth mode; admin from ${ADMIN_USER_ENV} / ${ADMIN_PASSWORD_ENV}")
    p.add_argument("--auth-database-uri", default=DEFAULT_AUTH_DATABASE_URI,
                   help="where basic-auth keeps users and permissions (default: %(default)s)")
    p.add_argument("--default-permission", default="READ", choices=AUTH_PERMISSIONS,
                   help="basic-auth permission of users without a grant (default: %(default)s)")
    p.add_argument("--log-file", default=None, help="server log (default: a temporary file)")
    args = p.parse_args(argv)

    try:
        server = start_server(
            args.host, None if args.port == 0 else args.port, args.backend_store_uri,
            args.artifacts_destination, workers=args.workers, auth=args.auth,
            auth_database_uri=args.auth_database_uri, default_permission=args.default_permission,
            allowed_hosts=args.allowed_hosts, log_path=args.log_file,
        )
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    # SIGTERM (e.g. from a process manager) stops the server the same way Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(f"MLflow tracking server at {server.url} (log: {server.log_path})")
    print(f"  export MLFLOW_TRACKING_URI={server.url}")
    if args.auth:
        print(f"  export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...  (admin: ${ADMIN_USER_ENV})")
    print("Ctrl-C stops it.", flush=True)
    try:
        code = server.process.wait()
        print(f"mlflow server exited with code {code}:\n{server.log_tail()}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
