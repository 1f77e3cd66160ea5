"""Throwaway servers for tests: a PostgreSQL cluster in a temp dir, an MLflow server, a model server.

Each helper starts a real process on 127.0.0.1 and returns a handle with a ``stop()``; the
fixtures in the test modules wrap them so that one server serves several tests.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ecg_mlflow.server import free_port

# initdb refuses to run as root; the Debian package creates this account.
_PG_SYSTEM_USER = "postgres"


def postgres_bin_dir() -> Path | None:
    """The directory holding initdb/pg_ctl (Debian: /usr/lib/postgresql/<ver>/bin), or None."""
    needed = ("initdb", "pg_ctl", "createdb")
    on_path = shutil.which("initdb")
    if on_path:
        # Resolve symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb).
        d = Path(on_path).resolve().parent
        if all((d / n).is_file() for n in needed):
            return d
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    for candidate in reversed(versions):
        d = Path(candidate).parent
        if all((d / n).is_file() for n in needed):
            return d
    return None


def _runuser() -> str | None:
    """``runuser`` lives in sbin, which a trimmed PATH may leave out."""
    return shutil.which("runuser", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def postgres_unavailable_reason() -> str | None:
    """Why a throwaway PostgreSQL cannot be started here, or None when it can."""
    if postgres_bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not installed: `make system-deps`"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_PG_SYSTEM_USER)
        except KeyError:
            return f"running as root and there is no '{_PG_SYSTEM_USER}' user to run initdb as"
        if _runuser() is None:
            return "running as root and `runuser` is missing (needed to run initdb as a non-root user)"
    try:
        import psycopg2  # noqa: F401  (mlflow's PostgreSQL driver)
    except ImportError:
        return "psycopg2 not installed: pip install -r requirements.txt"
    return None


@dataclass
class PostgresCluster:
    """A running throwaway PostgreSQL cluster listening on 127.0.0.1:``port``."""

    data_dir: Path
    port: int
    bin_dir: Path
    run_as: str | None
    database: str = "mlflow"

    @property
    def uri(self) -> str:
        """SQLAlchemy URI (psycopg2 driver; SQLAlchemy 2.1 defaults to psycopg 3) with trust auth, no password."""
        user = self.run_as or pwd.getpwuid(os.geteuid()).pw_name
        return f"postgresql+psycopg2://{user}@127.0.0.1:{self.port}/{self.database}"

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster directory."""
        _run_pg([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
                self.run_as, check=False)
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def _run_pg(cmd: list[str], run_as: str | None, check: bool = True) -> subprocess.CompletedProcess:
    if run_as:
        cmd = [_runuser() or "runuser", "-u", run_as, "--", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def start_postgres(database: str = "mlflow") -> PostgresCluster:
    """initdb + pg_ctl start a cluster in a new temp dir (as ``postgres`` when we are root)."""
    reason = postgres_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    bin_dir = postgres_bin_dir()
    run_as = _PG_SYSTEM_USER if os.geteuid() == 0 else None
    # Not under pytest's tmp dir: that is private to our user and the postgres user could not enter it.
    root = Path(tempfile.mkdtemp(prefix="ecg-mlflow-pg-"))
    data_dir = root / "data"
    if run_as:
        shutil.chown(root, user=run_as)
    _run_pg([str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", run_as or
             pwd.getpwuid(os.geteuid()).pw_name, "--no-sync", "-E", "UTF8", "--locale", "C"], run_as)
    port = free_port()
    # Loopback TCP only; the unix socket goes into the cluster dir, not the shared /var/run.
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {data_dir} -c fsync=off -c full_page_writes=off"
    cluster = PostgresCluster(data_dir, port, bin_dir, run_as, database)
    try:
        _run_pg([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-o", opts, "-l", str(root / "pg.log"),
                 "-w", "-t", "60", "start"], run_as)
        _run_pg([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                 run_as or pwd.getpwuid(os.geteuid()).pw_name, database], run_as)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def chromium_unavailable_reason(path: str = "/usr/bin/chromium") -> str | None:
    """Why the UI test cannot drive a browser here, or None when it can."""
    if not Path(path).is_file():
        return f"{path} not found: `make system-deps` installs Debian's chromium"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright not installed: pip install -r requirements-dev.txt"
    return None


@dataclass
class ModelServer:
    """``mlflow models serve`` running on 127.0.0.1:``port``."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)


def start_model_server(model_uri: str, env: dict[str, str], log_path: Path, timeout: float = 180.0) -> ModelServer:
    """Serve ``model_uri`` with ``mlflow models serve --env-manager local``; wait until /ping answers."""
    port = free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow_cli, "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-p", str(port), "-h", "127.0.0.1", "--workers", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = ModelServer(proc, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/ping", timeout=5) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"mlflow models serve did not answer /ping in {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")
