"""Locate, download, validate and read WFDB records.

A record is read into a :class:`Record`: both leads in physical units (mV) in a
fixed order (MLII first where the record has it), at the model's sampling rate
(records at other rates are resampled, annotations moved with them), plus the
reference annotations (beats, and the rhythm changes in their ``aux_note``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import wfdb

TARGET_FS = 360  # Hz; MIT-BIH's rate and the rate every model in this project expects.
PRIMARY_LEAD = "MLII"
PHYSIONET_DB = "mitdb"
ANNOTATOR = "atr"

# The 48 records of the MIT-BIH Arrhythmia Database.
MITDB_RECORDS: tuple[str, ...] = tuple(
    str(r)
    for r in (
        100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 111, 112, 113, 114, 115, 116,
        117, 118, 119, 121, 122, 123, 124, 200, 201, 202, 203, 205, 207, 208, 209, 210,
        212, 213, 214, 215, 217, 219, 220, 221, 222, 223, 228, 230, 231, 232, 233, 234,
    )
)

# Two subject-disjoint halves of the 44 non-paced records, for choosing options on one half and
# reporting them on the other: de Chazal et al. (2004)'s DS1 and DS2, except that record 202 sits in
# half1 beside 201 (one subject), so no subject is on both sides.
RECORD_SETS: dict[str, tuple[str, ...]] = {
    "half1": ("101", "106", "108", "109", "112", "114", "115", "116", "118", "119", "122", "124", "201",
              "202", "203", "205", "207", "208", "209", "215", "220", "223", "230"),
    "half2": ("100", "103", "105", "111", "113", "117", "121", "123", "200", "210", "212", "213", "214",
              "219", "221", "222", "228", "231", "232", "233", "234"),
}

# Bytes per sample for the WFDB formats we accept (212 packs two 12-bit samples in 3 bytes).
_BYTES_PER_SAMPLE = {"212": 1.5, "16": 2, "80": 1, "61": 2, "160": 2, "310": 4 / 3, "311": 4 / 3}


class DataError(ValueError):
    """Input data is missing, corrupt or inconsistent. The message names the file at fault."""


def default_cache_dir() -> Path:
    """Where downloaded records and prepared datasets live: ``$ECG_CACHE_DIR`` or ``~/.cache/ecg-mlflow``."""
    return Path(os.environ.get("ECG_CACHE_DIR") or Path.home() / ".cache" / "ecg-mlflow")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The record directory: ``data_dir`` if given, else ``$ECG_DATA_DIR``, else the download cache."""
    if data_dir not in (None, ""):
        return Path(data_dir).expanduser()
    env = os.environ.get("ECG_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return default_cache_dir() / PHYSIONET_DB


def available_records(data_dir: Path) -> list[str]:
    """Record names in ``data_dir``: its ``RECORDS`` file if present, else every ``*.hea`` file."""
    listing = data_dir / "RECORDS"
    if listing.is_file():
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return sorted(p.stem for p in data_dir.glob("*.hea"))


def parse_records(records: str | list[str] | tuple[str, ...] | None, data_dir: Path) -> list[str]:
    """Normalise a ``records`` parameter: ``None``/``'all'``/``''``, a set name of
    :data:`RECORD_SETS` (``half1``, ``half2``), or ids separated by commas or spaces.

    Ids are checked against the records known for ``data_dir`` (its listing, or the
    MIT-BIH list when the directory is still empty and will be downloaded).
    """
    known = available_records(data_dir) if data_dir.is_dir() else []
    known = known or list(MITDB_RECORDS)
    if records is None or (isinstance(records, str) and records.strip().lower() in ("", "all")):
        return known
    if isinstance(records, str) and records.strip().lower() in RECORD_SETS:
        records = list(RECORD_SETS[records.strip().lower()])
    elif isinstance(records, str):
        records = records.replace(",", " ").split()
    wanted = [str(r).strip() for r in records]
    unknown = [r for r in wanted if r not in known]
    if unknown:
        raise DataError(
            f"unknown record id(s) {unknown} in 'records'; expected ids from {data_dir} "
            f"such as {', '.join(known[:5])}, ... ({len(known)} known), or a set: {', '.join(RECORD_SETS)}"
        )
    if len(set(wanted)) != len(wanted):
        raise DataError(f"'records' names a record twice: {wanted}")
    return wanted


def record_files(data_dir: Path, record: str) -> dict[str, Path]:
    """The three files a record needs: header, signal, reference annotations."""
    header = data_dir / f"{record}.hea"
    files = {"hea": header, "atr": data_dir / f"{record}.{ANNOTATOR}"}
    dat = data_dir / f"{record}.dat"
    if header.is_file():
        # The header names its signal file(s); usually <record>.dat.
        names = set(_header_signal_files(header))
        if len(names) == 1:
            dat = data_dir / names.pop()
    files["dat"] = dat
    return files


def _header_signal_files(header: Path) -> list[str]:
    """Signal file names a header lists, or ``[]`` unless its record line reads ``name n_sig ...``
    and each name is a plain file name: a corrupt header must be reported as such by
    :func:`check_record`, not send us looking for (or downloading) a file named by garbage.
    (A light parse on purpose: ``wfdb.rdheader`` costs milliseconds and this runs on every call.)"""
    lines = [line.split() for line in header.read_text(errors="replace").splitlines()]
    lines = [t for t in lines if t and not t[0].startswith("#")]
    if not lines or len(lines[0]) < 2 or not lines[0][1].isdigit():
        return []
    n_sig = int(lines[0][1])
    names = [t[0] for t in lines[1:1 + n_sig]]
    if len(names) != n_sig or not all(n.isprintable() and Path(n).name == n for n in names):
        return []
    return names


def ensure_records(data_dir: Path, records: list[str], download: bool = True) -> None:
    """Make sure every record's files exist, downloading the missing ones from PhysioNet.

    Raises :class:`DataError` naming the missing files when they cannot be had.
    """
    missing = {r: [p for p in record_files(data_dir, r).values() if not p.is_file()] for r in records}
    missing = {r: ps for r, ps in missing.items() if ps}
    if not missing:
        return
    if download:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            wfdb.dl_database(PHYSIONET_DB, dl_dir=str(data_dir), records=sorted(missing),
                             annotators=[ANNOTATOR], keep_subdirs=False, overwrite=False)
        except Exception as exc:  # network errors come in many types
            first = next(iter(missing.values()))[0]
            raise DataError(
                f"missing record file {first} ({len(missing)} record(s) incomplete) and the download "
                f"from PhysioNet failed ({type(exc).__name__}: {exc}). Put the MIT-BIH files "
                f"(<record>.hea, .dat, .atr) in {data_dir}, or set ECG_DATA_DIR / data_dir to where they are."
            ) from exc
        missing = {r: [p for p in record_files(data_dir, r).values() if not p.is_file()] for r in records}
        missing = {r: ps for r, ps in missing.items() if ps}
    if missing:
        files = [str(p) for ps in missing.values() for p in ps]
        raise DataError(
            f"missing record file(s): {', '.join(files[:6])}{' ...' if len(files) > 6 else ''}. "
            f"Put the MIT-BIH files (<record>.hea, .dat, .atr) in {data_dir}, or set ECG_DATA_DIR / data_dir."
        )


@dataclass(frozen=True)
class RecordInfo:
    """What a header says about a record; cheap to read, used to validate before any real work."""

    name: str
    fs: float
    n_samples: int
    lead_names: tuple[str, ...]

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.fs


def check_record(data_dir: Path, record: str, annotations: bool = True) -> RecordInfo:
    """Validate a record's files without reading its signal: header parses, signal file size
    matches the header, annotation file is non-empty (unless ``annotations`` is False: a recording
    without reference annotations). Raises :class:`DataError` naming the file."""
    files = record_files(data_dir, record)
    if not annotations:
        del files["atr"]
    for path in files.values():
        if not path.is_file():
            raise DataError(f"missing record file {path}")
    try:
        header = wfdb.rdheader(str(data_dir / record))
    except Exception as exc:
        raise DataError(f"corrupt header {files['hea']}: {exc}") from exc
    if not header.sig_len or not header.fs or not header.n_sig:
        raise DataError(f"header {files['hea']} gives no signal length, sampling rate or signals")
    fmts = set(header.fmt or [])
    if len(fmts) != 1 or next(iter(fmts)) not in _BYTES_PER_SAMPLE:
        raise DataError(f"header {files['hea']} uses unsupported signal format(s) {sorted(fmts)}")
    expected = int(np.ceil(header.sig_len * header.n_sig * _BYTES_PER_SAMPLE[next(iter(fmts))]))
    actual = files["dat"].stat().st_size
    offset = max(header.byte_offset or [0]) if header.byte_offset and any(header.byte_offset) else 0
    if actual - offset < expected:
        raise DataError(
            f"signal file {files['dat']} is truncated: {actual} bytes, the header {files['hea']} "
            f"promises {header.n_sig} signals x {header.sig_len} samples = {expected} bytes"
        )
    if actual - offset > expected + 2:
        raise DataError(
            f"signal file {files['dat']} does not match its header {files['hea']}: {actual} bytes, "
            f"expected {expected} for {header.n_sig} signals x {header.sig_len} samples"
        )
    if annotations and files["atr"].stat().st_size < 2:
        raise DataError(f"annotation file {files['atr']} is empty")
    return RecordInfo(record, float(header.fs), int(header.sig_len), tuple(header.sig_name))


@dataclass
class Record:
    """A record read for beat extraction.

    signal: float32 array, shape ``(n_samples, 2)``, mV, leads in :attr:`lead_names` order.
    ann_sample: int64 array, shape ``(n_ann,)``, annotation positions in samples at :attr:`fs`.
    ann_symbol: str array, shape ``(n_ann,)``.
    ann_aux: str array, shape ``(n_ann,)``: each annotation's ``aux_note`` ('' where it has none);
    a rhythm change (symbol ``+``) names the new rhythm there, e.g. ``'(AFIB'``.
    source_fs: the rate of the record's files (``fs`` is the rate after resampling).
    """

    name: str
    fs: float
    signal: np.ndarray
    lead_names: tuple[str, str]
    ann_sample: np.ndarray
    ann_symbol: np.ndarray
    has_primary_lead: bool
    ann_aux: np.ndarray
    source_fs: float | None = None


def lead_order(lead_names: tuple[str, ...]) -> list[int]:
    """Column order that puts MLII first (record 114 stores V5 first); the others keep theirs."""
    idx = list(range(len(lead_names)))
    if PRIMARY_LEAD in lead_names:
        p = lead_names.index(PRIMARY_LEAD)
        idx = [p] + [i for i in idx if i != p]
    return idx[:2]


def read_record(data_dir: Path, record: str, target_fs: int = TARGET_FS, annotations: bool = True) -> Record:
    """Read a record's first two leads (MLII first) in mV and its reference annotations (none, with
    ``annotations`` False), resampled to ``target_fs``. Raises :class:`DataError` naming the file on
    a read failure."""
    path = str(data_dir / record)
    try:
        sig = wfdb.rdrecord(path, physical=True, return_res=32)
    except Exception as exc:
        raise DataError(f"cannot read signal of record {record} in {data_dir}: {exc}") from exc
    try:
        ann = wfdb.rdann(path, ANNOTATOR) if annotations else None
    except Exception as exc:
        raise DataError(f"cannot read annotations {data_dir / (record + '.' + ANNOTATOR)}: {exc}") from exc
    if ann is None:
        ann = SimpleNamespace(sample=np.zeros(0, dtype=np.int64), symbol=[], aux_note=[])
    if sig.p_signal is None or sig.p_signal.shape[1] < 2:
        raise DataError(f"record {record} in {data_dir} has fewer than two signals")
    order = lead_order(tuple(sig.sig_name))
    signal = np.ascontiguousarray(sig.p_signal[:, order], dtype=np.float32)
    if not np.all(np.isfinite(signal)):
        # Invalid samples read as NaN; carry the previous valid value so windows stay finite.
        signal = _fill_invalid(signal)
    samples = np.asarray(ann.sample, dtype=np.int64)
    fs = float(sig.fs)
    if fs != target_fs:
        signal, samples = resample(signal, samples, fs, target_fs)
        fs = float(target_fs)
    return Record(
        name=record,
        fs=fs,
        signal=signal,
        lead_names=(sig.sig_name[order[0]], sig.sig_name[order[1]]),
        ann_sample=samples,
        ann_symbol=np.asarray(ann.symbol, dtype=object),
        has_primary_lead=PRIMARY_LEAD in sig.sig_name,
        ann_aux=np.asarray([a or "" for a in (ann.aux_note or [""] * len(samples))], dtype=object),
        source_fs=float(sig.fs),
    )


def resample(signal: np.ndarray, samples: np.ndarray, fs: float, target_fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Polyphase-resample ``signal`` (``(n, leads)``) from ``fs`` to ``target_fs`` and move the
    annotation ``samples`` with it. Returns ``(signal', samples')``."""
    ratio = Fraction(target_fs / fs).limit_denominator(1000)
    from scipy.signal import resample_poly

    out = resample_poly(signal, ratio.numerator, ratio.denominator, axis=0).astype(np.float32)
    moved = np.round(samples * (target_fs / fs)).astype(np.int64)
    return out, np.clip(moved, 0, len(out) - 1)


def _fill_invalid(signal: np.ndarray) -> np.ndarray:
    out = signal.copy()
    for j in range(out.shape[1]):
        col = out[:, j]
        bad = ~np.isfinite(col)
        if bad.all():
            col[:] = 0.0
            continue
        idx = np.where(~bad, np.arange(len(col)), 0)
        np.maximum.accumulate(idx, out=idx)
        col[:] = col[idx]
        first = np.argmax(~bad)
        col[:first] = col[first]
    return out
