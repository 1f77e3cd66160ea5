"""The LOSO experiment end to end: `mlflow run . -e loso` on three real records, then everything it
left in the store and the registry is read back and checked against the data."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlflow
from mlflow import MlflowClient

from conftest import REPO, entry_env, run_script_in_process
from ecg_mlflow.dataset import PrepareConfig, prepare
from ecg_mlflow.metrics import confusion
from ecg_mlflow.predictions import read_predictions, softmax
from ecg_mlflow.splits import subject_of

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

RECORDS = ["100", "201", "202"]  # 201 and 202 are one subject: held out together
SUBJECTS = ["100", "201"]
EPOCHS, FT_EPOCHS = 1, 2


def run_entry(entry: str, params: dict[str, object], env: dict[str, str], experiment: str = "t") -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", entry, "--env-manager", "local",
           "--experiment-name", experiment]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def loso_store(tmp_path_factory, mitdb_dir, cache_root):
    """One LOSO run over RECORDS in a fresh SQLite store; yields (tracking uri, parent run id, env)."""
    tmp = tmp_path_factory.mktemp("loso")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = entry_env(uri, mitdb_dir, cache_root)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "loso", "--env-manager", "local",
         "--experiment-name", "loso-test", "-P", f"records={','.join(RECORDS)}", "-P", f"epochs={EPOCHS}",
         "-P", f"finetune_epochs={FT_EPOCHS}", "-P", "seed=7"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("loso-test")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`ecg.role` = 'loso'")
    yield uri, parent, client, proc.stdout
    mlflow.set_tracking_uri(None)


def children(client, parent, role=None):
    flt = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    if role:
        flt += f" and tags.`ecg.role` = '{role}'"
    return client.search_runs([parent.info.experiment_id], flt, max_results=1000)


def test_run_tree_and_tags(loso_store):
    _, parent, client, stdout = loso_store
    assert parent.info.status == "FINISHED"
    assert parent.data.params["epochs"] == str(EPOCHS)
    bases = children(client, parent, "base")
    assert sorted(r.data.tags["subject"] for r in bases) == SUBJECTS
    variants = children(client, parent, "variant")
    pairs = sorted((r.data.tags["patient"], r.data.tags["variant"]) for r in variants)
    assert pairs == sorted((rec, v) for rec in RECORDS for v in ("no_transfer", "transfer"))
    base_of = {r.data.tags["subject"]: r.info.run_id for r in bases}
    for r in variants:
        assert r.info.status == "FINISHED"
        assert r.data.tags["subject"] == subject_of(r.data.tags["patient"])
        assert r.data.tags["base_run_id"] == base_of[r.data.tags["subject"]]
    # progress a person can follow
    assert "[loso 1/2]" in stdout and "[loso 2/2]" in stdout and "left" in stdout


def test_metric_names_identical_across_variants_and_history(loso_store):
    _, parent, client, _ = loso_store
    variants = children(client, parent, "variant")
    names = {r.data.tags["variant"]: set() for r in variants}
    for r in variants:
        test_names = {k for k in r.data.metrics if k.startswith("test_")}
        assert {"test_accuracy", "test_macro_f1", "test_n_beats", "test_veb_tp", "test_sveb_fn",
                "test_precision_N", "test_recall_N"} <= test_names
        names[r.data.tags["variant"]] |= test_names
        if r.data.tags["variant"] == "transfer":
            hist = client.get_metric_history(r.info.run_id, "finetune_loss")
            assert [m.step for m in hist] == list(range(FT_EPOCHS))
    assert names["transfer"] == names["no_transfer"]
    for b in children(client, parent, "base"):
        assert [m.step for m in client.get_metric_history(b.info.run_id, "loss")] == list(range(EPOCHS))
    for v in ("no_transfer", "transfer"):
        for stat in ("veb_se", "sveb_fpr", "accuracy", "macro_f1"):
            assert f"gross_{v}_{stat}" in parent.data.metrics
            assert f"avg_{v}_{stat}" in parent.data.metrics


def test_confusion_matrices_match_metrics_and_parent_sums(loso_store, tmp_path):
    _, parent, client, _ = loso_store
    sums = {}
    for r in children(client, parent, "variant"):
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"confusion_matrix.json", "confusion_matrix.png"} <= arts
        cm_doc = mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/confusion_matrix.json")
        cm = np.array(cm_doc["matrix"])
        assert cm_doc["labels"] == ["N", "S", "V", "F", "Q"]
        assert cm.sum() == r.data.metrics["test_n_beats"]
        assert np.trace(cm) / cm.sum() == pytest.approx(r.data.metrics["test_accuracy"])
        assert cm[2, 2] == r.data.metrics["test_veb_tp"]
        v = r.data.tags["variant"]
        sums[v] = sums.get(v, 0) + cm
    for v, total in sums.items():
        doc = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/confusion_matrix_{v}.json")
        np.testing.assert_array_equal(np.array(doc["matrix"]), total)
        assert np.trace(total) / total.sum() == pytest.approx(parent.data.metrics[f"gross_{v}_accuracy"])


def test_registry_versions_and_served_model_classifies_its_patient(loso_store, mitdb_dir, dataset_cache):
    uri, parent, client, _ = loso_store
    transfer_runs = {r.data.tags["patient"]: r for r in children(client, parent, "variant")
                     if r.data.tags["variant"] == "transfer"}
    for rec in RECORDS:
        v = client.get_model_version_by_alias(f"ecg-transfer-{rec}", "newest")
        assert v.tags["loso_run_id"] == parent.info.run_id
        assert v.tags["run_id"] == transfer_runs[rec].info.run_id == v.run_id
        assert v.tags["base_model_uri"].startswith("models:/")
    for s in SUBJECTS:
        v = client.get_model_version_by_alias(f"ecg-base-{s}", "newest")
        assert v.tags["subject"] == s and v.tags["loso_run_id"] == parent.info.run_id
    logged = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    assert len(logged) == len(RECORDS) + len(SUBJECTS)

    # The registered transfer model of 201, loaded as a plain pyfunc, classifies 201's test beats
    # exactly as logged: same accuracy as the run's test_accuracy.
    ds = prepare(PrepareConfig(data_dir=str(mitdb_dir), records=",".join(RECORDS), cache_dir=str(dataset_cache)))
    test = (ds.record == "201") & (ds.part == "test")
    model = mlflow.pyfunc.load_model("models:/ecg-transfer-201@newest")
    logits = np.asarray(model.predict({"beat": ds.x[test], "rr": ds.rr_features()[test]}))  # default rr_cnn
    assert logits.shape == (test.sum(), 5)
    acc = float((logits.argmax(1) == ds.label[test]).mean())
    assert acc == pytest.approx(transfer_runs["201"].data.metrics["test_accuracy"], abs=1e-9)


def test_every_variant_run_logs_the_calls_and_probabilities_of_its_test_beats(loso_store, mitdb_dir, dataset_cache):
    _, parent, client, _ = loso_store
    ds = prepare(PrepareConfig(data_dir=str(mitdb_dir), records=",".join(RECORDS), cache_dir=str(dataset_cache)))
    classes = ds.classes
    code = {c: i for i, c in enumerate(classes)}
    for r in children(client, parent, "variant"):
        rec = r.data.tags["patient"]
        table = read_predictions(r.info.run_id)
        test = (ds.record == rec) & (ds.part == "test")
        # one row per test beat of the record, in the beat table's order, with its rhythm and class
        assert table["sample"].tolist() == ds.sample[test].tolist() and set(table["record"]) == {rec}
        assert table["rhythm"].tolist() == ds.rhythm[test].tolist()
        assert table["symbol"].tolist() == ds.symbol[test].tolist()
        assert table["label"].tolist() == [classes[c] for c in ds.label[test]]
        pred = table["predicted"].map(code).to_numpy()
        cm = np.array(mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/confusion_matrix.json")["matrix"])
        np.testing.assert_array_equal(confusion(ds.label[test].astype(int), pred, len(classes)), cm)
        p = table[[f"p_{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-4)
        assert (p[np.arange(len(p)), pred] >= p.max(axis=1) - 1e-5).all()  # the call is the likeliest class
    # The logged probabilities are the softmax of the registered transfer model's outputs.
    run = next(r for r in children(client, parent, "variant")
               if r.data.tags["patient"] == "201" and r.data.tags["variant"] == "transfer")
    (version,) = [v for v in client.search_model_versions("name = 'ecg-transfer-201'") if v.run_id == run.info.run_id]
    model = mlflow.pyfunc.load_model(f"models:/ecg-transfer-201/{version.version}")
    test = (ds.record == "201") & (ds.part == "test")
    logits = np.asarray(model.predict({"beat": ds.x[test], "rr": ds.rr_features()[test]}))
    table = read_predictions(run.info.run_id)
    np.testing.assert_allclose(table[[f"p_{c}" for c in classes]].to_numpy(), softmax(logits), atol=1e-4)


def test_heldout_subject_never_reaches_base_training(loso_store, mitdb_dir, dataset_cache):
    _, parent, client, _ = loso_store
    ds = prepare(PrepareConfig(data_dir=str(mitdb_dir), records=",".join(RECORDS), cache_dir=str(dataset_cache)))
    for b in children(client, parent, "base"):
        subject = b.data.tags["subject"]
        held = set(b.data.tags["heldout_records"].split(","))
        trained = set(b.data.tags["train_records"].split(","))
        assert held == {r for r in RECORDS if subject_of(r) == subject}
        assert not held & trained and all(subject_of(r) != subject for r in trained)
        # the beat count actually trained on is every beat of the other subjects, nothing more
        assert int(b.data.params["n_train_beats"]) == int(np.isin(ds.record, sorted(trained)).sum())
        assert int(b.data.params["n_train_beats"]) == int((ds.subject != subject).sum())


def test_seed_repeats_metrics_and_new_version_moves_alias(loso_store, cache_root, mitdb_dir, monkeypatch):
    """A second LOSO run with the same seed, in-process, gives identical per-patient metrics and a
    second registered version that the alias now points at."""
    from ecg_mlflow.loso import LosoConfig, run_loso
    from ecg_mlflow.training import TrainConfig

    uri, parent, client, _ = loso_store
    cfg = LosoConfig(prepare=PrepareConfig(data_dir=str(mitdb_dir), records=",".join(RECORDS),
                                           cache_dir=str(cache_root / "beats")),
                     train=TrainConfig(epochs=EPOCHS, finetune_epochs=FT_EPOCHS, seed=7))
    # the environment, not mlflow.set_experiment: that would stay active for later tests' stores
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", parent.info.experiment_id)
    second = run_loso(cfg)
    first_m = {(r.data.tags["patient"], r.data.tags["variant"]): r.data.metrics for r in children(client, parent, "variant")}
    second_run = client.get_run(second)
    second_m = {(r.data.tags["patient"], r.data.tags["variant"]): r.data.metrics
                for r in children(client, second_run, "variant")}
    assert first_m.keys() == second_m.keys()
    for key in first_m:
        for name, value in first_m[key].items():
            if name.startswith("test_"):  # NaN (no denominator) must repeat as NaN
                assert second_m[key][name] == value or (np.isnan(value) and np.isnan(second_m[key][name])), (key, name)
    v = client.get_model_version_by_alias("ecg-transfer-100", "newest")
    assert str(v.version) == "2" and v.tags["loso_run_id"] == second


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_PARAMETERS = [
    (["--epochs", "0"], "epochs"),
    (["--epochs", "1.5"], "epochs"),
    (["--learning-rate", "-1"], "learning_rate"),
    (["--records", "100,999"], "999"),
    (["--label-scheme", "ahaa"], "label_scheme"),
    (["--finetune-minutes", "31"], "finetune_minutes"),
    (["--holdout", "105"], "105"),
    (["--base-folds", "3"], "base_folds"),  # two subjects cannot make three groups
    (["--evaluate-on", "train"], "evaluate_on"),
    (["--finetune-layers", "conv"], "finetune_layers"),
    (["--rr-features", "heart"], "rr_features"),
    (["--augment", "2"], "augment"),
    (["--augment-shift", "41"], "augment_shift"),  # more than a quarter of the 160-sample window
    (["--sveb-gate", "1"], "sveb_gate"),
    (["--recent-reference", "normal"], "recent_reference"),
    (["--recent-reference", "ontime"], "recent_reference"),  # acts only on recent_cnn; the default is rr_cnn
    (["--label-scheme", "raw", "--sveb-gate", "0.99"], "sveb_gate"),  # raw labels have no S class to gate
    (["--sveb-regular", "1"], "sveb_regular"),
    (["--label-scheme", "raw", "--sveb-regular", "0.99"], "sveb_regular"),
    (["--sveb-regular", "0.99", "--regular-measure", "median"], "regular_measure"),
    (["--regular-measure", "lagged"], "regular_measure"),  # without sveb_regular it would do nothing
    (["--early-sveb", "1"], "early_sveb"),
    (["--label-scheme", "raw", "--early-sveb", "0.01"], "early_sveb"),
    (["--early-sveb", "0.002", "--early-sveb-rate", "-100"], "early_sveb_rate"),
    (["--early-sveb-rate", "100"], "early_sveb_rate"),  # without early_sveb it would do nothing
    (["--early-sveb", "0.002", "--early-reference", "mode"], "early_reference"),
    (["--early-reference", "median"], "early_reference"),  # without early_sveb it would do nothing
    (["--sveb-af", "1"], "sveb_af"),
    (["--label-scheme", "raw", "--sveb-af", "0.02"], "sveb_af"),  # raw labels have no S class to veto
    (["--sveb-af", "0.02"], "sveb_af"),  # 100 and 101 have no atrial fibrillation to train its detector on
    (["--kernel-size", "0"], "kernel_size"),
    (["--kernel-size", "23"], "kernel_size"),  # three convolutions of 23 leave nothing of a 160-sample window
    (["--width", "9"], "width"),
    (["--core-window", "160"], "core_window"),  # the whole 160-sample window: nothing left for the context
    (["--window", "256", "--window-offset", "48", "--core-window", "161"], "core_window"),  # past the window's end
    (["--window", "256", "--core-window", "160", "--kernel-size", "23"], "kernel_size"),  # checked on the core
    (["--window", "7"], "window must be at least 8"),  # too short for any kernel: the window is the culprit
    (["--core-window", "6"], "core_window must be at least 8"),  # the same for the core the convolutions see
    (["--lr-schedule", "linear"], "lr_schedule"),
    (["--finetune-replay-early", "-5"], "finetune_replay_early"),
    (["--finetune-replay-select", "closest"], "finetune_replay_select"),
    (["--finetune-replay-select", "nearest", "--finetune-replay", "0"], "finetune_replay_select"),
    (["--finetune-premature", "-5"], "finetune_premature"),
    (["--label-scheme", "raw", "--finetune-premature", "5"], "finetune_premature"),
    (["--focal-gamma", "-1"], "focal_gamma"),
    (["--ema", "1"], "ema"), (["--subject-balance", "2"], "subject_balance"),
]


def _assert_refused(code: int, stderr: str, culprit: str, uri: str) -> None:
    assert code == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert "error:" in last and culprit in last  # ours: "error: ...", argparse: "loso.py: error: ..."
    assert "Traceback" not in stderr
    # nothing half-written: no run was started
    client = MlflowClient(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("args, culprit", BAD_PARAMETERS)
def test_bad_parameters_fail_before_training_with_a_clear_error(args, culprit, tracking_uri, mitdb_dir, cache_root,
                                                                monkeypatch, capsys):
    # The script itself, run in this process: a new interpreter for each case would spend most of
    # its time starting TensorFlow. The next test runs two cases as real processes.
    code, err = run_script_in_process(REPO / "entrypoints" / "loso.py", ["--records", "100,101", *args], monkeypatch,
                                      capsys, ECG_DATA_DIR=str(mitdb_dir), ECG_CACHE_DIR=str(cache_root))
    _assert_refused(code, err, culprit, tracking_uri)


@pytest.mark.parametrize("args, culprit", [BAD_PARAMETERS[0], BAD_PARAMETERS[3]])  # argparse's, ours
def test_bad_parameters_exit_2_from_a_real_process(args, culprit, tmp_path, mitdb_dir, cache_root):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(REPO / "entrypoints" / "loso.py"), "--records", "100,101", *args],
                          env=entry_env(uri, mitdb_dir, cache_root), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    _assert_refused(proc.returncode, proc.stderr, culprit, uri)


@pytest.mark.parametrize("entry, records, culprit", [
    ("loso", "100", "two subjects"), ("loso", "100,101", "105"), ("train_base", "100,101", "105"),
    ("transfer", "100,101", "105")])
def test_record_names_are_checked_before_any_record_is_read(entry, records, culprit, tracking_uri, tmp_path):
    from ecg_mlflow import loso
    from ecg_mlflow.experiment import LosoConfig

    # No record files and no download: a check made after reading the records would stop at the
    # first missing file (or, on a user's machine, download the database first) instead.
    empty = tmp_path / "no-records"
    empty.mkdir()
    cfg = LosoConfig(prepare=PrepareConfig(data_dir=str(empty), records=records, download=False),
                     holdout="105" if entry == "loso" and records != "100" else None)
    call = {"loso": lambda: loso.preflight(cfg), "train_base": lambda: loso.run_train_base(cfg, "105"),
            "transfer": lambda: loso.run_transfer(cfg, "models:/ecg-base-105/1", "105")}[entry]
    with pytest.raises(ValueError, match=culprit):
        call()
    client = MlflowClient(tracking_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not list(empty.iterdir())


def test_unreachable_tracking_server_is_named_before_work(tmp_path, mitdb_dir, cache_root):
    uri = f"http://127.0.0.1:{_closed_port()}"
    proc = subprocess.run([sys.executable, str(REPO / "entrypoints" / "loso.py"), "--records", "100,101"],
                          env=entry_env(uri, mitdb_dir, cache_root), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert uri in proc.stderr.strip().splitlines()[-1] and "unreachable" in proc.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_loso_stops_at_an_unreachable_tracking_server_before_mlflow_run(tmp_path, mitdb_dir, cache_root):
    # `mlflow run` creates its run first and MLflow's client retries a server that is down for
    # minutes; make loso asks `python -m ecg_mlflow.tracking` first. make echoes each command it
    # runs, so `mlflow run` missing from its output means it never started.
    uri = f"http://127.0.0.1:{_closed_port()}"
    venv = Path(sys.prefix)
    proc = subprocess.run(["make", "-C", str(REPO), "-o", str(venv / "bin" / ".installed"), "loso", f"VENV={venv}",
                           "P=-P records=100"], cwd=tmp_path,
                          env=entry_env(uri, mitdb_dir, cache_root, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"error: tracking server {uri} is unreachable" in proc.stderr
    assert "ecg_mlflow.tracking" in proc.stdout and "mlflow run" not in proc.stdout, proc.stdout
    # the same check passes a store that is there, and names it
    ok = subprocess.run([sys.executable, "-m", "ecg_mlflow.tracking"], env=entry_env(f"sqlite:///{tmp_path}/m.db",
                        mitdb_dir, cache_root), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == f"tracking store: sqlite:///{tmp_path}/m.db", ok.stderr
    assert not (tmp_path / "m.db").exists()  # asking creates no store


def test_train_base_then_transfer_compose_and_refuse_a_leaky_base(tracking_uri, mitdb_dir, cache_root, monkeypatch,
                                                                 capsys):
    uri = tracking_uri
    env = entry_env(uri, mitdb_dir, cache_root)
    common = {"records": "100,101", "epochs": 1, "finetune_epochs": 1}
    proc = run_entry("train_base", {**common, "holdout": "100"}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_entry("transfer", {**common, "base_model_uri": "models:/ecg-base-100@newest", "patient": "100"}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    variants = client.search_runs([exp.experiment_id], "tags.`ecg.role` = 'variant'")
    assert sorted(r.data.tags["variant"] for r in variants) == ["no_transfer", "transfer"]
    assert {r.data.tags["patient"] for r in variants} == {"100"}
    assert client.get_model_version_by_alias("ecg-transfer-100", "newest").tags["base_model_uri"] == \
        "models:/ecg-base-100@newest"

    def transfer(**params: object) -> tuple[int, str]:  # the script in this process: refusals come before work
        argv = [f"--{k.replace('_', '-')}={v}" for k, v in {**common, **params}.items()]
        return run_script_in_process(REPO / "entrypoints" / "transfer.py", argv, monkeypatch, capsys,
                                     ECG_DATA_DIR=str(mitdb_dir), ECG_CACHE_DIR=str(cache_root))

    def n_runs() -> int:
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    before = n_runs()
    # The base model that held out 100 was trained on 101: using it for patient 101 would leak.
    code, err = transfer(base_model_uri="models:/ecg-base-100@newest", patient="101")
    assert code == 2 and "ecg-base-100" in err and "subject 101" in err, err[-2000:]
    # A transfer must make the base model's inputs as its training made them.
    code, err = transfer(base_model_uri="models:/ecg-base-100@newest", patient="100", model="recent_cnn",
                         recent_reference="ontime")
    assert code == 2 and "recent_reference='all'" in err and "ecg-base-100" in err, err[-2000:]
    assert n_runs() == before  # refused before any run was started


@pytest.mark.parametrize("entry", ["train_base", "transfer", "loso"])
def test_every_training_option_is_an_entry_point_parameter_with_its_default(entry):
    # A TrainConfig field missing from MLproject could not be set by `mlflow run`, and a stale
    # default there would silently differ from the package's.
    import dataclasses

    import yaml

    from ecg_mlflow.training import TrainConfig

    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"][entry]
    for f in dataclasses.fields(TrainConfig):
        param = spec["parameters"].get(f.name)
        assert param is not None, f"MLproject {entry} has no parameter {f.name}"
        default = f.default
        if isinstance(default, bool):
            assert str(param["default"]).lower() == str(default).lower(), f.name
        elif isinstance(default, (int, float)):
            assert float(param["default"]) == default, f.name
        else:
            assert param["default"] == default, f.name
        assert f"--{f.name.replace('_', '-')} {{{f.name}}}" in spec["command"], f"{entry} does not pass {f.name}"


@pytest.mark.parametrize("entry", ["prepare", "train_base", "transfer", "loso"])
def test_the_data_options_are_entry_point_parameters_with_their_defaults(entry):
    # The same for the PrepareConfig fields an entry point sets by a value of the same name.
    import yaml

    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"][entry]
    d = PrepareConfig()
    for name in ("window", "window_offset", "label_scheme", "finetune_minutes", "signal_filter"):
        default = spec["parameters"][name]["default"]
        assert (float(default) if isinstance(getattr(d, name), (int, float)) else default) == getattr(d, name), name
        assert f"--{name.replace('_', '-')} {{{name}}}" in spec["command"], f"{entry} does not pass {name}"
