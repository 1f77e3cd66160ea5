"""docker-compose.yml: parsed by a real Compose implementation, and wired the way the README says.

There is no Docker engine here, but ``docker-compose config`` (Debian's docker-compose, or the
``docker compose`` plugin) parses, interpolates and validates the file against the Compose schema
with the client alone. Wiring checks run on its resolved output; without a Compose client they run
on the raw YAML with the same ``${VAR:-default}`` interpolation, and the parser tests skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
MLFLOW_DOCKERFILE = REPO / "docker" / "mlflow.Dockerfile"
TRAINER_DOCKERFILE = REPO / "docker" / "trainer.Dockerfile"
SERVICES = {"postgres", "minio", "create-bucket", "mlflow", "trainer"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a .env file (comments and blanks skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def compose_cli() -> list[str] | None:
    """The argv prefix of a Compose client that can run ``config`` without an engine, or None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        res = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if res.returncode == 0:
            return ["docker", "compose"]
    return None


def _clean_env(**overrides: str) -> dict[str, str]:
    # Variables from the caller's shell would override .env; keep only what the test sets.
    names = set(read_env_file(ENV_EXAMPLE)) | set(_VAR_NAMES())
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(overrides)
    return env


def _VAR_NAMES() -> set[str]:
    return {m.group(1) for m in _VAR.finditer(COMPOSE.read_text())}


def run_config(env_file: Path, **overrides: str) -> subprocess.CompletedProcess:
    cli = compose_cli()
    assert cli is not None
    return subprocess.run(
        [*cli, "--project-directory", str(REPO), "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
        capture_output=True, text=True, env=_clean_env(**overrides), cwd=REPO, timeout=60,
    )


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` substitution (``$$`` kept)."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op in (":-", "-") and not value:
            return arg
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value

    return _VAR.sub(sub, text)


def _resolve(**overrides: str) -> dict:
    """The resolved compose model: from the Compose client when there is one, else our interpolation."""
    if compose_cli() is not None:
        res = run_config(ENV_EXAMPLE, **overrides)
        assert res.returncode == 0, f"compose config failed:\n{res.stderr}"
        return yaml.safe_load(res.stdout)
    env = {**read_env_file(ENV_EXAMPLE), **overrides}
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env))


@pytest.fixture(scope="module")
def config() -> dict:
    return _resolve()


def _ports(service: dict) -> list[tuple[str, str, str]]:
    """(host_ip, published, target) for each port, from short ("ip:pub:target/tcp") or long syntax."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip", ""), str(p.get("published", "")), str(p["target"])))
        else:
            parts = str(p).split("/")[0].split(":")
            ip = parts[0] if len(parts) == 3 else ""
            out.append((ip, parts[-2] if len(parts) >= 2 else "", parts[-1]))
    return out


def _volumes(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each volume, from short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), v["target"], bool(v.get("read_only", False))))
        else:
            parts = str(v).split(":")
            mode = parts[2] if len(parts) > 2 else "rw"
            out.append((parts[0], parts[1], "ro" in mode.split(",")))
    return out


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


# --- the real parser ----------------------------------------------------------------------------

def test_compose_file_is_valid_for_a_real_compose_parser():
    if compose_cli() is None:
        pytest.skip("no Compose client (docker-compose or `docker compose`): `make system-deps`")
    res = run_config(ENV_EXAMPLE)
    assert res.returncode == 0, res.stderr
    model = yaml.safe_load(res.stdout)
    assert set(model["services"]) == SERVICES


def test_compose_refuses_to_run_without_credentials(tmp_path):
    # No secret has a default in the compose file: without .env the parser must stop, naming the variable.
    if compose_cli() is None:
        pytest.skip("no Compose client (docker-compose or `docker compose`): `make system-deps`")
    env_file = tmp_path / "partial.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in read_env_file(ENV_EXAMPLE).items()
                                if k != "POSTGRES_PASSWORD"))
    res = run_config(env_file)
    assert res.returncode != 0
    assert "POSTGRES_PASSWORD" in res.stderr


def test_bind_address_comes_from_the_environment():
    ports = _ports(_resolve(MLFLOW_BIND="0.0.0.0", MLFLOW_PORT="5055")["services"]["mlflow"])
    assert ports == [("0.0.0.0", "5055", "5000")]


# --- wiring -------------------------------------------------------------------------------------

def test_services_and_start_order(config):
    s = config["services"]
    assert set(s) == SERVICES
    assert s["create-bucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert s["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "create-bucket": {"condition": "service_completed_successfully"},
    }
    assert s["trainer"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    for name in ("postgres", "minio", "mlflow"):
        assert s[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_only_the_mlflow_port_is_published_on_loopback(config):
    published = {name: _ports(svc) for name, svc in config["services"].items() if svc.get("ports")}
    assert published == {"mlflow": [("127.0.0.1", "5000", "5000")]}


def test_mlflow_server_wiring(config):
    svc = config["services"]["mlflow"]
    cmd = [str(c) for c in svc["command"]]
    assert cmd[:2] == ["mlflow", "server"]
    assert _option(cmd, "--port") == "5000"
    pg = config["services"]["postgres"]["environment"]
    assert _option(cmd, "--backend-store-uri") == (
        f"postgresql+psycopg2://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )
    assert "--serve-artifacts" in cmd
    bucket = config["services"]["create-bucket"]["environment"]["MLFLOW_BUCKET"]
    assert _option(cmd, "--artifacts-destination") == f"s3://{bucket}/"
    hosts = _option(cmd, "--allowed-hosts").split(",")
    # The trainer reaches it as http://mlflow:5000 (Host: mlflow:5000); a browser on 127.0.0.1:<port>.
    assert {"mlflow", "mlflow:5000", "localhost:*", "127.0.0.1:*"} <= set(hosts)
    env = _env(svc)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    minio = _env(config["services"]["minio"])
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])


def test_trainer_wiring(config):
    svc = config["services"]["trainer"]
    env = _env(svc)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    cmd = [str(c) for c in svc["command"]]
    assert cmd[:3] == ["mlflow", "run", "."] and _option(cmd, "-e") == "loso"
    assert _option(cmd, "--env-manager") == "local"
    vols = {target: (source, ro) for source, target, ro in _volumes(svc)}
    data_source, data_ro = vols[env["ECG_DATA_DIR"]]
    assert data_ro, "the data directory must be mounted read-only"
    expected = (REPO / read_env_file(ENV_EXAMPLE)["ECG_DATA_DIR"]).resolve()
    assert (REPO / data_source).resolve() == expected  # relative sources are project-relative
    assert vols[env["ECG_CACHE_DIR"]] == ("ecg-cache", False)
    assert {"postgres-data", "minio-data", "ecg-cache"} <= set(config["volumes"])
    assert ("postgres-data", "/var/lib/postgresql/data", False) in _volumes(config["services"]["postgres"])
    assert ("minio-data", "/data", False) in _volumes(config["services"]["minio"])


def test_env_example_names_exactly_the_variables_compose_uses():
    used = _VAR_NAMES()
    declared = set(read_env_file(ENV_EXAMPLE))
    assert used == declared, f"only in compose: {used - declared}; only in .env.example: {declared - used}"


def test_no_secret_in_the_repo():
    example = read_env_file(ENV_EXAMPLE)
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert example[key].startswith("change-me"), f"{key} in .env.example must be a placeholder"
        # In the compose file a secret is only ever a required reference, never a literal or a default.
        for m in _VAR.finditer(COMPOSE.read_text()):
            if m.group(1) == key:
                assert m.group(2) in (None, ":?"), f"{key} must not have a default in docker-compose.yml"
    assert ".env" in (REPO / ".gitignore").read_text().split()
    assert ".env" in (REPO / ".dockerignore").read_text().split()


def test_mlflow_image_matches_the_client_version(config):
    version = mlflow.__version__
    base = re.search(r"^FROM\s+(\S+)", MLFLOW_DOCKERFILE.read_text(), re.M).group(1)
    assert base == f"ghcr.io/mlflow/mlflow:v{version}"
    assert config["services"]["mlflow"]["image"].endswith(f":{version}")
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", MLFLOW_DOCKERFILE.read_text()))
    assert {"psycopg2-binary", "boto3"} <= set(pins)
    assert f"mlflow=={version}" in (REPO / "requirements.txt").read_text()


def test_trainer_image_installs_requirements_and_the_package(config):
    build = config["services"]["trainer"]["build"]
    assert (REPO / build["context"]).resolve() == REPO
    text = TRAINER_DOCKERFILE.read_text()
    assert re.search(r"pip install[^\n]*-r requirements\.txt", text)
    assert re.search(r"pip install[^\n]*-e \.", text)
    assert "tensorflow" in (REPO / "requirements.txt").read_text()
