"""End to end against a real tracking service: ``mlflow server`` on a free loopback port (PostgreSQL
backend where the server binaries are installed, else SQLite; proxied local artifact store), the
``loso`` entry point run over HTTP on two real records, then everything read back the way a user
would: the REST API, the web UI in headless Chromium, and a registered model served over HTTP.

The LOSO run happens once per module; every test reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from ecg_mlflow.server import start_server
from servers import (
    chromium_unavailable_reason, postgres_unavailable_reason, start_model_server, start_postgres,
)

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

REPO = Path(__file__).resolve().parents[1]
RECORDS = ("100", "103")
EXPERIMENT = "ecg-e2e"
VARIANTS = ("no_transfer", "transfer")
STATS = ("veb_se", "veb_ppv", "veb_fpr", "sveb_se", "sveb_ppv", "sveb_fpr", "accuracy", "macro_f1")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT_COPY_DIR = REPO / "out" / "ui"  # ignored by git; the latest screenshots for a person to look at


# --- the service and the one LOSO run ----------------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A running tracking server; ``service["backend"]`` is ``"postgresql"`` or ``"sqlite"``."""
    root = tmp_path_factory.mktemp("tracking-service")
    reason = postgres_unavailable_reason()
    pg = None
    if reason is None:
        pg = start_postgres()
        backend, uri = "postgresql", pg.uri
    else:
        print(f"\nPostgreSQL not available ({reason}); the server uses SQLite")
        backend, uri = "sqlite", f"sqlite:///{root / 'mlflow.db'}"
    try:
        server = start_server(backend_store_uri=uri, artifacts_destination=str(root / "artifacts"),
                              log_path=root / "server.log", timeout=180)
    except BaseException:
        if pg:
            pg.stop()
        raise
    print(f"\ntracking server {server.url} ({backend}), log {server.log_path}")
    yield {"server": server, "url": server.url, "backend": backend, "postgres": pg, "root": root}
    server.stop()
    if pg:
        pg.stop()


def client_env(url: str, cache_root: Path, data_dir: Path) -> dict[str, str]:
    """A clean client environment: this interpreter's bin first on PATH (``mlflow run
    --env-manager local`` calls plain ``python``), the server's URI, the data and the cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_TRACKING_URI=url, ECG_DATA_DIR=str(data_dir), ECG_CACHE_DIR=str(cache_root),
               TF_CPP_MIN_LOG_LEVEL="2")
    return env


class Api:
    """Plain HTTP calls to the MLflow REST API (``/api/2.0/mlflow/...``)."""

    def __init__(self, url: str):
        self.url = url
        self.http = requests.Session()

    def get(self, path: str, **params) -> dict:
        r = self.http.get(f"{self.url}/api/2.0/mlflow/{path}", params=params, timeout=60)
        assert r.status_code == 200, f"GET {path} {params}: {r.status_code} {r.text[:500]}"
        return r.json()

    def post(self, path: str, body: dict) -> dict:
        r = self.http.post(f"{self.url}/api/2.0/mlflow/{path}", json=body, timeout=60)
        assert r.status_code == 200, f"POST {path} {body}: {r.status_code} {r.text[:500]}"
        return r.json()

    def search_runs(self, experiment_id: str, filter_string: str) -> list[dict]:
        return self.post("runs/search", {"experiment_ids": [experiment_id], "filter": filter_string,
                                         "max_results": 1000}).get("runs", [])

    def artifact(self, run: dict, path: str) -> bytes:
        """Download a run artifact through the server's artifact proxy (``mlflow-artifacts:/``)."""
        root = run["info"]["artifact_uri"]
        assert root.startswith("mlflow-artifacts:/"), f"artifacts are not proxied: {root}"
        rel = root[len("mlflow-artifacts:/"):].lstrip("/")
        r = self.http.get(f"{self.url}/api/2.0/mlflow-artifacts/artifacts/{rel}/{path}", timeout=60)
        assert r.status_code == 200, f"artifact {path} of run {run['info']['run_id']}: {r.status_code}"
        return r.content


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics(run: dict) -> dict[str, float]:
    """Latest metric values; the REST API writes a logged NaN as the string "NaN"."""
    return {m["key"]: float(m["value"]) for m in run["data"].get("metrics", [])}


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


@pytest.fixture(scope="module")
def loso(service, mitdb_dir, cache_root):
    """Run ``mlflow run . -e loso`` against the server over HTTP once; return the run tree via REST."""
    cmd = [str(Path(sys.executable).with_name("mlflow")), "run", ".", "-e", "loso", "--env-manager", "local",
           "--experiment-name", EXPERIMENT, "-P", f"records={','.join(RECORDS)}", "-P", "epochs=1",
           "-P", "finetune_epochs=1"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, env=client_env(service["url"], cache_root, mitdb_dir),
                         capture_output=True, text=True, timeout=900)
    print(f"\nLOSO over HTTP took {time.monotonic() - t0:.0f} s")
    assert res.returncode == 0, f"mlflow run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"

    api = Api(service["url"])
    exp = api.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    parents = api.search_runs(exp["experiment_id"], "tags.`ecg.role` = 'loso'")
    assert len(parents) == 1, f"expected one loso run, got {len(parents)}"
    parent = parents[0]
    children = api.search_runs(exp["experiment_id"], f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'")
    return {"api": api, "experiment": exp, "parent": parent, "children": children}


def _children(loso, role: str) -> list[dict]:
    return [r for r in loso["children"] if tags(r).get("ecg.role") == role]


def _variant(loso, record: str, variant: str) -> dict:
    (run,) = [r for r in _children(loso, "variant")
              if tags(r).get("patient") == record and tags(r).get("variant") == variant]
    return run


def _matrix(api: Api, run: dict, name: str = "confusion_matrix.json") -> tuple[list[str], np.ndarray]:
    cm = json.loads(api.artifact(run, name))
    matrix = np.asarray(cm["matrix"], dtype=np.int64)
    assert matrix.shape == (len(cm["labels"]), len(cm["labels"]))
    return cm["labels"], matrix


# --- REST: runs, metrics, artifacts, registry ----------------------------------------------------

def test_run_tree_over_rest(loso):
    parent = loso["parent"]
    assert parent["info"]["status"] == "FINISHED"
    p = params(parent)
    assert p["records"] == ",".join(RECORDS) and float(p["epochs"]) == 1 and float(p["finetune_epochs"]) == 1
    for name in ("data_dir", "label_scheme", "finetune_minutes", "batch_size", "learning_rate", "seed",
                 "window", "registry_prefix"):
        assert name in p, f"parameter {name} not logged on the loso run"

    bases = _children(loso, "base")
    assert sorted(tags(r)["subject"] for r in bases) == sorted(RECORDS)
    variants = _children(loso, "variant")
    assert sorted((tags(r)["patient"], tags(r)["variant"]) for r in variants) == sorted(
        (rec, v) for rec in RECORDS for v in VARIANTS)
    assert len(loso["children"]) == len(bases) + len(variants)
    base_ids = {tags(r)["subject"]: r["info"]["run_id"] for r in bases}
    for run in variants:
        t = tags(run)
        assert run["info"]["status"] == "FINISHED"
        assert t["subject"] == t["patient"]  # 100 and 103 are each their own subject
        assert t["base_run_id"] == base_ids[t["subject"]], "variant run must point at its subject's base run"


def test_metrics_over_rest(loso):
    api = loso["api"]
    # Parent: every gross_/avg_ statistic for both variants; a fraction, or NaN where undefined.
    parent = metrics(loso["parent"])
    summary = {k: v for k, v in parent.items() if k.startswith(("gross_", "avg_"))}
    assert set(summary) == {f"{kind}_{v}_{s}" for kind in ("gross", "avg") for v in VARIANTS for s in STATS}
    for key, value in summary.items():
        assert np.isnan(value) or 0.0 <= value <= 1.0, f"{key}={value} is not a fraction"

    for record in RECORDS:
        names, n_beats = [], set()
        for variant in VARIANTS:
            m = metrics(_variant(loso, record, variant))
            for key in ("test_accuracy", "test_macro_f1", "test_n_beats", "test_veb_se", "test_veb_ppv",
                        "test_veb_fpr", "test_sveb_se", "test_sveb_ppv", "test_sveb_fpr"):
                assert key in m, f"{key} missing from {record}-{variant}"
            assert 0.0 <= m["test_accuracy"] <= 1.0
            for kind in ("veb", "sveb"):
                tp, fn, fp, tn = (m[f"test_{kind}_{c}"] for c in ("tp", "fn", "fp", "tn"))
                assert tp + fn + fp + tn <= m["test_n_beats"]
                # README: a statistic without a denominator is NaN, never 0.
                for stat, denominator in (("se", tp + fn), ("ppv", tp + fp), ("fpr", fp + tn)):
                    value = m[f"test_{kind}_{stat}"]
                    if denominator == 0:
                        assert np.isnan(value), f"{record}-{variant} test_{kind}_{stat}={value}, expected NaN"
                    else:
                        assert 0.0 <= value <= 1.0
            names.append({k for k in m if k.startswith("test_")})
            n_beats.add(m["test_n_beats"])
        assert names[0] == names[1], f"{record}: variants differ in metric names {names[0] ^ names[1]}"
        assert len(n_beats) == 1, f"{record}: both variants must be evaluated on the same test beats"

    # Per-epoch histories: one step each for epochs=1 / finetune_epochs=1.
    base = _children(loso, "base")[0]["info"]["run_id"]
    for key in ("loss", "accuracy"):
        hist = api.get("metrics/get-history", run_id=base, metric_key=key)["metrics"]
        assert [h["step"] for h in hist] == [0] and np.isfinite(hist[0]["value"])
    transfer = _variant(loso, RECORDS[1], "transfer")["info"]["run_id"]
    for key in ("finetune_loss", "finetune_accuracy"):
        hist = api.get("metrics/get-history", run_id=transfer, metric_key=key)["metrics"]
        assert [h["step"] for h in hist] == [0]


def test_artifacts_over_rest(loso):
    api = loso["api"]
    totals = {v: None for v in VARIANTS}
    for record in RECORDS:
        for variant in VARIANTS:
            run = _variant(loso, record, variant)
            files = {f["path"] for f in api.get("artifacts/list", run_id=run["info"]["run_id"]).get("files", [])}
            assert {"confusion_matrix.json", "confusion_matrix.png"} <= files
            labels, matrix = _matrix(api, run)
            m = metrics(run)
            assert matrix.sum() == m["test_n_beats"]
            assert np.trace(matrix) / matrix.sum() == pytest.approx(m["test_accuracy"], abs=1e-6)
            assert api.artifact(run, "confusion_matrix.png")[:8] == b"\x89PNG\r\n\x1a\n"
            # the per-beat predictions come through the proxy too, one row per test beat
            rows = api.artifact(run, "predictions.csv").decode().splitlines()
            assert rows[0].startswith("record,sample,time_s,rhythm,symbol,label,predicted,p_")
            assert len(rows) - 1 == matrix.sum() and {r.split(",")[0] for r in rows[1:]} == {record}
            totals[variant] = matrix if totals[variant] is None else totals[variant] + matrix
    parent = loso["parent"]
    for variant in VARIANTS:
        labels, summed = _matrix(api, parent, f"confusion_matrix_{variant}.json")
        np.testing.assert_array_equal(summed, totals[variant])  # the parent's matrix sums the patients'
        gross = metrics(parent)[f"gross_{variant}_accuracy"]
        assert gross == pytest.approx(np.trace(summed) / summed.sum(), abs=1e-6)
        assert api.artifact(parent, f"confusion_matrix_{variant}.png")[:4] == b"\x89PNG"


def test_registered_models_over_rest(loso):
    api = loso["api"]
    parent_id = loso["parent"]["info"]["run_id"]
    for record in RECORDS:
        name = f"ecg-transfer-{record}"
        assert api.get("registered-models/get", name=name)["registered_model"]["name"] == name
        mv = api.get("registered-models/alias", name=name, alias="newest")["model_version"]
        t = {x["key"]: x["value"] for x in mv.get("tags", [])}
        run = _variant(loso, record, "transfer")
        assert mv["run_id"] == run["info"]["run_id"] and t["run_id"] == run["info"]["run_id"]
        assert t["loso_run_id"] == parent_id and t["subject"] == record
        assert t["base_model_uri"]
        assert float(t["test_accuracy"]) == pytest.approx(metrics(run)["test_accuracy"], abs=1e-4)
        base = api.get("registered-models/alias", name=f"ecg-base-{record}", alias="newest")["model_version"]
        bt = {x["key"]: x["value"] for x in base.get("tags", [])}
        assert bt["loso_run_id"] == parent_id and bt["subject"] == record


def test_backend_store_is_postgresql_when_installed(loso, service):
    if service["backend"] != "postgresql":
        pytest.skip(f"PostgreSQL not available: {postgres_unavailable_reason()}")
    import psycopg2

    dsn = service["postgres"].uri.replace("postgresql+psycopg2://", "postgresql://")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s",
                    (int(loso["experiment"]["experiment_id"]),))
        assert cur.fetchone()[0] == 1 + len(loso["children"])
        cur.execute("SELECT name FROM registered_models ORDER BY name")
        assert [r[0] for r in cur.fetchall()] == sorted(
            [f"ecg-base-{r}" for r in RECORDS] + [f"ecg-transfer-{r}" for r in RECORDS])


# --- the web UI ----------------------------------------------------------------------------------

def _save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOT_COPY_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOT_COPY_DIR / name)
    print(f"\nscreenshot {path} (copy: {SCREENSHOT_COPY_DIR / name})")
    return path


def test_ui_shows_runs_and_confusion_matrix(loso, service, tmp_path):
    reason = chromium_unavailable_reason(CHROMIUM)
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    url, exp_id = service["url"], loso["experiment"]["experiment_id"]
    run = _variant(loso, RECORDS[1], "transfer")
    # expect() waits 5 s unless told otherwise; the UI's run table can take longer on a busy machine.
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            # The experiment's run table: the loso run, expanded to its nested per-patient runs.
            page.goto(f"{url}/#/experiments/{exp_id}/runs", wait_until="load")
            parent_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="loso", exact=True))
            expect(parent_row).to_have_count(1)
            parent_row.locator('button[data-component-id*="runnamecellrenderer"]').click()
            names = ["loso"] + [f"base-{r}" for r in RECORDS] + [f"{r}-{v}" for r in RECORDS for v in VARIANTS]
            for name in names:
                expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
            _save_screenshot(page, tmp_path, "experiment-runs.png")

            # A transfer run's artifacts: the confusion matrix image is rendered.
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/#/experiments/{exp_id}/runs/{run['info']['run_id']}/artifacts", wait_until="load")
            expect(page.get_by_text(f"{RECORDS[1]}-transfer", exact=True).first).to_be_visible()
            page.get_by_text("confusion_matrix.png", exact=True).first.click()
            image = page.locator("img[src^='blob:']").first
            expect(image).to_be_visible()
            expect(page.get_by_text(f"{run['info']['run_id']}/artifacts/confusion_matrix.png")).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            # The rendered image is the logged PNG: same pixel size as the artifact's IHDR header.
            png = loso["api"].artifact(run, "confusion_matrix.png")
            width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
            assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [width, height]
            _save_screenshot(page, tmp_path, "run-confusion-matrix.png")
        finally:
            browser.close()


# --- a registered model served over HTTP -------------------------------------------------------

def test_served_transfer_model_predicts_like_the_loaded_model(loso, service, mitdb_dir, cache_root, tmp_path):
    import mlflow
    import mlflow.keras

    from ecg_mlflow.dataset import PrepareConfig, prepare
    from ecg_mlflow.splits import TEST

    record = RECORDS[1]
    model_uri = f"models:/ecg-transfer-{record}@newest"
    # Real beats from the record's test part: the first ones plus every non-N beat (few in 103).
    ds = prepare(PrepareConfig(data_dir=str(mitdb_dir), records=",".join(RECORDS),
                               cache_dir=str(cache_root / "beats")))
    idx = np.flatnonzero((ds.record == record) & (ds.part == TEST))
    pick = np.unique(np.concatenate([idx[:24], idx[ds.label[idx] != 0][:8]]))
    beats = ds.x[pick].astype(np.float32)  # (n, window, 2) mV
    rr = ds.rr_features()[pick]  # (n, 3): the default model, rr_cnn, reads the rhythm too
    assert beats.ndim == 3 and beats.shape[2] == 2

    env = client_env(service["url"], cache_root, mitdb_dir)
    server = start_model_server(model_uri, env, tmp_path / "serve.log")
    try:
        r = requests.post(f"{server.url}/invocations", json={"inputs": {"beat": beats.tolist(), "rr": rr.tolist()}}, timeout=120)
        assert r.status_code == 200, r.text[:1000]
        served = np.asarray(r.json()["predictions"], dtype=np.float64)
    finally:
        server.stop()

    mlflow.set_tracking_uri(service["url"])
    try:
        model = mlflow.keras.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    local = np.asarray(model.predict({"beat": beats, "rr": rr}, verbose=0), dtype=np.float64)
    assert served.shape == local.shape == (len(beats), len(ds.classes))  # logits per class
    np.testing.assert_allclose(served, local, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(served.argmax(axis=1), local.argmax(axis=1))
