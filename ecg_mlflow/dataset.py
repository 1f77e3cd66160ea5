"""The prepared beat dataset: built from raw records, cached as one Parquet file.

One row per beat. Columns: ``record``, ``subject``, ``sample`` (annotation index at 360 Hz),
``time_s``, ``symbol``, ``label`` (class code of the scheme), ``rr_prev``, ``rr_next``,
``rr_local`` (s), ``rhythm`` (the reference rhythm in force, e.g. ``'N'``, ``'AFIB'``; ``''``
before a record's first rhythm annotation), ``part`` (``'finetune'`` / ``'test'``), ``signal`` (fixed-size list of
``window * 2`` float32 mV values, row-major ``(window, 2)``, MLII first).

The file lives under a key derived from the input files' SHA-256 checksums and the
parameters, is written atomically (temporary file, then rename) and reused when nothing changed.
:func:`log_to_mlflow` records it in an MLflow run (dataset input, ``data.*`` params and metrics,
summary table).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import json
import os
import tempfile
import warnings
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ecg_mlflow import beats as beats_mod
from ecg_mlflow.filters import check_signal_filter, filtered
from ecg_mlflow.labels import PACED_RECORDS, get_scheme, LabelScheme, to_aami
from ecg_mlflow.records import (
    TARGET_FS, DataError, Record, check_record, default_cache_dir, ensure_records, parse_records,
    read_record, record_files, resolve_data_dir,
)
from ecg_mlflow.splits import FINETUNE, TEST, subject_of, time_split

FORMAT_VERSION = 3  # bump when the file layout or extraction rules change


@dataclass(frozen=True)
class PrepareConfig:
    """Parameters of ``prepare``. ``include_paced=None`` means: excluded under ``aami``, kept under ``raw``."""

    data_dir: str | None = None
    records: str | tuple[str, ...] | None = None
    window: int = 160
    window_offset: int = 0  # the R peak at index window // 2 + window_offset; 0 = centred (beats.r_index)
    label_scheme: str = "aami"
    include_paced: bool | None = None
    finetune_minutes: float = 10.0
    signal_filter: str = "highpass"  # ecg_mlflow.filters; "none" reads the signal as recorded (before the 28th round)
    cache_dir: str | None = None
    download: bool = True

    def validated(self) -> "PrepareConfig":
        """``self`` if every parameter is usable; else ``ValueError`` naming the parameter."""
        # bool is an int subclass; window=True is a mistake, not a 1-sample window.
        if isinstance(self.window, bool) or not isinstance(self.window, (int, np.integer)) or self.window <= 0:
            raise ValueError(f"window must be a positive whole number of samples, got {self.window!r}")
        if self.window > 10 * TARGET_FS:
            raise ValueError(f"window must be at most {10 * TARGET_FS} samples (10 s), got {self.window}")
        if isinstance(self.window_offset, bool) or not isinstance(self.window_offset, (int, np.integer)):
            raise ValueError(f"window_offset must be a whole number of samples, got {self.window_offset!r}")
        beats_mod.check_window_offset(self.window, self.window_offset)
        get_scheme(self.label_scheme)
        if isinstance(self.finetune_minutes, bool) or not (
                isinstance(self.finetune_minutes, (int, float, np.integer, np.floating))
                and np.isfinite(self.finetune_minutes) and self.finetune_minutes > 0):
            raise ValueError(f"finetune_minutes must be a positive number, got {self.finetune_minutes!r}")
        if self.include_paced not in (None, True, False):
            raise ValueError(f"include_paced must be True, False or None (auto), got {self.include_paced!r}")
        check_signal_filter(self.signal_filter)
        return self


def _samples_from_param(value: str | float | int, name: str, positive: bool) -> int:
    """An entry-point parameter as a whole number of samples: MLproject passes floats such as
    ``'160.0'``; anything else is a ``ValueError`` naming ``name``."""
    expected = "a positive whole number of samples" if positive else "a whole number of samples"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if not np.isfinite(number) or number != int(number) or (positive and number <= 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(number)


def window_from_param(value: str | float | int) -> int:
    """A ``window`` entry-point parameter as a positive sample count (``'160.0'`` from MLproject)."""
    return _samples_from_param(value, "window", positive=True)


def window_offset_from_param(value: str | float | int) -> int:
    """A ``window_offset`` entry-point parameter (``'48.0'`` from MLproject), negative allowed. The
    range is the window's, checked by :meth:`PrepareConfig.validated`."""
    return _samples_from_param(value, "window_offset", positive=False)


def include_paced_from_param(value: str | bool | None) -> bool | None:
    """An ``include_paced`` parameter: ``'auto'`` -> ``None`` (out under ``aami``, in under ``raw``),
    ``'true'`` / ``'false'`` -> ``True`` / ``False``."""
    if value is None or isinstance(value, bool):
        return value
    table = {"auto": None, "true": True, "false": False}
    key = str(value).strip().lower()
    if key not in table:
        raise ValueError(f"include_paced must be one of auto, true, false; got {value!r}")
    return table[key]


@dataclass
class BeatDataset:
    """A prepared beat table held as NumPy arrays.

    x: float32 ``(n, window, 2)`` mV.  label: int16 ``(n,)``.  record, subject, symbol, part,
    rhythm: object ``(n,)``.  sample: int64 ``(n,)``.  time_s: float64 ``(n,)``.  rr_prev, rr_next,
    rr_local: float32 ``(n,)``.  ``meta`` holds the parameters, classes, lead names, counts.
    """

    x: np.ndarray
    label: np.ndarray
    record: np.ndarray
    subject: np.ndarray
    symbol: np.ndarray
    part: np.ndarray
    sample: np.ndarray
    time_s: np.ndarray
    rr_prev: np.ndarray
    rr_next: np.ndarray
    rr_local: np.ndarray
    rhythm: np.ndarray
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.label)

    @property
    def scheme(self) -> LabelScheme:
        return get_scheme(self.meta["label_scheme"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def digest(self) -> str:
        return self.meta["digest"]

    @property
    def records(self) -> list[str]:
        return list(self.meta["records"])

    @property
    def r_peak(self) -> int:
        """The index of the R peak inside each beat window (:func:`ecg_mlflow.beats.r_index`)."""
        return beats_mod.r_index(self.meta["window"], self.meta.get("window_offset", 0))

    def rr_features(self) -> np.ndarray:
        """Rhythm context, float32 ``(n, 3)``: previous and next RR relative to the local mean
        (unitless), and the local-mean RR itself (s); 1.0 where a value is missing."""
        local = np.where(np.isfinite(self.rr_local) & (self.rr_local > 0), self.rr_local, np.nan)
        feats = np.stack([self.rr_prev / local, self.rr_next / local, self.rr_local], axis=1)
        feats[:, 2] = self.rr_local
        return np.nan_to_num(feats, nan=1.0).astype(np.float32)

    def rr_long(self) -> np.ndarray:
        """Rhythm over minutes, float32 ``(n, 2)``: previous RR and local-mean RR, each over the
        average RR of the (up to) 300 beats before (about five minutes,
        :func:`ecg_mlflow.beats.rr_average`); 1.0 where a value is missing. In a run of
        supraventricular tachycardia a beat's RR is close to the local mean, but short against
        the minutes before it."""
        return self._over_average(np.stack([self.rr_prev, self.rr_local], axis=1))

    def rr_median(self) -> np.ndarray:
        """As :meth:`rr_long`, over the median RR of the same (up to) 300 beats instead of their mean
        (:func:`ecg_mlflow.beats.rr_median`), float32 ``(n, 2)``; 1.0 where a value is missing. In a
        record whose runs of tachycardia fill a good part of the five minutes (209), the mean follows
        the runs and a beat inside one reads less early against it than against the median."""
        return self._over_average(np.stack([self.rr_prev, self.rr_local], axis=1), beats_mod.rr_median)

    def _over_average(self, intervals: np.ndarray, average=beats_mod.rr_average) -> np.ndarray:
        """RR intervals ``(n, k)`` (s) over each beat's five-minute ``average`` RR
        (:func:`ecg_mlflow.beats.rr_average`, or :func:`ecg_mlflow.beats.rr_median`), float32
        ``(n, k)``; 1.0 where either is missing."""
        average = average(self.record, self.sample, self.rr_prev)
        with np.errstate(invalid="ignore", divide="ignore"):
            feats = intervals / average[:, None]
        feats[~np.isfinite(feats)] = 1.0
        return feats.astype(np.float32)

    def early(self, share: float = beats_mod.ONTIME_SHARE) -> np.ndarray:
        """Which beats came early, bool ``(n,)``: their earliness, the smaller of previous RR over the
        local mean RR (:meth:`rr_features`) and over the five-minute average (:meth:`rr_long`), the
        measure ``sveb_gate`` thresholds (:func:`ecg_mlflow.training.premature_threshold`), is under
        ``share``; never where a value is missing. ``share`` 0.9 is the complement of
        ``recent_reference=ontime``."""
        return np.minimum(self.rr_features()[:, 0], self.rr_long()[:, 0]) < share

    def rr_irregular(self, lags: tuple[int, ...] = (1,)) -> np.ndarray:
        """Rhythm irregularity before each beat, float32 ``(n, 1)``: the median absolute change
        between successive RR intervals over the 16 before the beat's own, over their mean
        (:func:`ecg_mlflow.beats.rr_irregularity`); 0.0 (regular) where undefined, at a record's
        first beats. A short RR says "premature" in sinus rhythm, not in atrial fibrillation.
        ``lags``: as :func:`ecg_mlflow.beats.rr_irregularity` takes them."""
        irregular = beats_mod.rr_irregularity(self.record, self.sample, self.rr_prev, lags=lags)
        return np.nan_to_num(irregular, nan=0.0, posinf=0.0)[:, None].astype(np.float32)

    def rr_lagged(self) -> np.ndarray:
        """Rhythm irregularity before each beat that bigeminy and trigeminy do not raise, float32
        ``(n, 1)``: as :meth:`rr_irregular`, but the smallest over lags 1, 2 and 3 of the median
        change between an RR interval and the one that many intervals before it
        (:func:`ecg_mlflow.beats.rr_irregularity` with :data:`ecg_mlflow.beats.FIBRILLATION_LAGS`);
        0.0 where undefined. Premature beats every second or third beat keep it low, atrial
        fibrillation raises it."""
        return self.rr_irregular(lags=beats_mod.FIBRILLATION_LAGS)

    def atrial(self) -> np.ndarray:
        """What the atria did before each beat, float32 ``(n, k + 1)``: the mean of the first lead
        0.25 s to 0.05 s before the R peak over the four beats before it (every second sample, ``k``
        of them) and how much those beats differ there (:func:`ecg_mlflow.beats.atrial_activity`).
        A clear P wave in sinus rhythm, f or F waves in atrial fibrillation or flutter: what
        ``sveb_af``'s detector reads, with the irregularity inputs."""
        return beats_mod.atrial_activity(self.record, self.sample, self.x, self.r_peak, self.meta.get("fs", TARGET_FS))

    def rr_sequence(self) -> np.ndarray:
        """The last eight RR intervals up to each beat, newest first, each over the average RR of
        the (up to) 300 beats before (about five minutes), float32 ``(n, 8)``
        (:func:`ecg_mlflow.beats.rr_sequence`; column 0 is :meth:`rr_long`'s column 0); 1.0 where
        a value is missing, at a record's first beats."""
        return self._over_average(beats_mod.rr_sequence(self.record, self.sample, self.rr_prev))

    def recent_template(self, reference: str = "all") -> np.ndarray:
        """Each beat's recent neighbours, float32 ``(n, window, leads)``: the sample-wise median of the
        windows of the 20 beats before it in its record (:func:`ecg_mlflow.beats.recent_median`).
        ``reference="ontime"`` takes the 20 beats before it that came on time (previous RR at least
        0.9 of the five-minute average, :meth:`rr_long`), so that inside a run of premature or
        fast beats the reference stays the rhythm before the run. Unlike :meth:`patient_context` it
        follows the record as it drifts, and reads no labels. About 10 s for the 44 records here,
        so sources compute it only for models that read it."""
        if reference not in beats_mod.RECENT_REFERENCES:
            raise ValueError(f"recent_reference must be one of {list(beats_mod.RECENT_REFERENCES)}, got {reference!r}")
        mask = None if reference == "all" else self.rr_long()[:, 0] >= beats_mod.ONTIME_SHARE
        return beats_mod.recent_median(self.record, self.sample, self.x, reference=mask)

    def patient_context(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each record's own normal beat and rhythm, from the labelled beats of its fine-tune
        minutes only (never its test part), so a model can read a beat against its patient.

        Returns ``templates`` float32 ``(n_records, window, leads)``: the sample-wise median of the
        record's fine-tune beats of AAMI class N (of all its fine-tune beats when it has none, zeros
        when it has no fine-tune beats); ``record_index`` int32 ``(n,)``: each row's template; and
        ``rr_patient`` float32 ``(n, 3)``: previous, next and local-mean RR over the median RR
        before those N beats (1.0 where undefined)."""
        normal = (to_aami(self.symbol) == "N") & (self.part == FINETUNE)
        lookup = {r: i for i, r in enumerate(self.records)}
        record_index = np.array([lookup[r] for r in self.record], dtype=np.int32)
        templates = np.zeros((len(lookup),) + self.x.shape[1:], dtype=np.float32)
        normal_rr = np.full(len(lookup), np.nan)
        for i in range(len(lookup)):
            rows = record_index == i
            pick = rows & normal if (rows & normal).any() else rows & (self.part == FINETUNE)
            if pick.any():
                templates[i] = np.median(self.x[pick], axis=0)
                rr = self.rr_prev[pick]
                normal_rr[i] = np.median(rr[np.isfinite(rr)]) if np.isfinite(rr).any() else np.nan
        per_row = normal_rr[record_index]
        with np.errstate(invalid="ignore", divide="ignore"):
            rr_patient = np.stack([self.rr_prev, self.rr_next, self.rr_local], axis=1) / per_row[:, None]
        rr_patient[~np.isfinite(rr_patient)] = 1.0
        return templates, record_index, rr_patient.astype(np.float32)

    def frame(self) -> pd.DataFrame:
        """Every column but the signal, as a DataFrame (one row per beat)."""
        return pd.DataFrame({
            "record": self.record, "subject": self.subject, "sample": self.sample, "time_s": self.time_s,
            "symbol": self.symbol, "label": self.label, "rr_prev": self.rr_prev, "rr_next": self.rr_next,
            "rr_local": self.rr_local, "rhythm": self.rhythm, "part": self.part,
        })

    def summary(self) -> pd.DataFrame:
        """One row per prepared record (also those left with no beats): ``record``, ``subject``,
        beats per class (one column per class, scheme order), ``finetune_beats``, ``test_beats``,
        ``dropped_<reason>``, the stored leads ``lead_0``/``lead_1`` and ``has_mlii``."""
        df = self.frame()
        df["cls"] = np.asarray(self.classes, dtype=object)[self.label.astype(int)]
        index = pd.Index(self.records, name="record")
        counts = (pd.crosstab(df["record"], df["cls"])
                  .reindex(index=index, columns=self.classes, fill_value=0))
        parts = pd.crosstab(df["record"], df["part"]).reindex(index=index, columns=[FINETUNE, TEST], fill_value=0)
        parts.columns = [f"{c}_beats" for c in parts.columns]
        dropped = pd.DataFrame(self.meta["dropped"]).T.reindex(index).fillna(0).astype(int)
        dropped.columns = [f"dropped_{c}" for c in dropped.columns]
        leads = pd.DataFrame(self.meta["leads"], index=["lead_0", "lead_1"]).T.reindex(index)
        missing = set(self.meta.get("missing_primary_lead", []))
        leads["has_mlii"] = [r not in missing for r in index]
        out = pd.concat([counts, parts, dropped, leads], axis=1)
        out.insert(0, "subject", [subject_of(r) for r in out.index])
        out.index.name = "record"
        return out.reset_index()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(cfg: PrepareConfig, data_dir: Path, records: list[str]) -> str:
    """SHA-256 over the format version, the parameters and every input file's checksum."""
    h = hashlib.sha256()
    params = {"format": FORMAT_VERSION, "window": int(cfg.window), "label_scheme": cfg.label_scheme,
              "finetune_minutes": float(cfg.finetune_minutes), "records": records, "fs": TARGET_FS}
    if cfg.signal_filter != "none":  # only then: the unfiltered datasets keep the digests they always had
        params["signal_filter"] = cfg.signal_filter
    if cfg.window_offset:  # likewise: centred windows keep their digests
        params["window_offset"] = int(cfg.window_offset)
    h.update(json.dumps(params, sort_keys=True).encode())
    for r in records:
        for kind, path in sorted(record_files(data_dir, r).items()):
            h.update(f"{r}.{kind}:{_file_sha256(path)}".encode())
    return h.hexdigest()


def select_records(cfg: PrepareConfig, data_dir: Path) -> tuple[list[str], list[str]]:
    """(records to use, paced records left out) for a config."""
    wanted = parse_records(cfg.records, data_dir)
    include_paced = cfg.include_paced if cfg.include_paced is not None else cfg.label_scheme != "aami"
    excluded = [] if include_paced else [r for r in wanted if r in PACED_RECORDS]
    kept = [r for r in wanted if r not in excluded]
    if not kept:
        raise DataError(f"no records left to prepare: {wanted} are all paced and include_paced is off")
    return kept, excluded


def _extract(args: tuple[str, str, int, str, float, str, int]) -> dict:
    data_dir, record, window, scheme_name, finetune_minutes, signal_filter, window_offset = args
    return record_part(filtered(read_record(Path(data_dir), record), signal_filter), window, scheme_name,
                       finetune_minutes, window_offset)


def record_part(rec: Record, window: int, scheme_name: str, finetune_minutes: float,
                window_offset: int = 0) -> dict:
    """The beats of one read record as ``prepare`` keeps them: those its label scheme maps, each with
    its window (R peak at ``beats.r_index(window, window_offset)``), RR intervals, rhythm and part; a
    dict of ``(n,)`` arrays (``x``: ``(n, window, 2)``) and the record's ``dropped`` counts and leads,
    as :func:`from_parts` takes it."""
    rb = beats_mod.extract_beats(rec, window, window_offset)
    scheme = get_scheme(scheme_name)
    label = scheme.encode(rb.symbol)
    mapped = label >= 0
    time_s = rb.sample / rec.fs
    return {
        "record": rec.name, "x": rb.x[mapped], "label": label[mapped], "symbol": rb.symbol[mapped],
        "sample": rb.sample[mapped], "time_s": time_s[mapped], "rr_prev": rb.rr_prev[mapped],
        "rr_next": rb.rr_next[mapped], "rr_local": rb.rr_local[mapped], "rhythm": rb.rhythm[mapped],
        "part": time_split(time_s[mapped], finetune_minutes),
        "dropped": {**rb.dropped, "unmapped": int((~mapped).sum())},
        "leads": list(rec.lead_names), "has_primary_lead": rec.has_primary_lead,
    }


def from_parts(parts: list[dict], meta: dict) -> BeatDataset:
    """A :class:`BeatDataset` held in memory (no cache file) from the :func:`record_part` dicts of
    one or more records; ``meta`` needs at least ``label_scheme``, ``classes``, ``window`` and
    ``records``."""
    cat = lambda key: np.concatenate([np.asarray(p[key]) for p in parts])  # noqa: E731
    records = np.concatenate([np.full(len(p["label"]), p["record"], dtype=object) for p in parts])
    return BeatDataset(
        x=cat("x").astype(np.float32).reshape(-1, meta["window"], 2), label=cat("label").astype(np.int16),
        record=records, subject=np.asarray([subject_of(r) for r in records.tolist()], dtype=object),
        symbol=cat("symbol").astype(object), part=cat("part").astype(object), sample=cat("sample").astype(np.int64),
        time_s=cat("time_s").astype(np.float64), rr_prev=cat("rr_prev"), rr_next=cat("rr_next"),
        rr_local=cat("rr_local"), rhythm=cat("rhythm").astype(object), meta=meta,
    )


def _extract_parallel(jobs: list[tuple], workers: int) -> list[dict]:
    """Extract records in worker processes. Never fork a process that runs TensorFlow's threads
    (forkserver then); a pool that cannot start (e.g. a caller's script without a ``__main__``
    guard, which forkserver re-imports) falls back to extracting in this process."""
    method = "forkserver" if "tensorflow" in sys.modules else "fork"
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
            return list(pool.map(_extract, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    except BrokenProcessPool:
        return [_extract(j) for j in jobs]


def _to_table(parts: list[dict], meta: dict) -> pa.Table:
    window = meta["window"]
    x = np.concatenate([p["x"] for p in parts]).reshape(-1, window * 2)
    signal = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), type=pa.float32()), window * 2)
    cat = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    records = np.concatenate([np.full(len(p["label"]), p["record"], dtype=object) for p in parts])
    table = pa.table({
        "record": pa.array(records.tolist(), type=pa.string()),
        "subject": pa.array([subject_of(r) for r in records.tolist()], type=pa.string()),
        "sample": pa.array(cat("sample"), type=pa.int64()),
        "time_s": pa.array(cat("time_s"), type=pa.float64()),
        "symbol": pa.array(cat("symbol").tolist(), type=pa.string()),
        "label": pa.array(cat("label"), type=pa.int16()),
        "rr_prev": pa.array(cat("rr_prev"), type=pa.float32()),
        "rr_next": pa.array(cat("rr_next"), type=pa.float32()),
        "rr_local": pa.array(cat("rr_local"), type=pa.float32()),
        "rhythm": pa.array(cat("rhythm").tolist(), type=pa.string()),
        "part": pa.array(cat("part").tolist(), type=pa.string()),
        "signal": signal,
    })
    return table.replace_schema_metadata({"ecg_mlflow": json.dumps(meta)})


def load(path: str | os.PathLike) -> BeatDataset:
    """Read a prepared Parquet file into a :class:`BeatDataset` (memory-mapped read)."""
    path = Path(path)
    # Any failure (not Parquet, truncated, no metadata, another layout) is one DataError, so a
    # bad cache entry can be recognised and rebuilt.
    try:
        table = pq.read_table(path, memory_map=True)
        meta = json.loads(table.schema.metadata[b"ecg_mlflow"])
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"file format {meta.get('format')!r}, this code reads {FORMAT_VERSION}")
        window = meta["window"]
        sig = table.column("signal").combine_chunks()
        x = sig.flatten().to_numpy(zero_copy_only=False).reshape(-1, window, 2)
        col = lambda name: table.column(name).to_numpy()  # noqa: E731
        obj = lambda name: np.asarray(table.column(name).to_pylist(), dtype=object)  # noqa: E731
        ds = BeatDataset(
            x=x, label=col("label"), record=obj("record"), subject=obj("subject"), symbol=obj("symbol"),
            part=obj("part"), sample=col("sample"), time_s=col("time_s"), rr_prev=col("rr_prev"),
            rr_next=col("rr_next"), rr_local=col("rr_local"), rhythm=obj("rhythm"), meta=meta, path=path,
        )
    except Exception as exc:
        raise DataError(f"cannot read prepared dataset {path}: {type(exc).__name__}: {exc}") from exc
    if len(ds.x) != len(ds.label):
        raise DataError(f"cannot read prepared dataset {path}: {len(ds.x)} signals for {len(ds.label)} labels")
    return ds


def prepare(cfg: PrepareConfig | None = None, *, workers: int | None = None, verbose: bool = False) -> BeatDataset:
    """Build (or reuse) the beat dataset for ``cfg``.

    Validates parameters and every record's files before reading any signal; raises
    ``ValueError``/:class:`DataError` naming the parameter or file at fault.
    """
    cfg = (cfg or PrepareConfig()).validated()
    data_dir = resolve_data_dir(cfg.data_dir)
    records, paced_excluded = select_records(cfg, data_dir)
    ensure_records(data_dir, records, download=cfg.download)
    infos = [check_record(data_dir, r) for r in records]
    for info in infos:
        if cfg.finetune_minutes * 60.0 >= info.duration_s:
            raise ValueError(
                f"finetune_minutes={cfg.finetune_minutes} leaves no test part: record {info.name} "
                f"lasts {info.duration_s / 60:.2f} minutes"
            )
    key = cache_key(cfg, data_dir, records)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "beats"
    path = cache_dir / f"beats-{cfg.label_scheme}-w{cfg.window}-{key[:16]}.parquet"
    if path.is_file():
        try:
            ds = load(path)
            if verbose:
                print(f"prepare: cached dataset {path} ({len(ds)} beats)")
            return ds
        except DataError:
            path.unlink(missing_ok=True)  # a corrupt cache entry is rebuilt, never trusted

    jobs = [(str(data_dir), r, int(cfg.window), cfg.label_scheme, float(cfg.finetune_minutes), cfg.signal_filter,
             int(cfg.window_offset)) for r in records]
    workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1:
        parts = _extract_parallel(jobs, workers)
    else:
        parts = [_extract(j) for j in jobs]

    scheme = get_scheme(cfg.label_scheme)
    meta = {
        "format": FORMAT_VERSION, "digest": key[:16], "label_scheme": scheme.name, "classes": list(scheme.classes),
        "window": int(cfg.window), "window_offset": int(cfg.window_offset), "fs": TARGET_FS,
        "finetune_minutes": float(cfg.finetune_minutes),
        "signal_filter": cfg.signal_filter, "records": records, "paced_excluded": paced_excluded,
        "source": str(data_dir.resolve()),
        "dropped": {p["record"]: p["dropped"] for p in parts},
        "leads": {p["record"]: p["leads"] for p in parts},
        "missing_primary_lead": [p["record"] for p in parts if not p["has_primary_lead"]],
    }
    table = _to_table(parts, meta)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".beats-", suffix=".tmp", dir=cache_dir)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="none")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if verbose:
        print(f"prepare: wrote {path} ({table.num_rows} beats from {len(records)} records)")
    return load(path)


def config_dict(cfg: PrepareConfig) -> dict:
    return asdict(cfg)


def log_to_mlflow(ds: BeatDataset, context: str = "prepare") -> None:
    """Log ``ds`` to the active MLflow run (one is started if none is active).

    - a dataset input (name, ``digest`` = the cache key prefix, ``source`` = the Parquet file)
      with ``context`` as its context tag;
    - params ``data.*`` (records, label scheme and classes, window, sampling rate,
      finetune_minutes, digest, records left out or lacking MLII); prefixed so they never
      collide with an entry point's own parameters of the same name;
    - metrics ``data.n_beats``, ``data.n_records``, ``data.n_finetune``, ``data.n_test`` and
      ``data.dropped_<reason>`` (summed over records);
    - artifacts ``dataset_summary.csv`` and ``dataset_summary.html`` (:meth:`BeatDataset.summary`).
    """
    import mlflow  # imported here: preparing data must not pay for importing MLflow

    if ds.path is None:
        raise ValueError("log_to_mlflow needs a dataset read from its file (prepare() or load())")
    meta = ds.meta
    name = f"mitdb-beats-{meta['label_scheme']}-w{meta['window']}"
    with warnings.catch_warnings():
        # A local path matches two equivalent source types, and schema inference hints at integer
        # columns; both warnings are noise here.
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(ds.frame(), source=str(ds.path), targets="label", name=name,
                                          digest=ds.digest)
        mlflow.log_input(dataset, context=context)

    dropped: dict[str, int] = {}
    for counts in meta["dropped"].values():
        for reason, n in counts.items():
            dropped[reason] = dropped.get(reason, 0) + int(n)
    mlflow.log_params({
        "data.records": ",".join(ds.records),
        "data.label_scheme": meta["label_scheme"],
        "data.classes": ",".join(ds.classes),
        "data.window": meta["window"],
        "data.window_offset": meta.get("window_offset", 0),
        "data.fs": meta["fs"],
        "data.finetune_minutes": meta["finetune_minutes"],
        "data.signal_filter": meta.get("signal_filter", "none"),
        "data.digest": ds.digest,
        "data.paced_excluded": ",".join(meta["paced_excluded"]) or "none",
        "data.missing_mlii": ",".join(meta["missing_primary_lead"]) or "none",
    })
    mlflow.log_metrics({
        "data.n_beats": len(ds),
        "data.n_records": len(ds.records),
        "data.n_finetune": int(np.sum(ds.part == FINETUNE)),
        "data.n_test": int(np.sum(ds.part == TEST)),
        **{f"data.dropped_{reason}": n for reason, n in sorted(dropped.items())},
    })

    summary = ds.summary()
    mlflow.log_text(summary.to_csv(index=False), "dataset_summary.csv")
    mlflow.log_text(summary_html(ds, summary), "dataset_summary.html")


def summary_html(ds: BeatDataset, summary: pd.DataFrame | None = None) -> str:
    """A standalone HTML page: the dataset's facts, then :meth:`BeatDataset.summary` with a total row."""
    import html

    summary = ds.summary() if summary is None else summary
    numeric = summary.select_dtypes("number").columns
    total = pd.DataFrame([{"record": "total", "subject": "", **summary[numeric].sum().to_dict()}])
    table = pd.concat([summary, total], ignore_index=True)
    meta = ds.meta
    facts = {
        "beats": f"{len(ds):,}",
        "records": f"{len(ds.records)} ({', '.join(ds.records)})",
        "label scheme": f"{meta['label_scheme']}: " + ", ".join(f"{i} {c}" for i, c in enumerate(ds.classes)),
        "window": f"{meta['window']} samples at {meta['fs']} Hz, R peak at index {ds.r_peak}",
        "fine-tune part": f"first {meta['finetune_minutes']:g} minutes of each record",
        "signal filter": meta.get("signal_filter", "none"),
        "paced records left out": ", ".join(meta["paced_excluded"]) or "none",
        "records without MLII": ", ".join(meta["missing_primary_lead"]) or "none",
        "digest": ds.digest,
        "file": str(ds.path),
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts.items())
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Beat dataset summary</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>\n"
        f"<h1>Beat dataset {html.escape(ds.digest)}</h1>\n<table>{rows}</table>\n"
        "<h2>Beats per record</h2>\n"
        + table.to_html(index=False, na_rep="")
        + "\n</body></html>\n"
    )
