"""Keras model builders.

Every model takes raw beats in mV, shape ``(batch, window, 2)``, and returns logits,
shape ``(batch, n_classes)``. Input normalisation is the model's first layer, fitted on
training data only, so a saved model needs no outside preprocessing.

The convolutional layers form the *feature extractor*; the layers named in
:data:`HEAD_LAYERS` form the *head* that transfer learning re-trains.
"""

from __future__ import annotations

import numpy as np

import keras
from keras import layers

HEAD_LAYERS: tuple[str, ...] = ("head_dense", "logits")
# Which inputs each model reads: "beat" ``(window, leads)`` mV; "rr" ``(3,)`` rhythm features
# (previous and next RR over the local mean RR, local mean RR in s; see BeatDataset.rr_features).
MODEL_INPUTS: dict[str, tuple[str, ...]] = {"seed_cnn": ("beat",), "rr_cnn": ("beat", "rr")}
MODELS: tuple[str, ...] = tuple(MODEL_INPUTS)


def lead_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead mean and variance of training beats ``x`` ``(n, window, leads)`` -> two ``(leads,)`` arrays."""
    if x.ndim != 3 or len(x) == 0:
        raise ValueError(f"expected training beats shaped (n > 0, window, leads), got {x.shape}")
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return flat.mean(axis=0), np.maximum(flat.var(axis=0), 1e-12)


def _features(beat, mean: np.ndarray, variance: np.ndarray, dtype: str):
    """Normalisation (float32), then Conv1D 16/32/64 (kernel 3, ReLU) with max-pool 2 after each, flattened."""
    x = layers.Normalization(axis=-1, mean=mean, variance=variance, name="normalize")(beat)
    for i, filters in enumerate((16, 32, 64), start=1):
        x = layers.Conv1D(filters, 3, activation="relu", name=f"conv{i}", dtype=dtype)(x)
        x = layers.MaxPool1D(2, name=f"pool{i}", dtype=dtype)(x)
    return layers.Flatten(name="flatten", dtype=dtype)(x)


def build_seed_cnn(window: int, n_leads: int, n_classes: int, mean: np.ndarray, variance: np.ndarray,
                   dtype: str = "float32") -> keras.Model:
    """The seed notebook's 1D CNN: Conv1D 16/32/64 (kernel 3, ReLU), max-pool 2 after each,
    Flatten, Dense 32 ReLU, Dense ``n_classes`` — the last layer gives logits (no ReLU).

    ``dtype``: the compute policy of the hidden layers (``mixed_float16`` on a GPU); the logits
    are always float32 so the loss is computed at full precision."""
    inputs = keras.Input(shape=(window, n_leads), name="beat")
    x = _features(inputs, mean, variance, dtype)
    x = layers.Dense(32, activation="relu", name="head_dense", dtype=dtype)(x)
    logits = layers.Dense(n_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name="seed_cnn")


def build_rr_cnn(window: int, n_leads: int, n_classes: int, mean: np.ndarray, variance: np.ndarray,
                 rr_mean: np.ndarray, rr_variance: np.ndarray, dtype: str = "float32") -> keras.Model:
    """The seed CNN with rhythm context: the three RR features join the flattened beat features
    before the head, so premature beats (short previous RR) are visible to the classifier."""
    beat = keras.Input(shape=(window, n_leads), name="beat")
    rr = keras.Input(shape=(3,), name="rr")
    x = _features(beat, mean, variance, dtype)
    r = layers.Normalization(axis=-1, mean=rr_mean, variance=rr_variance, name="normalize_rr")(rr)
    x = layers.Concatenate(name="features", dtype=dtype)([x, r])
    x = layers.Dense(32, activation="relu", name="head_dense", dtype=dtype)(x)
    logits = layers.Dense(n_classes, name="logits", dtype="float32")(x)
    return keras.Model({"beat": beat, "rr": rr}, logits, name="rr_cnn")


def build_model(name: str, window: int, n_leads: int, n_classes: int, train_x: np.ndarray,
                train_rr: np.ndarray | None = None, dtype: str = "float32") -> keras.Model:
    """Build model ``name`` with its normalisation fitted on training beats ``train_x``
    ``(n, window, n_leads)`` (and, for ``rr_cnn``, training RR features ``train_rr`` ``(n, 3)``);
    ``dtype`` is the hidden layers' compute policy (``float32`` or ``mixed_float16``)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {name!r}")
    mean, variance = lead_stats(train_x)
    if name == "rr_cnn":
        if train_rr is None:
            raise ValueError("model rr_cnn needs the training RR features (n, 3)")
        rr_mean, rr_var = lead_stats(train_rr[:, None, :])
        return build_rr_cnn(window, n_leads, n_classes, mean, variance, rr_mean, rr_var, dtype)
    return build_seed_cnn(window, n_leads, n_classes, mean, variance, dtype)


def transfer_copy(base: keras.Model, layers_to_train: str = "head") -> keras.Model:
    """A copy of ``base`` with its weights, every layer frozen except the head (:data:`HEAD_LAYERS`);
    ``layers_to_train="all"`` leaves every layer trainable (the normalisation stays fixed)."""
    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    names = {layer.name for layer in model.layers}
    missing = [n for n in HEAD_LAYERS if n not in names]
    if missing:
        raise ValueError(f"base model has no head layer(s) {missing}; layers: {sorted(names)}")
    for layer in model.layers:
        layer.trainable = layer.name in HEAD_LAYERS or layers_to_train == "all"
    return model
