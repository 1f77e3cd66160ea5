"""Quick and honest model choice: grouped base folds and the validation split of the fine-tune minutes.

- ``grouped_folds``: every subject is held out exactly once, 201 and 202 stay together, and no
  group's base-training mask holds any of its own subjects;
- ``validation_fold``: fine-tune and evaluation beats both come from the fine-tune minutes, in
  time order, and no beat of the test part is selected;
- a LOSO run with ``base_folds=2, evaluate_on=validation`` on real records trains two base models,
  evaluates each patient on exactly the second half of its fine-tune minutes, and registers nothing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mlflow import MlflowClient

from ecg_mlflow import loso as loso_mod
from ecg_mlflow.dataset import PrepareConfig, prepare
from ecg_mlflow.executors import ExecConfig
from ecg_mlflow.loso import LosoConfig, run_loso
from ecg_mlflow.splits import FINETUNE, TEST, grouped_folds, loso_folds, subject_of, time_split, validation_fold
from ecg_mlflow.training import TrainConfig, head_features


def toy_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Five records (201 and 202 one subject), 12 beats each, one every 50 s over 10 minutes."""
    records = ["100", "201", "202", "103", "104"]
    record = np.repeat(records, 12)
    time_s = np.tile(np.arange(12) * 50.0, len(records))
    return record, time_split(time_s, 5), time_s


def test_grouped_folds_hold_out_every_subject_once_and_never_train_on_it():
    record, part, _ = toy_table()
    subjects = ["100", "201", "103", "104"]
    folds = grouped_folds(record, part, subjects, 2)
    assert [f.subject for f in folds] == ["group1of2", "group2of2"]
    assert [f.records for f in folds] == [("100", "103"), ("201", "202", "104")]  # round-robin, 202 with 201
    held = [r for f in folds for r in f.records]
    assert sorted(held) == sorted(set(record)) and len(held) == len(set(held))
    for f in folds:
        trained = set(record[f.train])
        assert not {subject_of(r) for r in trained} & {subject_of(r) for r in f.records}
        assert trained | set(f.records) == set(record)
        for r in f.records:
            assert set(part[f.finetune[r]]) == {FINETUNE} and set(part[f.test[r]]) == {TEST}
            assert set(record[f.finetune[r] | f.test[r]]) == {r}
    # k equal to the number of subjects is plain LOSO
    plain = {f.subject: f for f in loso_folds(record, part, subjects)}
    for f in grouped_folds(record, part, subjects, 4):
        (s,) = {subject_of(r) for r in f.records}
        np.testing.assert_array_equal(f.train, plain[s].train)


@pytest.mark.parametrize("k", [1, 5])
def test_grouped_folds_refuse_a_group_count_that_does_not_fit(k):
    record, part, _ = toy_table()
    with pytest.raises(ValueError, match="base_folds"):
        grouped_folds(record, part, ["100", "201", "103", "104"], k)


def test_validation_fold_splits_the_finetune_minutes_and_never_selects_test_beats():
    record, part, time_s = toy_table()
    (fold,) = loso_folds(record, part, ["201"])
    val = validation_fold(fold, time_s, 5)
    np.testing.assert_array_equal(val.train, fold.train)
    for r in fold.records:
        tune, held = val.finetune[r], val.test[r]
        assert not (tune & held).any() and ((tune | held) == fold.finetune[r]).all()
        assert time_s[tune].max() < 150 <= time_s[held].min()  # first 2.5 minutes tune, the rest validates
        assert not ((tune | held) & fold.test[r]).any()


@pytest.mark.slow
@pytest.mark.realdata
def test_quick_validation_run_trains_group_bases_and_scores_only_finetune_minutes(tracking_uri, mitdb_dir,
                                                                                   dataset_cache, monkeypatch):
    prep = PrepareConfig(data_dir=str(mitdb_dir), records="100,101,103", finetune_minutes=5,
                         cache_dir=str(dataset_cache))
    cfg = LosoConfig(prepare=prep, train=TrainConfig(epochs=1, finetune_epochs=1, seed=3, finetune_replay=4,
                                                           finetune_replay_early=5, finetune_premature=3,
                                                           focal_gamma=2.0),
                     base_folds=2,
                     evaluate_on="validation", execution=ExecConfig(threads=1))
    parent_id = run_loso(cfg)
    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.data.params["base_folds"] == "2" and parent.data.params["evaluate_on"] == "validation"
    assert parent.data.params["focal_gamma"] == "2.0"
    assert parent.data.tags["evaluated_on"] == "validation"
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    bases = {r.info.run_name: r for r in kids if r.data.tags["ecg.role"] == "base"}
    assert sorted(bases) == ["base-group1of2", "base-group2of2"]
    for b in bases.values():
        held, trained = b.data.tags["heldout_records"].split(","), b.data.tags["train_records"].split(",")
        assert held and not set(held) & set(trained)
    ds = prepare(prep)
    variants = [r for r in kids if r.data.tags["ecg.role"] == "variant"]
    assert len(variants) == 6
    for r in variants:
        rec = r.data.tags["patient"]
        in_second_half = (ds.record == rec) & (ds.part == FINETUNE) & (ds.time_s >= 150)
        assert r.data.metrics["test_n_beats"] == in_second_half.sum() > 0
        base = client.get_run(r.data.tags["base_run_id"])
        assert rec in base.data.tags["heldout_records"].split(",")
    transfer = [r for r in variants if r.data.tags["variant"] == "transfer"]
    for r in transfer:
        tuned = (ds.record == r.data.tags["patient"]) & (ds.part == FINETUNE) & (ds.time_s < 150)
        assert r.data.params["n_finetune_beats"] == str(tuned.sum())
        n_early = int(r.data.params["n_replay_early_beats"])
        assert 4 + n_early <= int(r.data.params["n_replay_beats"]) <= 4 * len(ds.classes) + n_early
        base = client.get_run(r.data.tags["base_run_id"])
        trained = base.data.tags["train_records"].split(",")
        # As many early N beats as the other subjects' base-training rows hold, up to 5.
        pool = (ds.label == ds.classes.index("N")) & ds.early() & np.isin(ds.record, trained)
        assert n_early == min(5, int(pool.sum())) > 0
        # Three made-up S beats where the base-training rows hold an S beat to take the rhythm of.
        has_s = ((ds.label == ds.classes.index("S")) & np.isin(ds.record, trained)).any()
        assert r.data.params["n_premature_beats"] == ("3" if has_s else "0")
    assert not client.search_registered_models()  # validation models are not the experiment's

    # A run that takes these group base models: each one is loaded for every record of its group,
    # and here its features choose the replayed beats. A base model's features over its training rows
    # are computed once, not once per record of its group (two groups, three records).
    computed = []  # the rows of each feature computation

    def counted(model, source, idx):
        computed.append(len(idx))
        return head_features(model, source, idx)

    with monkeypatch.context() as m:
        m.setattr(loso_mod, "head_features", counted)
        again = run_loso(replace(cfg, base_run_id=parent_id,
                                 train=replace(cfg.train, finetune_epochs=2, finetune_replay_select="nearest")))
    train_rows = sorted(int(b.data.params["n_train_beats"]) for b in bases.values())
    assert sorted(n for n in computed if n in train_rows) == train_rows  # once per base model
    assert sorted(n for n in computed if n not in train_rows) == sorted(
        int(r.data.params["n_finetune_beats"]) for r in transfer)  # each patient's own beats
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{again}'")
    assert client.get_run(again).info.status == "FINISHED" and len(kids) == 6
    assert client.get_run(again).data.params["finetune_replay_select"] == "nearest"
    replayed = {r.data.tags["patient"]: r.data.params["n_replay_beats"] for r in transfer}
    # Chosen, not drawn: as many of each class as before (up to 4), so the same count.
    assert {r.data.tags["patient"]: r.data.params["n_replay_beats"] for r in kids
            if r.data.tags["variant"] == "transfer"} == replayed
    assert {r.data.tags["ecg.role"] for r in kids} == {"variant"}
    assert {r.data.tags["base_run_id"] for r in kids} == {b.info.run_id for b in bases.values()}


def test_holdout_takes_a_record_set_as_its_subjects():
    from ecg_mlflow.loso import holdout_subjects
    from ecg_mlflow.records import RECORD_SETS

    every = list(RECORD_SETS["half1"] + RECORD_SETS["half2"])
    half1 = holdout_subjects(every, "half1")
    assert len(half1) == 22 and "201" in half1 and "202" not in half1  # 202 is subject 201
    assert not set(half1) & set(holdout_subjects(every, "half2"))
    with pytest.raises(ValueError, match="not in the prepared records"):
        holdout_subjects(list(RECORD_SETS["half2"]), "half1")


def test_a_resumed_run_that_never_logged_replay_keeps_running_without_it():
    from ecg_mlflow.resume import config_of_run

    assert TrainConfig().finetune_replay == 75  # the default changed after runs without the field
    assert config_of_run({}, LosoConfig()).train.finetune_replay == 0
    assert config_of_run({"finetune_replay": "75.0"}, LosoConfig()).train.finetune_replay == 75
    assert config_of_run({"model": "seed_cnn"}, LosoConfig()).train.model == "seed_cnn"


def test_a_run_started_by_mlflow_run_reads_back_its_own_parameters():
    """`mlflow run` logs each value shell-quoted ('' for the empty data_dir and base_run_id); read
    back, they are the values, so a resume or a blend of such a run finds its data and no base run."""
    from mlflow.projects import _project_spec

    from conftest import REPO
    from ecg_mlflow.resume import config_of_run, logged_value

    entry = _project_spec.load_project(str(REPO)).get_entry_point("loso")
    logged, _ = entry.compute_parameters({"records": "100,101", "window": "256", "sveb_gate": "0.99",
                                          "signal_filter": "bandpass", "window_offset": "48"},
                                         storage_dir=None)
    assert logged["data_dir"] == "''" and logged["base_run_id"] == "''"  # what the store holds
    cfg = config_of_run(logged, LosoConfig())
    assert cfg.prepare.data_dir is None and cfg.base_run_id is None and cfg.prepare.window == 256
    assert cfg.prepare.records == "100,101" and cfg.train.sveb_gate == 0.99 and cfg.holdout == "all"
    assert cfg.prepare.signal_filter == "bandpass" and config_of_run({}, LosoConfig()).prepare.signal_filter == "none"
    assert cfg.prepare.window_offset == 48 and config_of_run({}, LosoConfig()).prepare.window_offset == 0
    given = LosoConfig(prepare=PrepareConfig(data_dir="/data/mitdb"))
    assert config_of_run(logged, given).prepare.data_dir == "/data/mitdb"
    assert logged_value("'a b'") == "a b" and logged_value("a b") == "a b" and logged_value("it's") == "it's"
