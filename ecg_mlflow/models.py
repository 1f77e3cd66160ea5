"""Keras model builders.

Every model takes raw beats in mV, shape ``(batch, window, 2)``, and returns logits,
shape ``(batch, n_classes)``. Input normalisation is the model's first layer, fitted on
training data only, so a saved model needs no outside preprocessing.

The convolutional layers form the *feature extractor*; the layers named in
:data:`HEAD_LAYERS` form the *head* that transfer learning re-trains.
"""

from __future__ import annotations

import itertools

import numpy as np

import keras
from keras import layers

HEAD_LAYERS: tuple[str, ...] = ("head_dense", "logits")
LAST_CONV = "conv3"  # the feature extractor's last layer, which finetune_layers="last" re-trains with the head
# Which inputs each model reads: "beat" ``(window, leads)`` mV; "rr" ``(3,)`` rhythm features
# (previous and next RR over the local mean RR, local mean RR in s; see BeatDataset.rr_features);
# "template" ``(window, leads)`` mV, the patient's median normal beat, and "rr_patient" ``(3,)``,
# RR over the patient's normal RR, both from the patient's fine-tune minutes
# (BeatDataset.patient_context). With rr_features="long" the rr models also read "rr_long"
# ``(2,)``: previous and local-mean RR over the average RR of about five minutes (BeatDataset.rr_long).
# "recent" ``(window, leads)`` mV: the median of the 20 beats before (BeatDataset.recent_template).
# With rr_features="irregular" they read "rr_long" and "rr_irregular" ``(1,)``: how irregular the
# rhythm is before the beat (BeatDataset.rr_irregular). With rr_features="sequence" they read "rr_long"
# and "rr_sequence" ``(8,)``: the last eight RR intervals, newest first, over the five-minute average
# (BeatDataset.rr_sequence). With rr_features="lagged" they read "rr_long" and "rr_lagged" ``(1,)``:
# the irregularity over lags 1-3, which bigeminy and trigeminy leave low (BeatDataset.rr_lagged).
MODEL_INPUTS: dict[str, tuple[str, ...]] = {
    "seed_cnn": ("beat",), "rr_cnn": ("beat", "rr"), "patient_cnn": ("beat", "rr", "template", "rr_patient"),
    "recent_cnn": ("beat", "rr", "recent"),
}
MODELS: tuple[str, ...] = tuple(MODEL_INPUTS)


def lead_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead mean and variance of training beats ``x`` ``(n, window, leads)`` -> two ``(leads,)`` arrays."""
    if x.ndim != 3 or len(x) == 0:
        raise ValueError(f"expected training beats shaped (n > 0, window, leads), got {x.shape}")
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return flat.mean(axis=0), np.maximum(flat.var(axis=0), 1e-12)


def _features(beat, mean: np.ndarray, variance: np.ndarray, dtype: str, template=None, dropout: float = 0.0,
              kernel_size: int = 3, width: int = 1, core: tuple[int, int] | None = None):
    """Normalisation (float32), then Conv1D 16/32/64 (``kernel_size``, ReLU) with max-pool 2 after
    each, flattened; ``width`` multiplies the filters (2: 32/64/128). The last convolution sees
    ``7 * (kernel_size - 1) + 1`` samples: 15 (42 ms at 360 Hz) at kernel 3, 43 (120 ms, about a P
    wave) at kernel 7.
    With a ``template`` the convolutions also see the beat minus its patient's normal beat, in the
    same scale, as extra channels. With ``core`` ``(left, right)`` (:func:`core_crop`) the three
    convolutions see the window less ``left`` samples at its start and ``right`` at its end, and
    :func:`_context` reads the whole window beside them. ``dropout`` > 0 adds a ``feature_dropout``
    layer on the flattened features (active in training only), so a head re-trained on a few minutes
    cannot lean on a handful of them."""
    x = layers.Normalization(axis=-1, mean=mean, variance=variance, name="normalize")(beat)
    if template is not None:
        diff = layers.Subtract(name="minus_template")([beat, template])
        diff = layers.Normalization(axis=-1, mean=np.zeros_like(mean), variance=variance, name="normalize_diff")(diff)
        x = layers.Concatenate(name="beat_and_diff")([x, diff])
    whole = x
    if core is not None:
        x = layers.Cropping1D(core, name="core_crop", dtype=dtype)(x)
    for i, filters in enumerate((16 * width, 32 * width, 64 * width), start=1):
        x = layers.Conv1D(filters, kernel_size, activation="relu", name=f"conv{i}", dtype=dtype)(x)
        x = layers.MaxPool1D(2, name=f"pool{i}", dtype=dtype)(x)
    x = layers.Flatten(name="flatten", dtype=dtype)(x)
    if core is not None:
        x = layers.Concatenate(name="core_and_context", dtype=dtype)([x, _context(whole, dtype)])
    return layers.Dropout(dropout, name="feature_dropout", dtype=dtype)(x) if dropout > 0 else x


# The context branch: two coarse convolutions over the whole window (kernel 7, max-pool 4 after
# each), few filters, so it adds the rhythm around the beat (the previous beat's T wave, a P wave
# that comes early, flutter waves) without a second morphology model beside the core's.
CONTEXT_FILTERS, CONTEXT_KERNEL, CONTEXT_POOL = (8, 16), 7, 4


def _context(x, dtype: str):
    """The context branch over ``x`` ``(batch, window, channels)``, flattened."""
    for i, filters in enumerate(CONTEXT_FILTERS, start=1):
        x = layers.Conv1D(filters, CONTEXT_KERNEL, activation="relu", name=f"context_conv{i}", dtype=dtype)(x)
        x = layers.MaxPool1D(CONTEXT_POOL, name=f"context_pool{i}", dtype=dtype)(x)
    return layers.Flatten(name="context_flatten", dtype=dtype)(x)


def core_crop(window: int, r_peak: int, core_window: int) -> tuple[int, int]:
    """Samples to drop at the start and at the end of a ``window``-sample beat window whose R peak
    is at index ``r_peak`` so that ``core_window`` samples are left, the peak at their index
    ``core_window // 2`` (as in a centred window of that length)."""
    left = r_peak - core_window // 2
    return left, window - left - core_window


def check_core_window(core_window: int, window: int, r_peak: int) -> None:
    """``ValueError`` naming ``core_window`` unless it is 0 (off) or a whole number of samples under
    ``window`` whose centred crop (:func:`core_crop`) fits inside the window with the R peak at
    ``r_peak``, and the window is long enough for the context branch."""
    if isinstance(core_window, bool) or not isinstance(core_window, (int, np.integer)) or core_window < 0:
        raise ValueError(f"core_window must be 0 (off) or a whole number of samples, got {core_window!r}")
    if core_window == 0:
        return

    def fits(c: int) -> bool:
        return c < window and min(core_crop(window, r_peak, c)) >= 0

    if not fits(core_window):
        most = max([c for c in range(1, window) if fits(c)], default=0)
        raise ValueError(f"core_window must fit inside the {window}-sample window with the R peak at its centre "
                         f"(the peak at index {r_peak}: at most {most} samples), got {core_window}")
    if _context_length(window) < 1:
        least = next(w for w in range(window, 100 * window) if _context_length(w) >= 1)
        raise ValueError(f"core_window needs a window long enough for the context branch (at least {least} "
                         f"samples), got window {window}")


def _context_length(window: int) -> int:
    """Positions the context branch (:func:`_context`) leaves of a ``window``-sample window."""
    for _ in CONTEXT_FILTERS:
        window = (window - CONTEXT_KERNEL + 1) // CONTEXT_POOL
    return window


# Columns of "rr" each rr_features setting keeps: "relative" drops the local mean RR in seconds, so
# a head re-trained on a few minutes cannot take the heart rate of those minutes for a beat class.
RR_COLUMNS: dict[str, tuple[int, ...]] = {"all": (0, 1, 2), "relative": (0, 1), "long": (0, 1, 2),
                                          "irregular": (0, 1, 2), "sequence": (0, 1, 2), "lagged": (0, 1, 2)}
# The rhythm inputs each rr_features setting adds beside "rr", in the order the head reads them:
# "long" adds "rr_long"; "irregular" also "rr_irregular", so that a short RR in atrial fibrillation
# need not look premature; "sequence" also "rr_sequence": the head sees whether a short RR follows
# steady ones (a premature beat), short ones (a run) or scattered ones (fibrillation); "lagged" also
# "rr_lagged": an irregularity that bigeminy and trigeminy leave low and atrial fibrillation raises.
RR_INPUTS: dict[str, tuple[str, ...]] = {"all": (), "relative": (), "long": ("rr_long",),
                                         "irregular": ("rr_long", "rr_irregular"),
                                         "sequence": ("rr_long", "rr_sequence"),
                                         "lagged": ("rr_long", "rr_lagged")}
# Each rhythm input's width; None: as many columns as its training features have (at least one).
# "rr_median" (rr_long over the five-minute median RR) is read only by promote_early (early_reference);
# "atrial" (what the atria did before the beat, its width set by the window) only by veto_atrial (sveb_af).
RHYTHM_WIDTHS: dict[str, int | None] = {"rr_long": 2, "rr_irregular": 1, "rr_sequence": None, "rr_lagged": 1,
                                        "rr_median": 2, "atrial": None}


def _rr_input(rr, keep: tuple[int, ...]):
    """``rr`` itself, or its columns ``keep`` through a fixed selection matrix: a plain Dense layer,
    so the saved model needs no custom layer to load or serve; never trained."""
    if keep == (0, 1, 2):
        return rr
    select = np.zeros((3, len(keep)), dtype=np.float32)
    select[list(keep), np.arange(len(keep))] = 1.0
    return layers.Dense(len(keep), use_bias=False, trainable=False, name="rr_select",
                        kernel_initializer=keras.initializers.Constant(select))(rr)


def _rhythm(inputs: dict, parts: list, rhythm: dict[str, int]):
    """The rhythm features side by side: ``parts``, then an input ``(width,)`` for each
    ``name: width`` of ``rhythm``, in its order (added to ``inputs``)."""
    for name, size in rhythm.items():
        inputs[name] = keras.Input(shape=(size,), name=name)
        parts.append(inputs[name])
    return parts[0] if len(parts) == 1 else layers.Concatenate(name="rhythm")(parts)


def build_seed_cnn(window: int, n_leads: int, n_classes: int, mean: np.ndarray, variance: np.ndarray,
                   dtype: str = "float32", dropout: float = 0.0, kernel_size: int = 3,
                   width: int = 1, core: tuple[int, int] | None = None) -> keras.Model:
    """The seed notebook's 1D CNN: Conv1D 16/32/64 (kernel 3, or ``kernel_size``; ReLU; the filters
    times ``width``), max-pool 2 after each, Flatten, Dense 32 ReLU, Dense ``n_classes`` — the last
    layer gives logits (no ReLU).

    ``dtype``: the compute policy of the hidden layers (``mixed_float16`` on a GPU); the logits
    are always float32 so the loss is computed at full precision. ``core``: see :func:`_features`."""
    inputs = keras.Input(shape=(window, n_leads), name="beat")
    x = _features(inputs, mean, variance, dtype, dropout=dropout, kernel_size=kernel_size, width=width, core=core)
    x = layers.Dense(32, activation="relu", name="head_dense", dtype=dtype)(x)
    logits = layers.Dense(n_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name="seed_cnn")


def build_rr_cnn(window: int, n_leads: int, n_classes: int, mean: np.ndarray, variance: np.ndarray,
                 rr_mean: np.ndarray, rr_variance: np.ndarray, dtype: str = "float32",
                 rr_keep: tuple[int, ...] = (0, 1, 2), dropout: float = 0.0, rhythm: dict[str, int] | None = None,
                 recent: bool = False, kernel_size: int = 3, width: int = 1,
                 core: tuple[int, int] | None = None) -> keras.Model:
    """The seed CNN with rhythm context: the RR features (columns ``rr_keep`` of the ``(3,)``
    input ``rr``, and an input ``(width,)`` for each ``name: width`` of ``rhythm``, e.g.
    ``{"rr_long": 2}``) join the flattened beat features before the head, so premature beats
    (short previous RR) are visible to the classifier. ``rr_mean``/``rr_variance``:
    ``(len(rr_keep) + sum(rhythm.values()),)``, the kept rr columns, then the rhythm inputs in
    ``rhythm``'s order.
    With ``recent`` (model ``recent_cnn``) the convolutions also see the beat minus the median of
    the beats just before it (input ``recent``): a beat that differs from its neighbours stands
    out, while a record whose beats slowly change shape keeps its normal beats normal."""
    beat = keras.Input(shape=(window, n_leads), name="beat")
    rr = keras.Input(shape=(3,), name="rr")
    inputs = {"beat": beat, "rr": rr}
    if recent:
        inputs["recent"] = keras.Input(shape=(window, n_leads), name="recent")
    x = _features(beat, mean, variance, dtype, template=inputs.get("recent"), dropout=dropout,
                  kernel_size=kernel_size, width=width, core=core)
    r = _rhythm(inputs, [_rr_input(rr, rr_keep)], rhythm or {})
    r = layers.Normalization(axis=-1, mean=rr_mean, variance=rr_variance, name="normalize_rr")(r)
    x = layers.Concatenate(name="features", dtype=dtype)([x, r])
    x = layers.Dense(32, activation="relu", name="head_dense", dtype=dtype)(x)
    logits = layers.Dense(n_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name="recent_cnn" if recent else "rr_cnn")


def build_patient_cnn(window: int, n_leads: int, n_classes: int, mean: np.ndarray, variance: np.ndarray,
                      rr_mean: np.ndarray, rr_variance: np.ndarray, dtype: str = "float32",
                      rr_keep: tuple[int, ...] = (0, 1, 2), dropout: float = 0.0,
                      rhythm: dict[str, int] | None = None, kernel_size: int = 3, width: int = 1,
                      core: tuple[int, int] | None = None) -> keras.Model:
    """``rr_cnn`` that reads each beat against its own patient: the convolutions see the beat and
    the beat minus the patient's median normal beat (``template``), and the head sees the RR
    features both over the local mean RR (``rr``) and over the patient's normal RR
    (``rr_patient``). A premature or odd-shaped beat stands out even in a patient whose
    fine-tune minutes hold none like it. ``rhythm`` as for :func:`build_rr_cnn`;
    ``rr_mean``/``rr_variance``: ``(len(rr_keep) + 3 + sum(rhythm.values()),)``, the kept rr
    columns, rr_patient, then the rhythm inputs in ``rhythm``'s order."""
    beat = keras.Input(shape=(window, n_leads), name="beat")
    template = keras.Input(shape=(window, n_leads), name="template")
    rr = keras.Input(shape=(3,), name="rr")
    rr_patient = keras.Input(shape=(3,), name="rr_patient")
    inputs = {"beat": beat, "rr": rr, "template": template, "rr_patient": rr_patient}
    x = _features(beat, mean, variance, dtype, template=template, dropout=dropout, kernel_size=kernel_size,
                  width=width, core=core)
    r = _rhythm(inputs, [_rr_input(rr, rr_keep), rr_patient], rhythm or {})
    r = layers.Normalization(axis=-1, mean=rr_mean, variance=rr_variance, name="normalize_rr")(r)
    x = layers.Concatenate(name="features", dtype=dtype)([x, r])
    x = layers.Dense(32, activation="relu", name="head_dense", dtype=dtype)(x)
    logits = layers.Dense(n_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name="patient_cnn")


def _feature_length(window: int, kernel_size: int) -> int:
    """Positions left after the three rounds of convolution (kernel ``kernel_size``, no padding)
    and max-pool 2 in :func:`_features`."""
    n = window
    for _ in range(3):
        n = (n - kernel_size + 1) // 2
    return n


def _least_window(kernel_size: int) -> int:
    """The shortest beat that the three rounds of convolution (kernel ``kernel_size``) and pooling
    leave a position of."""
    return next(w for w in itertools.count(1) if _feature_length(w, kernel_size) >= 1)


def check_kernel_size(kernel_size: int, window: int, core_window: int = 0) -> None:
    """``ValueError`` naming ``kernel_size`` unless it is a whole number >= 1 small enough that the
    three rounds of convolution and pooling leave a position of what they see: the
    ``window``-sample beat, or its ``core_window`` samples when that is > 0. When that is too short
    for any kernel, the error names it (``window`` or ``core_window``) instead."""
    window_name, window = ("core_window", core_window) if core_window else ("window", window)
    most = max([k for k in range(1, window + 1) if _feature_length(window, k) >= 1], default=0)
    valid = not isinstance(kernel_size, bool) and isinstance(kernel_size, (int, np.integer)) and kernel_size >= 1
    if most == 0:
        needs = f", {_least_window(kernel_size)} with kernel_size {kernel_size}" if valid and kernel_size > 1 else ""
        raise ValueError(f"{window_name} must be at least {_least_window(1)} samples for the three rounds of "
                         f"convolution and pooling{needs}, got {window}")
    if not valid or kernel_size > most:
        needs = f"; kernel_size {kernel_size} needs a {window_name} of at least {_least_window(kernel_size)} samples" \
            if valid else ""
        raise ValueError(f"kernel_size must be a whole number from 1 to {most} (for {window_name} {window}), "
                         f"got {kernel_size!r}{needs}")


# Wider than this the convolutions hold 64 times the seed's weights in their last layer and train
# many times slower on a CPU; nothing measured asks for more.
MAX_WIDTH = 8


def check_width(width: int) -> None:
    """``ValueError`` naming ``width`` unless it is a whole number from 1 to :data:`MAX_WIDTH`."""
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be a whole number from 1 to {MAX_WIDTH}, got {width!r}")


def build_model(name: str, window: int, n_leads: int, n_classes: int, train_x: np.ndarray,
                train_rr: np.ndarray | None = None, dtype: str = "float32",
                train_rr_patient: np.ndarray | None = None, rr_features: str = "all",
                dropout: float = 0.0, kernel_size: int = 3, width: int = 1,
                train_rhythm: dict[str, np.ndarray | None] | None = None, core_window: int = 0,
                r_peak: int | None = None) -> keras.Model:
    """Build model ``name`` with its normalisation fitted on training beats ``train_x``
    ``(n, window, n_leads)`` (and, for ``rr_cnn`` and ``patient_cnn``, training RR features
    ``train_rr`` ``(n, 3)``; for ``patient_cnn`` also ``train_rr_patient`` ``(n, 3)``; and in
    ``train_rhythm`` the training features of each input :data:`RR_INPUTS` names for
    ``rr_features``: ``rr_long`` ``(n, 2)``, ``rr_irregular`` ``(n, 1)``, ``rr_sequence``
    ``(n, k)``, ``rr_lagged`` ``(n, 1)``; others are not read);
    ``dtype`` is the hidden layers' compute policy (``float32`` or ``mixed_float16``);
    ``rr_features`` which RR inputs the rr models read (:data:`RR_COLUMNS`, :data:`RR_INPUTS`);
    ``dropout`` the rate of the ``feature_dropout`` layer (none at 0); ``kernel_size`` the
    convolutions' kernel (:func:`check_kernel_size`, on the core window when there is one); ``width``
    (1 to :data:`MAX_WIDTH`) multiplies their filters; ``core_window`` > 0: the convolutions see only
    that many samples centred on the R peak, at index ``r_peak`` of the window (``window // 2`` when
    None), and a context branch reads the whole window (:func:`check_core_window`)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {name!r}")
    if rr_features not in RR_COLUMNS:
        raise ValueError(f"rr_features must be one of {list(RR_COLUMNS)}, got {rr_features!r}")
    r_peak = window // 2 if r_peak is None else r_peak
    check_core_window(core_window, window, r_peak)
    check_kernel_size(kernel_size, window, core_window)
    check_width(width)
    core = core_crop(window, r_peak, core_window) if core_window else None
    mean, variance = lead_stats(train_x)
    if name == "seed_cnn":
        return build_seed_cnn(window, n_leads, n_classes, mean, variance, dtype, dropout, kernel_size, width, core)
    if train_rr is None or (name == "patient_cnn" and train_rr_patient is None):
        raise ValueError(f"model {name} needs the training RR features rr"
                         f"{' and rr_patient' if name == 'patient_cnn' else ''}, each (n, 3)")
    extra = {}
    for input_name in RR_INPUTS[rr_features]:
        a, size = (train_rhythm or {}).get(input_name), RHYTHM_WIDTHS[input_name]
        if a is None or a.ndim != 2 or a.shape[1] < 1 or size not in (None, a.shape[1]):
            raise ValueError(f"rr_features={rr_features!r} needs the training features {input_name} "
                             f"(n, {size or 'k >= 1'}), got {None if a is None else a.shape}")
        extra[input_name] = a
    keep = RR_COLUMNS[rr_features]
    rhythm = [train_rr[:, list(keep)]] + ([train_rr_patient] if name == "patient_cnn" else []) + list(extra.values())
    rr_mean, rr_var = lead_stats(np.concatenate(rhythm, axis=1)[:, None, :])
    widths = {n: a.shape[1] for n, a in extra.items()}
    if name == "patient_cnn":
        return build_patient_cnn(window, n_leads, n_classes, mean, variance, rr_mean, rr_var, dtype, keep, dropout,
                                 widths, kernel_size, width, core)
    return build_rr_cnn(window, n_leads, n_classes, mean, variance, rr_mean, rr_var, dtype, keep, dropout, widths,
                        recent=name == "recent_cnn", kernel_size=kernel_size, width=width, core=core)


ENSEMBLE_NAME = "ensemble"


def model_input_names(model: keras.Model) -> tuple[str, ...]:
    """The inputs a model reads, in :data:`MODEL_INPUTS` terms."""
    return tuple(model.input.keys()) if isinstance(model.input, dict) else ("beat",)


def build_ensemble(members: list[keras.Model]) -> keras.Model:
    """One model from ``members`` (each trained on its own, same inputs): the mean of their logits.

    Averaging logits (not probabilities) needs no custom layer, so the saved model loads and
    serves as any other; ``softmax`` of the mean is the normalised geometric mean of the members'
    probabilities. One member is returned as it is, so ``ensemble=1`` is the single model."""
    if not members:
        raise ValueError("an ensemble needs at least one member model, got none")
    if len(members) == 1:
        return members[0]
    first = members[0]
    for m in members[1:]:
        if model_input_names(m) != model_input_names(first):
            raise ValueError(f"ensemble members read different inputs: {model_input_names(first)} and "
                             f"{model_input_names(m)}")
    # Each member under its own name ("member1", ...), so the saved ensemble keeps them apart.
    renamed = [keras.Model(m.input, m.output, name=f"member{i}") for i, m in enumerate(members, start=1)]
    inputs = ({n: keras.Input(shape=first.input[n].shape[1:], name=n) for n in model_input_names(first)}
              if isinstance(first.input, dict) else keras.Input(shape=first.input.shape[1:], name="beat"))
    logits = layers.Average(name="mean_logits", dtype="float32")([m(inputs) for m in renamed])
    return keras.Model(inputs, logits, name=ENSEMBLE_NAME)


GATED_NAME = "premature_gate"
# Above this much the gate's step is closed: a beat exactly at the threshold is still called early.
_STEP = 1e4


def _fixed_dense(units: int, kernel: np.ndarray, bias: np.ndarray | None, name: str) -> layers.Dense:
    """A Dense layer with given, never-trained weights: built-in, so the saved model needs no custom layer."""
    return layers.Dense(units, use_bias=bias is not None, trainable=False, name=name, dtype="float32",
                        kernel_initializer=keras.initializers.Constant(kernel),
                        bias_initializer=keras.initializers.Constant(0.0 if bias is None else bias))


def _wrapped(model: keras.Model, extra: dict[str, int]) -> tuple[dict, object]:
    """Fresh inputs for ``model``'s own plus the ``extra`` ones (name -> width) it lacks, and
    ``model``'s logits on them: the start of a wrapper around a trained model."""
    inner = model_input_names(model)
    inputs = {n: keras.Input(shape=(model.input[n] if isinstance(model.input, dict) else model.input).shape[1:], name=n)
              for n in inner}
    for name, size in extra.items():
        inputs.setdefault(name, keras.Input(shape=(size,), name=name))
    return inputs, model({n: inputs[n] for n in inner} if isinstance(model.input, dict) else inputs["beat"])


def _ruled_out_above(logits, value, threshold: float, class_index: int, names: tuple[str, str, str, str]):
    """``logits`` ``(batch, n_classes)`` with class ``class_index``'s lowered by 1e4 wherever ``value``
    ``(batch, 1)`` is above ``threshold``. The step is 0 while the value is <= threshold and 1 once it
    is 1e-4 above: Dense + capped ReLU, built-in layers with fixed weights. ``names``: the layers'
    names (step, its capped ReLU, the penalty, the sum), kept as each rule has always saved them."""
    step, on, penalty_name, out = names
    n_classes = int(logits.shape[-1])
    above = _fixed_dense(1, np.full((1, 1), _STEP, np.float32), np.array([-threshold * _STEP], np.float32),
                         step)(value)
    above = layers.ReLU(max_value=1.0, name=on, dtype="float32")(above)
    penalty = np.zeros((1, n_classes), np.float32)
    penalty[0, class_index] = -_STEP
    return layers.Add(name=out, dtype="float32")([logits, _fixed_dense(n_classes, penalty, None, penalty_name)(above)])


def gate_premature(model: keras.Model, threshold: float, class_index: int) -> keras.Model:
    """``model`` with class ``class_index`` (SVEB) ruled out for every beat that does not come early:
    where the previous RR over the local mean RR (``rr`` column 0) and the previous RR over the
    average of about five minutes (``rr_long`` column 0) are both above ``threshold``, that class's
    logit is lowered by 1e4, so the beat takes the best of the other classes. Premature atrial and
    junctional beats come early by definition, and a beat that is early against neither the beats
    around it nor the minutes before is, in these records, a normal beat whose shape has drifted
    towards the patient's ectopic ones.

    The returned model reads ``model``'s inputs plus ``rr`` ``(3,)`` and ``rr_long`` ``(2,)`` and gives
    logits ``(batch, n_classes)``; the gate is built from built-in layers with fixed weights, so it
    saves, loads and serves as any other model."""
    n_classes = int(model.output.shape[-1])
    if not 0 <= class_index < n_classes:
        raise ValueError(f"class_index must be in [0, {n_classes}), got {class_index}")
    inputs, logits = _wrapped(model, {"rr": 3, "rr_long": 2})
    first = np.zeros((3, 1), np.float32)
    first[0, 0] = 1.0
    early_local = _fixed_dense(1, first, None, "gate_rr_prev")(inputs["rr"])
    early_long = _fixed_dense(1, first[:2], None, "gate_rr_prev_long")(inputs["rr_long"])
    earliest = layers.Minimum(name="gate_earliest", dtype="float32")([early_local, early_long])
    out = _ruled_out_above(logits, earliest, threshold, class_index,
                           ("gate_step", "gate_late", "gate_penalty", "gated_logits"))
    return keras.Model(inputs, out, name=GATED_NAME)


IRREGULAR_GATED_NAME = "irregular_gate"


# What gate_irregular reads the irregularity from, by the name of the regular_measure option: the change
# between successive RR intervals (rr_irregular), or the smallest over lags 1-3 (rr_lagged), which
# bigeminy, trigeminy and isolated ectopic pairs raise less and atrial fibrillation still raises.
REGULAR_MEASURES: dict[str, str] = {"successive": "rr_irregular", "lagged": "rr_lagged"}


def gate_irregular(model: keras.Model, threshold: float, class_index: int,
                   measure: str = "rr_irregular") -> keras.Model:
    """``model`` with class ``class_index`` (SVEB) ruled out for every beat whose rhythm before is
    more irregular than ``threshold`` (``measure``, ``rr_irregular`` or ``rr_lagged``, above it): that
    class's logit is lowered by 1e4, so the beat takes the best of the other classes. In atrial
    fibrillation and flutter a short RR is ordinary and the annotators call the beats N; this is
    where most false S calls of the transfer models are (README, "errors by rhythm").

    The returned model reads ``model``'s inputs plus ``measure`` ``(1,)`` and gives logits
    ``(batch, n_classes)``; built from built-in layers with fixed weights, it saves, loads and serves
    as any other model."""
    n_classes = int(model.output.shape[-1])
    if not 0 <= class_index < n_classes:
        raise ValueError(f"class_index must be in [0, {n_classes}), got {class_index}")
    if measure not in REGULAR_MEASURES.values():
        raise ValueError(f"measure must be one of {list(REGULAR_MEASURES.values())}, got {measure!r}")
    inputs, logits = _wrapped(model, {measure: 1})
    out = _ruled_out_above(logits, inputs[measure], threshold, class_index,
                           ("irregular_step", "irregular_gate_on", "irregular_penalty", "irregular_gated_logits"))
    return keras.Model(inputs, out, name=IRREGULAR_GATED_NAME)


PROMOTED_NAME = "early_promotion"
# What promote_early reads the earliness from, by the name of the early_reference option: previous RR
# over the mean RR of about five minutes (rr_long) or over their median (rr_median), which runs of
# tachycardia filling less than half of them do not pull down.
EARLY_REFERENCES: dict[str, str] = {"mean": "rr_long", "median": "rr_median"}


def promote_early(model: keras.Model, threshold: float, regular: float, from_index: int,
                  to_index: int, fast_rr: float = 0.0, reference: str = "rr_long") -> keras.Model:
    """``model`` with class ``from_index`` (N) handed to class ``to_index`` (SVEB) for every beat that
    comes early in a regular rhythm: where the previous RR over the average of about five minutes
    (``rr_long`` column 0) is below ``threshold`` and the rhythm before the beat is regular
    (``rr_irregular`` below ``regular``), the ``to_index`` logit becomes the larger of the two and
    the ``from_index`` logit is lowered by 1e4. So a beat the model called N is called S there, and
    a beat it called V (or any other class) keeps its class. In sinus rhythm a beat that early is
    premature by definition, so not normal, whatever its shape; in atrial fibrillation short RRs
    are ordinary, hence the rhythm condition. This is the converse of :func:`gate_premature`.

    ``fast_rr`` > 0 (s) adds a third condition: the local mean RR (``rr`` column 2) is below it, so
    the rhythm is fast (0.6 s: 100 beats a minute, tachycardia). Inside a run of supraventricular
    tachycardia every beat is S and comes early against the minutes before; a sinus rhythm back
    from a slower stretch (2:1 block, bradycardia) is early against them too, but not fast.

    ``reference``: the input whose column 0 is the earliness, ``rr_long`` (previous RR over the
    five-minute mean RR) or ``rr_median`` (over their median, which runs of tachycardia pull down
    less); ``threshold`` is in its terms.

    The returned model reads ``model``'s inputs plus ``reference`` ``(2,)`` and ``rr_irregular``
    ``(1,)`` (and ``rr`` ``(3,)`` with ``fast_rr``) and gives logits ``(batch, n_classes)``; it is
    built from built-in layers with fixed weights, so it saves, loads and serves as any other model."""
    n_classes = int(model.output.shape[-1])
    for name, index in (("from_index", from_index), ("to_index", to_index)):
        if not 0 <= index < n_classes:
            raise ValueError(f"{name} must be in [0, {n_classes}), got {index}")
    if from_index == to_index:
        raise ValueError(f"from_index and to_index must differ, got {from_index} for both")
    if isinstance(fast_rr, bool) or not isinstance(fast_rr, (int, float)) or fast_rr < 0:
        raise ValueError(f"fast_rr must be 0 (any rate) or a local mean RR in seconds, got {fast_rr!r}")
    if reference not in EARLY_REFERENCES.values():
        raise ValueError(f"reference must be one of {list(EARLY_REFERENCES.values())}, got {reference!r}")
    inputs, logits = _wrapped(model, {reference: 2, "rr_irregular": 1, **({"rr": 3} if fast_rr else {})})
    # 1 while the value is at least 1e-4 below its bound, 0 from the bound on: Dense + capped ReLU.
    first = np.zeros((2, 1), np.float32)
    first[0, 0] = -_STEP
    early = _fixed_dense(1, first, np.array([threshold * _STEP], np.float32), "promote_early_step")(inputs[reference])
    early = layers.ReLU(max_value=1.0, name="promote_early", dtype="float32")(early)
    steady = _fixed_dense(1, np.full((1, 1), -_STEP, np.float32), np.array([regular * _STEP], np.float32),
                          "promote_regular_step")(inputs["rr_irregular"])
    steady = layers.ReLU(max_value=1.0, name="promote_regular", dtype="float32")(steady)
    conditions = [early, steady]
    if fast_rr:
        local = np.zeros((3, 1), np.float32)
        local[2, 0] = -_STEP
        fast = _fixed_dense(1, local, np.array([fast_rr * _STEP], np.float32), "promote_fast_step")(inputs["rr"])
        conditions.append(layers.ReLU(max_value=1.0, name="promote_fast", dtype="float32")(fast))
    both = layers.Minimum(name="promote_when", dtype="float32")(conditions)

    def column(index: int, name: str):
        pick = np.zeros((n_classes, 1), np.float32)
        pick[index, 0] = 1.0
        return _fixed_dense(1, pick, None, name)(logits)

    source, target = column(from_index, "promote_from_logit"), column(to_index, "promote_to_logit")
    # How far the target logit must rise to reach the source's (0 when it is already above).
    rise = layers.Subtract(name="promote_rise", dtype="float32")(
        [layers.Maximum(name="promote_larger", dtype="float32")([source, target]), target])
    shift = np.zeros((2, n_classes), np.float32)
    shift[0, to_index] = 1.0  # row 0: the rise goes to the target
    shift[1, from_index] = -_STEP  # row 1 (a constant 1): the source is ruled out
    ones = _fixed_dense(1, np.zeros((1, 1), np.float32), np.ones(1, np.float32), "promote_one")(both)
    change = _fixed_dense(n_classes, shift, None, "promote_change")(
        layers.Concatenate(name="promote_parts", dtype="float32")([rise, ones]))
    spread = _fixed_dense(n_classes, np.ones((1, n_classes), np.float32), None, "promote_spread")(both)
    out = layers.Add(name="promoted_logits", dtype="float32")(
        [logits, layers.Multiply(name="promote_where", dtype="float32")([change, spread])])
    return keras.Model(inputs, out, name=PROMOTED_NAME)


ATRIAL_DETECTOR_NAME = "atrial_detector"
# What the detector of atrial fibrillation and flutter reads: the atrial activity before the beat and
# three views of the rhythm (RR features, irregularity, irregularity that bigeminy leaves low).
ATRIAL_INPUTS: tuple[str, ...] = ("atrial", "rr", "rr_irregular", "rr_lagged")
ATRIAL_HIDDEN = 16


def build_atrial_detector(train: dict[str, np.ndarray]) -> keras.Model:
    """A small network that tells whether the rhythm before a beat is atrial fibrillation or flutter:
    it reads the inputs :data:`ATRIAL_INPUTS` names, each ``(width,)``, and gives one logit
    ``(batch, 1)``. ``train``: the training features of each of them, ``(n, width)``, which set the
    widths and the normalisation; the weights are to be trained
    (:func:`ecg_mlflow.training.fit_atrial_detector`)."""
    missing = [n for n in ATRIAL_INPUTS if n not in train or np.ndim(train[n]) != 2 or len(train[n]) == 0]
    if missing:
        raise ValueError(f"the atrial detector needs training features (n > 0, width) for {missing}")
    inputs = {n: keras.Input(shape=(train[n].shape[1],), name=n) for n in ATRIAL_INPUTS}
    mean, variance = lead_stats(np.concatenate([train[n] for n in ATRIAL_INPUTS], axis=1)[:, None, :])
    x = layers.Concatenate(name="atrial_features")([inputs[n] for n in ATRIAL_INPUTS])
    x = layers.Normalization(axis=-1, mean=mean, variance=variance, name="atrial_normalize")(x)
    x = layers.Dense(ATRIAL_HIDDEN, activation="relu", name="atrial_dense")(x)
    return keras.Model(inputs, layers.Dense(1, name="atrial_logit")(x), name=ATRIAL_DETECTOR_NAME)


ATRIAL_VETOED_NAME = "atrial_veto"


def veto_atrial(model: keras.Model, detector: keras.Model, threshold: float, class_index: int) -> keras.Model:
    """``model`` with class ``class_index`` (SVEB) ruled out for every beat whose rhythm before
    ``detector`` (:func:`build_atrial_detector`, trained) reads as atrial fibrillation or flutter:
    where its logit is above ``threshold``, that class's logit is lowered by 1e4, so the beat takes
    the best of the other classes. In fibrillation and flutter the annotators call the beats N, and
    the early, irregular beats there are most of the transfer models' false S calls. Unlike
    :func:`gate_irregular`, which reads the irregularity alone, the detector also reads the atria's
    activity before the beat, which frequent premature beats in sinus rhythm leave alone.

    The returned model reads ``model``'s inputs plus ``detector``'s and gives logits
    ``(batch, n_classes)``; the detector is part of it, frozen, and the veto is built from built-in
    layers with fixed weights, so it saves, loads and serves as any other model."""
    n_classes = int(model.output.shape[-1])
    if not 0 <= class_index < n_classes:
        raise ValueError(f"class_index must be in [0, {n_classes}), got {class_index}")
    if detector.name != ATRIAL_DETECTOR_NAME or int(detector.output.shape[-1]) != 1:
        raise ValueError(f"detector must be an {ATRIAL_DETECTOR_NAME} with one logit (build_atrial_detector), "
                         f"got {detector.name!r} with output {detector.output.shape}")
    widths = {n: int(detector.input[n].shape[-1]) for n in ATRIAL_INPUTS}
    inputs, logits = _wrapped(model, widths)
    detector.trainable = False
    score = detector({n: inputs[n] for n in ATRIAL_INPUTS})
    out = _ruled_out_above(logits, score, threshold, class_index,
                           ("atrial_step", "atrial_veto_on", "atrial_penalty", "atrial_vetoed_logits"))
    return keras.Model(inputs, out, name=ATRIAL_VETOED_NAME)


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The member models of an ensemble built by :func:`build_ensemble` (also after save and load),
    or ``[model]`` for a single model."""
    if model.name != ENSEMBLE_NAME:
        return [model]
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def transfer_copy(base: keras.Model, layers_to_train: str = "head") -> keras.Model:
    """A copy of ``base`` with its weights, every layer frozen except the head (:data:`HEAD_LAYERS`);
    ``layers_to_train="last"`` also leaves the last convolution (:data:`LAST_CONV`) trainable, so the
    beat features nearest the head can follow the patient; ``"all"`` leaves every layer trainable
    (the normalisation stays fixed)."""
    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    names = {layer.name for layer in model.layers}
    trained = HEAD_LAYERS + ((LAST_CONV,) if layers_to_train == "last" else ())
    missing = [n for n in trained if n not in names]
    if missing:
        raise ValueError(f"base model has no layer(s) {missing} to re-train; layers: {sorted(names)}")
    for layer in model.layers:
        # rr_select is a fixed column choice, not a weight to learn.
        layer.trainable = (layer.name in trained or layers_to_train == "all") and layer.name != "rr_select"
    return model
