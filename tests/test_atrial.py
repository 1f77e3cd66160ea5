"""``sveb_af``: no S calls where the rhythm before a beat reads as atrial fibrillation or flutter.

What the atria did before each beat (``beats.atrial_activity``), the small detector trained on the
training subjects' reference rhythms (``training.fit_atrial_detector``), the veto saved into the model
(``models.veto_atrial``), and all of them through a real LOSO run on MIT-BIH records and through
``classify``, which must repeat its calls."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import loso_in_fresh_store
from ecg_mlflow.beats import ATRIAL_BEATS, ATRIAL_RHYTHMS, atrial_activity, atrial_span
from ecg_mlflow.dataset import PrepareConfig
from ecg_mlflow.models import (ATRIAL_DETECTOR_NAME, ATRIAL_INPUTS, build_atrial_detector, build_model,
                               model_input_names, veto_atrial)
from ecg_mlflow.training import BeatSource, atrial_threshold, fit_atrial_detector, predict_classes, predict_logits

WINDOW = 32


def test_atrial_span_is_the_quarter_second_before_the_r_peak_every_second_sample():
    assert atrial_span(80, 360.0) == slice(0, 62, 2)  # the default 160-sample window: 31 samples
    assert atrial_span(128, 360.0) == slice(38, 110, 2)  # 256 samples: 0.25 s to 0.05 s before R
    assert atrial_span(10, 360.0) == slice(0, 1, 2)  # an R peak near the start still leaves one sample


def test_atrial_activity_averages_the_beats_before_in_the_same_record_only():
    rng = np.random.default_rng(0)
    n, r_peak, fs = 30, 40, 100.0  # span: samples 15 .. 34, every second one
    x = rng.normal(0, 1, (n, 60, 2)).astype(np.float32)
    record = np.array(["a", "b"] * (n // 2), dtype=object)
    sample = np.arange(n) * 100
    order = rng.permutation(n)  # rows in any order
    got = atrial_activity(record[order], sample[order], x[order], r_peak, fs)
    got = got[np.argsort(order)]
    span = x[:, atrial_span(r_peak, fs), 0]
    assert got.shape == (n, span.shape[1] + 1) and got.dtype == np.float32
    for rows in (np.flatnonzero(record == "a"), np.flatnonzero(record == "b")):
        np.testing.assert_array_equal(got[rows[0]], 0.0)  # no beat before: zeros
        np.testing.assert_allclose(got[rows[1], :-1], span[rows[0]], rtol=1e-6)  # one before: its span
        assert got[rows[1], -1] == 0.0  # a spread needs two
        for i in range(ATRIAL_BEATS, len(rows)):
            before = span[rows[i - ATRIAL_BEATS:i]]  # the beats before, never the beat itself
            np.testing.assert_allclose(got[rows[i], :-1], before.mean(axis=0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[rows[i], -1], before.std(axis=0, ddof=1).mean(), rtol=1e-5)
    # the same P wave before every beat leaves no spread; a beat's own window never counts
    same = np.repeat(x[:1], n, axis=0)
    same[5, :, 0] += 10.0
    steady = atrial_activity(np.zeros(n, int), sample, same, r_peak, fs)
    assert steady[5, -1] == 0.0 and steady[6, -1] > 0.0 and steady[10, -1] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="R peak inside the window"):
        atrial_activity(record, sample, x, 60, fs)


def toy_atrial(n: int = 600, seed: int = 0):
    """Beats whose rhythm is 'fibrillation' (target) when the atrial span is noisy and the RR
    irregular; an rr_cnn model and the detector's inputs for them."""
    rng = np.random.default_rng(seed)
    target = rng.random(n) < 0.3
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.05, (n, WINDOW, 2)).astype(np.float32)
    x[np.arange(n), 8 + 8 * y, 0] += 1.5
    rr = np.stack([1 + 0.3 * (y == 1), np.ones(n), np.full(n, 0.8)], axis=1).astype(np.float32)
    atrial = rng.normal(0, 0.05, (n, 9)).astype(np.float32)
    atrial[target] += rng.normal(0, 1.0, (int(target.sum()), 9)).astype(np.float32)
    atrial[:, -1] = np.abs(atrial[:, :-1]).mean(axis=1)
    irregular = np.where(target, rng.uniform(0.1, 0.3, n), rng.uniform(0.0, 0.05, n)).astype(np.float32)[:, None]
    source = BeatSource(x, y, rr, rhythm={"atrial": atrial, "rr_irregular": irregular, "rr_lagged": irregular})
    return source, y, target


def test_the_detector_learns_the_rhythm_and_the_veto_rules_out_s_only_where_it_fires(tmp_path):
    import keras

    source, y, target = toy_atrial()
    train, test = np.arange(400), np.arange(400, 600)
    detector = fit_atrial_detector(source, train, target, seed=1, epochs=20, batch_size=32)
    assert detector.name == ATRIAL_DETECTOR_NAME and set(model_input_names(detector)) == set(ATRIAL_INPUTS)
    score = predict_logits(detector, source, test)[:, 0]
    assert score[target[test]].min() > score[~target[test]].max()  # it tells the two rhythms apart
    threshold = atrial_threshold(detector, source, y, train, 1, 0.2)
    s_train = train[y[train] == 1]  # the 1 - share quantile over the training rows' class-1 beats
    assert threshold == pytest.approx(np.quantile(predict_logits(detector, source, s_train)[:, 0], 0.8), abs=1e-5)
    plain = build_model("rr_cnn", WINDOW, 2, 3, source.x_np[train], source.rhythm_np["rr"][train])
    vetoed = veto_atrial(plain, detector, threshold, class_index=1)
    assert set(model_input_names(vetoed)) == {"beat", *ATRIAL_INPUTS}
    rows = np.arange(600)
    want = plain.predict(source.inputs(rows, model_input_names(plain)), verbose=0)
    got = vetoed.predict(source.inputs(rows, model_input_names(vetoed)), verbose=0)
    fires = predict_logits(detector, source, rows)[:, 0] > threshold
    assert 50 < fires.sum() < 550
    np.testing.assert_allclose(got[~fires], want[~fires], rtol=1e-6)  # where it stays quiet: untouched
    np.testing.assert_allclose(got[fires][:, [0, 2]], want[fires][:, [0, 2]], rtol=1e-6)
    assert (got[fires, 1] < want[fires, 1] - 1000).all()  # where it fires: never class 1
    pred = predict_classes(vetoed, source, rows)
    path = tmp_path / "vetoed.keras"
    vetoed.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.models.load_model(path)
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]  # no optimizer state left behind
    np.testing.assert_array_equal(predict_classes(loaded, source, rows), pred)
    with pytest.raises(ValueError, match="class_index"):
        veto_atrial(plain, detector, threshold, class_index=3)
    with pytest.raises(ValueError, match="detector"):
        veto_atrial(plain, plain, threshold, class_index=1)


def test_the_detector_needs_both_rhythms_and_all_its_inputs():
    source, _, target = toy_atrial()
    with pytest.raises(ValueError, match="both in atrial fibrillation or flutter and out of it"):
        fit_atrial_detector(source, np.flatnonzero(~target), target, seed=1)
    with pytest.raises(ValueError, match="rr_lagged"):
        build_atrial_detector({n: source.rhythm_np[n] for n in ATRIAL_INPUTS if n != "rr_lagged"})


# --------------------------------------------------------------------------------------------
# through LOSO on real records, and classify

# 100 (sinus rhythm, 33 S beats) and 203 (atrial fibrillation and flutter) train; the patient, 201, has
# atrial fibrillation and S beats.
RECORDS, HOLDOUT, SHARE = "100,201,203", "201", 0.3


@pytest.fixture(scope="module")
def store(tmp_path_factory, mitdb_dir, cache_root):
    """A LOSO run with ``sveb_af`` in a fresh store, in this process; yields (uri, run id, client, cfg)."""
    from ecg_mlflow.experiment import LosoConfig
    from ecg_mlflow.training import TrainConfig

    cfg = LosoConfig(prepare=PrepareConfig(data_dir=str(mitdb_dir), records=RECORDS,
                                           cache_dir=str(cache_root / "beats")),
                     train=TrainConfig(sveb_af=SHARE, epochs=1, finetune_epochs=1, seed=3), holdout=HOLDOUT)
    with loso_in_fresh_store(tmp_path_factory.mktemp("atrial"), "atrial-test", cfg) as (uri, loso_run, client):
        yield uri, loso_run, client, cfg


def test_loso_vetoes_s_where_its_detector_trained_on_the_other_subjects_reads_fibrillation(store, mitdb_dir):
    import keras

    import mlflow.keras

    from ecg_mlflow.classify import ClassifyConfig, classify
    from ecg_mlflow.dataset import prepare
    from ecg_mlflow.loso import beat_source
    from ecg_mlflow.predictions import read_predictions

    uri, loso_run, client, cfg = store
    (run,) = [r for r in client.search_runs([client.get_run(loso_run).info.experiment_id],
                                            f"tags.loso_run_id = '{loso_run}' and tags.patient = '{HOLDOUT}'")
              if r.data.tags.get("variant") == "transfer"]
    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
    assert set(ATRIAL_INPUTS) <= set(model_input_names(model))
    detector, inner = (next(layer for layer in model.layers if isinstance(layer, keras.Model) and
                            (layer.name == ATRIAL_DETECTOR_NAME) == want) for want in (True, False))
    ds = prepare(cfg.prepare)
    src, s = beat_source(ds), ds.classes.index("S")
    train = np.flatnonzero(ds.record != HOLDOUT)  # the other subjects: 100 and 203
    # the detector learned the training subjects' reference rhythm: fibrillation and flutter read higher
    score = predict_logits(detector, src, train)[:, 0]
    atrial = np.isin(ds.rhythm[train], ATRIAL_RHYTHMS)
    assert atrial.sum() > 100 and score[atrial].mean() > score[~atrial].mean() + 1.0
    # its threshold is the quantile over their S beats, as logged
    threshold = float(run.data.params["sveb_af_threshold"])
    s_train = train[ds.label[train] == s]
    assert threshold == pytest.approx(np.quantile(predict_logits(detector, src, s_train)[:, 0], 1 - SHARE), abs=1e-4)
    # on the patient's test beats: no S where it fires, the inner model's logits where it does not
    rows = np.flatnonzero((ds.record == HOLDOUT) & (ds.part == "test"))
    fires = predict_logits(detector, src, rows)[:, 0]
    on, off = fires > threshold + 1e-3, fires < threshold - 1e-3
    assert on.sum() > 50 and off.sum() > 50
    got = predict_logits(model, src, rows)
    plain = predict_logits(inner, src, rows)
    assert not (np.argmax(got, 1)[on] == s).any() and (got[on, s] < plain[on, s] - 1000).all()
    np.testing.assert_allclose(got[off], plain[off], rtol=1e-5, atol=1e-5)
    # classify makes the atrial input from the record alone and repeats the run's calls
    done = classify(ClassifyConfig(record=HOLDOUT, model_uri=f"models:/ecg-transfer-{HOLDOUT}@newest",
                                   data_dir=str(mitdb_dir)))
    ours, theirs = read_predictions(done.run_id), read_predictions(run.info.run_id)
    assert len(ours) == len(theirs) > 1000 and ours["predicted"].tolist() == theirs["predicted"].tolist()
    probabilities = [c for c in theirs.columns if c.startswith("p_")]
    np.testing.assert_allclose(ours[probabilities].to_numpy(), theirs[probabilities].to_numpy(), atol=2e-5)


def test_sveb_af_is_refused_by_name_when_training_subjects_have_no_fibrillation(mitdb_dir, cache_root):
    from ecg_mlflow.dataset import prepare
    from ecg_mlflow.experiment import LosoConfig
    from ecg_mlflow.loso import check_sveb_gate
    from ecg_mlflow.splits import loso_folds
    from ecg_mlflow.training import TrainConfig

    cfg = LosoConfig(prepare=PrepareConfig(data_dir=str(mitdb_dir), records="100,101,103",
                                           cache_dir=str(cache_root / "beats")), train=TrainConfig(sveb_af=0.02))
    ds = prepare(cfg.prepare)
    assert ds.rhythm.size and not np.isin(ds.rhythm, ATRIAL_RHYTHMS).any()
    with pytest.raises(ValueError, match=r"sveb_af=0.02: .* no beats in atrial fibrillation or flutter"):
        check_sveb_gate(cfg, ds, loso_folds(ds.record, ds.part))
