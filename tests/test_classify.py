"""``classify``: a registered model applied to a record's beats, from its reference annotations or
from a QRS detector, read back from a real store. The models come from a real (tiny) LOSO run whose
models read every input classify makes (beat, RR, five-minute RR, the last RR intervals, recent beats,
and through the rules the irregularity and the RR over the five-minute median) and carry all three
saved-in rules (``sveb_gate``, ``sveb_regular``, ``early_sveb`` with its heart-rate bound
``early_sveb_rate``, read against the five-minute median with ``early_reference=median``); they were
trained on windows moved off the R peak (``augment_shift``), which acts on training alone. Their run
band-passed its records and put the R peak 16 samples past each window's middle (``window_offset``),
both of which classify must repeat; their convolutions read a 128-sample core around the peak beside a
context branch over the whole window (``core_window``), which the saved model carries."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import wfdb

import mlflow
from mlflow import MlflowClient

from conftest import REPO, entry_env, loso_in_fresh_store, run_script_in_process
from ecg_mlflow.classify import ANNOTATOR_OUT, INPUTS, ClassifyConfig, ClassifyError, classify, load_model, match_beats
from ecg_mlflow.dataset import PrepareConfig
from ecg_mlflow.labels import BEAT_SYMBOLS
from ecg_mlflow.models import model_input_names
from ecg_mlflow.predictions import read_predictions
from ecg_mlflow.records import DataError, read_record
from ecg_mlflow.server import free_port
from wfdb_records import write_record

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

RECORDS = ["100", "103", "208"]
FINETUNE_MINUTES = 5.0


@pytest.fixture(scope="module")
def store(tmp_path_factory, mitdb_dir, cache_root):
    """A LOSO run over RECORDS in a fresh store, in this process; yields (uri, LOSO run id, client)."""
    from ecg_mlflow.experiment import LosoConfig
    from ecg_mlflow.training import TrainConfig

    cfg = LosoConfig(prepare=PrepareConfig(data_dir=str(mitdb_dir), records=",".join(RECORDS),
                                           finetune_minutes=FINETUNE_MINUTES, cache_dir=str(cache_root / "beats"),
                                           signal_filter="bandpass", window_offset=16),
                     train=TrainConfig(model="recent_cnn", rr_features="sequence", recent_reference="ontime",
                                       sveb_gate=0.99, sveb_regular=0.99, regular_measure="lagged",
                                       early_sveb=0.002, early_sveb_rate=60,
                                       early_reference="median", augment_shift=8, core_window=128, epochs=1,
                                       finetune_epochs=1, seed=3))
    with loso_in_fresh_store(tmp_path_factory.mktemp("classify"), "classify-test", cfg) as store:
        yield store


def _variant(client, loso_run: str, record: str, variant: str):
    (run,) = [r for r in client.search_runs([client.get_run(loso_run).info.experiment_id],
                                            f"tags.loso_run_id = '{loso_run}' and tags.patient = '{record}'")
              if r.data.tags.get("variant") == variant]
    return run


def _nested_layer(model, name: str):
    """Layer ``name`` of ``model`` or of a model nested in it (the transfer rules wrap the model)."""
    import keras

    for layer in model.layers:
        found = layer if layer.name == name else \
            (_nested_layer(layer, name) if isinstance(layer, keras.Model) else None)
        if found is not None:
            return found
    return None


def _runs(client) -> int:
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.mark.parametrize("record", ["103", "208"])
def test_reference_beats_get_the_calls_of_the_loso_run(store, mitdb_dir, record):
    """On the beats LOSO scored, the registered transfer model (and the base model) called through
    classify give the LOSO run's calls and probabilities to the last digit: every input is made as
    LOSO made it, from the record alone."""
    _, loso_run, client = store
    assert client.get_run(loso_run).data.params["augment_shift"] == "8"
    assert "sveb_regular_threshold" in _variant(client, loso_run, record, "transfer").data.params
    # The run's records were band-passed (not the default high-pass); classify must filter the record
    # as that run did for the calls to agree.
    assert client.get_run(loso_run).data.params["signal_filter"] == "bandpass"
    assert client.get_run(loso_run).data.params["window_offset"] == "16"  # and its windows not centred
    for uri, variant in ((f"models:/ecg-transfer-{record}@newest", "transfer"),
                         (f"models:/ecg-base-{record}@newest", "no_transfer")):
        if variant == "transfer":  # the model reads every input classify makes but sveb_af's, which needs
            # records with atrial fibrillation (test_atrial's classify test reads it); rr_lagged through
            # sveb_regular's gate (regular_measure=lagged), rr_irregular through early_sveb's
            assert set(model_input_names(load_model(uri).model)) == set(INPUTS) - {"atrial"}
            assert _nested_layer(load_model(uri).model, "core_crop").cropping == (32, 0)  # samples 32..159
            assert load_model(uri).model.get_layer("promote_fast_step")  # early_sveb's rate bound is saved in
            assert "rr_median" in model_input_names(load_model(uri).model)  # and it reads the five-minute median
        done = classify(ClassifyConfig(record=record, model_uri=uri, data_dir=str(mitdb_dir)))
        run = client.get_run(done.run_id)
        assert run.data.params["beats"] == "annotations" and run.data.params["signal_filter"] == "bandpass"
        assert run.data.params["window_offset"] == "16"
        assert float(run.data.params["start_minute"]) == FINETUNE_MINUTES  # auto: the minutes it was tuned on
        ours, theirs = read_predictions(done.run_id), read_predictions(_variant(client, loso_run, record, variant).info.run_id)
        assert len(ours) == len(theirs) > 1000
        for column in ("sample", "symbol", "label", "rhythm", "predicted"):
            assert ours[column].tolist() == theirs[column].tolist(), (variant, column)
        probabilities = [c for c in theirs.columns if c.startswith("p_")]
        np.testing.assert_allclose(ours[probabilities].to_numpy(), theirs[probabilities].to_numpy(), atol=2e-5)
        loso_metrics = _variant(client, loso_run, record, variant).data.metrics
        for name in ("test_veb_se", "test_veb_ppv", "test_sveb_fpr", "test_accuracy"):
            assert run.data.metrics[name] == pytest.approx(loso_metrics[name], nan_ok=True), (variant, name)
        assert run.data.tags["ecg.role"] == "classify"
        assert run.data.tags["model_run_id"] == client.get_model_version_by_alias(uri[8:].split("@")[0], "newest").run_id


def test_detected_beats_are_matched_to_the_reference_and_written_as_annotations(store, mitdb_dir, tmp_path):
    _, _, client = store
    done = classify(ClassifyConfig(record="208", model_uri="models:/ecg-transfer-208@newest",
                                   data_dir=str(mitdb_dir), beats="detect", start_minute=0))
    m = client.get_run(done.run_id).data.metrics
    ref = read_record(mitdb_dir, "208")
    n_ref = int(np.isin(ref.ann_symbol, list(BEAT_SYMBOLS)).sum())
    assert abs(m["n_reference"] - n_ref) <= 5  # the reference beats whose window fits the record
    assert m["detect_se"] == pytest.approx(m["n_matched"] / m["n_reference"])
    assert m["detect_ppv"] == pytest.approx(m["n_matched"] / m["n_classified"])
    assert m["detect_se"] > 0.9 and m["detect_ppv"] > 0.99
    assert m["test_n_beats"] == m["n_matched"]  # class statistics over the matched beats only

    table = read_predictions(done.run_id)
    matched = table[table["label"] != ""]
    # each matched beat carries the symbol of a reference beat within 150 ms (54 samples)
    ref_beats = np.isin(ref.ann_symbol, list(BEAT_SYMBOLS))
    ref_sample, ref_symbol = ref.ann_sample[ref_beats], ref.ann_symbol[ref_beats]
    j = np.abs(ref_sample[None, :] - matched["sample"].to_numpy()[:, None]).argmin(axis=1)
    assert (np.abs(ref_sample[j] - matched["sample"].to_numpy()) <= 54).all()
    assert (ref_symbol[j] == matched["symbol"].to_numpy()).mean() > 0.999
    assert (table.loc[table["label"] == "", "symbol"] == "").all()

    path = mlflow.artifacts.download_artifacts(f"runs:/{done.run_id}/208.{ANNOTATOR_OUT}", dst_path=str(tmp_path))
    ann = wfdb.rdann(path[: -len(ANNOTATOR_OUT) - 1], ANNOTATOR_OUT)
    assert ann.sample.tolist() == table["sample"].tolist()  # 208 is stored at 360 Hz
    assert ann.symbol == table["predicted"].tolist()


def test_a_recording_without_annotations_at_another_rate(store, mitdb_dir, tmp_path):
    """Record 103's first eight minutes stored at 250 Hz without annotations: its beats are found,
    classified from minute 5 (auto: the model's fine-tune minutes, the record being 103), and the
    calls are written at the recording's own rate, where 103's reference beats are."""
    from scipy.signal import resample_poly

    rec = read_record(mitdb_dir, "103")
    n360 = 8 * 60 * 360
    signal = resample_poly(rec.signal[:n360], 25, 36, axis=0)
    write_record(tmp_path, "103", fs=250, seconds=len(signal) / 250, signal=signal, lead_names=rec.lead_names)
    assert not (tmp_path / "103.atr").exists()
    done = classify(ClassifyConfig(record="103", model_uri="models:/ecg-transfer-103@newest", data_dir=str(tmp_path)))
    run = MlflowClient().get_run(done.run_id)
    assert run.data.params["beats"] == "detect" and float(run.data.params["start_minute"]) == FINETUNE_MINUTES
    assert set(run.data.metrics) == {"n_classified"}  # no reference, no statistics

    path = mlflow.artifacts.download_artifacts(f"runs:/{done.run_id}/103.{ANNOTATOR_OUT}", dst_path=str(tmp_path / "out"))
    ann = wfdb.rdann(path[: -len(ANNOTATOR_OUT) - 1], ANNOTATOR_OUT)
    assert ann.fs == 250 and len(ann.sample) == run.data.metrics["n_classified"]
    beats = np.isin(rec.ann_symbol, list(BEAT_SYMBOLS))
    truth = rec.ann_sample[beats] * 250 / 360
    truth = truth[(truth >= 5 * 60 * 250) & (truth < len(signal) - 60)]
    nearest = np.abs(truth[None, :] - ann.sample[:, None]).min(axis=1)
    assert (nearest <= 3).mean() > 0.99  # within 12 ms of 103's reference beats
    assert abs(len(ann.sample) - len(truth)) <= 3


def test_match_beats_pairs_the_closest_first_and_each_beat_once():
    reference = np.array([100, 200, 300, 1000])
    detected = np.array([95, 104, 260, 290, 700])
    # 104 and 95 both reach 100: 104 is closer; 260 and 290 both reach 300 (and 260 reaches 200, 60 away,
    # beyond the tolerance of 54): 290 wins; 700 reaches nothing.
    assert match_beats(detected, reference, 54).tolist() == [-1, 0, -1, 2, -1]
    assert match_beats(detected, reference, 60).tolist() == [-1, 0, 1, 2, -1]
    assert match_beats(np.array([], dtype=np.int64), reference, 54).tolist() == []
    assert match_beats(detected, np.array([], dtype=np.int64), 54).tolist() == [-1] * 5


BAD = [
    (["--record", "999"], "999.hea"),
    (["--record", "../103"], "record"),
    (["--model-uri", "models:/ecg-transfer-999@newest"], "models:/ecg-transfer-999@newest"),
    (["--model-uri", "ecg-transfer-103"], "model_uri"),
    (["--beats", "guess"], "beats"),
    (["--start-minute", "-1"], "start_minute"),
    (["--start-minute", "31"], "start_minute=31"),
]


@pytest.mark.parametrize("args, culprit", BAD)
def test_bad_input_is_named_before_any_run(store, mitdb_dir, cache_root, monkeypatch, capsys, args, culprit):
    uri, _, client = store
    before = _runs(client)
    argv = {"--record": "103", "--model-uri": "models:/ecg-transfer-103@newest", "--data-dir": str(mitdb_dir)}
    argv.update(dict(zip(args[::2], args[1::2])))
    code, err = run_script_in_process(REPO / "entrypoints" / "classify.py", [x for kv in argv.items() for x in kv],
                                      monkeypatch, capsys, MLFLOW_TRACKING_URI=uri, ECG_CACHE_DIR=str(cache_root))
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "error:" in last and culprit in last, last
    assert "Traceback" not in err
    assert _runs(client) == before


@pytest.mark.parametrize("params, culprit", [({"signal_filter": "lowpass"}, "signal_filter 'lowpass'"),
                                             ({"window_offset": "80"}, "window_offset '80'"),
                                             ({"window_offset": "-81"}, "window_offset '-81'"),
                                             ({"window_offset": "1.5"}, "window_offset '1.5'")])
def test_a_model_whose_run_logged_an_unusable_filter_or_window_offset_is_refused_by_name(store, params, culprit):
    """A 160-sample model whose run says its records were filtered in a way classify does not know, or
    its windows cut with the R peak outside them: refused, naming the parameter, before any record is read."""
    from ecg_mlflow.tracking import log_keras_model

    _, loso_run, client = store
    model = load_model("models:/ecg-transfer-103@newest").model
    example = {name: np.zeros((1, *model.input[name].shape[1:]), np.float32) for name in model_input_names(model)}
    with mlflow.start_run(experiment_id=client.get_run(loso_run).info.experiment_id):
        mlflow.log_params({"label_scheme": "aami", **params})
        uri = log_keras_model(model, example)
    with pytest.raises(ClassifyError, match=culprit):
        load_model(uri)


def test_a_record_without_annotations_refuses_beats_annotations(store, mitdb_dir, tmp_path):
    rec = read_record(mitdb_dir, "103")
    write_record(tmp_path, "103", seconds=60, signal=rec.signal[:60 * 360], lead_names=rec.lead_names)
    _, _, client = store
    before = _runs(client)
    with pytest.raises(DataError, match=r"103\.atr"):
        classify(ClassifyConfig(record="103", model_uri="models:/ecg-transfer-103@newest", data_dir=str(tmp_path),
                                beats="annotations"))
    with pytest.raises(ClassifyError, match="start_minute=5 leaves no beat"):  # auto: 5, the record lasts 1
        classify(ClassifyConfig(record="103", model_uri="models:/ecg-transfer-103@newest", data_dir=str(tmp_path)))
    assert _runs(client) == before


def test_unreachable_tracking_server_is_named(tmp_path, mitdb_dir, cache_root):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run([sys.executable, str(REPO / "entrypoints" / "classify.py"), "--record", "103",
                           "--model-uri", "models:/ecg-transfer-103@newest"],
                          env=entry_env(uri, mitdb_dir, cache_root), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert uri in proc.stderr.strip().splitlines()[-1] and "unreachable" in proc.stderr
