"""Subjects, the per-record time split, and leave-one-subject-out folds.

A *patient* here is a record; a *subject* is a person. MIT-BIH records 201 and 202
come from the same person, so they share subject ``'201'`` and are held out together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FINETUNE = "finetune"
TEST = "test"

# Records of one person; every other record is its own subject.
SAME_SUBJECT: dict[str, str] = {"202": "201"}


def subject_of(record: str) -> str:
    """Subject id of a record (``'202'`` -> ``'201'``; otherwise the record id)."""
    return SAME_SUBJECT.get(record, record)


def time_split(time_s: np.ndarray, finetune_minutes: float) -> np.ndarray:
    """``'finetune'`` for beats in the first ``finetune_minutes``, ``'test'`` after; shape ``(n,)``."""
    if not finetune_minutes > 0:
        raise ValueError(f"finetune_minutes must be > 0, got {finetune_minutes}")
    return np.where(np.asarray(time_s) < finetune_minutes * 60.0, FINETUNE, TEST).astype(object)


@dataclass(frozen=True)
class Fold:
    """One held-out subject: its records, and the boolean row masks of a beat table.

    train: every beat of every other subject (base training).
    finetune / test: beats of each held-out record, keyed by record id.
    """

    subject: str
    records: tuple[str, ...]
    train: np.ndarray
    finetune: dict[str, np.ndarray]
    test: dict[str, np.ndarray]


def loso_folds(record: np.ndarray, part: np.ndarray, subjects: list[str] | None = None) -> list[Fold]:
    """Leave-one-subject-out folds over a beat table's ``record`` and ``part`` columns (each ``(n,)``).

    ``subjects`` limits which subjects are held out (default: all, in record order); the
    base-training mask of each fold always excludes every record of the held-out subject.
    """
    record = np.asarray(record).astype(str)
    subject = np.array([subject_of(r) for r in record], dtype=object)
    all_subjects = list(dict.fromkeys(subject_of(r) for r in dict.fromkeys(record.tolist())))
    if subjects is None:
        subjects = all_subjects
    unknown = [s for s in subjects if s not in all_subjects]
    if unknown:
        raise ValueError(f"subjects {unknown} have no beats in the table; expected some of {all_subjects}")
    folds = []
    for s in subjects:
        held = subject == s
        recs = tuple(dict.fromkeys(record[held].tolist()))
        folds.append(Fold(
            subject=s,
            records=recs,
            train=~held,
            finetune={r: (record == r) & (part == FINETUNE) for r in recs},
            test={r: (record == r) & (part == TEST) for r in recs},
        ))
    return folds
