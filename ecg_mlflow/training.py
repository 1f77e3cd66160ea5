"""Base training and transfer (re-training the head on a patient's first minutes).

Reads top to bottom: seed everything, build a ``tf.data`` pipeline over the arrays,
compile, fit, return the model and its per-epoch history. Logging is a callback the
caller passes in, so this module knows nothing of MLflow.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np

import keras
import tensorflow as tf

from ecg_mlflow.beats import RECENT_REFERENCES, REGULAR_IRREGULARITY
from ecg_mlflow.models import (ATRIAL_INPUTS, EARLY_REFERENCES, MODELS, REGULAR_MEASURES, RR_COLUMNS,
                               RHYTHM_WIDTHS, RR_INPUTS, build_atrial_detector, build_ensemble, build_model,
                               check_width, ensemble_members, model_input_names, transfer_copy)
from ecg_mlflow.pooling import training_twin, twin_pays

CLASS_WEIGHTS = ("none", "balanced", "sqrt")
FINETUNE_LAYERS = ("head", "last", "all")
PRECISIONS = ("auto", "float32", "mixed")
LR_SCHEDULES = ("constant", "cosine")
REPLAY_SELECTIONS = ("random", "nearest")
MAX_HEART_RATE = 300  # beats a minute: early_sveb_rate above any ventricular rate is a typo
RR_FEATURES = tuple(RR_COLUMNS)


# Lin et al. use gamma up to 5; far beyond it every beat the model leans the right way weighs nothing.
MAX_FOCAL_GAMMA = 10


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters (plain values). Validated by :meth:`validated` before any work."""

    model: str = "rr_cnn"  # chosen on validation halves of the fine-tune minutes (README); seed_cnn = the notebook's
    epochs: int = 5
    batch_size: int = 256
    learning_rate: float = 1e-3
    finetune_epochs: int = 20
    finetune_batch_size: int = 32
    finetune_learning_rate: float = 1e-3
    seed: int = 42
    class_weight: str = "sqrt"  # none | balanced | sqrt: loss weight per class from training counts
    jit_compile: bool = False  # XLA-compile the train step (slower on CPU; seeded repeats not bit-exact)
    finetune_layers: str = "head"  # head: re-train only the head; last: the last convolution and the head;
    # all: every layer (at the fine-tune rate)
    precision: str = "auto"  # float32 | mixed (float16 compute, float32 weights and logits) | auto: mixed on a GPU
    finetune_replay: int = 75  # beats per class from the base-training subjects mixed into the fine-tune set
    # (75 chosen on both halves of the subjects, README "Choosing options across halves")
    rr_features: str = "all"  # all | relative: leave out the local mean RR in s (the heart rate)
    # | long: add RR over ~5 min | irregular: long plus the rhythm's irregularity before the beat
    # | sequence: long plus the last 8 RR intervals
    # | lagged: long plus an irregularity over lags 1-3 (bigeminy reads regular, atrial fibrillation irregular)
    dropout: float = 0.5  # dropout rate on the flattened beat features while training (never on the RR features)
    # (0.5 chosen on both halves of the subjects, README "Choosing options across halves")
    finetune_blend: float = 1.0  # transfer weights = blend * fine-tuned + (1 - blend) * base (1: fine-tuned only)
    ensemble: int = 1  # base models trained with seeds seed, seed + 1, ...; each fine-tuned; their logits averaged
    augment: float = 0.0  # strength of random gain, baseline and noise on training waveforms (0: none)
    augment_shift: int = 0  # most samples a training beat's window moves off its R peak, afresh every epoch
    # (0: none): a QRS detector does not place a beat where the annotators did (classify beats=detect)
    sveb_gate: float = 0.0  # > 0: transfer calls S only for beats earlier than this share of training S beats
    sveb_regular: float = 0.0  # > 0: transfer calls S only for beats whose rhythm before is no more irregular
    # than this share of the training subjects' S beats (no S calls in atrial fibrillation or flutter)
    regular_measure: str = "successive"  # the irregularity sveb_regular reads: the change between successive RR
    # intervals, or the smallest over lags 1-3 (lagged), which ectopic beats raise less (models.REGULAR_MEASURES)
    early_sveb: float = 0.0  # > 0: transfer calls S instead of N for beats in regular rhythm earlier than all but
    # this share of the training subjects' N beats in regular rhythm
    early_sveb_rate: float = 0.0  # > 0 (beats a minute): early_sveb acts only where the local heart rate is at
    # least this (100: tachycardia), so a rhythm back from a slower stretch is not taken for a run of SVTA
    early_reference: str = "mean"  # early_sveb reads the previous RR over the five-minute mean or median RR
    # (models.EARLY_REFERENCES)
    sveb_af: float = 0.0  # > 0: transfer calls no S where a detector of atrial fibrillation and flutter, trained on
    # the training subjects' rhythm annotations, reads the rhythm so; this share of their S beats would be vetoed
    recent_reference: str = "all"  # recent_cnn reads each beat against the 20 beats before it (all) or
    # the 20 before it that came on time (ontime), so a run of early beats is not its own reference
    kernel_size: int = 3  # the convolutions' kernel (samples at 360 Hz); 3 is the seed notebook's
    width: int = 1  # multiplies the convolutions' filters (1: the seed notebook's 16/32/64)
    core_window: int = 0  # > 0: the convolutions see only this many samples centred on the R peak, and a
    # coarse context branch reads the whole window (a longer one, e.g. window=256 window_offset=48)
    lr_schedule: str = "constant"  # constant | cosine: each training's rate decays from its learning rate to 0
    # over its epochs (cosine), base training and fine-tuning alike
    finetune_replay_early: int = 0  # N beats that came early, from the base-training subjects, added to the
    # replay: they show the head short-RR beats that are not S (atrial fibrillation, sinus arrhythmia)
    finetune_premature: int = 0  # made-up S beats added to the fine-tune set: the patient's own fine-tune N
    # beats read with the rhythm inputs of S beats from the base-training subjects, so that the head learns
    # "this patient's beat shape, come early" as S rather than "another subject's beat shape"
    focal_gamma: float = 0.0  # > 0: focal loss (Lin et al. 2017), each beat's cross-entropy times (1 - p)^gamma with p
    # the probability of its true class, so beats already classified well weigh less; base training and fine-tuning
    ema: float = 0.0  # > 0: each training ends on the exponential moving average of its weights over its steps
    # (from the first step's on), with this momentum (0.99: about the last 100 steps), not on the last step's weights;
    # base training and fine-tuning
    subject_balance: float = 0.0  # > 0: in base training a beat's loss weight inside its class goes as its subject's
    # count of that class to the power -subject_balance (1: each subject weighs the same in each class), so a class
    # is not learnt as the look of the one or two subjects that hold most of its beats (232: half the S beats)
    finetune_replay_select: str = "random"  # random: each class's replayed beats drawn at random (seeded); nearest:
    # those whose features in the base model (the input of head_dense) lie nearest the mean of the patient's
    # fine-tune beats', so the S beats replayed are other subjects' S beats that the base model sees as this patient

    def validated(self) -> "TrainConfig":
        def whole(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be a whole number >= {lo}, got {v!r}")

        def number(name: str, lo: float, hi: float, ends: str = "[]", expected: str = "") -> None:
            """A real number (not a bool) from ``lo`` to ``hi``, each end closed ("[", "]") or open."""
            v = getattr(self, name)
            inside = isinstance(v, (int, float)) and not isinstance(v, bool) \
                and (lo <= v if ends[0] == "[" else lo < v) and (v <= hi if ends[1] == "]" else v < hi)
            if not inside:
                expected = expected or f"a number in {ends[0]}{lo}, {hi}{ends[1]}"
                raise ValueError(f"{name} must be {expected}, got {v!r}")

        def one_of(name: str, options) -> None:
            v = getattr(self, name)
            if v not in options:
                raise ValueError(f"{name} must be one of {list(options)}, got {v!r}")

        for name, lo in (("epochs", 1), ("batch_size", 1), ("finetune_epochs", 1), ("finetune_batch_size", 1),
                         ("seed", 0), ("finetune_replay", 0), ("finetune_replay_early", 0),
                         ("finetune_premature", 0), ("ensemble", 1), ("kernel_size", 1), ("augment_shift", 0),
                         ("core_window", 0)):
            whole(name, lo)
        check_width(self.width)
        number("augment", 0, 1)
        number("focal_gamma", 0, MAX_FOCAL_GAMMA, expected=f"a number in [0, {MAX_FOCAL_GAMMA}] (0: cross-entropy)")
        number("ema", 0, 1, "[)", expected="0 (off) or a momentum in (0, 1), e.g. 0.99")
        number("subject_balance", 0, 1, expected="a power in [0, 1] (0: off, 1: subjects weigh alike)")
        number("learning_rate", 0, 10, "()")
        number("finetune_learning_rate", 0, 10, "()")
        number("dropout", 0, 1, "[)")
        number("finetune_blend", 0, 1, "(]")
        for name in ("sveb_gate", "sveb_regular", "early_sveb", "sveb_af"):  # the transfer rules: off, or a share
            number(name, 0, 1, "[)", expected="0 (off) or a share in (0, 1)")
        number("early_sveb_rate", 0, MAX_HEART_RATE,
               expected=f"0 (any rate) or a heart rate in beats a minute, at most {MAX_HEART_RATE}")
        for name, options in (("model", MODELS), ("class_weight", CLASS_WEIGHTS), ("finetune_layers", FINETUNE_LAYERS),
                              ("lr_schedule", LR_SCHEDULES), ("precision", PRECISIONS), ("rr_features", RR_FEATURES),
                              ("early_reference", EARLY_REFERENCES), ("recent_reference", RECENT_REFERENCES),
                              ("finetune_replay_select", REPLAY_SELECTIONS), ("regular_measure", REGULAR_MEASURES)):
            one_of(name, options)
        if self.early_sveb_rate > 0 and self.early_sveb == 0:
            raise ValueError(f"early_sveb_rate={self.early_sveb_rate} acts only with early_sveb > 0, got early_sveb=0")
        if self.early_reference != "mean" and self.early_sveb == 0:
            raise ValueError(f"early_reference={self.early_reference!r} acts only with early_sveb > 0, "
                             f"got early_sveb=0")
        if self.regular_measure != "successive" and self.sveb_regular == 0:
            raise ValueError(f"regular_measure={self.regular_measure!r} acts only with sveb_regular > 0, "
                             f"got sveb_regular=0")
        if self.recent_reference != "all" and self.model != "recent_cnn":
            raise ValueError(f"recent_reference={self.recent_reference!r} acts only on model=recent_cnn, "
                             f"got model={self.model!r}")
        if self.finetune_replay_select != "random" and (self.finetune_replay == 0 or self.ensemble > 1):
            raise ValueError(f"finetune_replay_select={self.finetune_replay_select!r} needs finetune_replay > 0 and "
                             f"ensemble=1 (the features of one base model), got finetune_replay="
                             f"{self.finetune_replay}, ensemble={self.ensemble}")
        if not isinstance(self.jit_compile, bool):
            raise ValueError(f"jit_compile must be true or false, got {self.jit_compile!r}")
        return self

    def as_params(self) -> dict:
        return asdict(self)


# The fields that act only on transfer; every other field shapes the base model too.
FINETUNE_FIELDS: tuple[str, ...] = ("finetune_epochs", "finetune_batch_size", "finetune_learning_rate",
                                    "finetune_layers", "finetune_replay", "finetune_blend", "sveb_gate",
                                    "sveb_regular", "regular_measure", "early_sveb", "early_sveb_rate",
                                    "early_reference", "sveb_af", "finetune_replay_early", "finetune_premature",
                                    "finetune_replay_select")

EpochCallback = Callable[[int, dict[str, float]], None]


def visible_gpus() -> int:
    """How many GPUs TensorFlow sees."""
    return len(tf.config.list_physical_devices("GPU"))


def compute_dtype(precision: str) -> str:
    """The Keras dtype policy of a ``precision`` setting: ``mixed_float16`` for ``mixed``, and for
    ``auto`` when TensorFlow sees a GPU (float16 is slower than float32 on a CPU)."""
    if precision == "mixed" or (precision == "auto" and visible_gpus()):
        return "mixed_float16"
    return "float32"


def seed_everything(seed: int, deterministic_ops: bool = True) -> None:
    """Python, NumPy and TensorFlow seeds plus deterministic ops: a seed repeats a run's metrics.

    Keras silently drops XLA (``jit_compile``) while op determinism is on, so an XLA run turns it
    off: its seed still fixes initial weights and batch order, but repeats are not guaranteed to
    be bit-exact."""
    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()
    else:  # not exported under tf.config; the module function is the one the exported enable calls
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()


class BeatSource:
    """Every beat of a prepared dataset as tensors, made once per process; folds select rows by
    index, so no fold copies the beat array.

    x: ``(n, window, leads)`` float32 mV; y: ``(n,)`` class codes; rr: ``(n, 3)`` RR features or None;
    patient: None or ``(templates (n_records, window, leads), record_index (n,), rr_patient (n, 3))``
    as :meth:`ecg_mlflow.dataset.BeatDataset.patient_context` gives (a row's template is gathered
    by its record, so no per-beat copy of the templates is made); recent: ``(n, window, leads)``
    (:meth:`ecg_mlflow.dataset.BeatDataset.recent_template`), a function that makes it on first
    use (only models that read ``recent`` pay for it), or None; rhythm: the extra rhythm inputs by
    name, each ``(n, width)``: ``rr_long``, ``rr_irregular``, ``rr_sequence``, ``rr_lagged``,
    ``rr_median``, ``atrial``, as the :class:`ecg_mlflow.dataset.BeatDataset` methods of those names
    make them (any of them may be left out; a model that reads one that is missing is refused by name).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, rr: np.ndarray | None = None,
                 patient: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 recent: np.ndarray | Callable[[], np.ndarray] | None = None,
                 rhythm: Mapping[str, np.ndarray] | None = None, r_peak: int | None = None):
        unknown = [name for name in rhythm or {} if name not in RHYTHM_WIDTHS]
        if unknown:  # "rr" too: it has its own argument
            raise ValueError(f"unknown rhythm inputs {unknown}; expected some of {list(RHYTHM_WIDTHS)}")
        rhythm = {"rr": rr, **(rhythm or {})}
        if len(x) != len(y) or any(a is not None and len(a) != len(x) for a in rhythm.values()):
            raise ValueError(f"beats, labels and RR features differ in length: {len(x)}, {len(y)}, "
                             + ", ".join(f"{name} {None if a is None else len(a)}" for name, a in rhythm.items()))
        if patient is not None:
            templates, record_index, rr_patient = patient
            if len(record_index) != len(x) or len(rr_patient) != len(x) or templates.shape[1:] != x.shape[1:]:
                raise ValueError(f"patient context does not fit {x.shape} beats: templates {templates.shape}, "
                                 f"record_index {record_index.shape}, rr_patient {rr_patient.shape}")
        self.x_np, self.y_np, self.patient = x, np.asarray(y).astype(np.int32), patient
        # The rhythm inputs given, by input name: each is gathered by row, as a tensor and as NumPy.
        self.rhythm_np = {name: a for name, a in rhythm.items() if a is not None}
        self.r_peak = x.shape[1] // 2 if r_peak is None else int(r_peak)  # the R peak's index in a window
        self._recent = recent
        self._tensors: dict[str, tf.Tensor] | None = None

    def _recent_np(self) -> np.ndarray | None:
        if callable(self._recent):
            made = np.asarray(self._recent(), dtype=np.float32)
            if made.shape != self.x_np.shape:
                raise ValueError(f"recent templates {made.shape} do not fit {self.x_np.shape} beats")
            self._recent = made
        return self._recent

    @classmethod
    def from_dataset(cls, ds, recent_reference: str = "all") -> "BeatSource":
        """A source over a :class:`ecg_mlflow.dataset.BeatDataset`; ``recent_reference``: what its
        ``recent`` input is made of (:meth:`ecg_mlflow.dataset.BeatDataset.recent_template`, which
        checks it when a model first reads it)."""
        # Each extra rhythm input is made by the dataset method of its name (BeatDataset.rr_long, ...).
        return cls(ds.x, ds.label, ds.rr_features(), ds.patient_context(),
                   lambda: ds.recent_template(recent_reference),
                   {name: getattr(ds, name)() for name in RHYTHM_WIDTHS}, ds.r_peak)

    def __len__(self) -> int:
        return len(self.y_np)

    def _t(self) -> dict[str, tf.Tensor]:
        if self._tensors is None:
            self._tensors = {"beat": tf.constant(self.x_np), "y": tf.constant(self.y_np)}
            self._tensors.update({name: tf.constant(a) for name, a in self.rhythm_np.items()})
            if self.patient is not None:
                templates, record_index, rr_patient = self.patient
                self._tensors.update(templates=tf.constant(templates), record_index=tf.constant(record_index),
                                     rr_patient=tf.constant(rr_patient))
        return self._tensors

    def _array(self, name: str, idx: np.ndarray) -> np.ndarray | None:
        if name == "beat":
            return self.x_np[idx]
        if name in self.rhythm_np:
            return self.rhythm_np[name][idx]
        if name == "recent":
            recent = self._recent_np()
            return None if recent is None else recent[idx]
        if name in ("template", "rr_patient") and self.patient is not None:
            templates, record_index, rr_patient = self.patient
            return templates[record_index[idx]] if name == "template" else rr_patient[idx]
        return None

    def inputs(self, idx: np.ndarray, names: tuple[str, ...] = ("beat",)):
        """Model inputs of rows ``idx`` as NumPy: the beat array, or a dict when a model reads several."""
        arrays = {n: self._array(n, idx) for n in names}
        missing = [n for n in names if arrays[n] is None]
        if missing:
            raise ValueError(f"this beat source has no {missing} input")
        return arrays["beat"] if names == ("beat",) else arrays

    def labels(self, idx: np.ndarray) -> np.ndarray:
        return self.y_np[idx]

    def dataset(self, idx: np.ndarray, batch_size: int, seed: int, names: tuple[str, ...] = ("beat",),
                shuffle: bool = True, augment: float = 0.0, shift: int = 0,
                rhythm_idx: np.ndarray | None = None, one_hot: int = 0,
                weights: np.ndarray | None = None) -> tf.data.Dataset:
        """Batches ``(inputs, y)`` of rows ``idx``, reshuffled every epoch with ``seed``; with
        ``augment`` > 0 the waveforms are perturbed afresh every epoch (:func:`augment_waveforms`), with
        ``shift`` > 0 each beat's window moves by up to that many samples (:func:`shift_beats`).
        ``rhythm_idx`` ``(len(idx),)``: the rows whose rhythm inputs (every input but the waveforms,
        :data:`WAVEFORM_INPUTS`) and label each example takes; by default its own, ``idx``.
        ``one_hot`` > 0: labels ``(batch, one_hot)`` one-hot rather than ``(batch,)`` class codes
        (Keras's focal loss takes no integer labels). ``weights`` ``(len(self),)``: a loss weight per
        row of the source; the batches are then ``(inputs, y, weight)``."""
        t = self._t()
        if "recent" in names and "recent" not in t and self._recent_np() is not None:
            t["recent"] = tf.constant(self._recent_np())
        missing = [n for n in names if n not in t and not (n == "template" and "templates" in t)]
        if missing:
            raise ValueError(f"this beat source has no {missing} input")
        if rhythm_idx is not None and np.shape(rhythm_idx) != np.shape(idx):
            raise ValueError(f"rhythm_idx must match idx in shape {np.shape(idx)}, got {np.shape(rhythm_idx)}")
        if weights is not None and np.shape(weights) != (len(self),):
            raise ValueError(f"weights must hold one per row of the source, ({len(self)},), got {np.shape(weights)}")
        row_weight = None if weights is None else tf.constant(np.asarray(weights, dtype=np.float32))
        # Without rhythm_idx the pipeline is the one it always was, so runs repeat to the bit.
        rows = np.asarray(idx, dtype=np.int64) if rhythm_idx is None else \
            np.stack([np.asarray(idx, dtype=np.int64), np.asarray(rhythm_idx, dtype=np.int64)], axis=1)
        ds = tf.data.Dataset.from_tensor_slices(rows)
        if shuffle:
            ds = ds.shuffle(len(idx), seed=seed, reshuffle_each_iteration=True)

        def gather(i, draw=None):
            i, r = (i, i) if rhythm_idx is None else (i[:, 0], i[:, 1])
            feats = {n: tf.gather(t["templates"], tf.gather(t["record_index"], i)) if n == "template"
                     else tf.gather(t[n], i if n in WAVEFORM_INPUTS else r) for n in names}
            if draw is not None:
                if augment > 0:
                    feats = augment_waveforms(feats, augment, tf.stack([draw, seed]))
                if shift > 0:  # seed + 3: augment_waveforms draws with seed .. seed + 2
                    feats["beat"] = shift_beats(feats["beat"], shift, tf.stack([draw, seed + 3]))
            y = tf.gather(t["y"], r)
            out = (feats["beat"] if names == ("beat",) else feats), (tf.one_hot(y, one_hot) if one_hot else y)
            return out if row_weight is None else (*out, tf.gather(row_weight, r))

        ds = ds.batch(batch_size)
        if augment > 0 or shift > 0:  # one seed per batch, new every epoch, the same sequence for the same seed
            ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True))
        return ds.map(gather).prefetch(2).with_options(pipeline_options())


WAVEFORM_INPUTS: tuple[str, ...] = ("beat", "template", "recent")


def augment_waveforms(feats: dict[str, tf.Tensor], strength: float, seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Randomly perturbed copies of a batch's waveform inputs (``beat`` and the references it is
    read against, each ``(batch, window, leads)`` mV), for training only:

    - gain: each beat's leads scaled by ``exp(N(0, strength))``, its references by the same
      factor, as an electrode or a body position changes a record's amplitude;
    - baseline: ``N(0, strength)`` mV added to each lead of the beat alone, as baseline wander
      moves one beat against its neighbours;
    - noise: ``N(0, strength / 5)`` mV white noise on the beat.

    ``seed``: ``(2,)`` int64 for the stateless draws. RR inputs are left as they are."""
    beat = feats["beat"]
    shape, lead_shape = tf.shape(beat), tf.stack([tf.shape(beat)[0], 1, tf.shape(beat)[2]])
    s1, s2, s3 = (tf.stack([seed[0], seed[1] + k]) for k in range(3))
    gain = tf.exp(strength * tf.random.stateless_normal(lead_shape, s1, dtype=beat.dtype))
    out = {n: (v * gain if n in WAVEFORM_INPUTS else v) for n, v in feats.items()}
    out["beat"] = out["beat"] + strength * tf.random.stateless_normal(lead_shape, s2, dtype=beat.dtype) \
        + strength / 5 * tf.random.stateless_normal(shape, s3, dtype=beat.dtype)
    return out


def shift_beats(beat: tf.Tensor, most: int, seed: tf.Tensor) -> tf.Tensor:
    """``beat`` ``(batch, window, leads)`` with each beat's window moved by a whole number of samples
    drawn uniformly from ``[-most, most]``, for training only: a QRS detector places a beat a few
    samples off where MIT-BIH's annotators did, most of all a V beat, and a model that only ever saw
    windows centred on the annotators' points reads the moved window as another beat (README "Classifying
    a record"). The samples moved in at an edge repeat the edge sample. ``seed``: ``(2,)`` int64; the
    references a beat is read against stay put, as they do when their own beats are detected (the
    median of 20 windows is centred whatever each one's offset)."""
    n, width = tf.shape(beat)[0], tf.shape(beat)[1]
    offset = tf.random.stateless_uniform(tf.stack([n, 1]), seed, minval=-most, maxval=most + 1, dtype=tf.int32)
    at = tf.clip_by_value(tf.range(width)[tf.newaxis, :] + offset, 0, width - 1)
    return tf.gather(beat, at, batch_dims=1)


def pipeline_options() -> tf.data.Options:
    """One input thread and no autotuning: a batch gather is cheap, and on a 2-core machine
    tf.data's autotuner and its thread pool took cores from the training step, so that every other
    epoch or so ran a third slower (base training 20,600 against 27,500 beats/s per epoch in an
    interleaved A/B, README "Speed").
    The batches and their order are the same either way."""
    opts = tf.data.Options()
    opts.autotune.enabled = False
    opts.threading.private_threadpool_size = 1
    return opts


def class_weights(y: np.ndarray, n_classes: int, how: str) -> dict[int, float] | None:
    """Loss weight per class from the training labels ``y`` ``(n,)``: ``balanced`` = n / (k n_c),
    ``sqrt`` = its square root (milder); classes absent from ``y`` get 1. Mean weight per beat is 1."""
    if how == "none":
        return None
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(n_classes)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    if how == "sqrt":
        w[present] = np.sqrt(w[present])
    w[present] /= (w[present] * counts[present]).sum() / counts[present].sum()
    return {int(c): float(w[c]) for c in range(n_classes)}


def subject_weights(labels: np.ndarray, groups: np.ndarray, power: float) -> np.ndarray:
    """Loss weights float32 ``(n,)`` that even out subjects inside each class: a beat of class ``c``
    from subject ``s`` weighs ``n_cs ** -power``, ``n_cs`` that subject's beats of class ``c`` among
    these, scaled so that each class's weights add up to its count (so :func:`class_weights` acts on
    top as before). ``labels``, ``groups`` (the subject of each beat): ``(n,)``. ``power`` 0 gives
    ones; 1 gives each subject the same total weight in each class it has beats of."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels and groups must be (n,) alike, got {labels.shape} and {groups.shape}")
    w = np.ones(len(labels))
    _, group = np.unique(groups, return_inverse=True)
    for c in np.unique(labels):
        rows = labels == c
        per_subject = np.bincount(group[rows])[group[rows]].astype(np.float64) ** -power
        w[rows] = per_subject * rows.sum() / per_subject.sum()
    return w.astype(np.float32)


def _rows_of_class(labels: np.ndarray, rows: np.ndarray, class_code: int, share: float, gate: str) -> np.ndarray:
    """Those of ``rows`` labelled ``class_code``, after checking ``share`` is in (0, 1) and that there
    is at least one (``gate`` names what the rows set, for the error)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share!r}")
    rows = np.asarray(rows)
    rows = rows[labels[rows] == class_code]
    if len(rows) == 0:
        raise ValueError(f"no training beats of class {class_code} to set the {gate} from")
    return rows


def premature_threshold(rr: np.ndarray, rr_long: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                        class_code: int, share: float) -> float:
    """The earliness a beat needs to be called class ``class_code`` (SVEB) under
    :func:`ecg_mlflow.models.gate_premature`: the ``share`` quantile, over the beats of that class
    among ``rows`` (training rows: never the held-out subject's), of the smaller of previous RR over
    local mean RR (``rr[:, 0]``) and previous RR over the five-minute average (``rr_long[:, 0]``).
    ``rr`` ``(n, 3)``, ``rr_long`` ``(n, 2)``, ``labels`` ``(n,)`` cover the whole table."""
    rows = _rows_of_class(labels, rows, class_code, share, "premature gate")
    return float(np.quantile(np.minimum(rr[rows, 0], rr_long[rows, 0]), share))


def irregular_threshold(irregular: np.ndarray, labels: np.ndarray, rows: np.ndarray, class_code: int,
                        share: float) -> float:
    """The ``share`` quantile of the rhythm's irregularity before each beat (``irregular`` ``(n,)``,
    :meth:`ecg_mlflow.dataset.BeatDataset.rr_irregular`) over the beats of class ``class_code``
    among ``rows`` (training rows only); ``labels`` ``(n,)``. So about ``share`` of those beats come
    in a rhythm no more irregular than the threshold."""
    rows = _rows_of_class(labels, rows, class_code, share, "irregularity gate")
    return float(np.quantile(irregular[rows], share))


def early_threshold(rr_long: np.ndarray, irregular: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                    class_code: int, share: float, regular: float = REGULAR_IRREGULARITY) -> float:
    """The earliness below which a beat in regular rhythm is no longer called class ``class_code``
    (N) under :func:`ecg_mlflow.models.promote_early`: the ``share`` quantile of previous RR over the
    five-minute average (``rr_long[:, 0]``; or over the five-minute median, when ``rr_median`` is
    passed as ``rr_long``) over the beats of that class among ``rows`` (training rows: never the
    held-out subject's) whose rhythm before is regular (``irregular`` below ``regular``). So about
    ``share`` of those beats would be called S. ``rr_long`` ``(n, 2)``, ``irregular`` ``(n, 1)`` or
    ``(n,)``, ``labels`` ``(n,)`` cover the whole table."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share!r}")
    rows = np.asarray(rows)
    irregular = np.asarray(irregular).reshape(len(labels))
    rows = rows[(labels[rows] == class_code) & (irregular[rows] < regular)]
    if len(rows) == 0:
        raise ValueError(f"no training beats of class {class_code} in regular rhythm to set the early threshold from")
    return float(np.quantile(rr_long[rows, 0], share))


# The detector's passes over the training subjects' beats. Four left it unsure of fibrillation in
# subjects it had not seen (fitted without 201 and 202, it fired on 16 % of their fibrillation beats,
# 41 % after 30 passes: docs/experiments.md, thirty-eighth round).
ATRIAL_EPOCHS = 30


def fit_atrial_detector(source: "BeatSource", rows: np.ndarray, target: np.ndarray, seed: int,
                        epochs: int = ATRIAL_EPOCHS, batch_size: int = 512) -> keras.Model:
    """:func:`ecg_mlflow.models.build_atrial_detector` trained on rows ``rows`` of ``source`` (training
    rows: never the held-out subject's) to tell the beats of ``target`` (bool ``(n,)`` over the whole
    table: the reference rhythm is atrial fibrillation or flutter) from the others, with binary
    cross-entropy, Adam and seed ``seed``. ``ValueError`` when ``rows`` hold no beat of either kind."""
    rows = np.asarray(rows)
    y = np.asarray(target, dtype=bool)[rows]
    if y.all() or not y.any():
        raise ValueError(f"the atrial detector needs training beats both in atrial fibrillation or flutter and "
                         f"out of it, got {int(y.sum())} of {len(y)} in it")
    seed_everything(seed)
    x = source.inputs(rows, ATRIAL_INPUTS)
    detector = build_atrial_detector(x)
    detector.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                     steps_per_execution=STEPS_PER_EXECUTION)
    detector.fit(x, y.astype(np.float32), batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    # The same layers as an uncompiled model: one that embeds the compiled detector (veto_atrial)
    # would save its optimizer too, which loading cannot restore (Keras warns and skips it).
    return keras.Model(detector.input, detector.output, name=detector.name)


def atrial_threshold(detector: keras.Model, source: "BeatSource", labels: np.ndarray, rows: np.ndarray,
                     class_code: int, share: float) -> float:
    """The detector logit above which :func:`ecg_mlflow.models.veto_atrial` rules class ``class_code``
    (SVEB) out: the ``1 - share`` quantile of ``detector``'s logits over the beats of that class among
    ``rows`` (training rows only), so about ``share`` of them would lose it. ``labels`` ``(n,)``
    covers the whole table."""
    rows = _rows_of_class(labels, rows, class_code, share, "atrial veto")
    return float(np.quantile(predict_logits(detector, source, rows)[:, 0], 1 - share))


def replay_rows(labels: np.ndarray, train_idx: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Rows to mix into a patient's fine-tune set: up to ``per_class`` beats of every class, drawn
    without replacement (seeded) from ``train_idx`` — the rows the base model was trained on, so
    never the held-out subject. ``labels``: class code per row of the whole table ``(n,)``.

    This is the literature's patient-specific recipe (a small common set of beats from other
    subjects plus the patient's first minutes): a patient whose minutes hold no S or V beats
    still shows the classifier what those look like while its head adapts. Returns sorted rows."""
    if per_class <= 0 or len(train_idx) == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train_idx = np.asarray(train_idx)
    y = labels[train_idx]
    picked = [rng.choice(train_idx[y == c], size=min(per_class, int((y == c).sum())), replace=False)
              for c in np.unique(y)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def nearest_replay_rows(labels: np.ndarray, train_idx: np.ndarray, features: np.ndarray, centre: np.ndarray,
                        per_class: int) -> np.ndarray:
    """Rows to mix into a patient's fine-tune set, chosen instead of drawn: of every class, the
    ``per_class`` rows of ``train_idx`` whose ``features`` lie nearest (Euclidean) to ``centre``
    (all of them where the class has fewer; ties to the earlier row). ``labels``: class code per
    row of the whole table ``(n,)``; ``features``: one row per ``train_idx`` row ``(len(train_idx), d)``;
    ``centre``: ``(d,)``, the mean features of the patient's fine-tune beats. Returns sorted rows.

    Randomly drawn S beats are mostly 232's and 209's, whatever the patient's beats look like;
    these are the other subjects' beats the base model sees as nearest to this patient's."""
    train_idx = np.asarray(train_idx)
    if per_class <= 0 or len(train_idx) == 0:
        return np.zeros(0, dtype=np.int64)
    features = np.asarray(features, dtype=np.float64)
    if features.shape[0] != len(train_idx) or features.ndim != 2 or np.shape(centre) != features.shape[1:]:
        raise ValueError(f"nearest_replay_rows: features {features.shape} must be (len(train_idx)={len(train_idx)}, d) "
                         f"and centre (d,), got centre {np.shape(centre)}")
    distance = np.linalg.norm(features - np.asarray(centre, dtype=np.float64), axis=1)
    y = labels[train_idx]
    picked = []
    for c in np.unique(y):
        mine = np.flatnonzero(y == c)
        picked.append(train_idx[mine[np.argsort(distance[mine], kind="stable")[:per_class]]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def head_features(model: keras.Model, source: "BeatSource", idx: np.ndarray) -> np.ndarray:
    """What ``model``'s head reads for rows ``idx`` of ``source``: the input of its ``head_dense``
    layer ``(len(idx), d)`` (beat features and, for the rr models, the normalised RR inputs), at
    inference (no dropout)."""
    features = keras.Model(model.input, model.get_layer("head_dense").input, name=f"{model.name}_features")
    return predict_logits(features, source, idx)


def early_normal_rows(labels: np.ndarray, early: np.ndarray, train_idx: np.ndarray, normal: int, count: int,
                      seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Up to ``count`` rows of class ``normal`` that came early (``early`` true), drawn without
    replacement (seeded) from ``train_idx`` and not in ``exclude``: the hard negatives of the replay.
    ``labels``, ``early``: per row of the whole table ``(n,)``. Returns sorted rows.

    A head fine-tuned on a few minutes of sinus rhythm and on replayed S beats learns "short RR
    means S"; normal beats that came early (atrial fibrillation, sinus arrhythmia, other subjects
    only) show it that a short RR alone is not one."""
    if count <= 0 or len(train_idx) == 0:
        return np.zeros(0, dtype=np.int64)
    train_idx = np.asarray(train_idx)
    pool = train_idx[(labels[train_idx] == normal) & np.asarray(early, dtype=bool)[train_idx]]
    if exclude is not None and len(exclude):
        pool = np.setdiff1d(pool, exclude)
    # Its own stream, so the per-class replay draws stay those of runs without this option.
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False)).astype(np.int64)


def premature_rows(labels: np.ndarray, patient_idx: np.ndarray, train_idx: np.ndarray, normal: int,
                   premature: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows for made-up premature beats: ``count`` of the patient's fine-tune beats of class
    ``normal`` (from ``patient_idx``), each read with the rhythm inputs and the label of a beat of class
    ``premature`` drawn from ``train_idx`` (the base-training rows: other subjects only). Both drawn
    with replacement, seeded, on a stream of their own. ``labels``: per row of the whole table
    ``(n,)``. Returns ``(waveform_rows, rhythm_rows)``, each ``(count,)`` int64, or two empty arrays
    when ``count`` is 0 or either side has no such beat.

    An S beat is a normal-shaped beat that comes early. Replayed S beats come with other subjects'
    beat shapes, so a head tuned on them can learn "unlike this patient" for S; these pairs show it
    this patient's own shape coming early instead."""
    empty = np.zeros(0, dtype=np.int64)
    patient_idx, train_idx = np.asarray(patient_idx), np.asarray(train_idx)
    shapes = patient_idx[labels[patient_idx] == normal]
    rhythms = train_idx[labels[train_idx] == premature]
    if count <= 0 or len(shapes) == 0 or len(rhythms) == 0:
        return empty, empty.copy()
    rng = np.random.default_rng([seed, 2])
    return (rng.choice(shapes, size=count, replace=True).astype(np.int64),
            rng.choice(rhythms, size=count, replace=True).astype(np.int64))


def _as_source(x, y) -> tuple["BeatSource", np.ndarray]:
    # Callers pass either (BeatSource, row indices) or plain (beats, labels) arrays.
    if isinstance(x, BeatSource):
        return x, np.asarray(y)
    return BeatSource(np.asarray(x), np.asarray(y)), np.arange(len(x))


class _EpochHook(keras.callbacks.Callback):
    def __init__(self, on_epoch: EpochCallback | None, prefix: str):
        super().__init__()
        self.on_epoch, self.prefix = on_epoch, prefix

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.on_epoch is not None:
            self.on_epoch(epoch, {f"{self.prefix}{k}": float(v) for k, v in (logs or {}).items()})


# Train steps per call into the compiled graph: the per-step Python work of `fit` dominates a
# model this small on a CPU. 16 makes base training about 1.6x faster here and changes no number
# (the same steps in the same order; tests/test_training.py compares the weights).
STEPS_PER_EXECUTION = 16


def _compile(model: keras.Model, learning_rate: float, jit_compile: bool, schedule: str = "constant",
             steps: int = 0, focal_gamma: float = 0.0, ema: float = 0.0) -> keras.Model:
    """Adam at ``learning_rate``; with ``schedule="cosine"`` the rate decays along half a cosine to 0
    over ``steps`` optimizer steps (all of the training's epochs). The loss is cross-entropy on
    integer labels, or with ``focal_gamma`` > 0 the focal loss on one-hot labels
    (:meth:`BeatSource.dataset` ``one_hot``). Built-in schedule and losses: a saved model loads
    without custom objects. With ``ema`` > 0 Adam keeps an exponential moving average of the
    weights (momentum ``ema``, from the first step's weights on), and ``fit`` leaves the weights at
    that average when it ends.

    Returns the model to fit: where it pays (:func:`ecg_mlflow.pooling.twin_pays`: a CPU without
    AVX-512) :func:`ecg_mlflow.pooling.training_twin` of ``model``, compiled with the same optimizer,
    so that fitting it trains ``model`` with the same numbers, faster; else ``model`` itself."""
    if schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(int(steps), 1))
    optimizer = keras.optimizers.Adam(learning_rate, use_ema=ema > 0, ema_momentum=ema or 0.99)  # 0.99 unused when off
    if any(layer.dtype_policy.name == "mixed_float16" for layer in model.layers):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)  # float16 gradients would underflow
    loss = keras.losses.CategoricalFocalCrossentropy(alpha=1.0, gamma=focal_gamma, from_logits=True) \
        if focal_gamma > 0 else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    settings = dict(optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=jit_compile,
                    steps_per_execution=STEPS_PER_EXECUTION)
    model.compile(**settings)  # the model keeps the compile configuration and the optimizer it saves
    twin = training_twin(model) if twin_pays() else model
    if twin is not model:
        twin.compile(**settings)
    return twin


def train_base(x, y, n_classes: int, cfg: TrainConfig, on_epoch: EpochCallback | None = None,
               groups: np.ndarray | None = None) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train a base model from scratch; with ``cfg.ensemble = k > 1``, ``k`` of them, with seeds
    ``seed`` to ``seed + k - 1``, joined by :func:`ecg_mlflow.models.build_ensemble`.

    ``(x, y)`` is either a :class:`BeatSource` and the training row indices ``(n,)``, or beats
    ``(n, window, leads)`` and labels ``(n,)``. Returns the model and its history (``loss``,
    ``accuracy`` per epoch; member ``i >= 2`` of an ensemble as ``member<i>_loss`` ...).
    ``groups``: the subject of every row of the source ``(len(source),)``, which
    ``cfg.subject_balance`` > 0 needs (:func:`subject_weights`).
    """
    source, idx = _as_source(x, y)
    if len(idx) == 0:
        raise ValueError("need training beats, got none")
    weights = None
    if cfg.subject_balance > 0:
        if groups is None or np.shape(groups) != (len(source),):
            raise ValueError(f"subject_balance={cfg.subject_balance} needs the subject of every beat, "
                             f"({len(source)},), got {None if groups is None else np.shape(groups)}")
        weights = np.ones(len(source), np.float32)
        weights[idx] = subject_weights(source.labels(idx), np.asarray(groups)[idx], cfg.subject_balance)
    return _each_member(cfg.ensemble, on_epoch,
                        lambda i, hook: _train_one(source, idx, n_classes, cfg, cfg.seed + i, hook, weights))


TrainOne = Callable[[int, EpochCallback | None], tuple[keras.Model, dict[str, list[float]]]]


def _each_member(count: int, on_epoch: EpochCallback | None, train_one: TrainOne) -> tuple[keras.Model, dict]:
    """``train_one(i, on_epoch)`` for members ``i = 0 .. count - 1``, joined by ``build_ensemble``.
    The first member's metrics keep their plain names (an ensemble of one is the single model);
    member ``i + 1 >= 2`` logs and returns them as ``member<i + 1>_<name>``."""
    members, history = [], {}
    for i in range(count):
        prefix = "" if i == 0 else f"member{i + 1}_"
        hook = on_epoch if on_epoch is None or i == 0 else \
            (lambda epoch, logs, p=prefix: on_epoch(epoch, {f"{p}{k}": v for k, v in logs.items()}))
        model, hist = train_one(i, hook)
        members.append(model)
        history |= {f"{prefix}{k}": v for k, v in hist.items()}
    return build_ensemble(members), history


def _train_one(source: "BeatSource", idx: np.ndarray, n_classes: int, cfg: TrainConfig, seed: int,
               on_epoch: EpochCallback | None,
               weights: np.ndarray | None = None) -> tuple[keras.Model, dict[str, list[float]]]:
    seed_everything(seed, deterministic_ops=not cfg.jit_compile)
    model = build_model(cfg.model, source.x_np.shape[1], source.x_np.shape[2], n_classes, source.x_np[idx],
                        source._array("rr", idx), dtype=compute_dtype(cfg.precision),
                        train_rr_patient=source._array("rr_patient", idx), rr_features=cfg.rr_features,
                        dropout=cfg.dropout, kernel_size=cfg.kernel_size, width=cfg.width,
                        train_rhythm={n: source._array(n, idx) for n in RR_INPUTS[cfg.rr_features]},
                        core_window=cfg.core_window, r_peak=source.r_peak)
    names = model_input_names(model)
    fitted = _compile(model, cfg.learning_rate, cfg.jit_compile, cfg.lr_schedule,
                      cfg.epochs * -(-len(idx) // cfg.batch_size), cfg.focal_gamma, cfg.ema)
    per_class = class_weights(source.labels(idx), n_classes, cfg.class_weight)
    if weights is not None and per_class is not None:  # Keras takes class or row weights, not both: fold them
        weights = weights * np.array([per_class[c] for c in range(n_classes)], np.float32)[source.y_np]
    batches = source.dataset(idx, cfg.batch_size, seed, names, augment=cfg.augment, shift=cfg.augment_shift,
                             one_hot=n_classes if cfg.focal_gamma > 0 else 0, weights=weights)
    hist = fitted.fit(batches, epochs=cfg.epochs, verbose=0, shuffle=False,
                     class_weight=per_class if weights is None else None, callbacks=[_EpochHook(on_epoch, "")])
    return model, {k: [float(v) for v in vs] for k, vs in hist.history.items()}


def fine_tune(base: keras.Model, x, y, cfg: TrainConfig, on_epoch: EpochCallback | None = None,
              rhythm_idx: np.ndarray | None = None) -> tuple[keras.Model, dict[str, list[float]]]:
    """Copy ``base``, freeze all but its head (``finetune_layers=head``; ``last`` also the last
    convolution, ``all`` every layer), re-train on the fine-tune beats (``(x, y)`` as in
    :func:`train_base`). ``base`` itself is left unchanged. An ensemble's members are fine-tuned
    one by one (member ``i`` with seed ``seed + i - 1``) and joined again. Returns the transfer model and its history
    (``finetune_loss``, ``finetune_accuracy`` per epoch; later members as ``member<i>_finetune_loss`` ...).
    ``rhythm_idx``: with a :class:`BeatSource`, the rows whose rhythm inputs and labels the rows ``y``
    take (:meth:`BeatSource.dataset`; :func:`premature_rows` makes such pairs)."""
    source, idx = _as_source(x, y)
    if len(idx) == 0:
        raise ValueError("need fine-tune beats, got none")
    members = ensemble_members(base)
    return _each_member(len(members), on_epoch,
                        lambda i, hook: _fine_tune_one(members[i], source, idx, cfg, cfg.seed + i, hook, rhythm_idx))


def _fine_tune_one(base: keras.Model, source: "BeatSource", idx: np.ndarray, cfg: TrainConfig, seed: int,
                   on_epoch: EpochCallback | None,
                   rhythm_idx: np.ndarray | None = None) -> tuple[keras.Model, dict[str, list[float]]]:
    names = model_input_names(base)
    seed_everything(seed, deterministic_ops=not cfg.jit_compile)
    model = transfer_copy(base, cfg.finetune_layers)
    fitted = _compile(model, cfg.finetune_learning_rate, cfg.jit_compile, cfg.lr_schedule,
                      cfg.finetune_epochs * -(-len(idx) // cfg.finetune_batch_size), cfg.focal_gamma, cfg.ema)
    n_classes = int(model.output.shape[-1])
    batches = source.dataset(idx, cfg.finetune_batch_size, seed, names, augment=cfg.augment, shift=cfg.augment_shift,
                             rhythm_idx=rhythm_idx, one_hot=n_classes if cfg.focal_gamma > 0 else 0)
    labels = source.labels(idx if rhythm_idx is None else rhythm_idx)
    hist = fitted.fit(batches, epochs=cfg.finetune_epochs, shuffle=False, verbose=0,
                     class_weight=class_weights(labels, n_classes, cfg.class_weight),
                     callbacks=[_EpochHook(on_epoch, "finetune_")])
    if cfg.finetune_blend < 1:
        blend_weights(model, base, cfg.finetune_blend)
    return model, {f"finetune_{k}": [float(v) for v in vs] for k, vs in hist.history.items()}


def blend_weights(tuned: keras.Model, base: keras.Model, blend: float) -> None:
    """Set every trainable weight of ``tuned`` (a :func:`transfer_copy` of ``base``, re-trained) to
    ``blend * tuned + (1 - blend) * base``, in place: the weight-space ensembling of fine-tuned and
    original weights (Wortsman et al. 2022, "WiSE-FT"), which keeps the patient's gains while the
    head strays less from what every other subject taught it. Frozen weights are equal anyway."""
    for layer in tuned.layers:
        if layer.trainable and layer.weights:
            mixed = [blend * t + (1 - blend) * b
                     for t, b in zip(layer.get_weights(), base.get_layer(layer.name).get_weights())]
            layer.set_weights(mixed)


# One inference graph per model, traced once for any batch size. `model.predict` on a model
# compiled with STEPS_PER_EXECUTION unrolls that many copies of the model into its graph (and
# traces again for a shorter last group): about three times the tracing, paid by every new model,
# i.e. by every fold, for no gain at inference batches of 4096. At the same batches the logits
# are the same to the bit.
_FORWARD: "weakref.WeakKeyDictionary[keras.Model, Callable]" = weakref.WeakKeyDictionary()


def _forward(model: keras.Model, x) -> Callable:
    """The model's inference function for float32 inputs shaped as ``x`` (an array, or a dict of them)."""
    if model not in _FORWARD:
        signature = [keras.tree.map_structure(lambda v: tf.TensorSpec((None, *v.shape[1:]), tf.float32), x)]
        ref = weakref.ref(model)  # a strong one would keep every fold's models alive in _FORWARD
        _FORWARD[model] = tf.function(lambda inputs: ref()(inputs, training=False), input_signature=signature)
    return _FORWARD[model]


def predict_logits(model: keras.Model, x, idx: np.ndarray | None = None, batch_size: int = 4096) -> np.ndarray:
    """The model's outputs (logits) ``(n, n_classes)`` for beats ``x`` ``(n, window, leads)`` (or a
    dict of the model's named inputs), or for rows ``idx`` of a :class:`BeatSource` ``x``; the
    same values as ``model.predict``, in batches of ``batch_size``."""
    if isinstance(x, BeatSource):
        x = x.inputs(np.asarray(idx), model_input_names(model))
    n = len(x["beat"] if "beat" in x else next(iter(x.values()))) if isinstance(x, dict) else len(x)
    x = keras.tree.map_structure(lambda v: np.asarray(v, dtype=np.float32), x)  # no copy when already float32
    forward = _forward(model, x)
    if n == 0:
        # The width from the traced graph, not from an empty batch: oneDNN's convolution refuses a
        # batch of 0 on some CPUs. It needs no symbolic output either (a Sequential model built from
        # a shape and never called has none).
        width = forward.get_concrete_function().structured_outputs.shape[-1]
        return np.zeros((0, int(width)), dtype=np.float32)
    return np.concatenate([forward(keras.tree.map_structure(lambda v: v[a:a + batch_size], x)).numpy()
                           for a in range(0, n, batch_size)])


def predict_classes(model: keras.Model, x, idx: np.ndarray | None = None, batch_size: int = 4096) -> np.ndarray:
    """Predicted class codes ``(n,)`` for beats ``x`` ``(n, window, leads)``, or for rows ``idx`` of a
    :class:`BeatSource` ``x``."""
    return np.argmax(predict_logits(model, x, idx, batch_size), axis=1).astype(np.int64)
