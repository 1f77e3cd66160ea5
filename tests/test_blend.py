"""The `blend` entry point: real LOSO runs with real (tiny) Keras models in a real SQLite store,
blended, and the blend checked against each member model's own predictions."""

from __future__ import annotations

from dataclasses import replace

import mlflow
import mlflow.keras
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from scipy.special import softmax
from sklearn.metrics import confusion_matrix

from conftest import REPO, run_script_in_process
from ecg_mlflow import compare as C
from ecg_mlflow.blend import BLEND_TAG, BlendError, Member, blend, check_members, mean_probabilities
from ecg_mlflow.dataset import PrepareConfig, prepare
from ecg_mlflow.executors import ExecConfig
from ecg_mlflow.loso import LosoConfig, beat_source, run_loso
from ecg_mlflow.metrics import ec57_counts, ec57_stats
from ecg_mlflow.predictions import read_predictions
from ecg_mlflow.splits import TEST
from ecg_mlflow.training import TrainConfig, model_input_names

RECORDS = "100,106,119,220"  # 106 and 119 hold hundreds of V beats (the tiny models call some), 100 and 220 S beats


@pytest.fixture(scope="module")
def store(tmp_path_factory, mitdb_dir, dataset_cache):
    """Three LOSO runs of RECORDS in one fresh store: A (rr_cnn, window 160), B (recent_cnn, window
    128, S gate) on the same patients, and C holding out record 100 only."""
    tmp = tmp_path_factory.mktemp("blend")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(k, raising=False)
    mlflow.set_tracking_uri(uri)
    prep = PrepareConfig(data_dir=str(mitdb_dir), records=RECORDS, finetune_minutes=5, cache_dir=str(dataset_cache))
    train = TrainConfig(epochs=2, finetune_epochs=2, seed=3, finetune_replay=4)
    a_cfg = LosoConfig(prepare=prep, train=train, base_folds=2, register=False, execution=ExecConfig(threads=1))
    b_cfg = replace(a_cfg, prepare=replace(prep, window=128),
                    train=replace(train, model="recent_cnn", seed=4, sveb_gate=0.9))
    runs = {"A": run_loso(a_cfg), "B": run_loso(b_cfg), "C": run_loso(replace(a_cfg, holdout="100", base_folds=0))}
    runs["blend"] = blend(f"{runs['A']},{runs['B']}", echo=False)
    yield runs, MlflowClient(uri), {"A": a_cfg, "B": b_cfg}
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mp.undo()


def _children(client: MlflowClient, parent: str) -> dict[tuple[str, str], object]:
    exp = client.get_run(parent).info.experiment_id
    kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}' and tags.`ecg.role` = 'variant'")
    return {(r.data.tags["patient"], r.data.tags["variant"]): r for r in kids}


def _member_probabilities(cfg: LosoConfig, child, variant: str) -> pd.DataFrame:
    """One member's softmax probabilities on its patient's test beats, computed here from its logged model."""
    ds = prepare(cfg.prepare)
    rows = np.flatnonzero((ds.record == child.data.tags["patient"]) & (ds.part == TEST))
    uri = f"runs:/{child.info.run_id}/model" if variant == "transfer" else child.data.tags["base_model_uri"]
    model = mlflow.keras.load_model(uri)
    x = beat_source(ds, cfg.train.recent_reference).inputs(rows, model_input_names(model))
    p = softmax(model.predict(x, verbose=0).astype(np.float64), axis=1)
    return pd.DataFrame(p, index=pd.Index(ds.sample[rows], name="sample")).assign(label=ds.label[rows])


@pytest.mark.slow
@pytest.mark.realdata
def test_blend_is_the_mean_of_its_members_probabilities_and_compare_reads_it(store, tmp_path):
    runs, client, cfgs = store
    parent = client.get_run(runs["blend"])
    assert parent.info.status == "FINISHED" and parent.data.tags["ecg.role"] == "loso"
    assert parent.data.tags[BLEND_TAG] == f"{runs['A']},{runs['B']}" and parent.data.params["model"] == "blend"
    kids = _children(client, runs["blend"])
    members = {k: _children(client, runs[k]) for k in ("A", "B")}
    assert sorted(kids) == sorted(members["A"]) and len(kids) == 8  # 4 patients x 2 variants

    summed = {}
    classes = prepare(cfgs["A"].prepare).classes
    for (patient, variant), kid in kids.items():
        a = _member_probabilities(cfgs["A"], members["A"][(patient, variant)], variant)
        b = _member_probabilities(cfgs["B"], members["B"][(patient, variant)], variant)
        both = a.join(b, how="inner", lsuffix="_a", rsuffix="_b")
        assert (both.label_a == both.label_b).all()
        k = len(classes)
        mean = (both[[f"{c}_a" for c in range(k)]].to_numpy() + both[[f"{c}_b" for c in range(k)]].to_numpy()) / 2
        expected = confusion_matrix(both.label_a, mean.argmax(axis=1), labels=range(k))
        logged = mlflow.artifacts.load_dict(f"runs:/{kid.info.run_id}/confusion_matrix.json")
        assert logged["labels"] == classes
        np.testing.assert_array_equal(np.asarray(logged["matrix"]), expected)
        # The 160-sample window cannot hold a few beats that the 128-sample one does, or the other way.
        assert kid.data.metrics["test_beats_left_out"] == len(a.index.symmetric_difference(b.index))
        assert kid.data.metrics["test_n_beats"] == len(both) > 0
        assert kid.data.tags["members"] == ",".join(members[m][(patient, variant)].info.run_id for m in "AB")
        # Its predictions.csv holds the blended beats, their mean probabilities and the calls.
        table = read_predictions(kid.info.run_id)
        assert table["sample"].tolist() == both.index.tolist() and set(table["record"]) == {patient}
        np.testing.assert_allclose(table[[f"p_{c}" for c in classes]].to_numpy(), mean, atol=1e-5)
        assert table["predicted"].tolist() == [classes[i] for i in mean.argmax(axis=1)]
        summed[variant] = summed.get(variant, 0) + expected
    for variant, cm in summed.items():
        stats = ec57_stats(ec57_counts(cm, classes))
        for stat in ("veb_se", "sveb_ppv"):
            got = parent.data.metrics[f"gross_{variant}_{stat}"]
            want = stats.get(stat, np.nan)
            assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want)
    assert summed["transfer"][:, 2].sum() > 0  # the blend calls V beats: its argmax is put to the test

    # compare reads the blend like any LOSO run, beside a member on the same patients.
    result = C.compare(loso_runs=f"{runs['A']},{runs['blend']}", n_boot=200, echo=False)
    assert [a.run.run_id for a in result.analyses] == [runs["A"], runs["blend"]]
    assert result.differences is not None and not result.differences.table.empty
    assert set(result.differences.table.run) == {1}
    assert not result.analyses[1].by_rhythm.empty  # errors by rhythm from the blend's predictions


@pytest.mark.slow
@pytest.mark.realdata
def test_bad_runs_are_refused_by_name_before_anything_is_logged(store, monkeypatch, capsys):
    runs, client, cfgs = store
    exp = client.get_run(runs["A"]).info.experiment_id
    other = client.create_run(exp, tags={"ecg.role": "compare"}).info.run_id
    running = client.create_run(exp, tags={"ecg.role": "loso"}).info.run_id  # never ended: RUNNING
    count = lambda: len(client.search_runs([exp], max_results=5000))  # noqa: E731
    before = count()
    cases = [
        (runs["A"], "at least two"),
        (f"{runs['A']},{runs['A']}", "more than once"),
        (f"{runs['A']}+{runs['C']},{runs['B']}", "pools runs"),
        (f"{runs['A']},0123456789abcdef0123456789abcdef", "'0123456789abcdef0123456789abcdef' not found"),
        (f"{runs['A']},{other}", f"{other!r} .* is not a LOSO run"),
        (f"{runs['A']},{running}", f"{running!r} .* status RUNNING"),
        (f"{runs['A']},{runs['blend']}", "is itself a blend"),
        (f"{runs['A']},{runs['C']}", "hold out different patients .*'106', '119', '220'"),
    ]
    for ids, message in cases:
        with pytest.raises(BlendError, match=message):
            blend(ids, echo=False)
    assert count() == before

    # The entry point: one line naming the run, exit status 2.
    code, err = run_script_in_process(REPO / "entrypoints" / "blend.py", ["--loso-runs", f"{runs['A']},{other}"],
                                      monkeypatch, capsys)
    assert code == 2 and err.startswith("error: loso_runs:") and other in err and len(err.strip().splitlines()) == 1
    assert count() == before


def test_members_must_score_the_same_beats():
    a = Member("a", "a", "0", LosoConfig(prepare=PrepareConfig(finetune_minutes=5)), {("100", "transfer"): ("x", "y")})
    b = replace(a, run_id="b", cfg=LosoConfig(prepare=PrepareConfig(finetune_minutes=10)))
    with pytest.raises(BlendError, match="run 'b' has finetune_minutes=10.*run 'a' has finetune_minutes=5"):
        check_members([a, b])
    c = replace(a, run_id="c", cfg=replace(a.cfg, evaluate_on="validation"))
    with pytest.raises(BlendError, match="evaluate_on='validation'"):
        check_members([a, c])
    assert check_members([a, replace(a, run_id="d", cfg=replace(a.cfg, prepare=replace(a.cfg.prepare, window=256)))]) \
        == ["100"]


def test_mean_probabilities_match_beats_by_sample_and_count_those_left_out():
    p1 = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    p2 = np.array([[0.3, 0.7], [0.5, 0.5], [0.1, 0.9]])
    # Member 2 lists its beats in another order and lacks sample 10, member 1 lacks sample 40.
    samples, labels, mean, left_out = mean_probabilities([
        (np.array([10, 20, 30]), np.array([0, 1, 0]), p1),
        (np.array([40, 30, 20]), np.array([1, 0, 1]), p2),
    ])
    np.testing.assert_array_equal(samples, [20, 30])
    np.testing.assert_array_equal(labels, [1, 0])
    np.testing.assert_allclose(mean, [[(0.2 + 0.1) / 2, (0.8 + 0.9) / 2], [(0.6 + 0.5) / 2, (0.4 + 0.5) / 2]])
    assert left_out == 2
    with pytest.raises(BlendError, match="label the same beats differently"):
        mean_probabilities([(np.array([1, 2]), np.array([0, 1]), p1[:2]), (np.array([1, 2]), np.array([0, 0]), p2[:2])])
