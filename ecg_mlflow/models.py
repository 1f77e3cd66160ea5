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
MODELS: tuple[str, ...] = ("seed_cnn",)


def lead_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead mean and variance of training beats ``x`` ``(n, window, leads)`` -> two ``(leads,)`` arrays."""
    if x.ndim != 3 or len(x) == 0:
        raise ValueError(f"expected training beats shaped (n > 0, window, leads), got {x.shape}")
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return flat.mean(axis=0), np.maximum(flat.var(axis=0), 1e-12)


def build_seed_cnn(window: int, n_leads: int, n_classes: int, mean: np.ndarray, variance: np.ndarray) -> keras.Model:
    """The seed notebook's 1D CNN: Conv1D 16/32/64 (kernel 3, ReLU), max-pool 2 after each,
    Flatten, Dense 32 ReLU, Dense ``n_classes`` — the last layer gives logits (no ReLU)."""
    inputs = keras.Input(shape=(window, n_leads), name="beat")
    x = layers.Normalization(axis=-1, mean=mean, variance=variance, name="normalize")(inputs)
    for i, filters in enumerate((16, 32, 64), start=1):
        x = layers.Conv1D(filters, 3, activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPool1D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(32, activation="relu", name="head_dense")(x)
    logits = layers.Dense(n_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="seed_cnn")


def build_model(name: str, window: int, n_leads: int, n_classes: int, train_x: np.ndarray) -> keras.Model:
    """Build model ``name`` with its normalisation fitted on ``train_x`` ``(n, window, n_leads)``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {name!r}")
    mean, variance = lead_stats(train_x)
    return build_seed_cnn(window, n_leads, n_classes, mean, variance)


def transfer_copy(base: keras.Model) -> keras.Model:
    """A copy of ``base`` with its weights, every layer frozen except the head (:data:`HEAD_LAYERS`)."""
    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    names = {layer.name for layer in model.layers}
    missing = [n for n in HEAD_LAYERS if n not in names]
    if missing:
        raise ValueError(f"base model has no head layer(s) {missing}; layers: {sorted(names)}")
    for layer in model.layers:
        layer.trainable = layer.name in HEAD_LAYERS
    return model
