"""The training-only max pool: MaxPool1D's values and gradients, and a twin that trains the model itself."""

from __future__ import annotations

import numpy as np
import pytest

import keras
import tensorflow as tf

from ecg_mlflow.models import build_model
from ecg_mlflow.pooling import WindowMax1D, cpu_flags, training_twin, twin_pays, window_max
from ecg_mlflow.training import STEPS_PER_EXECUTION, BeatSource, TrainConfig, seed_everything, train_base

from test_training import WINDOW, toy_beats


@pytest.mark.parametrize("pool, steps", [(2, 16), (2, 11), (3, 10), (4, 23), (1, 5)])
def test_window_max_gives_max_pools_values_and_gradient_ties_included(pool, steps):
    rng = np.random.default_rng(pool * 100 + steps)
    # Whole numbers in 0..2: most windows hold a tie, where the gradient must go to the first maximum
    # only, as MaxPool1D's does. Steps beyond the last whole window get none.
    x = tf.constant(rng.integers(0, 3, size=(6, steps, 5)).astype(np.float32))
    upstream = tf.constant(rng.normal(size=(6, steps // pool, 5)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, theirs = window_max(x, pool), keras.layers.MaxPool1D(pool)(x)
        ours_loss, theirs_loss = tf.reduce_sum(ours * upstream), tf.reduce_sum(theirs * upstream)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    ours_grad, theirs_grad = tape.gradient(ours_loss, x).numpy(), tape.gradient(theirs_loss, x).numpy()
    np.testing.assert_array_equal(ours_grad, theirs_grad)
    # each window passes its gradient to exactly one step: a split tie would show here
    assert np.count_nonzero(ours_grad) == np.count_nonzero(upstream.numpy())


def test_twin_swaps_the_max_pools_and_shares_every_other_layer():
    x, _, rr = toy_beats(64)
    model = build_model("rr_cnn", 64, 2, 3, np.tile(x, (1, 2, 1)), rr, core_window=32, r_peak=32, dropout=0.5)
    twin = training_twin(model)
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling1D)]
    swapped = [layer for layer in twin.layers if isinstance(layer, WindowMax1D)]
    assert len(pools) == 5 and sorted(p.name for p in pools) == sorted(s.name for s in swapped)  # core and context
    assert [s.pool for s in sorted(swapped, key=lambda s: s.name)] == [4, 4, 2, 2, 2]
    kept = [layer for layer in twin.layers if not isinstance(layer, (WindowMax1D, keras.layers.InputLayer))]
    assert kept and all(any(layer is own for own in model.layers) for layer in kept)
    assert all(a is b for a, b in zip(twin.trainable_variables, model.trainable_variables))
    inputs = {"beat": np.tile(x, (1, 2, 1)), "rr": rr}
    np.testing.assert_array_equal(twin(inputs).numpy(), model(inputs).numpy())
    # a model without max pools, or with one the twin cannot compute exactly, is its own twin
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert training_twin(dense) is dense
    strided = keras.Sequential([keras.Input((8, 1)), keras.layers.MaxPool1D(2, strides=1)])
    assert training_twin(strided) is strided


def test_the_twin_pays_on_a_cpu_without_avx512_only(tmp_path):
    assert twin_pays({"avx2", "fma"}, gpus=0)
    assert not twin_pays({"avx2", "fma", "avx512f", "avx512bw"}, gpus=0)
    assert not twin_pays({"avx2", "fma"}, gpus=1)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512f"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("pays", [True, False])
def test_training_through_the_twin_gives_the_plain_models_weights_and_saves_built_in_layers(tmp_path, monkeypatch,
                                                                                              pays):
    import ecg_mlflow.training as training

    # Whichever this machine's CPU would take: through the twin, and through the model itself.
    made = []
    monkeypatch.setattr(training, "twin_pays", lambda: pays)
    monkeypatch.setattr(training, "training_twin", lambda model: made.append(training_twin(model)) or made[-1])
    x, y, rr = toy_beats()
    cfg = TrainConfig(model="rr_cnn", class_weight="none", epochs=2, batch_size=32, seed=3, dropout=0.5)
    source, rows = BeatSource(x, y, rr), np.arange(400)
    trained, hist = train_base(source, rows, 3, cfg)
    assert len(made) == pays and all(any(isinstance(layer, WindowMax1D) for layer in t.layers) for t in made)
    # The same model, seed and batches, fitted the plain way: MaxPool1D and its own gradient.
    seed_everything(cfg.seed)
    plain = build_model("rr_cnn", WINDOW, 2, 3, x[rows], rr[rows], dropout=0.5)
    plain.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  steps_per_execution=STEPS_PER_EXECUTION)
    plain_hist = plain.fit(source.dataset(rows, cfg.batch_size, cfg.seed, ("beat", "rr")), epochs=cfg.epochs,
                           verbose=0, shuffle=False).history
    assert hist["loss"] == [float(v) for v in plain_hist["loss"]]
    for ours, theirs in zip(trained.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    assert int(trained.optimizer.iterations) == cfg.epochs * -(-len(rows) // cfg.batch_size)
    assert not any(isinstance(layer, WindowMax1D) for layer in trained.layers)
    trained.save(tmp_path / "base.keras")  # built-in layers only: loads without custom objects
    loaded = keras.models.load_model(tmp_path / "base.keras")
    inputs = {"beat": x[400:], "rr": rr[400:]}
    np.testing.assert_array_equal(loaded(inputs).numpy(), trained(inputs).numpy())
