"""Tiny WFDB records written with wfdb itself, for unit tests of the data layer.

A record made here looks like an MIT-BIH record on disk (``<name>.hea``, ``<name>.dat``,
``<name>.atr``) but lasts seconds, so tests can build exactly the situation they need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import wfdb


def synthetic_signal(n_samples: int, fs: float, beat_samples: Sequence[int] = (), spike_mv: float = 0.0,
                     spike_width_s: float = 0.008) -> np.ndarray:
    """Two smooth, everywhere-different leads, shape ``(n_samples, 2)``, mV.

    Lead 0 is a slow sine plus a ramp (no two windows look alike); lead 1 is the negated
    lead 0 at half the size, so a swapped lead order is visible. With ``spike_mv`` > 0 a
    Gaussian spike of that height (``spike_width_s`` standard deviation) sits on lead 0 at
    every sample in ``beat_samples``, so the spike marks where the annotation is.
    """
    t = np.arange(n_samples) / fs
    lead0 = 0.4 * np.sin(2 * np.pi * 0.7 * t) + 0.05 * t / max(t[-1], 1.0)
    if spike_mv:
        sigma = spike_width_s * fs
        for s in beat_samples:
            lo, hi = max(0, int(s - 6 * sigma)), min(n_samples, int(s + 6 * sigma) + 1)
            idx = np.arange(lo, hi)
            lead0[lo:hi] += spike_mv * np.exp(-0.5 * ((idx - s) / sigma) ** 2)
    return np.stack([lead0, -0.5 * lead0], axis=1)


def write_record(directory: str | Path, name: str, *, fs: float = 360.0, seconds: float = 20.0,
                 lead_names: Sequence[str] = ("MLII", "V1"), samples: Sequence[int] = (),
                 symbols: Sequence[str] | None = None, signal: np.ndarray | None = None,
                 spike_mv: float = 0.0, fmt: str = "16", aux_notes: Sequence[str] | None = None) -> str:
    """Write a 2-lead WFDB record ``name`` into ``directory`` and return ``name``.

    samples, symbols: the reference annotations (``.atr``), any MIT-BIH symbols, beats or not
    (``+``, ``~``, ``[``, ``!``, ``]`` ...); ``symbols`` defaults to ``'N'`` for every sample.
    signal: ``(round(fs * seconds), 2)`` mV; default :func:`synthetic_signal` (with spikes at
    the annotations when ``spike_mv`` > 0). Lead ``i`` of ``signal`` is stored under
    ``lead_names[i]``, in that order. aux_notes: each annotation's ``aux_note`` (``''`` for none),
    e.g. ``'(AFIB'`` on a ``+`` rhythm change.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = int(round(fs * seconds))
    samples = np.asarray(samples, dtype=np.int64)
    symbols = ["N"] * len(samples) if symbols is None else list(symbols)
    if len(symbols) != len(samples):
        raise ValueError(f"{len(samples)} annotation samples but {len(symbols)} symbols")
    if signal is None:
        signal = synthetic_signal(n, fs, samples, spike_mv)
    signal = np.asarray(signal, dtype=np.float64)
    if signal.shape != (n, len(lead_names)):
        raise ValueError(f"signal must have shape {(n, len(lead_names))}, got {signal.shape}")
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(lead_names), sig_name=list(lead_names), p_signal=signal,
                fmt=[fmt] * len(lead_names), write_dir=str(directory))
    if len(samples):
        aux = None if aux_notes is None else list(aux_notes)
        if aux is not None and len(aux) != len(samples):
            raise ValueError(f"{len(samples)} annotation samples but {len(aux)} aux notes")
        wfdb.wrann(name, "atr", samples, symbol=symbols, aux_note=aux, fs=fs, write_dir=str(directory))
    return name


def write_records_list(directory: str | Path, names: Sequence[str]) -> None:
    """Write the database's ``RECORDS`` listing (as PhysioNet ships it)."""
    Path(directory, "RECORDS").write_text("".join(f"{n}\n" for n in names))


def regular_beats(fs: float, seconds: float, rr_s: float = 0.8, first_s: float = 0.3) -> np.ndarray:
    """Sample indices of a regular rhythm: one beat every ``rr_s`` from ``first_s`` to the end."""
    return np.round(np.arange(first_s, seconds, rr_s) * fs).astype(np.int64)
