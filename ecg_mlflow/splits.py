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


def patient_key(p: str) -> tuple:
    """Sort record ids numerically where they are numbers ('100' < '1000'), else by text."""
    return (0, int(p), p) if p.isdigit() else (1, 0, p)


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


def subject_groups(subjects: list[str], k: int) -> dict[str, list[str]]:
    """Held-out subjects dealt round-robin into ``k`` groups (subject ``i`` goes to group ``i % k``),
    keyed ``group<j>of<k>`` (``j`` from 1). ``k`` outside 2..len(subjects) is refused."""
    if not 2 <= k <= len(subjects):
        raise ValueError(f"base_folds must be 0 (one base model per subject) or between 2 and the "
                         f"{len(subjects)} held-out subjects, got {k}")
    return {f"group{j + 1}of{k}": subjects[j::k] for j in range(k)}


def group_fold(record: np.ndarray, part: np.ndarray, name: str, members: list[str]) -> Fold:
    """One fold that holds out every subject in ``members`` at once: its base-training mask
    excludes every record of each of them, so none reaches the base model it is evaluated with."""
    single = loso_folds(record, part, members)
    return Fold(
        subject=name,
        records=tuple(r for f in single for r in f.records),
        train=np.logical_and.reduce([f.train for f in single]),
        finetune={r: m for f in single for r, m in f.finetune.items()},
        test={r: m for f in single for r, m in f.test.items()},
    )


def grouped_folds(record: np.ndarray, part: np.ndarray, subjects: list[str], k: int) -> list[Fold]:
    """``k`` folds of held-out subjects that share one base model each (quick runs); see
    :func:`subject_groups` and :func:`group_fold`."""
    return [group_fold(record, part, name, members) for name, members in subject_groups(subjects, k).items()]


def validation_fold(fold: Fold, time_s: np.ndarray, finetune_minutes: float) -> Fold:
    """``fold`` for model choice: each record's fine-tune minutes split in time halves, the first
    half fine-tunes and the second half is evaluated. Test beats are not selected at all, so
    options chosen on these figures never saw a test segment."""
    cut = finetune_minutes * 60.0 / 2
    early = np.asarray(time_s) < cut
    return Fold(subject=fold.subject, records=fold.records, train=fold.train,
                finetune={r: m & early for r, m in fold.finetune.items()},
                test={r: m & ~early for r, m in fold.finetune.items()})
