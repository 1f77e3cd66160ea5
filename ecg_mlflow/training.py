"""Base training and transfer (re-training the head on a patient's first minutes).

Reads top to bottom: seed everything, build a ``tf.data`` pipeline over the arrays,
compile, fit, return the model and its per-epoch history. Logging is a callback the
caller passes in, so this module knows nothing of MLflow.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

import keras
import tensorflow as tf

from ecg_mlflow.models import build_model, transfer_copy, MODELS


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters (plain values). Validated by :meth:`validated` before any work."""

    model: str = "seed_cnn"
    epochs: int = 5
    batch_size: int = 256
    learning_rate: float = 1e-3
    finetune_epochs: int = 20
    finetune_batch_size: int = 32
    finetune_learning_rate: float = 1e-3
    seed: int = 42

    def validated(self) -> "TrainConfig":
        def whole(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be a whole number >= {lo}, got {v!r}")

        whole("epochs", 1)
        whole("batch_size", 1)
        whole("finetune_epochs", 1)
        whole("finetune_batch_size", 1)
        whole("seed", 0)
        for name in ("learning_rate", "finetune_learning_rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < 10:
                raise ValueError(f"{name} must be a number in (0, 10), got {v!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        return self

    def as_params(self) -> dict:
        return asdict(self)


EpochCallback = Callable[[int, dict[str, float]], None]


def seed_everything(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds plus deterministic ops: a seed repeats a run's metrics."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, shuffle: bool = True) -> tf.data.Dataset:
    """Batched ``(x, y)`` pipeline: x ``(n, window, leads)`` float32, y ``(n,)`` int."""
    ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class _EpochHook(keras.callbacks.Callback):
    def __init__(self, on_epoch: EpochCallback | None, prefix: str):
        super().__init__()
        self.on_epoch, self.prefix = on_epoch, prefix

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.on_epoch is not None:
            self.on_epoch(epoch, {f"{self.prefix}{k}": float(v) for k, v in (logs or {}).items()})


def _compile(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def train_base(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig,
               on_epoch: EpochCallback | None = None) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train a base model from scratch on beats ``x`` ``(n, window, leads)`` with labels ``y`` ``(n,)``.

    Returns the model and its history (``loss``, ``accuracy`` per epoch).
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as beats (> 0), got {len(x)} beats and {len(y)} labels")
    seed_everything(cfg.seed)
    model = build_model(cfg.model, x.shape[1], x.shape[2], n_classes, x)
    _compile(model, cfg.learning_rate)
    hist = model.fit(make_dataset(x, y, cfg.batch_size, cfg.seed), epochs=cfg.epochs, verbose=0,
                     callbacks=[_EpochHook(on_epoch, "")])
    return model, {k: [float(v) for v in vs] for k, vs in hist.history.items()}


def fine_tune(base: keras.Model, x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
              on_epoch: EpochCallback | None = None) -> tuple[keras.Model, dict[str, list[float]]]:
    """Copy ``base``, freeze all but its head, re-train the head on ``x`` ``(n, window, leads)``, ``y`` ``(n,)``.

    ``base`` itself is left unchanged. Returns the transfer model and its history
    (``finetune_loss``, ``finetune_accuracy`` per epoch).
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need fine-tune beats with labels (> 0), got {len(x)} beats and {len(y)} labels")
    seed_everything(cfg.seed)
    model = transfer_copy(base)
    _compile(model, cfg.finetune_learning_rate)
    hist = model.fit(make_dataset(x, y, cfg.finetune_batch_size, cfg.seed), epochs=cfg.finetune_epochs,
                     verbose=0, callbacks=[_EpochHook(on_epoch, "finetune_")])
    return model, {f"finetune_{k}": [float(v) for v in vs] for k, vs in hist.history.items()}


def predict_classes(model: keras.Model, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Predicted class codes ``(n,)`` for beats ``x`` ``(n, window, leads)``."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return np.argmax(logits, axis=1).astype(np.int64)


class Progress:
    """Prints where a long job stands: step i of n, elapsed time and an estimate of the time left."""

    def __init__(self, total: int, label: str = "loso"):
        self.total, self.label, self.start, self.done = total, label, time.monotonic(), 0

    def step(self, message: str) -> None:
        print(f"[{self.label} {self.done + 1}/{self.total}] {message} | {self._times()}", flush=True)

    def finish_step(self) -> None:
        self.done += 1

    def _times(self) -> str:
        elapsed = time.monotonic() - self.start
        if self.done == 0:
            return f"elapsed {_fmt(elapsed)}"
        left = elapsed / self.done * (self.total - self.done)
        return f"elapsed {_fmt(elapsed)}, about {_fmt(left)} left"


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
