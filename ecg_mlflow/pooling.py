"""Max pooling for training on a CPU: the same values and gradients as ``MaxPool1D``, faster.

TensorFlow's CPU kernel for the gradient of max pooling (``MaxPoolGrad``) took about a third of
a base model's training step on a 2-core CPU, more than any convolution (docs/speed.md).
:class:`WindowMax1D` computes the same forward values and the same gradient (all of it to the
first maximum of each window, as ``MaxPoolGrad`` gives it) from elementwise ops, which cost a few
microseconds a beat.

It pays only where ``MaxPoolGrad`` is slow: on the AVX2 machine a LOSO's base training ran 16 %
faster through it, while on the AVX-512 machine oneDNN's own kernel is faster and the twin cost
15-20 % (docs/speed.md). :func:`twin_pays` tells which, from the CPU's instruction sets.

It is for training only and is never saved: :func:`training_twin` gives a model whose max-pooling
layers are ``WindowMax1D`` and whose every other layer *is* the model's own (shared, not copied),
so fitting the twin trains the model, and the model that is saved and served keeps built-in
layers only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import keras
import tensorflow as tf
from keras import layers


def window_max(x: tf.Tensor, pool: int) -> tf.Tensor:
    """``x`` ``(batch, steps, channels)`` max-pooled over windows of ``pool`` steps (stride ``pool``,
    trailing steps that fill no window dropped, as ``MaxPool1D(pool)`` with ``padding="valid"``) ->
    ``(batch, steps // pool, channels)``. Its gradient goes, for each window, to the first step that
    holds the maximum."""
    steps, channels = int(x.shape[1]), int(x.shape[2])
    width = steps // pool

    @tf.custom_gradient
    def pooled(v):
        # (batch, width, pool * channels): step j of each window is a contiguous block of channels.
        rows = tf.reshape(v[:, :width * pool], (-1, width, pool * channels))
        parts = [rows[:, :, j * channels:(j + 1) * channels] for j in range(pool)]
        out = parts[0]
        for part in parts[1:]:
            out = tf.maximum(out, part)

        def grad(g):
            zeros, taken, pieces = tf.zeros_like(g), None, []
            for j, part in enumerate(parts):
                if j == pool - 1:  # the last step of a window takes what the others did not
                    pieces.append(tf.where(taken, zeros, g) if pool > 1 else g)
                    break
                hit = tf.equal(part, out)
                hit = hit if taken is None else tf.logical_and(hit, tf.logical_not(taken))
                taken = hit if taken is None else tf.logical_or(taken, hit)
                pieces.append(tf.where(hit, g, zeros))
            d = tf.reshape(tf.concat(pieces, axis=-1), (-1, width * pool, channels))
            return d if steps == width * pool else tf.pad(d, [[0, 0], [0, steps - width * pool], [0, 0]])

        return out, grad

    return pooled(x)


class WindowMax1D(layers.Layer):
    """``MaxPool1D(pool)`` (stride ``pool``, valid padding, channels last) by :func:`window_max`."""

    def __init__(self, pool: int, **kwargs):
        super().__init__(**kwargs)
        self.pool = int(pool)

    def call(self, x):
        return window_max(x, self.pool)

    def compute_output_shape(self, input_shape):
        return input_shape[0], input_shape[1] // self.pool, input_shape[2]


def _pool_of(layer: layers.Layer) -> int | None:
    """The window of a max pool :class:`WindowMax1D` computes exactly (windows side by side, none
    padded, channels last); ``None`` for any other layer."""
    if not isinstance(layer, layers.MaxPooling1D):
        return None
    config = layer.get_config()
    first = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
    pool, strides = first(config["pool_size"]), first(config["strides"])
    exact = strides in (None, pool) and config["padding"] == "valid" and config["data_format"] == "channels_last"
    return int(pool) if exact else None


def training_twin(model: keras.Model) -> keras.Model:
    """``model`` with each max pool it can replace exactly as a :class:`WindowMax1D`, every other
    layer shared with ``model``; ``model`` itself when it has none or a GPU is there (cuDNN's own
    pooling gradient is fast). Fit the twin; save ``model``."""
    if tf.config.list_physical_devices("GPU") or all(_pool_of(layer) is None for layer in model.layers):
        return model

    def swap(layer: layers.Layer) -> layers.Layer:
        pool = _pool_of(layer)
        return layer if pool is None else WindowMax1D(pool, name=layer.name, dtype=layer.dtype_policy)

    return keras.models.clone_model(model, clone_function=swap)


@functools.cache  # read once: every training asks (twin_pays), and the CPU does not change
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``cpuinfo`` (Linux); empty where it cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def twin_pays(flags: frozenset[str] | set[str] | None = None, gpus: int | None = None) -> bool:
    """Whether training should go through :func:`training_twin`: on a CPU without AVX-512.

    With a GPU cuDNN's pooling gradient is fast. With AVX-512 (``avx512f``) oneDNN's ``MaxPoolGrad``
    was faster than the twin (docs/speed.md); without it, the twin. Either way the numbers are the
    same to the bit. ``flags``, ``gpus``: this machine's when not given."""
    gpus = len(tf.config.list_physical_devices("GPU")) if gpus is None else gpus
    flags = cpu_flags() if flags is None else flags
    return gpus == 0 and "avx512f" not in flags
