"""Models and training on tiny synthetic beats: logits, normalisation, freezing, seeds, weights."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_mlflow.models import (HEAD_LAYERS, build_ensemble, build_model, check_core_window, check_kernel_size,
                               ensemble_members,
                               gate_irregular, gate_premature, lead_stats, model_input_names, promote_early,
                               transfer_copy)
from ecg_mlflow.training import (BeatSource, TrainConfig, class_weights, compute_dtype, early_normal_rows,
                                 early_threshold, fine_tune, head_features, irregular_threshold,
                                 nearest_replay_rows, predict_classes, predict_logits, premature_rows,
                                 premature_threshold, replay_rows, subject_weights, train_base)

WINDOW = 32


def toy_beats(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three separable classes: a spike at a class-specific position on lead 0, offset lead 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.05, (n, WINDOW, 2)).astype(np.float32)
    x[np.arange(n), 8 + 8 * y, 0] += 1.5
    x[:, :, 1] += 3.0  # a lead far from zero mean: normalisation must handle it
    rr = np.stack([1 + 0.3 * (y == 1), np.ones(n), np.full(n, 0.8)], axis=1).astype(np.float32)
    return x, y, rr


FAST = TrainConfig(model="seed_cnn", class_weight="none", epochs=3, batch_size=32, finetune_epochs=2,
                   learning_rate=3e-3, seed=1)


def test_last_layer_gives_logits_and_normalisation_is_fitted_on_training_beats():
    x, y, _ = toy_beats()
    model = build_model("seed_cnn", WINDOW, 2, 3, x[:400])
    assert model.get_layer("logits").get_config()["activation"] == "linear"
    norm = model.get_layer("normalize")
    mean, var = lead_stats(x[:400])
    np.testing.assert_allclose(np.ravel(norm.mean), mean, rtol=1e-5)
    np.testing.assert_allclose(np.ravel(norm.variance), var, rtol=1e-5)
    assert not np.allclose(mean, lead_stats(x[400:])[0], rtol=1e-6)  # fitted on training rows only
    logits = model.predict(x[:50], verbose=0)
    assert (logits < 0).any()  # a ReLU on the output could never give this


def test_trains_to_separate_classes_and_reports_history():
    x, y, _ = toy_beats()
    model, hist = train_base(x[:500], y[:500], 3, FAST)
    assert len(hist["loss"]) == FAST.epochs and hist["loss"][-1] < hist["loss"][0]
    assert (predict_classes(model, x[500:]) == y[500:]).mean() > 0.9


def test_source_with_indices_equals_arrays_and_same_seed_repeats():
    x, y, rr = toy_beats()
    src = BeatSource(x, y, rr)
    idx = np.arange(100, 500)
    m1, h1 = train_base(src, idx, 3, FAST)
    m2, h2 = train_base(x[idx], y[idx], 3, FAST)
    assert h1["loss"] == h2["loss"]
    for a, b in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(a, b)
    _, h3 = train_base(src, idx, 3, TrainConfig(**{**FAST.__dict__, "seed": 2}))
    assert h3["loss"] != h1["loss"]


def test_several_steps_per_execution_change_no_number(monkeypatch):
    import ecg_mlflow.training as training

    x, y, rr = toy_beats()
    src, idx = BeatSource(x, y, rr), np.arange(333)  # 11 batches of 32: not a multiple of 16
    cfg = TrainConfig(**{**FAST.__dict__, "model": "rr_cnn"})
    assert training.STEPS_PER_EXECUTION > 1
    base, hist = train_base(src, idx, 3, cfg)
    tuned, ft_hist = fine_tune(base, src, np.arange(333, 380), cfg)  # 2 batches: fewer than one execution
    monkeypatch.setattr(training, "STEPS_PER_EXECUTION", 1)
    base1, hist1 = train_base(src, idx, 3, cfg)
    tuned1, ft_hist1 = fine_tune(base1, src, np.arange(333, 380), cfg)
    assert hist == hist1 and ft_hist == ft_hist1
    for a, b in zip(tuned.get_weights(), tuned1.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_predict_logits_on_no_beats_has_the_models_output_shape():
    """Also for a model that has never been called (a Sequential one built from a shape has no
    symbolic output to read the shape from)."""
    import keras

    from ecg_mlflow.training import predict_logits

    model = keras.Sequential([keras.layers.Conv1D(4, 3, name="conv"), keras.layers.Flatten(name="flatten"),
                              keras.layers.Dense(5, name="logits")])
    model.build((None, 16, 2))
    empty = predict_logits(model, np.zeros((0, 16, 2)))
    assert empty.shape == (0, 5) and empty.dtype == np.float32
    assert predict_logits(model, np.ones((3, 16, 2)), batch_size=2).shape == (3, 5)


@pytest.mark.parametrize("model_name", ["seed_cnn", "rr_cnn"])
def test_predict_logits_equals_keras_predict_to_the_bit_for_any_batch_split(model_name):
    from ecg_mlflow.training import predict_logits

    x, y, rr = toy_beats()
    src = BeatSource(x, y, rr)
    model, _ = train_base(src, np.arange(400), 3, TrainConfig(**{**FAST.__dict__, "model": model_name}))
    rows = np.arange(400, 600)
    inputs = src.inputs(rows, model_input_names(model))
    # The float rounding may depend on the batch size (the CPU kernels differ by shape), so each
    # split is held against Keras's predict with the same batches, compiled with several steps
    # per execution as training leaves it.
    for batch_size in (64, 7, 4096):  # several full batches and a short one; many; one
        expected = model.predict(inputs, batch_size=batch_size, verbose=0)
        got = predict_logits(model, src, rows, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == (200, 3)
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(predict_logits(model, inputs), expected)  # arrays as well as a source
    assert predict_logits(model, src, np.arange(0)).shape == (0, 3)
    # the graph kept for the model does not keep the model (a LOSO run makes two per fold)
    import gc
    import weakref

    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_kernel_size_sets_every_convolution_and_is_checked_against_the_window():
    x, y, rr = toy_beats()
    cfg = TrainConfig(**{**FAST.__dict__, "model": "rr_cnn", "kernel_size": 4})
    model, _ = train_base(BeatSource(x, y, rr), np.arange(500), 3, cfg)
    assert [model.get_layer(f"conv{i}").kernel.shape[0] for i in (1, 2, 3)] == [4, 4, 4]
    assert (predict_classes(model, BeatSource(x, y, rr), np.arange(500, 600)) == y[500:]).mean() > 0.9
    # 32 samples: kernel 4 leaves 29 -> 14 -> 11 -> 5 -> 2 -> 1 position, kernel 5 none
    check_kernel_size(4, WINDOW)
    for bad in (5, 0, 2.0):
        with pytest.raises(ValueError, match=r"kernel_size must be a whole number from 1 to 4 \(for window 32\)"):
            check_kernel_size(bad, WINDOW)
    with pytest.raises(ValueError, match=r"got 5; kernel_size 5 needs a window of at least 36 samples$"):
        check_kernel_size(5, WINDOW)
    # A window too short for any kernel is the culprit, not the kernel: 7 samples leave no position
    # even at kernel 1 (7 -> 3 -> 1 -> 0), 8 do, and kernel 3 needs 22 (22 -> 10 -> 4 -> 1).
    with pytest.raises(ValueError, match=r"^window must be at least 8 samples for the three rounds of convolution "
                                         r"and pooling, 22 with kernel_size 3, got 7$"):
        check_kernel_size(3, 7)
    check_kernel_size(1, 8)
    check_kernel_size(3, 22)
    with pytest.raises(ValueError, match="kernel_size"):
        build_model("seed_cnn", WINDOW, 2, 3, x, kernel_size=5)


def context_beats(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64-sample beats, the R peak at index 40, the same spike there in every class; the class shows
    only in a bump 30 to 36 samples before the peak, outside a 32-sample core window around it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.05, (n, 64, 2)).astype(np.float32)
    x[:, 40, 0] += 1.5
    x[np.arange(n), 4 + 2 * y, 0] += 1.0
    rr = np.ones((n, 3), dtype=np.float32)
    return x, y, rr


def test_core_window_crops_the_convolutions_to_the_peak_and_a_context_branch_reads_the_rest(tmp_path):
    import keras

    x, y, rr = context_beats()
    source = BeatSource(x, y, rr, r_peak=40)
    cfg = TrainConfig(**{**FAST.__dict__, "core_window": 32, "epochs": 6})
    model, _ = train_base(source, np.arange(500), 3, cfg)
    # The convolutions see samples 24..55: 16 before the peak and 16 from it on, as a centred 32-sample window.
    ramp = np.tile(np.arange(64, dtype=np.float32)[None, :, None], (1, 1, 2))
    crop = keras.Model(model.inputs, model.get_layer("core_crop").output)({"beat": ramp})
    mean, var = (np.ravel(a) for a in (model.get_layer("normalize").mean, model.get_layer("normalize").variance))
    np.testing.assert_allclose(np.asarray(crop)[0], (ramp[0, 24:56] - mean) / np.sqrt(var), rtol=1e-4, atol=1e-4)
    assert model.get_layer("conv1").input.shape[1] == 32 and model.get_layer("context_conv1").input.shape[1] == 64
    # The class lies outside the core: only the context branch can tell them apart.
    assert (predict_classes(model, source, np.arange(500, 600)) == y[500:]).mean() > 0.9
    plain, _ = train_base(BeatSource(x[:, 24:56], y, rr), np.arange(500), 3, TrainConfig(**{**cfg.__dict__,
                                                                                           "core_window": 0}))
    assert (predict_classes(plain, x[500:, 24:56]) == y[500:]).mean() < 0.6
    # Transfer re-trains the head only: the context branch is part of the frozen feature extractor.
    tuned, _ = fine_tune(model, source, np.arange(500, 560), cfg)
    for name in ("context_conv1", "context_conv2", "conv1"):
        for a, b in zip(tuned.get_layer(name).get_weights(), model.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    model.save(tmp_path / "core.keras")  # built-in layers only: loads without custom objects
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "core.keras").predict(x[:20], verbose=0),
                               model.predict(x[:20], verbose=0), rtol=1e-5, atol=1e-5)


def test_core_window_is_checked_against_the_window_and_the_r_peak():
    x, _, rr = context_beats(50)
    check_core_window(32, 64, 40)
    check_core_window(0, 64, 40)
    for bad, peak in ((64, 32), (49, 40), (49, 23)):  # the whole window; past its end; before its start
        with pytest.raises(ValueError, match=r"core_window must fit inside the 64-sample window .* at most"):
            check_core_window(bad, 64, peak)
    check_core_window(48, 64, 40)  # 24 before the peak and 24 from it on: samples 16..63
    with pytest.raises(ValueError, match=r"index 40: at most 48 samples\), got 49"):
        check_core_window(49, 64, 40)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="core_window must be 0 \\(off\\) or a whole number"):
            check_core_window(bad, 64, 40)
    with pytest.raises(ValueError, match=r"context branch \(at least 46 samples\), got window 40"):
        check_core_window(20, 40, 20)  # 40 -> 8 -> 0 positions after the two convolutions and pools
    check_core_window(20, 46, 23)  # 46 -> 10 -> 1
    # The kernel is checked against what the convolutions see: 32 samples take kernel 4, not 5.
    build_model("seed_cnn", 64, 2, 3, x, core_window=32, r_peak=40, kernel_size=4)
    with pytest.raises(ValueError, match=r"kernel_size must be a whole number from 1 to 4 \(for core_window 32\), "
                                         r"got 5; kernel_size 5 needs a core_window of at least 36 samples$"):
        build_model("seed_cnn", 64, 2, 3, x, core_window=32, r_peak=40, kernel_size=5)
    with pytest.raises(ValueError, match=r"^core_window must be at least 8 samples .*, got 6$"):
        build_model("seed_cnn", 64, 2, 3, x, core_window=6, r_peak=40, kernel_size=3)
    with pytest.raises(ValueError, match="core_window"):
        build_model("rr_cnn", 64, 2, 3, x, rr, core_window=32, r_peak=56)


def test_cosine_schedule_takes_each_trainings_rate_to_zero_over_its_epochs(tmp_path):
    import keras

    x, y, rr = toy_beats()
    source = BeatSource(x, y, rr)
    cosine = TrainConfig(**{**FAST.__dict__, "lr_schedule": "cosine"})
    base, _ = train_base(source, np.arange(500), 3, cosine)
    steps = cosine.epochs * -(-500 // cosine.batch_size)
    assert int(base.optimizer.iterations) == steps
    assert float(base.optimizer.learning_rate) < 1e-9  # decayed to 0 at the last step
    schedule = base.optimizer.get_config()["learning_rate"]["config"]  # what a saved model keeps
    assert schedule["initial_learning_rate"] == cosine.learning_rate and schedule["decay_steps"] == steps
    assert (predict_classes(base, source, np.arange(500, 600)) == y[500:]).mean() > 0.9
    base.save(tmp_path / "cosine.keras")  # a built-in schedule: loads without custom objects
    loaded = keras.models.load_model(tmp_path / "cosine.keras")
    np.testing.assert_array_equal(predict_classes(loaded, source, np.arange(500, 600)),
                                  predict_classes(base, source, np.arange(500, 600)))
    tuned, _ = fine_tune(base, source, np.arange(500, 560), cosine)
    assert int(tuned.optimizer.iterations) == cosine.finetune_epochs * -(-60 // cosine.finetune_batch_size)
    assert float(tuned.optimizer.learning_rate) < 1e-9
    plain, _ = train_base(source, np.arange(500), 3, FAST)
    assert float(plain.optimizer.learning_rate) == pytest.approx(FAST.learning_rate)
    # the same seed, another schedule: other weights
    assert not np.allclose(plain.get_layer("conv3").kernel.numpy(), base.get_layer("conv3").kernel.numpy())


def test_focal_loss_weighs_each_beat_by_how_wrong_it_is_and_a_saved_model_loads(tmp_path):
    import keras

    x, y, rr = toy_beats()
    source = BeatSource(x, y, rr)
    focal = TrainConfig(**{**FAST.__dict__, "focal_gamma": 2.0, "epochs": 1})
    base, hist = train_base(source, np.arange(500), 3, focal)
    assert base.loss.get_config()["gamma"] == 2.0
    # The loss it trained with is (1 - p)^2 times the cross-entropy, p the softmax of the true class.
    logits = base.predict(x[500:], verbose=0).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True))[np.arange(100), y[500:]]
    by_hand = np.mean((1 - p) ** 2 * -np.log(p))
    got = base.evaluate(source.dataset(np.arange(500, 600), 32, 0, ("beat",), shuffle=False, one_hot=3),
                        verbose=0, return_dict=True)["loss"]
    assert got == pytest.approx(by_hand, rel=1e-4)
    assert by_hand < np.mean(-np.log(p))  # below the plain cross-entropy of the same beats
    base.save(tmp_path / "focal.keras")  # a built-in loss: loads without custom objects
    loaded = keras.models.load_model(tmp_path / "focal.keras")
    assert loaded.loss.get_config()["gamma"] == 2.0
    tuned, tuned_hist = fine_tune(base, source, np.arange(500, 560), focal)
    assert tuned.loss.get_config()["gamma"] == 2.0 and len(tuned_hist["finetune_loss"]) == focal.finetune_epochs
    plain, plain_hist = train_base(source, np.arange(500), 3, TrainConfig(**{**focal.__dict__, "focal_gamma": 0.0}))
    assert isinstance(plain.loss, keras.losses.SparseCategoricalCrossentropy)
    assert hist["loss"][0] < plain_hist["loss"][0]  # the same start, each beat's loss scaled down


# mixed: the loss-scale optimizer a GPU run gets wraps Adam, and must pass the average on (float16 runs on a CPU too)
@pytest.mark.parametrize("precision", ["float32", "mixed"])
def test_ema_ends_each_training_on_the_moving_average_of_its_steps_weights(tmp_path, precision):
    import keras

    x, y, rr = toy_beats()
    source = BeatSource(x, y, rr)
    # One step an epoch (batch 200 of 200 beats): a run of k epochs ends on the weights of step k
    # of the longer runs, so the plain runs of 1 .. 6 epochs give each step's weights.
    one_step = TrainConfig(**{**FAST.__dict__, "batch_size": 200, "epochs": 6, "dropout": 0.0, "precision": precision})
    steps = [train_base(source, np.arange(200), 3, TrainConfig(**{**one_step.__dict__, "epochs": k}))[0]
             .get_layer("logits").kernel.numpy() for k in range(1, 7)]
    m = 0.8
    averaged, _ = train_base(source, np.arange(200), 3, TrainConfig(**{**one_step.__dict__, "ema": m}))
    by_hand = steps[0].astype(np.float64)  # the average starts at the first step's weights
    for w in steps[1:]:
        by_hand = m * by_hand + (1 - m) * w
    got = averaged.get_layer("logits").kernel.numpy()
    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, steps[-1], atol=1e-4)  # not the last step's weights
    averaged.save(tmp_path / "ema.keras")  # Adam's own option: loads without custom objects
    loaded = keras.models.load_model(tmp_path / "ema.keras")
    np.testing.assert_array_equal(loaded.get_layer("logits").kernel.numpy(), got)
    # Fine-tuning averages too: the same base, other head weights than without it, the rest frozen.
    tuned_plain, _ = fine_tune(averaged, source, np.arange(200, 260), one_step)
    tuned, _ = fine_tune(averaged, source, np.arange(200, 260), TrainConfig(**{**one_step.__dict__, "ema": m}))
    inner = (lambda o: getattr(o, "inner_optimizer", o))  # mixed: Adam inside the loss-scale optimizer
    assert inner(tuned.optimizer).use_ema and not inner(tuned_plain.optimizer).use_ema
    assert not np.allclose(tuned.get_layer("logits").kernel.numpy(), tuned_plain.get_layer("logits").kernel.numpy(),
                           atol=1e-4)
    np.testing.assert_array_equal(tuned.get_layer("conv1").kernel.numpy(), averaged.get_layer("conv1").kernel.numpy())


def test_subject_weights_even_out_subjects_inside_each_class():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 0])
    g = np.array(["a", "a", "a", "b", "a", "a", "b", "b"])
    # Class 0: a has 3 beats, b 2; power 1 gives each 1/3 and 1/2, scaled to add up to the class's 5.
    np.testing.assert_allclose(subject_weights(y, g, 1.0), [5 / 6, 5 / 6, 5 / 6, 5 / 4, 3 / 4, 3 / 4, 3 / 2, 5 / 4],
                               rtol=1e-6)
    half = subject_weights(y, g, 0.5)
    for c in (0, 1):
        assert half[y == c].sum() == pytest.approx((y == c).sum())  # each class keeps its total
    assert half[g == "a"][0] < 1 < half[3]  # the subject with more beats of the class weighs less a beat
    np.testing.assert_array_equal(subject_weights(y, g, 0.0), np.ones(8))
    with pytest.raises(ValueError, match="alike"):
        subject_weights(y, g[:3], 1.0)


def test_subject_balance_weights_each_training_beat_and_otherwise_trains_as_before():
    x, y, rr = toy_beats()
    source = BeatSource(x, y, rr)
    # Each batch carries the weights of its own rows: weight = row number shows which rows they are.
    for xb, yb, wb in source.dataset(np.arange(100), 32, seed=3, weights=np.arange(len(y), dtype=np.float32)):
        rows = wb.numpy().astype(int)
        np.testing.assert_array_equal(xb.numpy(), x[rows])
        np.testing.assert_array_equal(yb.numpy(), y[rows])
    # Two subjects with as many beats of each class as each other weigh 1 a beat: the run is the
    # run without the option, to the bit, with and without class weights folded in.
    idx = np.sort(np.concatenate([np.flatnonzero(y[:200] == c)[: 2 * ((y[:200] == c).sum() // 2)] for c in range(3)]))
    alike = np.full(len(y), "z", dtype=object)
    for c in range(3):
        rows = idx[y[idx] == c]
        alike[rows[::2]], alike[rows[1::2]] = "a", "b"
    for class_weight in ("none", "sqrt"):
        cfg = TrainConfig(**{**FAST.__dict__, "class_weight": class_weight})
        plain, plain_hist = train_base(source, idx, 3, cfg)
        balanced, hist = train_base(source, idx, 3, TrainConfig(**{**cfg.__dict__, "subject_balance": 1.0}),
                                    groups=alike.astype(str))
        assert hist["loss"] == plain_hist["loss"]
        np.testing.assert_array_equal(balanced.get_layer("logits").kernel.numpy(),
                                      plain.get_layer("logits").kernel.numpy())
    # One subject with most of the beats: the weights act.
    lopsided = np.where(np.arange(len(y)) < 150, "a", "b")
    cfg = TrainConfig(**{**FAST.__dict__, "subject_balance": 1.0})
    _, hist = train_base(source, idx, 3, cfg, groups=lopsided)
    assert hist["loss"] != plain_hist["loss"]
    with pytest.raises(ValueError, match="subject_balance=1.0 needs the subject of every beat"):
        train_base(source, idx, 3, cfg)


def test_width_multiplies_every_convolutions_filters_and_transfer_keeps_them():
    x, y, rr = toy_beats()
    source = BeatSource(x, y, rr)
    cfg = TrainConfig(**{**FAST.__dict__, "model": "rr_cnn", "width": 2})
    base, _ = train_base(source, np.arange(500), 3, cfg)
    assert [base.get_layer(f"conv{i}").filters for i in (1, 2, 3)] == [32, 64, 128]
    assert (predict_classes(base, source, np.arange(500, 600)) == y[500:]).mean() > 0.9
    plain = build_model("rr_cnn", WINDOW, 2, 3, x, rr)
    assert [plain.get_layer(f"conv{i}").filters for i in (1, 2, 3)] == [16, 32, 64]
    # A patient's model is the base model with its head re-trained: the wide convolutions come along.
    tuned, _ = fine_tune(base, source, np.arange(500, 560), cfg)
    assert [tuned.get_layer(f"conv{i}").filters for i in (1, 2, 3)] == [32, 64, 128]
    for bad in (0, 9, 1.5, True):
        with pytest.raises(ValueError, match=r"width must be a whole number from 1 to 8"):
            build_model("seed_cnn", WINDOW, 2, 3, x, width=bad)


def test_beat_source_batches_hold_the_selected_rows():
    x, y, rr = toy_beats(50)
    src = BeatSource(x, y, rr)
    idx = np.array([3, 7, 11, 40])
    got_x, got_y = next(iter(src.dataset(idx, 8, seed=0, shuffle=False)))
    np.testing.assert_array_equal(got_x.numpy(), x[idx])
    np.testing.assert_array_equal(got_y.numpy(), y[idx])
    feats, _ = next(iter(src.dataset(idx, 8, seed=0, names=("beat", "rr"), shuffle=False)))
    np.testing.assert_array_equal(feats["rr"].numpy(), rr[idx])
    with pytest.raises(ValueError, match="rr"):
        BeatSource(x, y).dataset(idx, 8, 0, names=("beat", "rr"))


def test_input_pipeline_runs_on_one_thread_without_autotuning_and_keeps_the_batches():
    import tensorflow as tf

    x, y, rr = toy_beats(300)
    src, idx = BeatSource(x, y, rr), np.arange(20, 290)
    ds = src.dataset(idx, 32, seed=3, names=("beat", "rr"))
    assert ds.options().autotune.enabled is False
    assert ds.options().threading.private_threadpool_size == 1
    opts = tf.data.Options()  # tf.data's defaults back (with_options merges, so set them explicitly)
    opts.autotune.enabled, opts.threading.private_threadpool_size = True, 0
    plain = src.dataset(idx, 32, seed=3, names=("beat", "rr")).with_options(opts)
    assert plain.options().autotune.enabled is True
    for epoch in range(2):  # reshuffled each epoch, identically
        ours, theirs = list(ds), list(plain)
        assert len(ours) == len(theirs) == 9
        for (a, ya), (b, yb) in zip(ours, theirs):
            np.testing.assert_array_equal(a["beat"].numpy(), b["beat"].numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_augmented_batches_scale_a_beat_with_its_reference_and_shift_the_beat_alone():
    x, y, rr = toy_beats(200)
    recent = np.random.default_rng(5).normal(0, 1, x.shape).astype(np.float32)
    src, idx = BeatSource(x, y, rr, recent=recent), np.arange(10, 190)
    names = ("beat", "rr", "recent")
    plain = list(src.dataset(idx, 32, seed=3, names=names))
    first = list(src.dataset(idx, 32, seed=3, names=names, augment=0.2))
    ds = src.dataset(idx, 32, seed=3, names=names, augment=0.2)
    epoch1, epoch2 = list(ds), list(ds)
    for (p, yp), (a, ya), (b, _) in zip(plain, epoch1, first):
        np.testing.assert_array_equal(ya.numpy(), yp.numpy())  # the same rows in the same order
        np.testing.assert_array_equal(a["rr"].numpy(), p["rr"].numpy())  # rhythm is left alone
        np.testing.assert_array_equal(a["beat"].numpy(), b["beat"].numpy())  # a seed repeats its draws
        gain = a["recent"].numpy() / p["recent"].numpy()  # one gain per beat and lead ...
        np.testing.assert_allclose(gain, np.repeat(gain[:, :1], WINDOW, axis=1), rtol=1e-4)
        assert 0.1 < np.log(gain[:, 0]).std() < 0.35  # exp(N(0, 0.2)); a batch of 32 x 2 draws
        # ... the beat shares it, plus an offset of its own and noise
        rest = a["beat"].numpy() - p["beat"].numpy() * gain[:, :1]
        assert 0.1 < np.abs(rest.mean(axis=1)).mean() < 0.3
        assert 0.02 < rest.std(axis=1).mean() < 0.08
    assert not np.allclose(epoch1[0][0]["beat"].numpy(), epoch2[0][0]["beat"].numpy())  # fresh every epoch
    for (p, _), (z, _) in zip(plain, src.dataset(idx, 32, seed=3, names=names, augment=0.0)):
        np.testing.assert_array_equal(z["beat"].numpy(), p["beat"].numpy())


def test_shifted_batches_move_each_beat_alone_by_its_own_offset_within_the_bound():
    x, y, rr = toy_beats(200)
    x = x + np.random.default_rng(6).normal(0, 1, x.shape).astype(np.float32)  # every window tells its offset
    recent = np.random.default_rng(5).normal(0, 1, x.shape).astype(np.float32)
    src, idx, most = BeatSource(x, y, rr, recent=recent), np.arange(10, 190), 4
    names = ("beat", "rr", "recent")
    plain = list(src.dataset(idx, 32, seed=3, names=names))
    ds = src.dataset(idx, 32, seed=3, names=names, shift=most)
    epoch1, epoch2, again = list(ds), list(ds), list(src.dataset(idx, 32, seed=3, names=names, shift=most))
    at = np.arange(WINDOW)
    offsets = []
    for (p, yp), (a, ya), (b, _) in zip(plain, epoch1, again):
        np.testing.assert_array_equal(ya.numpy(), yp.numpy())  # the same rows in the same order
        np.testing.assert_array_equal(a["rr"].numpy(), p["rr"].numpy())
        np.testing.assert_array_equal(a["recent"].numpy(), p["recent"].numpy())  # references stay put
        np.testing.assert_array_equal(a["beat"].numpy(), b["beat"].numpy())  # a seed repeats its draws
        for moved, beat in zip(a["beat"].numpy(), p["beat"].numpy()):
            (s,) = [s for s in range(-most, most + 1) if np.array_equal(moved, beat[np.clip(at + s, 0, WINDOW - 1)])]
            offsets.append(s)
    assert set(offsets) == set(range(-most, most + 1))  # uniform over the 9 offsets: 180 draws hit each
    assert not np.array_equal(epoch1[0][0]["beat"].numpy(), epoch2[0][0]["beat"].numpy())  # fresh every epoch


def test_training_with_augmentation_repeats_with_its_seed_and_still_learns():
    x, y, rr = toy_beats()
    cfg = TrainConfig(**{**FAST.__dict__, "augment": 0.1, "augment_shift": 2})
    m1, h1 = train_base(x[:500], y[:500], 3, cfg)
    m2, h2 = train_base(x[:500], y[:500], 3, cfg)
    _, h0 = train_base(x[:500], y[:500], 3, FAST)
    assert h1 == h2 and h1["loss"] != h0["loss"]
    for a, b in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert (predict_classes(m1, x[500:]) == y[500:]).mean() > 0.9
    tuned, _ = fine_tune(m1, x[500:], y[500:], cfg)
    assert len(tuned.get_weights()) == len(m1.get_weights())


def test_fine_tune_retrains_only_the_head_and_leaves_the_base_unchanged():
    x, y, _ = toy_beats()
    base, _ = train_base(x[:300], y[:300], 3, FAST)
    before = [w.copy() for w in base.get_weights()]
    tuned, hist = fine_tune(base, x[300:400], y[300:400], FAST)
    assert len(hist["finetune_loss"]) == FAST.finetune_epochs
    for a, b in zip(before, base.get_weights()):
        np.testing.assert_array_equal(a, b)
    for layer in tuned.layers:
        assert layer.trainable == (layer.name in HEAD_LAYERS)
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), base.get_layer(layer.name).get_weights()))
        assert same == (layer.name not in HEAD_LAYERS), layer.name
    assert transfer_copy(base).get_layer("conv1").trainable is False


@pytest.mark.parametrize("layers, moved", [("last", {"conv3"}), ("all", {"conv1", "conv2", "conv3"})])
def test_fine_tune_last_or_all_layers_moves_the_feature_extractor_too(layers, moved):
    x, y, _ = toy_beats()
    base, _ = train_base(x[:300], y[:300], 3, FAST)
    tuned, _ = fine_tune(base, x[300:400], y[300:400], TrainConfig(**{**FAST.__dict__, "finetune_layers": layers}))
    changed = {layer.name for layer in tuned.layers
               if not all(np.array_equal(a, b) for a, b in zip(layer.get_weights(),
                                                               base.get_layer(layer.name).get_weights()))}
    assert changed == moved | set(HEAD_LAYERS)  # the normalisation stays as fitted on the training beats


def test_mixed_precision_computes_in_float16_with_float32_logits():
    x, y, _ = toy_beats()
    assert compute_dtype("float32") == "float32" and compute_dtype("mixed") == "mixed_float16"
    model, hist = train_base(x[:300], y[:300], 3, TrainConfig(**{**FAST.__dict__, "precision": "mixed"}))
    assert model.get_layer("conv1").compute_dtype == "float16"
    assert model.get_layer("conv1").variable_dtype == "float32"  # weights are kept at full precision
    assert model.get_layer("logits").compute_dtype == "float32"
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert np.isfinite(hist["loss"]).all() and hist["loss"][-1] < hist["loss"][0]
    assert model.predict(x[:4], verbose=0).dtype == np.float32


def test_jit_compile_really_compiles_with_xla_and_plain_runs_stay_deterministic():
    from tensorflow.python.framework import config as tf_config

    x, y, _ = toy_beats(200)
    model, _ = train_base(x, y, 3, TrainConfig(**{**FAST.__dict__, "epochs": 1, "jit_compile": True}))
    assert model.jit_compile is True  # Keras drops XLA without a word while op determinism is on
    plain, _ = train_base(x, y, 3, TrainConfig(**{**FAST.__dict__, "epochs": 1}))
    assert plain.jit_compile is False
    assert tf_config.is_op_determinism_enabled()


def test_rr_model_reads_rhythm_features():
    x, y, rr = toy_beats()
    src = BeatSource(x, y, rr)
    cfg = TrainConfig(**{**FAST.__dict__, "model": "rr_cnn"})
    model, _ = train_base(src, np.arange(500), 3, cfg)
    assert set(model.input) == {"beat", "rr"}
    assert (predict_classes(model, src, np.arange(500, 600)) == y[500:]).mean() > 0.9
    tuned, _ = fine_tune(model, src, np.arange(500, 550), cfg)
    assert predict_classes(tuned, src, np.arange(550, 600)).shape == (50,)
    with pytest.raises(ValueError, match="RR"):
        train_base(x, y, 3, cfg)  # plain arrays carry no RR features


def test_long_rr_features_are_an_extra_input_the_model_reads():
    # Two classes that differ only in the RR over the last minutes (rr_long): beats and rr alike.
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 600)
    x = rng.normal(0, 0.05, (600, WINDOW, 2)).astype(np.float32)
    rr = np.ones((600, 3), np.float32)
    rr_long = np.stack([1 - 0.4 * y, np.ones(600)], axis=1).astype(np.float32) + rng.normal(0, 0.03, (600, 2)).astype(np.float32)
    src = BeatSource(x, y, rr, rhythm={"rr_long": rr_long})
    cfg = TrainConfig(**{**FAST.__dict__, "model": "rr_cnn", "rr_features": "long"})
    model, _ = train_base(src, np.arange(500), 2, cfg)
    assert set(model.input) == {"beat", "rr", "rr_long"}
    assert (predict_classes(model, src, np.arange(500, 600)) == y[500:]).mean() > 0.9
    tuned, _ = fine_tune(model, src, np.arange(500, 550), cfg)
    assert set(tuned.input) == {"beat", "rr", "rr_long"}
    plain, _ = train_base(src, np.arange(500), 2, TrainConfig(**{**cfg.__dict__, "rr_features": "all"}))
    assert set(plain.input) == {"beat", "rr"}
    assert (predict_classes(plain, src, np.arange(500, 600)) == y[500:]).mean() < 0.75
    with pytest.raises(ValueError, match="rr_long"):
        train_base(BeatSource(x, y, rr), np.arange(500), 2, cfg)
    with pytest.raises(ValueError, match=r"rr_long \(n, 2\), got \(600, 3\)"):  # a width of its own
        build_model("rr_cnn", WINDOW, 2, 2, x, rr, rr_features="long", train_rhythm={"rr_long": rr})
    with pytest.raises(ValueError, match="rr_long"):
        predict_classes(model, BeatSource(x, y, rr), np.arange(10))


@pytest.mark.parametrize("model", ["rr_cnn", "patient_cnn"])
@pytest.mark.parametrize("features, name", [("irregular", "rr_irregular"), ("sequence", "rr_sequence"),
                                            ("lagged", "rr_lagged")])
def test_irregular_sequence_and_lagged_rr_features_add_their_input_to_long(model, features, name):
    # Two classes that differ only in that input (beats, rr, rr_long alike): the rhythm's irregularity
    # before the beat (n, 1; both measures), or the interval three beats before in the last eight (n, 8).
    rng = np.random.default_rng(4)
    n = 600
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.05, (n, WINDOW, 2)).astype(np.float32)
    rr, rr_long = np.ones((n, 3), np.float32), np.ones((n, 2), np.float32)
    if features in ("irregular", "lagged"):
        extra = (0.02 + 0.2 * y + rng.normal(0, 0.02, n)).astype(np.float32)[:, None]
    else:
        extra = (1 + rng.normal(0, 0.03, (n, 8))).astype(np.float32)
        extra[:, 3] -= 0.4 * y
    patient = (np.zeros((1, WINDOW, 2), np.float32), np.zeros(n, np.int32), np.ones((n, 3), np.float32))
    src = BeatSource(x, y, rr, patient=patient, rhythm={"rr_long": rr_long, name: extra})
    cfg = TrainConfig(**{**FAST.__dict__, "model": model, "rr_features": features})
    got, _ = train_base(src, np.arange(500), 2, cfg)
    assert "rr_long" in got.input and set(got.input) & {"rr_irregular", "rr_sequence", "rr_lagged"} == {name}
    assert tuple(got.input[name].shape) == (None, extra.shape[1])
    assert (predict_classes(got, src, np.arange(500, 600)) == y[500:]).mean() > 0.9
    tuned, _ = fine_tune(got, src, np.arange(500, 550), cfg)
    assert set(tuned.input) == set(got.input)
    long, _ = train_base(src, np.arange(500), 2, TrainConfig(**{**cfg.__dict__, "rr_features": "long"}))
    assert name not in long.input
    assert (predict_classes(long, src, np.arange(500, 600)) == y[500:]).mean() < 0.75
    without = BeatSource(x, y, rr, patient=patient, rhythm={"rr_long": rr_long})
    with pytest.raises(ValueError, match=name):
        train_base(without, np.arange(500), 2, cfg)
    with pytest.raises(ValueError, match=name):
        predict_classes(got, without, np.arange(10))
    with pytest.raises(ValueError, match=f"length: 600, 600, rr 600, {name} 10"):
        BeatSource(x, y, rr, rhythm={name: extra[:10]})
    with pytest.raises(ValueError, match=r"unknown rhythm inputs \['rr_typo'\]"):  # a misspelt name is no missing input
        BeatSource(x, y, rr, rhythm={"rr_typo": extra})


def test_ensemble_members_are_the_single_models_of_their_seeds_and_the_logits_their_mean(tmp_path):
    import keras

    x, y, rr = toy_beats()
    src, idx = BeatSource(x, y, rr), np.arange(400)
    cfg = TrainConfig(**{**FAST.__dict__, "model": "rr_cnn", "ensemble": 2})
    model, hist = train_base(src, idx, 3, cfg)
    assert set(model.input) == {"beat", "rr"} and hist["loss"] != hist["member2_loss"]
    members = ensemble_members(model)
    assert [m.name for m in members] == ["member1", "member2"]
    for member, seed in zip(members, (cfg.seed, cfg.seed + 1)):
        single, _ = train_base(src, idx, 3, TrainConfig(**{**cfg.__dict__, "ensemble": 1, "seed": seed}))
        for a, b in zip(member.get_weights(), single.get_weights()):
            np.testing.assert_array_equal(a, b)
    inputs = src.inputs(np.arange(400, 600), ("beat", "rr"))
    logits = [m.predict(inputs, verbose=0) for m in members]
    assert not np.allclose(logits[0], logits[1])
    np.testing.assert_allclose(model.predict(inputs, verbose=0), (logits[0] + logits[1]) / 2, rtol=1e-5, atol=1e-5)

    # Fine-tuning re-trains each member's head on its own; the base ensemble is left as it was.
    before = [w.copy() for w in model.get_weights()]
    tuned, ft_hist = fine_tune(model, src, np.arange(400, 500), cfg)
    assert {"finetune_loss", "member2_finetune_loss"} <= set(ft_hist)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for base_m, tuned_m in zip(members, ensemble_members(tuned)):
        assert not np.array_equal(base_m.get_layer("logits").get_weights()[0], tuned_m.get_layer("logits").get_weights()[0])
        np.testing.assert_array_equal(base_m.get_layer("conv1").get_weights()[0], tuned_m.get_layer("conv1").get_weights()[0])

    # The saved ensemble loads as one model with the same predictions, and fine-tunes again.
    tuned.save(tmp_path / "ensemble.keras")
    loaded = keras.models.load_model(tmp_path / "ensemble.keras")
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), tuned.predict(inputs, verbose=0), rtol=1e-6)
    assert len(ensemble_members(loaded)) == 2
    again, _ = fine_tune(loaded, src, np.arange(400, 450), cfg)
    assert predict_classes(again, src, np.arange(500, 600)).shape == (100,)

    # One member is the plain model, as before the option existed.
    single, _ = train_base(src, idx, 3, TrainConfig(**{**cfg.__dict__, "ensemble": 1}))
    assert single.name == "rr_cnn" and ensemble_members(single) == [single]

    # A model with one plain input (seed_cnn) makes an ensemble of plain input too.
    seeds, _ = train_base(x[:300], y[:300], 3, TrainConfig(**{**FAST.__dict__, "ensemble": 2, "epochs": 1}))
    assert seeds.name == "ensemble" and not isinstance(seeds.input, dict)
    assert (predict_classes(seeds, x[300:400]) == y[300:400]).mean() > 0.5


def test_finetune_blend_moves_the_head_part_way_from_the_base_to_the_fine_tuned_weights():
    x, y, _ = toy_beats()
    base, _ = train_base(x[:300], y[:300], 3, FAST)
    full, _ = fine_tune(base, x[300:400], y[300:400], FAST)
    half, _ = fine_tune(base, x[300:400], y[300:400], TrainConfig(**{**FAST.__dict__, "finetune_blend": 0.25}))
    for name in HEAD_LAYERS:
        for b, f, h in zip(base.get_layer(name).get_weights(), full.get_layer(name).get_weights(),
                           half.get_layer(name).get_weights()):
            assert not np.allclose(b, f)
            np.testing.assert_allclose(h, 0.25 * f + 0.75 * b, rtol=1e-5, atol=1e-6)
    for b, h in zip(base.get_layer("conv1").get_weights(), half.get_layer("conv1").get_weights()):
        np.testing.assert_array_equal(b, h)  # frozen layers stay the base model's


def test_recent_cnn_reads_each_beat_against_the_beats_before_it():
    # Two classes alike in rhythm whose beats differ from their own neighbours in opposite ways, on
    # a baseline that wanders between beats: only the beat minus its neighbours sets them apart.
    rng = np.random.default_rng(3)
    n = 800
    y = rng.integers(0, 2, n)
    drift = rng.normal(0, 1.0, (n, 1, 2)).astype(np.float32)
    recent = drift + rng.normal(0, 0.02, (n, WINDOW, 2)).astype(np.float32)
    recent[:, 10:14, 0] += rng.normal(0, 1.0, (n, 1)).astype(np.float32)  # the record's own shape, shared
    x = recent + rng.normal(0, 0.02, (n, WINDOW, 2)).astype(np.float32)
    x[:, 10:14, 0] += np.where(y == 1, 0.5, -0.5)[:, None]  # alone, the beat is ambiguous
    rr = np.ones((n, 3), np.float32)
    made = []
    src = BeatSource(x, y, rr, recent=lambda: made.append(1) or recent)
    cfg = TrainConfig(**{**FAST.__dict__, "model": "rr_cnn"})
    plain, _ = train_base(src, np.arange(600), 2, cfg)
    assert made == []  # models that do not read it never make it
    model, _ = train_base(src, np.arange(600), 2, TrainConfig(**{**cfg.__dict__, "model": "recent_cnn"}))
    assert set(model.input) == {"beat", "rr", "recent"} and made == [1]
    assert "minus_template" in [layer.name for layer in model.layers]
    test = np.arange(600, n)
    assert (predict_classes(model, src, test) == y[test]).mean() > 0.9
    assert (predict_classes(plain, src, test) == y[test]).mean() < 0.8
    tuned, _ = fine_tune(model, src, np.arange(600, 650), TrainConfig(**{**cfg.__dict__, "model": "recent_cnn"}))
    assert set(tuned.input) == {"beat", "rr", "recent"}
    with pytest.raises(ValueError, match="recent"):
        train_base(BeatSource(x, y, rr), np.arange(600), 2, TrainConfig(**{**cfg.__dict__, "model": "recent_cnn"}))


@pytest.mark.parametrize("model_name, members", [("seed_cnn", 1), ("rr_cnn", 1), ("rr_cnn", 2)])
def test_premature_gate_rules_out_s_only_for_beats_that_are_not_early(model_name, members, tmp_path):
    import keras

    x, y, rr = toy_beats(200)
    rng = np.random.default_rng(3)
    rr[:, 0] = rng.uniform(0.5, 1.5, len(x))
    rr_long = rng.uniform(0.5, 1.5, (len(x), 2)).astype(np.float32)
    plain = build_ensemble([build_model(model_name, WINDOW, 2, 3, x, rr, dropout=0.1 * i) for i in range(members)])
    gated = gate_premature(plain, 0.9, class_index=1)
    assert set(model_input_names(gated)) == set(model_input_names(plain)) | {"rr", "rr_long"}
    src = BeatSource(x, y, rr, rhythm={"rr_long": rr_long})
    want = plain.predict(src.inputs(np.arange(len(x)), model_input_names(plain)), verbose=0)
    got = gated.predict(src.inputs(np.arange(len(x)), model_input_names(gated)), verbose=0)
    earliest = np.minimum(rr[:, 0], rr_long[:, 0])
    early = earliest <= 0.9
    assert 0 < early.sum() < len(x)
    np.testing.assert_allclose(got[early], want[early], rtol=1e-6)  # early beats: untouched
    np.testing.assert_allclose(got[~early][:, [0, 2]], want[~early][:, [0, 2]], rtol=1e-6)
    assert (got[~early, 1] < want[~early, 1] - 1000).all()  # late beats: never class 1
    pred = predict_classes(gated, src, np.arange(len(x)))
    assert not (pred[~early] == 1).any()
    np.testing.assert_array_equal(pred[early], np.argmax(want[early], axis=1))
    path = tmp_path / "gated.keras"
    gated.save(path)
    np.testing.assert_array_equal(predict_classes(keras.models.load_model(path), src, np.arange(len(x))), pred)
    with pytest.raises(ValueError, match="class_index"):
        gate_premature(plain, 0.9, class_index=3)


@pytest.mark.parametrize("model_name, members", [("seed_cnn", 1), ("rr_cnn", 2)])
@pytest.mark.parametrize("measure", ["rr_irregular", "rr_lagged"])
def test_irregular_gate_rules_out_s_only_for_beats_after_an_irregular_rhythm(model_name, members, measure, tmp_path):
    import keras

    x, y, rr = toy_beats(200)
    rng = np.random.default_rng(4)
    irregular, other = rng.uniform(0.0, 0.3, (2, len(x), 1)).astype(np.float32)
    plain = build_ensemble([build_model(model_name, WINDOW, 2, 3, x, rr, dropout=0.1 * i) for i in range(members)])
    gated = gate_irregular(plain, 0.1, class_index=1, measure=measure)
    assert set(model_input_names(gated)) == set(model_input_names(plain)) | {measure}
    # the source holds both measures, the other one drawn apart: the gate must read the one it was given
    unread = ({"rr_irregular", "rr_lagged"} - {measure}).pop()
    src = BeatSource(x, y, rr, rhythm={measure: irregular, unread: other})
    want = plain.predict(src.inputs(np.arange(len(x)), model_input_names(plain)), verbose=0)
    got = gated.predict(src.inputs(np.arange(len(x)), model_input_names(gated)), verbose=0)
    regular = irregular[:, 0] <= 0.1
    assert 0 < regular.sum() < len(x)
    np.testing.assert_allclose(got[regular], want[regular], rtol=1e-6)  # regular rhythm: untouched
    np.testing.assert_allclose(got[~regular][:, [0, 2]], want[~regular][:, [0, 2]], rtol=1e-6)
    assert (got[~regular, 1] < want[~regular, 1] - 1000).all()  # irregular rhythm: never class 1
    pred = predict_classes(gated, src, np.arange(len(x)))
    assert not (pred[~regular] == 1).any()
    path = tmp_path / "gated.keras"
    gated.save(path)
    np.testing.assert_array_equal(predict_classes(keras.models.load_model(path), src, np.arange(len(x))), pred)
    with pytest.raises(ValueError, match="class_index"):
        gate_irregular(plain, 0.1, class_index=3)
    with pytest.raises(ValueError, match="measure must be one of"):
        gate_irregular(plain, 0.1, class_index=1, measure="rr_long")


def test_irregular_threshold_is_a_quantile_over_the_given_rows_of_the_class_only():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 1000)
    irregular = rng.uniform(0.0, 0.3, 1000)
    rows = np.arange(800)
    got = irregular_threshold(irregular, labels, rows, 1, 0.9)
    assert got == pytest.approx(np.quantile(irregular[rows][labels[rows] == 1], 0.9))
    irregular[800:], labels[800:] = 5.0, 1  # a held-out subject's rows change nothing
    assert irregular_threshold(irregular, labels, rows, 1, 0.9) == got
    with pytest.raises(ValueError, match="no training beats of class 1"):
        irregular_threshold(irregular, np.zeros(1000, int), rows, 1, 0.9)


def test_premature_threshold_is_a_quantile_over_the_given_rows_of_the_class_only():
    rng = np.random.default_rng(0)
    n = 1000
    labels = rng.integers(0, 3, n)
    rr = rng.uniform(0.4, 1.6, (n, 3)).astype(np.float32)
    rr_long = rng.uniform(0.4, 1.6, (n, 2)).astype(np.float32)
    rows = np.arange(0, 800)
    got = premature_threshold(rr, rr_long, labels, rows, 1, 0.9)
    s_rows = rows[labels[rows] == 1]
    assert got == pytest.approx(np.quantile(np.minimum(rr[s_rows, 0], rr_long[s_rows, 0]), 0.9))
    rr[800:, 0] = rr_long[800:, 0] = 100.0  # rows outside `rows` (a held-out subject's) change nothing
    labels[800:] = 1
    assert premature_threshold(rr, rr_long, labels, rows, 1, 0.9) == got
    assert premature_threshold(rr, rr_long, labels, rows, 1, 0.5) < got
    with pytest.raises(ValueError, match="no training beats of class 2"):
        premature_threshold(rr, rr_long, np.zeros(n, int), rows, 2, 0.9)
    with pytest.raises(ValueError, match="share"):
        premature_threshold(rr, rr_long, labels, rows, 1, 1.0)


@pytest.mark.parametrize("model_name, members", [("seed_cnn", 1), ("rr_cnn", 2)])
def test_early_promotion_hands_n_calls_to_s_only_for_early_beats_in_regular_rhythm(model_name, members, tmp_path):
    from dataclasses import replace

    import keras

    x, y, rr = toy_beats(300)
    rng = np.random.default_rng(4)
    rr_long = rng.uniform(0.4, 1.4, (len(x), 2)).astype(np.float32)
    irregular = rng.uniform(0.0, 0.1, (len(x), 1)).astype(np.float32)
    src = BeatSource(x, y, rr, rhythm={"rr_long": rr_long, "rr_irregular": irregular})
    # trained on the separable toy classes, so its calls cover all three
    plain, _ = train_base(src, np.arange(len(x)), 3, replace(FAST, model=model_name, ensemble=members))
    promoted = promote_early(plain, 0.8, 0.05, from_index=0, to_index=1)
    assert set(model_input_names(promoted)) == set(model_input_names(plain)) | {"rr_long", "rr_irregular"}
    want = plain.predict(src.inputs(np.arange(len(x)), model_input_names(plain)), verbose=0)
    got = promoted.predict(src.inputs(np.arange(len(x)), model_input_names(promoted)), verbose=0)
    acts = (rr_long[:, 0] < 0.8 - 1e-3) & (irregular[:, 0] < 0.05 - 1e-3)
    idle = (rr_long[:, 0] >= 0.8) | (irregular[:, 0] >= 0.05)
    assert acts.sum() > 20 and idle.sum() > 20
    np.testing.assert_allclose(got[idle], want[idle], rtol=1e-6)  # late or irregular beats: untouched
    np.testing.assert_allclose(got[acts][:, 2], want[acts][:, 2], rtol=1e-6)  # the third class: untouched
    np.testing.assert_allclose(got[acts][:, 1], want[acts][:, :2].max(axis=1), rtol=1e-5, atol=1e-4)  # S: the larger
    assert (got[acts, 0] < want[acts, 0] - 1000).all()  # N: ruled out
    before, pred = np.argmax(want, axis=1), predict_classes(promoted, src, np.arange(len(x)))
    assert ((before == 0) & acts).sum() > 0 and ((before == 2) & acts).sum() > 0
    np.testing.assert_array_equal(pred[acts & (before == 0)], 1)  # N calls become S ...
    np.testing.assert_array_equal(pred[acts & (before != 0)], before[acts & (before != 0)])  # ... others stay
    np.testing.assert_array_equal(pred[idle], before[idle])
    path = tmp_path / "promoted.keras"
    promoted.save(path)
    np.testing.assert_array_equal(predict_classes(keras.models.load_model(path), src, np.arange(len(x))), pred)
    # behind the premature gate, as transfer builds it: both inputs once, both rules kept
    both = promote_early(gate_premature(plain, 0.9, class_index=1), 0.8, 0.05, 0, 1)
    assert set(model_input_names(both)) == set(model_input_names(plain)) | {"rr", "rr_long", "rr_irregular"}
    for bad, match in (((0.8, 0.05, 3, 1), "from_index"), ((0.8, 0.05, 0, -1), "to_index"),
                       ((0.8, 0.05, 1, 1), "differ")):
        with pytest.raises(ValueError, match=match):
            promote_early(plain, *bad)


@pytest.mark.parametrize("model_name", ["seed_cnn", "rr_cnn"])
def test_early_promotion_with_fast_rr_leaves_early_beats_of_a_slow_rhythm_alone(model_name, tmp_path):
    from dataclasses import replace

    import keras

    x, y, rr = toy_beats(300)
    rng = np.random.default_rng(5)
    rr = rr.copy()
    rr[:, 2] = rng.uniform(0.3, 1.2, len(x))  # local mean RR (s): 200 to 50 beats a minute
    rr_long = rng.uniform(0.4, 1.4, (len(x), 2)).astype(np.float32)
    irregular = rng.uniform(0.0, 0.1, (len(x), 1)).astype(np.float32)
    src = BeatSource(x, y, rr, rhythm={"rr_long": rr_long, "rr_irregular": irregular})
    plain, _ = train_base(src, np.arange(len(x)), 3, replace(FAST, model=model_name))
    fast = promote_early(plain, 0.8, 0.05, from_index=0, to_index=1, fast_rr=0.6)
    assert set(model_input_names(fast)) == set(model_input_names(plain)) | {"rr", "rr_long", "rr_irregular"}
    rows = np.arange(len(x))
    before = np.argmax(plain.predict(src.inputs(rows, model_input_names(plain)), verbose=0), axis=1)
    pred = predict_classes(fast, src, rows)
    early = (rr_long[:, 0] < 0.8 - 1e-3) & (irregular[:, 0] < 0.05 - 1e-3)
    quick, slow = rr[:, 2] < 0.6 - 1e-3, rr[:, 2] >= 0.6
    # early beats of a fast rhythm: N calls become S, as without fast_rr
    assert (early & quick & (before == 0)).sum() > 5
    np.testing.assert_array_equal(pred[early & quick & (before == 0)], 1)
    # early beats of a slow rhythm, which promote_early alone would hand to S, keep their calls
    assert (early & slow & (before == 0)).sum() > 5
    np.testing.assert_array_equal(pred[~(early & quick)], before[~(early & quick)])
    alone = predict_classes(promote_early(plain, 0.8, 0.05, 0, 1), src, rows)
    assert (alone[early & slow & (before == 0)] == 1).all()
    path = tmp_path / "fast.keras"
    fast.save(path)
    np.testing.assert_array_equal(predict_classes(keras.models.load_model(path), src, rows), pred)
    for bad in (-0.1, True, "0.6"):
        with pytest.raises(ValueError, match="fast_rr"):
            promote_early(plain, 0.8, 0.05, 0, 1, fast_rr=bad)


def test_early_promotion_reads_its_earliness_from_the_reference_input_it_is_given(tmp_path):
    from dataclasses import replace

    import keras

    x, y, rr = toy_beats(300)
    rng = np.random.default_rng(6)
    rr_long, rr_median = (rng.uniform(0.4, 1.4, (len(x), 2)).astype(np.float32) for _ in range(2))
    irregular = np.zeros((len(x), 1), np.float32)
    src = BeatSource(x, y, rr, rhythm={"rr_long": rr_long, "rr_median": rr_median, "rr_irregular": irregular})
    plain, _ = train_base(src, np.arange(len(x)), 3, replace(FAST, model="seed_cnn"))
    rows = np.arange(len(x))
    before = predict_classes(plain, src, rows)
    median = promote_early(plain, 0.8, 0.05, 0, 1, reference="rr_median")
    assert set(model_input_names(median)) == {"beat", "rr_median", "rr_irregular"}
    pred = predict_classes(median, src, rows)
    by_median, by_mean = rr_median[:, 0] < 0.8 - 1e-3, rr_long[:, 0] < 0.8 - 1e-3
    # beats early against one reference only: the median's rule follows the median
    assert (by_median & ~by_mean & (before == 0)).sum() > 5 and (by_mean & ~by_median & (before == 0)).sum() > 5
    np.testing.assert_array_equal(pred[by_median & (before == 0)], 1)
    late = rr_median[:, 0] >= 0.8
    np.testing.assert_array_equal(pred[late], before[late])
    path = tmp_path / "median.keras"
    median.save(path)
    np.testing.assert_array_equal(predict_classes(keras.models.load_model(path), src, rows), pred)
    with pytest.raises(ValueError, match="reference"):
        promote_early(plain, 0.8, 0.05, 0, 1, reference="rr_sequence")


def test_early_threshold_is_a_quantile_over_training_beats_of_the_class_in_regular_rhythm():
    rng = np.random.default_rng(1)
    n = 2000
    labels = rng.integers(0, 3, n)
    rr_long = rng.uniform(0.4, 1.6, (n, 2)).astype(np.float32)
    irregular = rng.uniform(0.0, 0.1, (n, 1)).astype(np.float32)
    rows = np.arange(0, 1600)
    got = early_threshold(rr_long, irregular, labels, rows, 0, 0.01)
    pick = rows[(labels[rows] == 0) & (irregular[rows, 0] < 0.05)]
    assert got == pytest.approx(np.quantile(rr_long[pick, 0], 0.01))
    rr_long[1600:, 0] = 0.01  # rows outside `rows` (a held-out subject's) change nothing
    labels[1600:] = 0
    assert early_threshold(rr_long, irregular, labels, rows, 0, 0.01) == got
    irregular[rows[labels[rows] == 0], 0] = np.where(rr_long[rows[labels[rows] == 0], 0] < 0.6, 0.5, 0.0)
    assert early_threshold(rr_long, irregular, labels, rows, 0, 0.01) > 0.6  # irregular beats never count
    assert early_threshold(rr_long, irregular[:, 0], labels, rows, 0, 0.2) > got
    with pytest.raises(ValueError, match="no training beats of class 2 in regular rhythm"):
        early_threshold(rr_long, np.ones(n), labels, rows, 2, 0.01)
    with pytest.raises(ValueError, match="share"):
        early_threshold(rr_long, irregular, labels, rows, 0, 0.0)


def test_replay_rows_come_only_from_training_rows_capped_per_class():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 30 + [0] * 20 + [2] * 20)  # rows 105+ are the patient's
    train_idx = np.arange(105)
    rows = replay_rows(labels, train_idx, 10, seed=0)
    assert set(rows) <= set(train_idx) and len(set(rows)) == len(rows)
    assert np.bincount(labels[rows]).tolist() == [10, 5, 10]  # class 1 has only 5 to give
    np.testing.assert_array_equal(rows, replay_rows(labels, train_idx, 10, seed=0))
    assert not np.array_equal(rows, replay_rows(labels, train_idx, 10, seed=1))
    assert len(replay_rows(labels, train_idx, 0, seed=0)) == 0


def test_nearest_replay_rows_take_each_class_nearest_the_patient():
    labels = np.array([0] * 6 + [1] * 4 + [2] * 2 + [1] * 3)  # rows 12+ are the patient's
    train_idx = np.arange(12)
    # One feature: the distance to the centre (0) is the value's size.
    features = np.array([5, -1, 3, 0.5, -4, 2, 9, -0.2, 6, 1, 7, 8], dtype=float)[:, None]
    rows = nearest_replay_rows(labels, train_idx, features, np.zeros(1), 2)
    assert rows.tolist() == [1, 3, 7, 9, 10, 11]  # N: 0.5, -1; S: -0.2, 1; V: both it has
    assert np.all(np.diff(rows) > 0) and set(rows) <= set(train_idx)
    # Another centre, other rows: they follow the patient, not the table's order.
    assert nearest_replay_rows(labels, train_idx, features, np.array([6.0]), 1).tolist() == [0, 8, 10]
    # Ties go to the earlier row; a row's class, not its place, decides which list it is in.
    assert nearest_replay_rows(labels, train_idx, np.zeros((12, 3)), np.ones(3), 1).tolist() == [0, 6, 10]
    assert len(nearest_replay_rows(labels, train_idx, features, np.zeros(1), 0)) == 0
    with pytest.raises(ValueError, match=r"features \(11, 1\) must be"):
        nearest_replay_rows(labels, train_idx, features[:11], np.zeros(1), 2)
    with pytest.raises(ValueError, match="centre"):
        nearest_replay_rows(labels, train_idx, features, np.zeros(2), 2)


@pytest.mark.parametrize("model", ["seed_cnn", "rr_cnn"])
def test_head_features_are_what_the_head_reads(model):
    x, y, rr = toy_beats(200)
    src, idx = BeatSource(x, y, rr), np.arange(50, 200)
    trained, _ = train_base(src, np.arange(150), 3, TrainConfig(model=model, epochs=1, batch_size=32, seed=2))
    feats = head_features(trained, src, idx)
    assert feats.shape[0] == len(idx) and feats.shape[1] > 3
    # Through the head's two layers they give the model's logits: they are the head's input.
    logits = trained.get_layer("logits")(trained.get_layer("head_dense")(feats)).numpy()
    np.testing.assert_allclose(logits, predict_logits(trained, src, idx), rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats[y[idx] == 0].mean(axis=0), feats[y[idx] == 2].mean(axis=0), atol=1e-3)


def test_nearest_replay_needs_replay_and_one_base_model():
    TrainConfig(finetune_replay_select="nearest").validated()
    for bad in ({"finetune_replay": 0}, {"ensemble": 2}):
        with pytest.raises(ValueError, match="finetune_replay_select='nearest' needs finetune_replay > 0 and "
                                             "ensemble=1"):
            TrainConfig(finetune_replay_select="nearest", **bad).validated()


def test_early_normal_rows_are_early_normal_training_rows_not_yet_replayed():
    labels = np.array([0] * 60 + [1] * 20 + [0] * 20)  # rows 80+ are the patient's
    early = np.zeros(100, dtype=bool)
    early[40:70] = True  # 20 early N and 10 early S rows for training, and the patient's first 10 N rows
    early[80:90] = True
    train_idx, replayed = np.arange(80), np.array([40, 41, 42, 60])
    rows = early_normal_rows(labels, early, train_idx, 0, 15, seed=0, exclude=replayed)
    assert len(rows) == 15 and len(set(rows)) == 15 and np.all(np.diff(rows) > 0)
    assert set(rows) <= set(range(43, 60))  # early, N, training, not replayed already
    assert set(early_normal_rows(labels, early, train_idx, 0, 99, seed=0, exclude=replayed)) == set(range(43, 60))
    assert set(early_normal_rows(labels, early, train_idx, 0, 99, seed=0)) == set(range(40, 60))
    np.testing.assert_array_equal(rows, early_normal_rows(labels, early, train_idx, 0, 15, seed=0, exclude=replayed))
    assert not np.array_equal(rows, early_normal_rows(labels, early, train_idx, 0, 15, seed=1, exclude=replayed))
    assert len(early_normal_rows(labels, early, train_idx, 0, 0, seed=0)) == 0
    assert len(early_normal_rows(labels, np.zeros(100, dtype=bool), train_idx, 0, 5, seed=0)) == 0


def test_premature_rows_pair_the_patients_normal_beats_with_training_s_beats():
    # Training rows 0-59 (S beats 40-49); the patient's rows 60-89 (N 60-79, S 80-84, V 85-89).
    labels = np.array([0] * 40 + [1] * 10 + [0] * 10 + [0] * 20 + [1] * 5 + [2] * 5)
    train_idx, patient_idx = np.arange(60), np.arange(60, 90)
    shapes, rhythms = premature_rows(labels, patient_idx, train_idx, 0, 1, 25, seed=0)
    assert shapes.shape == rhythms.shape == (25,) and shapes.dtype == rhythms.dtype == np.int64
    assert set(shapes) <= set(range(60, 80))  # the patient's own N beats only
    assert set(rhythms) <= set(range(40, 50))  # S beats of the training rows only, never the patient's
    assert len(set(shapes)) > 5 and len(set(rhythms)) > 5  # drawn, with replacement past the pool
    again = premature_rows(labels, patient_idx, train_idx, 0, 1, 25, seed=0)
    np.testing.assert_array_equal(shapes, again[0])
    np.testing.assert_array_equal(rhythms, again[1])
    assert not np.array_equal(shapes, premature_rows(labels, patient_idx, train_idx, 0, 1, 25, seed=1)[0])
    for args in ((labels, patient_idx, train_idx, 0, 1, 0), (labels, np.arange(80, 90), train_idx, 0, 1, 5),
                 (labels, patient_idx, np.arange(40), 0, 1, 5)):  # none asked, no patient N, no training S
        assert [len(a) for a in premature_rows(*args, seed=0)] == [0, 0]


def test_fine_tune_with_rhythm_rows_teaches_the_head_the_patients_own_shape_come_early():
    # Other subjects: N beats of shape A on time, S beats of shape B early. The patient's beats have
    # shape C; its premature beats (shape C, early) appear in none of the fine-tune beats. Pairs of
    # the patient's N beats with the S beats' rhythm and label teach the head that C early is S.
    rng = np.random.default_rng(9)
    n_other, n_patient = 400, 100
    shape = np.concatenate([rng.integers(0, 2, n_other), np.full(n_patient, 2)])  # A, B; the patient's C
    y = np.concatenate([shape[:n_other], np.zeros(n_patient, int)])  # A: N, B: S; the patient's: N
    x = rng.normal(0, 0.05, (len(y), WINDOW, 2)).astype(np.float32)
    x[np.arange(len(y)), 6 + 10 * shape, 0] += 1.5
    rr = np.ones((len(y), 3), np.float32)
    rr[:, 2] = 0.8
    rr[y == 1, 0] = 0.6  # S beats come early
    rr += rng.normal(0, 0.02, rr.shape).astype(np.float32)
    src = BeatSource(x, y, rr)
    other, patient = np.arange(n_other), np.arange(n_other, n_other + n_patient)
    cfg = TrainConfig(**{**FAST.__dict__, "model": "rr_cnn", "dropout": 0.0, "finetune_epochs": 30,
                         "finetune_learning_rate": 1e-2})
    base, _ = train_base(src, other, 2, cfg)
    # The test beats: the patient's shape C, early, read as S.
    early_rr = np.column_stack([np.full(n_patient, 0.6), rr[patient, 1:]])
    early_c = BeatSource(x[patient], np.ones(n_patient, int), early_rr)
    replay = replay_rows(y, other, 20, seed=0)
    tune = np.concatenate([patient[:60], replay])
    shapes, rhythms = premature_rows(y, patient[:60], other, 0, 1, 20, seed=0)
    tuned, _ = fine_tune(base, src, np.concatenate([tune, shapes]), cfg, rhythm_idx=np.concatenate([tune, rhythms]))
    assert (predict_classes(tuned, early_c, np.arange(n_patient)) == 1).mean() > 0.9
    assert (predict_classes(tuned, src, patient[60:]) == 0).mean() > 0.9  # on time it stays N
    plain, _ = fine_tune(base, src, tune, cfg)  # without the pairs, C early is nothing the head has seen as S
    assert (predict_classes(plain, early_c, np.arange(n_patient)) == 1).mean() < 0.5
    with pytest.raises(ValueError, match="rhythm_idx"):
        src.dataset(tune, 32, 0, ("beat", "rr"), rhythm_idx=tune[:5])
    # The pairs read each side from its own row: the beat from the first, rhythm and label from the second.
    (inputs, labels), = src.dataset(shapes[:4], 4, 0, ("beat", "rr"), shuffle=False, rhythm_idx=rhythms[:4])
    np.testing.assert_array_equal(inputs["beat"].numpy(), x[shapes[:4]])
    np.testing.assert_array_equal(inputs["rr"].numpy(), rr[rhythms[:4]])
    np.testing.assert_array_equal(labels.numpy(), y[rhythms[:4]])


def test_class_weights():
    y = np.array([0] * 90 + [1] * 9 + [2] * 1)
    assert class_weights(y, 4, "none") is None
    bal = class_weights(y, 4, "balanced")
    sq = class_weights(y, 4, "sqrt")
    counts = np.bincount(y, minlength=4)
    for w in (bal, sq):
        assert sum(w[c] * counts[c] for c in range(4)) / counts.sum() == pytest.approx(1.0)  # mean 1 per beat
        assert w[0] < w[1] < w[2] and w[3] == 1.0  # rarer weighs more; absent class left at 1
    assert bal[2] / bal[0] == pytest.approx(90.0)
    assert sq[2] / sq[0] == pytest.approx(np.sqrt(90.0))


def test_dropout_drops_beat_features_in_training_only_and_never_the_rr_features():
    import keras

    x, y, rr = toy_beats()
    assert "feature_dropout" not in [layer.name for layer in build_model("rr_cnn", WINDOW, 2, 3, x, rr).layers]
    cfg = TrainConfig(**{**FAST.__dict__, "model": "rr_cnn", "dropout": 0.5, "epochs": 1})
    model, _ = train_base(BeatSource(x, y, rr), np.arange(400), 3, cfg)
    features = keras.Model(model.inputs, model.get_layer("features").output)
    inputs = {"beat": x[:64], "rr": rr[:64]}
    infer, train = features(inputs, training=False).numpy(), features(inputs, training=True).numpy()
    np.testing.assert_array_equal(infer, features(inputs, training=False).numpy())  # no dropout in inference
    assert 0.3 < (train[:, :-3] == 0).mean() - (infer[:, :-3] == 0).mean() < 0.7  # about half dropped
    np.testing.assert_array_equal(train[:, -3:], infer[:, -3:])  # the RR features, never
    tuned, _ = fine_tune(model, BeatSource(x, y, rr), np.arange(400, 500), cfg)
    assert "feature_dropout" in [layer.name for layer in tuned.layers]


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs"), ("batch_size", 2.5, "batch_size"), ("learning_rate", 0, "learning_rate"),
    ("model", "resnet", "model"), ("class_weight", "auto", "class_weight"), ("seed", -1, "seed"),
    ("jit_compile", "yes", "jit_compile"), ("finetune_epochs", True, "finetune_epochs"),
    ("finetune_layers", "conv", "finetune_layers"), ("precision", "bf16", "precision"),
    ("finetune_replay", -1, "finetune_replay"), ("rr_features", "heart", "rr_features"),
    ("dropout", 1.0, "dropout"), ("dropout", -0.1, "dropout"), ("ensemble", 0, "ensemble"), ("ensemble", 1.5, "ensemble"),
    ("finetune_blend", 0, "finetune_blend"), ("finetune_blend", 1.5, "finetune_blend"),
    ("augment", -0.1, "augment"), ("augment", 2, "augment"), ("augment", True, "augment"),
    ("augment_shift", -1, "augment_shift"), ("augment_shift", 2.5, "augment_shift"),
    ("augment_shift", True, "augment_shift"),
    ("sveb_gate", 1, "sveb_gate"), ("sveb_gate", -0.5, "sveb_gate"), ("sveb_gate", "on", "sveb_gate"),
    ("sveb_regular", 1, "sveb_regular"), ("sveb_regular", -0.1, "sveb_regular"), ("sveb_regular", True, "sveb_regular"),
    ("early_sveb", 1, "early_sveb"), ("early_sveb", -0.1, "early_sveb"), ("early_sveb", True, "early_sveb"),
    ("early_sveb_rate", -1, "early_sveb_rate"), ("early_sveb_rate", 301, "early_sveb_rate"),
    ("early_sveb_rate", True, "early_sveb_rate"), ("early_sveb_rate", "100", "early_sveb_rate"),
    ("early_sveb_rate", 100, "early_sveb_rate=100 acts only with early_sveb > 0"),
    ("early_reference", "mode", "early_reference"),
    ("early_reference", "median", "early_reference='median' acts only with early_sveb > 0"),
    ("sveb_af", 1, "sveb_af"), ("sveb_af", -0.1, "sveb_af"), ("sveb_af", True, "sveb_af"),
    ("recent_reference", "normal", "recent_reference"), ("recent_reference", "ontime", "recent_reference"),
    ("kernel_size", 0, "kernel_size"), ("kernel_size", 2.5, "kernel_size"), ("kernel_size", True, "kernel_size"),
    ("lr_schedule", "step", "lr_schedule"),
    ("width", 0, "width"), ("width", 9, "width"), ("width", 2.0, "width"), ("width", False, "width"),
    ("core_window", -1, "core_window"), ("core_window", 1.5, "core_window"), ("core_window", True, "core_window"),
    ("finetune_replay_early", -1, "finetune_replay_early"), ("finetune_replay_early", 7.5, "finetune_replay_early"),
    ("finetune_premature", -1, "finetune_premature"), ("finetune_premature", 2.5, "finetune_premature"),
    ("finetune_replay_select", "closest", "finetune_replay_select"),
    ("regular_measure", "median", "regular_measure"),
    ("regular_measure", "lagged", "regular_measure='lagged' acts only with sveb_regular > 0"),
    ("focal_gamma", -0.5, "focal_gamma"), ("focal_gamma", 11, "focal_gamma"), ("focal_gamma", True, "focal_gamma"),
    ("ema", 1, "ema"), ("ema", -0.1, "ema"), ("ema", True, "ema"),
    # a bool is no rate, though Python counts True as 1
    ("subject_balance", 1.5, "subject_balance"), ("subject_balance", -0.1, "subject_balance"),
    ("subject_balance", True, "subject_balance"),
    ("learning_rate", True, "learning_rate"), ("finetune_learning_rate", True, "finetune_learning_rate"),
    ("finetune_learning_rate", "0.1", "finetune_learning_rate"), ("dropout", True, "dropout"),
])
def test_config_validation_names_the_parameter(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value}).validated()


def patient_toy(n_records: int = 6, per_record: int = 120, seed: int = 0):
    """Beats whose class shows only against their own record's normal beat: every record has its
    own normal shape (a bump at a record-specific place); class 1 beats carry an extra bump at the
    place of another record's normal bump, so without the template the shapes overlap."""
    rng = np.random.default_rng(seed)
    n = n_records * per_record
    record_index = np.repeat(np.arange(n_records), per_record).astype(np.int32)
    y = (rng.random(n) < 0.3).astype(np.int64)
    pos = 4 + 4 * np.arange(n_records)
    x = rng.normal(0, 0.05, (n, WINDOW, 2)).astype(np.float32)
    x[np.arange(n), pos[record_index], 0] += 1.0
    odd = y == 1
    other = (record_index[odd] + rng.integers(1, n_records, odd.sum())) % n_records
    x[np.flatnonzero(odd), pos[other], 0] += 1.0
    templates = np.zeros((n_records, WINDOW, 2), np.float32)
    templates[np.arange(n_records), pos, 0] = 1.0
    rr = np.ones((n, 3), np.float32)
    return x, y, rr, (templates, record_index, np.ones((n, 3), np.float32))


def test_patient_context_is_gathered_by_record_in_batches_and_arrays():
    x, y, rr, patient = patient_toy()
    src = BeatSource(x, y, rr, patient)
    idx = np.array([0, 130, 250, 719])
    names = ("beat", "rr", "template", "rr_patient")
    feats, _ = next(iter(src.dataset(idx, 8, seed=0, names=names, shuffle=False)))
    np.testing.assert_array_equal(feats["template"].numpy(), patient[0][patient[1][idx]])
    np.testing.assert_array_equal(src.inputs(idx, names)["template"], feats["template"].numpy())
    with pytest.raises(ValueError, match="template"):
        BeatSource(x, y, rr).inputs(idx, names)
    with pytest.raises(ValueError, match="patient context does not fit"):
        BeatSource(x, y, rr, (patient[0], patient[1][:10], patient[2]))


def test_patient_cnn_reads_beats_against_their_own_template():
    x, y, rr, patient = patient_toy()
    src = BeatSource(x, y, rr, patient)
    train, test = np.arange(480), np.arange(480, 720)  # held-out records 4 and 5
    cfg = TrainConfig(**{**FAST.__dict__, "epochs": 8})
    model, _ = train_base(src, train, 2, TrainConfig(**{**cfg.__dict__, "model": "patient_cnn"}))
    assert set(model.input) == {"beat", "rr", "template", "rr_patient"}
    with_template = (predict_classes(model, src, test) == y[test]).mean()
    # Same beats, every template swapped for another record's: the odd class is no longer readable.
    wrong = BeatSource(x, y, rr, (np.roll(patient[0], 3, axis=0),) + patient[1:])
    swapped = (predict_classes(model, wrong, test) == y[test]).mean()
    assert with_template > 0.9 and swapped < with_template - 0.15


@pytest.mark.parametrize("model", ["rr_cnn", "patient_cnn"])
def test_relative_rr_features_never_read_the_heart_rate_even_after_full_fine_tuning(model):
    x, y, rr, patient = patient_toy()
    src = BeatSource(x, y, rr + np.random.default_rng(1).normal(0, 0.1, rr.shape).astype(np.float32), patient)
    cfg = TrainConfig(**{**FAST.__dict__, "model": model, "rr_features": "relative", "finetune_layers": "all"})
    base, _ = train_base(src, np.arange(480), 2, cfg)
    tuned, _ = fine_tune(base, src, np.arange(480, 560), cfg)
    np.testing.assert_array_equal(tuned.get_layer("rr_select").get_weights()[0], [[1, 0], [0, 1], [0, 0]])
    names = tuple(tuned.input)
    idx = np.arange(560, 720)
    inputs = src.inputs(idx, names)
    moved = {**inputs, "rr": inputs["rr"] * np.array([1, 1, 5], np.float32)}  # heart rate x5
    np.testing.assert_array_equal(tuned.predict(inputs, verbose=0), tuned.predict(moved, verbose=0))
    full, _ = train_base(src, np.arange(480), 2, TrainConfig(**{**cfg.__dict__, "rr_features": "all"}))
    assert not np.array_equal(full.predict(inputs, verbose=0), full.predict(moved, verbose=0))
