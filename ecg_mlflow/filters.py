"""Signal filters that ``prepare`` (and ``classify``, for a model prepared so) can apply to a whole
record before its beats are cut.

MIT-BIH's signals are as recorded: breathing and movement move the baseline by tenths of a
millivolt over seconds (as much as a P wave), at times by more. A beat window then sits at an offset
and on a slope of its own, and a model must learn to look past them. Most of the literature
removes the baseline first (de Chazal et al. 2004 with median filters, many CNN papers with a
0.5 Hz high-pass or a 0.5-40 Hz band-pass). ``highpass`` is the default: it raised the smallest
EC57 statistic of the default model inside both halves under three seeds (docs/experiments.md,
twenty-eighth round). ``none`` keeps the seed notebook's raw signal.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SIGNAL_FILTERS: tuple[str, ...] = ("none", "highpass", "bandpass")
HIGHPASS_HZ = 0.5  # below: baseline wander; above: every wave of the ECG (a heart rate of 30/min is 0.5 Hz)
LOWPASS_HZ = 40.0  # "bandpass" also cuts above: muscle noise and mains hum (50/60 Hz); QRS energy is mostly lower
ORDER = 2  # Butterworth order of each pass; run forward and backward, so 4 in effect and no phase shift


def check_signal_filter(kind: str) -> str:
    """``kind`` if it names a filter of :data:`SIGNAL_FILTERS`, else ``ValueError`` naming ``signal_filter``."""
    if kind not in SIGNAL_FILTERS:
        raise ValueError(f"signal_filter must be one of {list(SIGNAL_FILTERS)}, got {kind!r}")
    return kind


def filter_signal(signal: np.ndarray, fs: float, kind: str) -> np.ndarray:
    """``signal`` ``(n_samples, leads)`` mV sampled at ``fs`` Hz, filtered along time with zero
    phase (so R peaks stay where the annotations put them): ``none`` returns it as it is;
    ``highpass``: Butterworth high-pass at :data:`HIGHPASS_HZ`; ``bandpass``: that and a low-pass at
    :data:`LOWPASS_HZ`. float32 ``(n_samples, leads)``."""
    check_signal_filter(kind)
    if kind == "none":
        return signal
    from scipy import signal as sp_signal  # here: reading records without a filter need not import it

    signal = np.asarray(signal)
    if signal.ndim != 2:
        raise ValueError(f"expected a signal shaped (n_samples, leads), got {signal.shape}")
    if kind == "highpass":
        sos = sp_signal.butter(ORDER, HIGHPASS_HZ, btype="highpass", fs=fs, output="sos")
    else:
        sos = sp_signal.butter(ORDER, [HIGHPASS_HZ, LOWPASS_HZ], btype="bandpass", fs=fs, output="sos")
    # sosfiltfilt pads each end by reflection; a record shorter than the padding cannot be filtered.
    pad = 3 * (2 * len(sos) + 1)
    if len(signal) <= pad:
        raise ValueError(f"a signal of {len(signal)} samples is too short to filter ({kind}); it needs over {pad}")
    return sp_signal.sosfiltfilt(sos, signal.astype(np.float64), axis=0).astype(np.float32)


def filtered(rec, kind: str):
    """A :class:`ecg_mlflow.records.Record` with its signal filtered (:func:`filter_signal`); the same
    record for ``none``."""
    return rec if check_signal_filter(kind) == "none" else \
        dataclasses.replace(rec, signal=filter_signal(rec.signal, rec.fs, kind))
