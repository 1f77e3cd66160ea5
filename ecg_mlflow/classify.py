"""Classify the beats of a recording with a logged model: a patient's registered transfer model
applied to a record of that patient (a later recording, or the test minutes of the one it was
fine-tuned on), or any base or transfer model to any two-lead WFDB record.

Beats come from the record's reference annotations (``beats="annotations"``, the beats LOSO scores)
or from a QRS detector (``beats="detect"``: wfdb's XQRS on the first lead, each detection moved to
the R peak), so a recording without annotations can be classified too; ``"auto"`` takes the
annotations where the record has a ``.atr`` file. Every input the model reads is made the way LOSO
makes it for its own records (:class:`ecg_mlflow.dataset.BeatDataset`): the beat window, RR features
over the beats before it, and for ``recent_cnn`` the median of the beats before it, so on the same
beats the model gives the same outputs as in its LOSO run.

The run (``ecg.role=classify``) logs ``predictions.csv`` (one row per classified beat:
:func:`ecg_mlflow.predictions.predictions_table`), ``<record>.pred`` (a WFDB annotation file of the
calls, at the record's own sampling rate, for WFDB tools and viewers) and, where the record has
reference annotations, the test metrics and confusion matrix of the classified beats that have a
reference label. With detected beats a reference beat counts as found when a detection lies within
150 ms of it (EC57's match window); ``detect_se`` and ``detect_ppv`` say how many were.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np

import mlflow
from mlflow.exceptions import MlflowException

from ecg_mlflow import tracking
from ecg_mlflow.beats import check_window_offset, extract_beats, rhythm_at
from ecg_mlflow.dataset import BeatDataset, from_parts, record_part, window_offset_from_param
from ecg_mlflow.filters import SIGNAL_FILTERS, filtered
from ecg_mlflow.labels import get_scheme
from ecg_mlflow.records import TARGET_FS, DataError, Record, check_record, read_record, record_files, resolve_data_dir
from ecg_mlflow.registry import source_run_id
from ecg_mlflow.splits import FINETUNE, TEST, subject_of

BEATS: tuple[str, ...] = ("auto", "annotations", "detect")
# The inputs made here.
INPUTS: tuple[str, ...] = ("beat", "rr", "rr_long", "rr_irregular", "rr_sequence", "rr_lagged", "rr_median", "atrial",
                           "recent")
MATCH_S = 0.15  # EC57's beat-by-beat comparison: a detection within 150 ms of a reference beat matches it
ANNOTATOR_OUT = "pred"  # <record>.pred: the calls as a WFDB annotation file
CLASSIFY_ROLE = "classify"


class ClassifyError(ValueError):
    """Bad input to ``classify``: the message names the parameter, file or model at fault."""


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    """What to classify with what, as plain values (``start_minute`` None: ``auto``, see :func:`classify`)."""

    record: str
    model_uri: str
    data_dir: str | None = None
    beats: str = "auto"
    start_minute: float | None = None

    def validated(self) -> "ClassifyConfig":
        if not isinstance(self.record, str) or not self.record or Path(self.record).name != self.record \
                or not self.record.isprintable():
            raise ClassifyError(f"record must be a record name in data_dir (e.g. 103, without a folder or "
                                f"extension), got {self.record!r}")
        if not isinstance(self.model_uri, str) or not self.model_uri.startswith(("runs:/", "models:/")):
            raise ClassifyError(f"model_uri must be runs:/<run id>/<path> or models:/<name>@<alias> "
                                f"(e.g. models:/ecg-transfer-103@newest), got {self.model_uri!r}")
        if self.beats not in BEATS:
            raise ClassifyError(f"beats must be one of {list(BEATS)}, got {self.beats!r}")
        m = self.start_minute
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0):
            raise ClassifyError(f"start_minute must be a number >= 0 or auto, got {m!r}")
        return self


def start_minute_from_param(text: str) -> float | None:
    """The ``start_minute`` entry-point parameter: ``auto`` (or empty) is None, else a number >= 0."""
    text = str(text).strip().lower()
    if text in ("", "auto"):
        return None
    try:
        return float(text)  # its range is checked with the other parameters (ClassifyConfig.validated)
    except ValueError:
        raise ClassifyError(f"start_minute must be a number >= 0 or auto, got {text!r}") from None


@dataclasses.dataclass
class LoadedModel:
    """A logged Keras model and what its run says about how it reads beats."""

    model: object
    run_id: str
    experiment_id: str
    window: int
    label_scheme: str
    recent_reference: str
    subject: str | None  # the subject its base model held out (its patient's subject)
    patient: str | None  # the record it was fine-tuned on (transfer models)
    finetune_minutes: float | None
    signal_filter: str = "none"  # what its run's records were filtered with (ecg_mlflow.filters)
    window_offset: int = 0  # where its run's windows put the R peak (beats.r_index)


def load_model(model_uri: str) -> LoadedModel:
    """Load ``model_uri`` and read its run's label scheme, ``recent_reference``, subject, patient,
    fine-tune minutes, signal filter and window offset; :class:`ClassifyError` naming the URI when it does not
    resolve, cannot be loaded or reads an input this module cannot make."""
    import mlflow.keras

    from ecg_mlflow.models import model_input_names

    try:
        run_id = source_run_id(model_uri)
    except MlflowException as exc:
        raise ClassifyError(f"model_uri {model_uri!r} does not resolve: {str(exc).splitlines()[0]}") from None
    if run_id is None:
        raise ClassifyError(f"model_uri {model_uri!r}: expected runs:/<run id>/<path> or models:/<name>@<alias>")
    try:
        model = mlflow.keras.load_model(model_uri)
    except Exception as exc:  # a missing artifact, not a Keras model, an unreadable file
        raise ClassifyError(f"model_uri {model_uri!r} cannot be loaded as a Keras model: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    unknown = [n for n in model_input_names(model) if n not in INPUTS]
    if unknown:
        raise ClassifyError(f"model {model_uri} reads {unknown}, which classify cannot make (patient_cnn's template "
                            f"comes from the labelled fine-tune minutes of its LOSO run); it makes {list(INPUTS)}")
    beat = model.input["beat"] if isinstance(model.input, dict) else model.input
    window, leads = int(beat.shape[1]), int(beat.shape[2])
    if leads != 2:
        raise ClassifyError(f"model {model_uri} reads {leads} leads; classify reads two")
    try:
        run = mlflow.get_run(run_id)
        params = {k: tracking.logged_value(v) for k, v in tracking.params_with_parent(run).items()}
    except MlflowException as exc:  # the model's run (or its parent) deleted or unreadable
        raise ClassifyError(f"model {model_uri}: its run {run_id} cannot be read: {str(exc).splitlines()[0]}") from None
    scheme = get_scheme(params.get("label_scheme") or "aami")
    width = int(model.output.shape[-1])
    if width != scheme.n_classes:
        raise ClassifyError(f"model {model_uri} answers {width} classes, its run's label scheme {scheme.name!r} "
                            f"has {scheme.n_classes}")
    minutes = params.get("finetune_minutes")
    signal_filter = params.get("signal_filter") or "none"  # a run from before the option read the raw signal
    if signal_filter not in SIGNAL_FILTERS:
        raise ClassifyError(f"model {model_uri}: its run's signal_filter {signal_filter!r} is none of "
                            f"{list(SIGNAL_FILTERS)}")
    try:  # a run from before the option cut centred windows
        window_offset = window_offset_from_param(params.get("window_offset") or 0)
        check_window_offset(window, window_offset)  # against the model's own window
    except ValueError as exc:
        raise ClassifyError(f"model {model_uri}: its run's window_offset {params.get('window_offset')!r} "
                            f"is unusable: {exc}") from None
    return LoadedModel(model=model, run_id=run_id, experiment_id=run.info.experiment_id, window=window,
                       label_scheme=scheme.name, recent_reference=params.get("recent_reference") or "all",
                       subject=run.data.tags.get("subject"), patient=run.data.tags.get("patient"),
                       finetune_minutes=float(minutes) if minutes else None, signal_filter=signal_filter,
                       window_offset=window_offset)


def detect_beats(signal: np.ndarray, fs: float) -> np.ndarray:
    """R-peak positions, int64 ``(n,)`` sorted and unique, in one lead ``signal`` ``(n_samples,)`` mV at
    ``fs`` Hz: wfdb's XQRS detector, each detection then moved to the largest deflection within 100 ms
    (``correct_peaks``), where MIT-BIH's annotators place beats and so where the models saw them."""
    from wfdb import processing

    sig = np.asarray(signal, dtype=np.float64)
    xqrs = processing.XQRS(sig=sig, fs=fs)
    xqrs.detect(verbose=False)
    peaks = np.asarray(xqrs.qrs_inds, dtype=np.int64)
    if len(peaks) == 0:
        return peaks
    peaks = processing.correct_peaks(sig, peaks, search_radius=int(0.1 * fs), smooth_window_size=int(0.15 * fs),
                                     peak_dir="compare")
    peaks = np.asarray(peaks, dtype=np.int64)
    return np.unique(peaks[(peaks >= 0) & (peaks < len(sig))])


def match_beats(detected: np.ndarray, reference: np.ndarray, tolerance: int) -> np.ndarray:
    """For each of the ``detected`` beats ``(n,)`` (samples, sorted) the index of the ``reference`` beat
    ``(m,)`` (sorted) it matches, ``-1`` where none: pairs at most ``tolerance`` samples apart, the
    closest first, each beat in at most one pair. Returns int64 ``(n,)``."""
    detected, reference = np.asarray(detected, dtype=np.int64), np.asarray(reference, dtype=np.int64)
    out = np.full(len(detected), -1, dtype=np.int64)
    if len(detected) == 0 or len(reference) == 0:
        return out
    k = np.searchsorted(reference, detected)
    pairs = []
    for step in (-2, -1, 0, 1):  # references next to each detection; within 150 ms there are at most two
        j = k + step
        ok = (j >= 0) & (j < len(reference))
        i, j = np.flatnonzero(ok), j[ok]
        near = np.abs(reference[j] - detected[i]) <= tolerance
        pairs.append(np.stack([np.abs(reference[j] - detected[i])[near], i[near], j[near]], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0)  # sorted by distance, then detection, then reference
    taken = np.zeros(len(reference), dtype=bool)
    for _, i, j in pairs:
        if out[i] < 0 and not taken[j]:
            out[i], taken[j] = j, True
    return out


def beats_at(rec: Record, peaks: np.ndarray, window: int, reference: dict | None, window_offset: int = 0) -> dict:
    """The :func:`ecg_mlflow.dataset.record_part` dict of the beats at ``peaks`` (samples, sorted), such
    as a detector's: windows (R peak at ``r_index(window, window_offset)``) and RR intervals of those
    beats; symbol and label of the ``reference`` beat each one matches (``''`` and ``-1`` where none,
    or without a reference); the reference rhythm in force (``''`` without one)."""
    det = dataclasses.replace(rec, ann_sample=peaks, ann_symbol=np.full(len(peaks), "N", dtype=object),
                              ann_aux=np.full(len(peaks), "", dtype=object))
    rb = extract_beats(det, window, window_offset)
    n = len(rb.sample)
    symbol, label = np.full(n, "", dtype=object), np.full(n, -1, dtype=np.int16)
    if reference is not None:
        matched = match_beats(rb.sample, reference["sample"], int(round(MATCH_S * rec.fs)))
        hit = matched >= 0
        symbol[hit], label[hit] = reference["symbol"][matched[hit]], reference["label"][matched[hit]]
    return {"record": rec.name, "x": rb.x, "label": label, "symbol": symbol, "sample": rb.sample,
            "time_s": rb.sample / rec.fs, "rr_prev": rb.rr_prev, "rr_next": rb.rr_next, "rr_local": rb.rr_local,
            "rhythm": rhythm_at(rec.ann_sample, rec.ann_symbol, rec.ann_aux, rb.sample), "part": None}


def beat_dataset(part: dict, start_minute: float, label_scheme: str, window: int,
                 window_offset: int = 0) -> BeatDataset:
    """The one-record :class:`ecg_mlflow.dataset.BeatDataset` of a :func:`beats_at` or
    :func:`ecg_mlflow.dataset.record_part` dict (windows cut with ``window_offset``), its beats before
    ``start_minute`` the context part (``FINETUNE``) and the rest the part to classify (``TEST``)."""
    scheme = get_scheme(label_scheme)
    part = dict(part, part=np.where(part["time_s"] < start_minute * 60.0, FINETUNE, TEST).astype(object))
    return from_parts([part], {"label_scheme": scheme.name, "classes": list(scheme.classes), "window": window,
                               "window_offset": window_offset, "records": [part["record"]], "fs": TARGET_FS})


@dataclasses.dataclass
class Classified:
    """What :func:`classify` made: the beats (all of the record's), the rows it classified, their calls."""

    run_id: str
    beats: BeatDataset
    rows: np.ndarray
    predicted: np.ndarray
    metrics: dict[str, float]


def _start_minute(cfg: ClassifyConfig, loaded: LoadedModel) -> float:
    """``start_minute`` as given, or for ``auto`` the fine-tune minutes of the model's run when the
    record is of the subject the model was made for (the minutes its transfer model was trained on,
    the ones LOSO leaves out of its test figures), else 0."""
    if cfg.start_minute is not None:
        return float(cfg.start_minute)
    if loaded.subject and subject_of(cfg.record) == loaded.subject and loaded.finetune_minutes:
        return loaded.finetune_minutes
    return 0.0


def classify(cfg: ClassifyConfig) -> Classified:
    """Classify the beats of ``cfg.record`` (in ``cfg.data_dir``) from ``start_minute`` on with
    ``cfg.model_uri``, logged to the active run, the one ``mlflow run`` made, or a new run in the
    experiment of the model's run. The record, the model and the tracking server are checked before
    any signal is read or run is made; bad input raises :class:`ClassifyError` or
    :class:`ecg_mlflow.records.DataError` naming the culprit."""
    cfg = cfg.validated()
    data_dir = resolve_data_dir(cfg.data_dir)
    has_reference = record_files(data_dir, cfg.record)["atr"].is_file()
    how = ("annotations" if has_reference else "detect") if cfg.beats == "auto" else cfg.beats
    if how == "annotations" and not has_reference:
        raise DataError(f"beats=annotations: record {cfg.record} has no reference annotations "
                        f"{record_files(data_dir, cfg.record)['atr']}; use beats=detect")
    info = check_record(data_dir, cfg.record, annotations=has_reference)
    tracking.check_tracking_server()
    loaded = load_model(cfg.model_uri)
    start = _start_minute(cfg, loaded)
    if start * 60.0 >= info.duration_s:
        raise ClassifyError(f"start_minute={start:g} leaves no beat to classify: record {cfg.record} lasts "
                            f"{info.duration_s / 60:.2f} minutes")

    # The record filtered as the model's own training records were, so its beats read alike.
    rec = filtered(read_record(data_dir, cfg.record, annotations=has_reference), loaded.signal_filter)
    scheme = get_scheme(loaded.label_scheme)
    # record_part's own split needs minutes > 0; the part of every beat is set below, for both beat sources.
    reference = (record_part(rec, loaded.window, scheme.name, max(start, 1e-9), loaded.window_offset)
                 if has_reference else None)
    if how == "annotations":
        part = reference
    else:
        part = beats_at(rec, detect_beats(rec.signal[:, 0], rec.fs), loaded.window, reference, loaded.window_offset)
    ds = beat_dataset(part, start, scheme.name, loaded.window, loaded.window_offset)
    rows = np.flatnonzero(ds.part == TEST)
    if len(rows) == 0:
        raise ClassifyError(f"record {cfg.record} has no beat from minute {start:g} on to classify")

    from ecg_mlflow.loso import log_test_results
    from ecg_mlflow.predictions import log_predictions, predictions_table, softmax
    from ecg_mlflow.training import BeatSource, predict_logits

    logits = predict_logits(loaded.model, BeatSource.from_dataset(ds, loaded.recent_reference), rows)
    predicted = np.argmax(logits, axis=1).astype(np.int64)
    with tracking.run_to_log_into(loaded.experiment_id, f"{cfg.record}-classify") as run:
        mlflow.set_tags({tracking.ROLE_TAG: CLASSIFY_ROLE, "record": cfg.record, "model_uri": cfg.model_uri,
                         "model_run_id": loaded.run_id, "model_patient": loaded.patient or "",
                         "model_subject": loaded.subject or ""})
        tracking.log_new_params({"record": cfg.record, "model_uri": cfg.model_uri, "data_dir": str(data_dir),
                                 "beats": how, "start_minute": start, "window": loaded.window,
                                 "recent_reference": loaded.recent_reference, "label_scheme": scheme.name,
                                 "signal_filter": loaded.signal_filter, "window_offset": loaded.window_offset})
        counts = {"n_classified": float(len(rows))}
        labelled = ds.label[rows] >= 0
        if how == "detect" and reference is not None:
            n_reference = int((reference["time_s"] >= start * 60.0).sum())
            counts |= {"n_reference": float(n_reference), "n_matched": float(labelled.sum()),
                       "detect_se": labelled.sum() / max(n_reference, 1), "detect_ppv": labelled.mean()}
        mlflow.log_metrics(counts)
        metrics = dict(counts)
        if labelled.any():
            m, _ = log_test_results(ds.label[rows[labelled]], predicted[labelled], ds.classes,
                                    f"{cfg.record} ({loaded.patient or loaded.subject or 'model'})")
            metrics |= m
        log_predictions(predictions_table(ds, rows, softmax(logits), predicted))
        _log_annotations(rec, ds.sample[rows], [ds.classes[i] for i in predicted])
    return Classified(run.info.run_id, ds, rows, predicted, metrics)


def _log_annotations(rec: Record, sample: np.ndarray, symbols: list[str]) -> None:
    """``<record>.pred`` to the active run: the calls as WFDB beat annotations (the class names are
    WFDB beat symbols under both label schemes), at the sampling rate of the record's files."""
    import wfdb

    fs = rec.source_fs or rec.fs
    at = np.round(np.asarray(sample) * (fs / rec.fs)).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        wfdb.wrann(rec.name, ANNOTATOR_OUT, sample=at, symbol=symbols, write_dir=tmp, fs=fs)
        mlflow.log_artifact(str(Path(tmp) / f"{rec.name}.{ANNOTATOR_OUT}"))


__all__ = ["ANNOTATOR_OUT", "BEATS", "ClassifyConfig", "ClassifyError", "Classified", "INPUTS", "MATCH_S",
           "beat_dataset", "beats_at", "classify", "detect_beats", "load_model", "match_beats",
           "start_minute_from_param"]
