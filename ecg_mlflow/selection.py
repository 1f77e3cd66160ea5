"""An honest estimate of "the best of several option sets": the choice among LOSO runs, cross-fitted.

Picking the best of K candidate runs by their test figures and reporting those figures is
optimistic: the choice has seen the test segments it is scored on. Here every subject's figures
come from a candidate chosen *without* that subject. The subjects are dealt into folds; for each
fold, every candidate is scored on the subjects outside it, by the rule used throughout this
project (the largest smallest of the four gross transfer statistics: VEB Se, VEB +P, SVEB Se,
SVEB +P, since the targets are a floor on each), and the fold's subjects take the winner's
counts. The pooled counts give the estimate (nested cross-validation over subjects).

Folds (``folds``):

- ``"subject"`` (default): one fold per subject, so each subject's option set is chosen on the
  other 42 subjects, the most data any choice can have here;
- ``"halves"``: the record sets ``half1`` and ``half2`` (:data:`ecg_mlflow.records.RECORD_SETS`),
  each choosing for the other, as in README "Choosing options across halves";
- ``k`` (a whole number >= 2): subjects dealt round-robin into ``k`` groups in record order.

Ties go to the candidate listed first, so list the incumbent (say the default options) first.

What is and is not held out: a subject's own figures never enter its choice. Whether the
candidates' figures on the *other* subjects were made without this subject depends on the runs
scored. A LOSO run over all records trains each base model on every subject but the one it is
evaluated on, so the choice for subject ``s`` is scored with base models that learned from ``s``'s
beats (its test minutes among them): an indirect path, reported per fold as
``scored_without_fold = no``. To close it, score on runs that never read the fold
(``scored_on``): for ``folds=halves`` each candidate run inside each half (``-P records=half1``,
``-P records=half2``, joined ``a+b``), as README "Choosing options across halves" does; for ``k``
folds each candidate run over every set of ``k - 1`` folds (joined with ``+``: these runs overlap
in patients, and each fold is scored, subject by subject, on the run whose base model for that
subject was trained without the fold). Such folds read ``yes``. Which subjects trained a base
model is read from its base run's ``train_records`` tag (``unknown`` where a run does not say).

Every candidate is one LOSO run, or several on different patients pooled with ``+`` (as in
``compare``), and all must hold the same subjects. ``scored_on`` gives one entry per candidate in
the same order (by default a candidate is scored on its own runs); an entry's runs, together, must
hold every subject of the candidates.
The interval of the estimate is a subject bootstrap of the whole procedure: in every resample each
fold's choice is made again on the resampled subjects outside it, and the fold's resampled subjects
take that choice's counts, so the interval holds the spread of the choice as well as that of the
subjects. How often each fold's choice stands in the resamples is reported (``kept``). The
difference from the first candidate is paired on the same resamples.

Seeds: a candidate may be given as its runs under several seeds (``a/b/c``, replica ``k`` of every
candidate under one seed; :func:`check_replicas`). One run is one draw of the seed, and the best of
many candidates under one seed carries that draw's luck; so a candidate then replaces candidate 0
in a fold only if it scores higher under each seed (:func:`choose`). Counts are pooled over the
seeds, and the estimate is also reported per seed.

A gain that rests on a few subjects: with ``min_share`` a candidate must also be higher than
candidate 0 in at least that share of paired resamples of the subjects it is scored on, under each
seed (:func:`resample_shares`, ``compare``'s "resamples higher" on those subjects); the bootstrap
makes that clause again within each resample (:func:`choice_bootstrap`).

The choice is guarded, not the candidates: an option set that was itself tuned on some subjects'
test figures carries that into any estimate it enters.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ecg_mlflow import tracking, uncertainty
from ecg_mlflow.analysis import CI_LEVEL, N_BOOT, CompareError, LosoRun, count_differences, load_loso_run, \
    moved_columns, parse_run_ids, pool, subject_count_table
from ecg_mlflow.metrics import EC57_COUNTS
from ecg_mlflow.records import RECORD_SETS
from ecg_mlflow.splits import patient_key, subject_groups, subject_of

RULE = uncertainty.SMALLEST  # the statistic a choice maximises
VARIANT = "transfer"  # the targets are on the transfer variant
FOLD_SCHEMES = ("subject", "halves")
FEW_FOLDS = 8  # up to this many folds the summary names each fold's subjects and blind runs
MOVED_SUBJECTS = 10  # subjects the summary lists as where the choice's difference from [0] comes from


class SelectError(CompareError):
    """Bad input to the selection (runs, folds); the message names the culprit."""


def subject_folds(subjects: list[str], folds: str) -> dict[str, list[str]]:
    """The folds of ``subjects`` (sorted as records are) for a ``folds`` setting, keyed by a name:
    ``{'201': ['201'], ...}`` for ``"subject"``, ``{'half1': [...], 'half2': [...]}`` for
    ``"halves"`` (each half's records mapped to subjects), ``{'group1of4': [...], ...}`` for ``"4"``.
    Every subject is in exactly one fold, and there are at least two folds."""
    subjects = sorted(subjects, key=patient_key)
    folds = str(folds).strip()
    if folds == "subject":
        out = {s: [s] for s in subjects}
    elif folds == "halves":
        out = {h: sorted({subject_of(r) for r in RECORD_SETS[h]} & set(subjects), key=patient_key)
               for h in ("half1", "half2")}
        outside = sorted(set(subjects) - set().union(*out.values()), key=patient_key)
        if outside:
            raise SelectError(f"folds=halves: subject(s) {outside} are in neither half1 nor half2")
        out = {h: s for h, s in out.items() if s}
    elif folds.isdigit() and int(folds) >= 2:
        k = int(folds)
        if k > len(subjects):
            raise SelectError(f"folds={k}: more folds than the {len(subjects)} subjects")
        out = subject_groups(subjects, k)  # the groups base_folds=k makes of the same subjects
    else:
        raise SelectError(f"folds must be one of {list(FOLD_SCHEMES)} or a whole number >= 2, got {folds!r}")
    if len(out) < 2:
        raise SelectError(f"folds={folds}: the candidates' {len(subjects)} subject(s) make only {len(out)} fold(s); "
                          "a choice needs subjects outside each fold")
    return out


def blind_records(records: list[str], folds: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per fold, the ``records`` (sorted) whose subjects lie outside it: what a candidate's scoring
    run blind to that fold runs over (``-P records=...``; both records of subject 201 go together)."""
    records = sorted(records, key=patient_key)
    return {name: [r for r in records if subject_of(r) not in members] for name, members in folds.items()}


def score(counts: np.ndarray) -> float:
    """The rule's value for summed EC57 counts ``(8,)``: the smallest of the four gross rates, or
    ``-inf`` where one is undefined (no V or S beat, or none called), so such a candidate never wins."""
    value = float(uncertainty.rates(counts)[RULE])
    return value if math.isfinite(value) else -math.inf


@dataclass
class Selection:
    """The outcome of :func:`cross_fitted_choice`.

    folds: one row per fold (index ``fold``): ``subjects`` (space-separated), ``chosen`` (index of
    the candidate), ``score_<i>`` (candidate ``i``'s rule value on the subjects outside the fold)
    and ``scored_without_fold`` (``yes`` / ``no`` / ``unknown``: whether every base model behind
    those scores was trained without the fold's subjects; :func:`fold_counts`).
    per_subject: index ``subject``: ``fold``, ``chosen`` and the chosen candidate's EC57 counts.
    counts: the candidates' counts per subject, summed over their replicas, ``(n_candidates,
    n_subjects, 8)``, subjects in the order of ``per_subject``.
    scoring: per fold, the counts each candidate's replicas were scored on, per subject,
    ``(n_folds, n_candidates, n_replicas, n_subjects, 8)`` (zero for the fold's own subjects), folds
    in the order of ``folds``; what :func:`choice_bootstrap` makes the choice again on.
    replica_counts: ``(n_candidates, n_replicas, n_subjects, 8)``, each replica's own counts.
    min_share: the share of paired resamples a candidate had to be higher in (0: no such clause);
    with it ``folds`` also holds ``share_<i>`` (candidate ``i``'s smallest share over the replicas)
    and, with several replicas, ``share_<i>_<k>``.
    """

    folds: pd.DataFrame
    per_subject: pd.DataFrame
    counts: np.ndarray
    scoring: np.ndarray
    replica_counts: np.ndarray
    min_share: float = 0.0

    @property
    def pooled(self) -> np.ndarray:
        """The estimate's counts per subject ``(n_subjects, 8)`` (summed over the replicas)."""
        return self.per_subject[list(EC57_COUNTS)].to_numpy(np.int64)

    def replica_pooled(self, k: int) -> np.ndarray:
        """The estimate's counts per subject ``(n_subjects, 8)`` under replica ``k`` alone: each
        subject takes its chosen candidate's replica ``k`` (the estimate under that seed)."""
        return self.replica_counts[self.per_subject.chosen.to_numpy(), k, np.arange(len(self.per_subject))]


def _check_subjects(tables: list[pd.DataFrame], subjects: list[str], what: str) -> None:
    """Refuse, naming it, a table whose subjects are not ``subjects``."""
    for i, t in enumerate(tables):
        if set(t.index) != set(subjects):
            extra, lack = sorted(set(t.index) - set(subjects)), sorted(set(subjects) - set(t.index))
            raise SelectError(f"{what} {i} holds other subjects than candidate 0 (has {extra} more, lacks "
                              f"{lack}); every candidate must hold the same subjects")


@dataclass
class ScoringRun:
    """One run a candidate is scored on: its EC57 counts by subject (index ``subject``) and, per
    subject, the subjects its base model was trained on (``None``: not known)."""

    counts: pd.DataFrame
    trained_on: dict[str, frozenset[str] | None]


_WORSE = {"yes": 0, "unknown": 1, "no": 2}  # a fold's verdict is the worst of its subjects'


def fold_counts(runs: list[ScoringRun], outside: list[str], fold: set[str], what: str) -> tuple[np.ndarray, str]:
    """A candidate's summed counts ``(8,)`` on the subjects ``outside`` a fold, and whether they were
    made without the fold (see :func:`fold_rows`)."""
    rows, verdict = fold_rows(runs, outside, fold, what)
    return rows.sum(axis=0), verdict


def fold_rows(runs: list[ScoringRun], outside: list[str], fold: set[str], what: str) -> tuple[np.ndarray, str]:
    """A candidate's counts ``(len(outside), 8)`` for each subject ``outside`` a fold, and whether
    they were made without the fold. Each subject's counts come from the first of ``runs`` that holds
    it with a base model trained without any of the ``fold``'s subjects (``'yes'``); failing that,
    from the first run that holds it (``'no'`` when that base model was trained with one of them,
    ``'unknown'`` when its training subjects are not known). The fold's verdict is the worst."""
    rows, verdict = np.zeros((len(outside), len(EC57_COUNTS)), np.int64), "yes"
    for j, s in enumerate(outside):
        holding = [r for r in runs if s in r.counts.index]
        if not holding:
            raise SelectError(f"{what}: no run holds subject {s}")
        blind = [r for r in holding if r.trained_on.get(s) is not None and not r.trained_on[s] & fold]
        run = (blind or holding)[0]
        if not blind:
            here = "unknown" if run.trained_on.get(s) is None else "no"
            verdict = max(verdict, here, key=_WORSE.get)
        rows[j] = run.counts.loc[s, list(EC57_COUNTS)].to_numpy(np.int64)
    return rows, verdict


def check_min_share(min_share: float, error: type[SelectError] = SelectError) -> None:
    """Refuse, naming it, a ``min_share`` that is not a share of resamples."""
    if not 0 <= min_share <= 1:
        raise error(f"min_share must be a share of resamples from 0 to 1, got {min_share!r} (0.9 for 90 %)")


def choose(scores: np.ndarray, shares: np.ndarray | None = None, min_share: float = 0.0) -> np.ndarray:
    """The rule applied to candidates' scores ``(n_candidates, n_replicas, ...)`` (any trailing axes,
    e.g. resamples): a candidate replaces candidate 0 (the incumbent) only if it scores higher under
    every replica (each seed); of those that do, the largest mean score wins, the first of equals.
    Undefined scores (NaN, ``-inf``) never score higher. With one replica this is the plain largest
    score, ties to the first listed. With ``min_share`` > 0 a candidate must also be higher in at
    least that share of paired subject resamples under every replica: ``shares`` has the shape of
    ``scores`` (:func:`resample_shares`; a NaN share never passes). Returns the chosen index per
    trailing position ``(...)``."""
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    higher = np.all(scores[1:] > scores[:1], axis=1)  # (n_candidates - 1, ...)
    if min_share > 0:
        higher &= np.all(np.asarray(shares)[1:] >= min_share, axis=1)
    mean = np.where(higher, scores[1:].mean(axis=1), -np.inf)
    best = np.argmax(mean, axis=0) + 1  # the first of equals
    return np.where(higher.any(axis=0), best, 0)


def resample_shares(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per candidate and replica, the share of paired subject resamples in which it scores higher
    than candidate 0 under the same replica, of the resamples where both scores are defined (as
    ``compare``'s "resamples higher"); NaN for candidate 0 and where no resample defines both.

    rows: counts per subject ``(n_candidates, n_replicas, n_subjects, 8)``; weights: how often each
    subject is drawn, ``(..., n_boot, n_subjects)`` (:func:`~ecg_mlflow.uncertainty.resample_weights`).
    Returns ``(n_candidates, n_replicas, ...)``.
    """
    # Sums of whole counts are exact in float64, and matmul is far faster than an integer einsum.
    summed = np.moveaxis(np.tensordot(weights.astype(np.float64), rows.astype(np.float64), axes=([-1], [2])),
                         (-3, -2), (0, 1))  # (n_cand, n_rep, ..., n_boot, 8)
    s = uncertainty.rates(summed)[RULE]
    d = s[1:] - s[:1]
    defined = np.isfinite(d).sum(axis=-1)
    share = np.where(defined > 0, (d > 0).sum(axis=-1) / np.maximum(defined, 1), np.nan)
    return np.concatenate([np.full_like(share[:1], np.nan), share])


def _replicas(x: list) -> list[list]:
    """Per candidate, its replicas: a bare table (or list of scoring runs) is one replica."""
    return [[c] if isinstance(c, pd.DataFrame) or (c and isinstance(c[0], ScoringRun)) else list(c) for c in x]


def cross_fitted_choice(tables: list, folds: dict[str, list[str]], scored: list | None = None,
                        min_share: float = 0.0, n_boot: int = N_BOOT, seed: int = 0) -> Selection:
    """Choose a candidate per fold on the subjects outside it and pool the choices' counts.

    tables: per candidate, EC57 counts by subject (index ``subject``, columns
    :data:`~ecg_mlflow.metrics.EC57_COUNTS`), all on the same subjects; or per candidate a list of
    such tables, its replicas (the same options under other seeds, replica ``k`` of every candidate
    under one seed), all candidates with as many. folds: a partition of those subjects
    (:func:`subject_folds`). scored: per candidate (and replica), the runs a choice is scored on
    (:func:`fold_counts`); default: ``tables`` themselves, base-model training not known.
    The choice per fold is :func:`choose`; a fold's subjects take the chosen candidate's counts,
    summed over its replicas. With ``min_share`` > 0 a candidate must also be higher than candidate 0
    in that share of ``n_boot`` paired resamples of the subjects outside the fold (drawn with
    ``seed``, as ``compare`` draws a run's subjects), under every replica.
    """
    check_min_share(min_share)
    if len(tables) < 2:
        raise SelectError(f"a choice needs at least two candidates, got {len(tables)}")
    tables = _replicas(tables)
    n_rep = len(tables[0])
    if n_rep < 1 or any(len(t) != n_rep for t in tables):
        raise SelectError(f"every candidate must have the same number of replicas, got {[len(t) for t in tables]}")
    subjects = sorted(tables[0][0].index, key=patient_key)
    _check_subjects([reps[0] for reps in tables], subjects, "candidate")
    for k in range(1, n_rep):
        _check_subjects([reps[k] for reps in tables], subjects, f"replica {k} of candidate")
    if scored is None:
        scored = [[[ScoringRun(t, dict.fromkeys(t.index))] for t in reps] for reps in tables]
    if len(scored) != len(tables):
        raise SelectError(f"scored_on must give one entry per candidate: {len(tables)} candidates, "
                          f"{len(scored)} entries")
    scored = _replicas(scored)
    if any(len(s) != n_rep for s in scored):
        raise SelectError(f"scored_on must give each candidate's {n_rep} replica(s), got {[len(s) for s in scored]}")
    in_folds = [s for members in folds.values() for s in members]
    if sorted(in_folds) != sorted(subjects):
        raise SelectError("folds must hold each of the candidates' subjects exactly once")
    replica_counts = np.stack([np.stack([t.reindex(subjects)[list(EC57_COUNTS)].to_numpy(np.int64) for t in reps])
                               for reps in tables])  # (n_cand, n_rep, n_subj, 8)
    counts = replica_counts.sum(axis=1)
    pos = {s: i for i, s in enumerate(subjects)}
    rows_of_folds, chosen_of = [], {}
    scoring = np.zeros((len(folds), len(tables), n_rep, len(subjects), len(EC57_COUNTS)), np.int64)
    for f, (name, members) in enumerate(folds.items()):
        outside = [s for s in subjects if s not in set(members)]
        at = [pos[s] for s in outside]
        scores, verdicts = np.full((len(tables), n_rep), -math.inf), []
        for i, reps in enumerate(scored):
            for k, runs in enumerate(reps):
                what = f"scored_on entry {i}" + (f" replica {k}" if n_rep > 1 else "")
                rows, verdict = fold_rows(runs, outside, set(members), what)
                scoring[f, i, k, at] = rows
                scores[i, k] = score(rows.sum(axis=0))
                verdicts.append(verdict)
        if not np.isfinite(scores).all(axis=1).any():
            raise SelectError(f"fold {name}: no candidate has all four statistics defined on the subjects "
                              "outside it" + (" under every replica" if n_rep > 1 else "") + ", so none can be chosen")
        shares, share_cols = None, {}
        if min_share > 0:
            weights = uncertainty.resample_weights(len(outside), n_boot, seed)
            shares = resample_shares(scoring[f][:, :, at], weights)  # (n_cand, n_rep)
            share_cols = {f"share_{i}": float(shares[i].min()) for i in range(1, len(tables))}
            if n_rep > 1:
                share_cols.update({f"share_{i}_{k}": shares[i, k] for i in range(1, len(tables)) for k in range(n_rep)})
        best = int(choose(scores, shares, min_share))
        per_replica = {f"score_{i}_{k}": scores[i, k] for i in range(len(tables)) for k in range(n_rep)} \
            if n_rep > 1 else {}
        rows_of_folds.append({"fold": name, "subjects": " ".join(members), "chosen": best,
                              **{f"score_{i}": float(np.mean(scores[i])) for i in range(len(tables))},
                              **per_replica, **share_cols, "scored_without_fold": max(verdicts, key=_WORSE.get)})
        chosen_of.update({s: (name, best) for s in members})
    per_subject = pd.DataFrame(
        [{"subject": s, "fold": chosen_of[s][0], "chosen": chosen_of[s][1],
          **dict(zip(EC57_COUNTS, counts[chosen_of[s][1], pos[s]].tolist()))} for s in subjects]
    ).set_index("subject")
    return Selection(folds=pd.DataFrame(rows_of_folds).set_index("fold"), per_subject=per_subject, counts=counts,
                     scoring=scoring, replica_counts=replica_counts, min_share=min_share)


@dataclass
class ChoiceBootstrap:
    """The cross-fitted choice made again on each resample of subjects (:func:`choice_bootstrap`).

    counts: the estimate's summed counts per resample ``(n_boot, 8)``; chosen: each fold's choice per
    resample ``(n_boot, n_folds)``, folds in the order of ``Selection.folds``.
    """

    counts: np.ndarray
    chosen: np.ndarray

    def kept(self, sel: Selection) -> np.ndarray:
        """Per fold, the share of resamples in which it makes the choice it made on the data ``(n_folds,)``."""
        return (self.chosen == sel.folds.chosen.to_numpy()[None, :]).mean(axis=0)


INNER_BOOT = 200  # resamples within each resample for the share clause (a share of 0.9 to within about 2 %)
_CHUNK = 250  # outer resamples whose inner resamples are summed at once (memory)


def _shares_within(scoring: np.ndarray, outer: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """:func:`resample_shares` made again within each outer resample: per outer row of ``outer``
    ``(n_boot, n_subjects)`` (zero for the fold's own subjects), :data:`INNER_BOOT` resamples of the
    subjects it drew outside the fold, as many as it drew. Returns ``(n_cand, n_rep, n_boot)``."""
    n_boot = outer.shape[0]
    drawn = outer.sum(axis=1)
    out = np.full((*scoring.shape[:2], n_boot), np.nan)
    for start in range(0, n_boot, _CHUNK):
        stop = min(start + _CHUNK, n_boot)
        inner = np.zeros((stop - start, INNER_BOOT, outer.shape[1]), np.int64)
        for j, b in enumerate(range(start, stop)):
            if drawn[b]:
                inner[j] = rng.multinomial(drawn[b], outer[b] / drawn[b], size=INNER_BOOT)
        out[..., start:stop] = resample_shares(scoring, inner)
    return out


def choice_bootstrap(sel: Selection, weights: np.ndarray, seed: int = 0) -> ChoiceBootstrap:
    """The whole procedure on each resample of subjects: ``weights`` ``(n_boot, n_subjects)``
    (:func:`ecg_mlflow.uncertainty.resample_weights`, subjects in the order of ``per_subject``).

    In a resample every candidate (each replica) is scored again on the fold's outside subjects as
    drawn (a subject drawn twice counts twice, one not drawn not at all); :func:`choose` picks, as on
    the data (candidate 0 where none scores higher); the fold's subjects as drawn then take the
    winner's counts. Where the choice had a share clause (``sel.min_share``), each resample's shares
    come from :data:`INNER_BOOT` resamples of what it drew outside the fold (a double bootstrap,
    seeded with ``seed`` and the fold's position).
    """
    n_boot = weights.shape[0]
    counts = np.zeros((n_boot, len(EC57_COUNTS)), np.int64)
    chosen = np.zeros((n_boot, len(sel.folds)), np.int64)
    fold_of = sel.per_subject.fold.to_numpy()
    for f, name in enumerate(sel.folds.index):
        scores = uncertainty.rates(np.einsum("bs,crsk->crbk", weights, sel.scoring[f]))[RULE]  # (n_cand, n_rep, n_boot)
        shares = None
        if sel.min_share > 0:
            outside = np.where(fold_of == name, 0, weights)
            shares = _shares_within(sel.scoring[f], outside, np.random.default_rng([seed, f]))
        best = choose(scores, shares, sel.min_share)
        chosen[:, f] = best
        members = fold_of == name
        for i in np.unique(best):
            at = best == i
            counts[at] += weights[np.ix_(at, members)] @ sel.counts[i][members]
    return ChoiceBootstrap(counts=counts, chosen=chosen)


def base_training_subjects(client: MlflowClient, run: LosoRun) -> dict[str, frozenset[str] | None]:
    """Per subject of ``run``'s transfer variant: the subjects whose beats trained the base model
    it was fine-tuned from (and whose beats any replay drew on), from the base run's
    ``train_records`` tag; ``None`` where the child names no base run or the base run has no tag."""
    bases: dict[str, frozenset[str] | None] = {}
    out: dict[str, frozenset[str] | None] = {}
    for _, c in run.children[run.children.variant == VARIANT].iterrows():
        base_id = client.get_run(c.run_id).data.tags.get("base_run_id", "")
        if base_id not in bases:
            try:
                tag = client.get_run(base_id).data.tags.get("train_records", "") if base_id else ""
            except MlflowException:  # a base run that is gone: its training set is unknown
                tag = ""
            bases[base_id] = frozenset(subject_of(r) for r in tag.split(",") if r) or None
        before, now = out.get(c.subject, frozenset()), bases[base_id]
        out[c.subject] = None if before is None or now is None else before | now
    return out


def estimate_table(sel: Selection, labels: list[str], n_boot: int = N_BOOT, seed: int = 0,
                   level: float = CI_LEVEL) -> tuple[pd.DataFrame, ChoiceBootstrap]:
    """Per row (each candidate on all subjects, then ``cross-fitted choice``): its label, the four
    gross rates and their smallest, with subject-bootstrap intervals (``<stat>_ci_low/high``), the
    folds that chose it, and the difference from candidate 0 on the same resamples
    (``<stat>_vs_0``, ``..._vs_0_ci_low/high``). Rates are fractions. The choice's intervals make
    the choice again in every resample (:func:`choice_bootstrap`), which is returned beside."""
    weights = uncertainty.resample_weights(len(sel.per_subject), n_boot, seed)
    boot = choice_bootstrap(sel, weights, seed)
    rows = []
    chosen = sel.folds.chosen.value_counts()
    for name, counts, n_folds, resampled in [
            *((labels[i], c, int(chosen.get(i, 0)), None) for i, c in enumerate(sel.counts)),
            ("cross-fitted choice", sel.pooled, len(sel.folds), boot.counts)]:
        ci = uncertainty.gross_interval(counts, weights, level, resampled)
        vs = uncertainty.paired_interval(sel.counts[0], counts, weights, level, resampled_b=resampled)
        row = {"candidate": name, "folds_chosen": n_folds}
        for k in uncertainty.STATISTICS:
            row[k], row[f"{k}_ci_low"], row[f"{k}_ci_high"] = ci[k]
            row[f"{k}_vs_0"], row[f"{k}_vs_0_ci_low"], row[f"{k}_vs_0_ci_high"] = (
                vs[k]["diff"], vs[k]["ci_low"], vs[k]["ci_high"])
        rows.append(row)
    return pd.DataFrame(rows), boot


def _finite(x: float) -> float | None:
    """A rate for JSON: ``None`` where it is undefined."""
    return float(x) if math.isfinite(float(x)) else None


def _pct(x: float) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def rule_text(seeds: list[str], min_share: float = 0.0) -> str:
    """The rule :func:`choose` applies, in words, for these replicas' seeds and share clause."""
    text = f"largest {RULE} of the four gross {VARIANT} statistics"
    if len(seeds) > 1:
        text += (", and a candidate replaces candidate [0] only if it is higher under each of seeds "
                 f"{', '.join(seeds)} (then the largest mean over the seeds wins)")
    if min_share > 0:
        text += ((" and" if len(seeds) > 1 else ", and a candidate replaces candidate [0] only if it is higher")
                 + f" in at least {100 * min_share:g} % of paired resamples of the subjects it is scored on"
                 + (" under each seed" if len(seeds) > 1 else ""))
    return text


def replica_rates(sel: Selection, k: int) -> dict[str, float]:
    """The estimate's four gross rates and their smallest under replica ``k`` alone (fractions)."""
    return {key: float(v) for key, v in uncertainty.rates(sel.replica_pooled(k).sum(axis=0)).items()}


def summary_text(table: pd.DataFrame, sel: Selection, folds: str, blind_to: dict[str, list[str]] | None = None,
                 seeds: list[str] | None = None, *, moved: pd.DataFrame) -> str:
    """The terminal summary: candidates and the cross-fitted estimate (%), then the choice per fold.
    ``blind_to`` (:func:`blind_records`) is listed where a fold was not scored blind to its subjects;
    with several replicas (``seeds``) the figures are pooled over them and the estimate is also given per seed.
    ``moved``: :func:`choice_differences` of ``sel``, made once by the caller for its artifacts too."""
    seeds = seeds or [""]
    lines = [f"=== Cross-fitted choice over {len(sel.folds)} folds ({folds}), rule: "
             f"{rule_text(seeds, sel.min_share)} ===",
             f"{'':3} {'VEB Se':>14} {'VEB +P':>14} {'SVEB Se':>14} {'SVEB +P':>14} {'smallest':>14}  folds  candidate"]
    for i, r in table.iterrows():
        cells = [f"{_pct(r[k])} ({_pct(r[k + '_ci_low'])}–{_pct(r[k + '_ci_high'])})" for k in uncertainty.STATISTICS]
        tag = f"[{i}]" if i < len(table) - 1 else " = "
        lines.append(f"{tag:3} " + " ".join(f"{c:>14}" for c in cells) + f"  {r.folds_chosen:>5}  {r.candidate}")
    last = table.iloc[-1]
    lines += ["", "cross-fitted choice − candidate [0] (paired subject bootstrap): "
              + ", ".join(f"{k} {100 * last[k + '_vs_0']:+.1f} ({100 * last[k + '_vs_0_ci_low']:+.1f} to "
                          f"{100 * last[k + '_vs_0_ci_high']:+.1f})" for k in uncertainty.STATISTICS), ""]
    if len(seeds) > 1:
        lines[2:2] = [f"(figures pooled over the {len(seeds)} seeds' runs: each beat counted once per seed)"]
        lines[-1:-1] = [f"cross-fitted choice under seed {sd} alone: " + ", ".join(
            f"{k} {_pct(v)}" for k, v in replica_rates(sel, i).items()) for i, sd in enumerate(seeds)]
    blind = sel.folds.scored_without_fold.value_counts()
    lines.append("scored without the fold's subjects: " + ", ".join(f"{k} in {n} fold(s)" for k, n in blind.items())
                 + ("" if set(blind.index) == {"yes"} else
                    " (no: the scored runs' base models were trained with the fold's subjects; see scored_on)"))
    if blind_to and set(blind.index) != {"yes"}:
        lines.append("to score each fold without its subjects, run each candidate's options once per fold over "
                     "the other folds' records and pass each candidate's runs joined with + as its scored_on entry:")
        lines += [f"  without {name}: -P records={','.join(recs)}" for name, recs in blind_to.items()]
    counts = sel.folds.groupby("chosen").size()
    lines.append("chosen per fold: " + ", ".join(f"[{i}] {n} fold(s)" for i, n in counts.items()))
    kept = sel.folds.get("kept")
    if len(sel.folds) <= FEW_FOLDS:  # name the subjects only where the folds are few
        for name, r in sel.folds.iterrows():
            again = "" if kept is None else f" (made again in {100 * r.kept:.0f}% of resamples)"
            shares = ", ".join(f"[{i}] {_pct(r[f'share_{i}'])}%" for i in range(1, len(sel.counts))) \
                if sel.min_share > 0 else ""
            lines.append(f"  {name}: [{r.chosen}] for {r.subjects}{again}"
                         + (f"; higher than [0] in {shares} of paired resamples" if shares else ""))
    else:
        for i in counts.index:
            if i != counts.idxmax():
                lines.append(f"  [{i}] chosen for: " + " ".join(sel.folds.index[sel.folds.chosen == i]))
        if kept is not None:
            lines.append(f"  each fold's choice made again in {100 * kept.min():.0f}–{100 * kept.max():.0f}% of "
                         f"resamples (median {100 * kept.median():.0f}%)")
    if kept is not None:
        lines.append("intervals of the cross-fitted choice: each fold's choice made again on every resample")
    lines += ["", *choice_differences_text(moved, len(seeds))]
    return "\n".join(lines)


def choice_differences(sel: Selection) -> pd.DataFrame:
    """Where the cross-fitted choice differs from candidate [0]: :func:`ecg_mlflow.analysis.count_differences`
    of each subject's counts under [0] against those under the candidate it took (both summed over
    the replicas), index ``subject``, with ``chosen``. Subjects that took [0] never appear; one that
    took another candidate appears where that candidate's V or S counts differ from [0]'s."""
    first = pd.DataFrame(sel.counts[0], index=sel.per_subject.index, columns=list(EC57_COUNTS))
    out = count_differences(first, sel.per_subject[list(EC57_COUNTS)])
    out.insert(0, "chosen", sel.per_subject.chosen.reindex(out.index))
    return out


def choice_differences_text(moved: pd.DataFrame, replicas: int = 1, n: int = MOVED_SUBJECTS) -> list[str]:
    """The summary's lines on :func:`choice_differences`: the ``n`` subjects whose counts moved most."""
    if moved.empty:
        return ["the cross-fitted choice counts as candidate [0] on every subject"]
    head = moved.head(n)
    shown = pd.DataFrame({"subject": head.index, "chosen": [f"[{i}]" for i in head.chosen],
                          **moved_columns(head)}).set_index("subject")
    summed = f", summed over the {replicas} seeds" if replicas > 1 else ""
    return [f"where the choice differs from [0] ([0] → the choice; the {min(n, len(moved))} of {len(moved)} "
            f"subjects whose V and S counts moved most{summed}):", shown.to_string()]


@dataclass
class SelectResult:
    run_id: str
    selection: Selection
    table: pd.DataFrame


# Parameters that say where or how a run ran, not what it computed: left out of candidate labels.
_NOT_OPTIONS = frozenset({"executor", "workers", "threads", "ray_address", "ray_gpus_per_task", "resume_run_id",
                          "base_run_id", "registry_prefix", "data_dir", "precision", "jit_compile"})


def _option_value(key: str, text: str) -> str:
    """A logged option as one spelling: ``mlflow run`` logs values as given (``1``, ``auto``), a run
    started by ``nested`` as the entry point parsed them (``1.0``, ``''`` for an automatic
    ``include_paced``); both mean the same."""
    text = tracking.logged_value(text)
    if key == "include_paced" and text == "":
        return "auto"
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _option_keys(run: LosoRun) -> set[str]:
    """The parameters of a run that say what it computed."""
    # data.* params describe the prepared dataset (digest, window), which the options already name.
    return {k for k in run.params if not k.startswith("data.")} - _NOT_OPTIONS


def candidate_labels(ids: list[str], runs: list[LosoRun]) -> list[str]:
    """Each candidate's run id(s) and the options in which the candidates differ, e.g.
    ``'<id> sveb_gate=0.99'`` (``'<id> (same options)'`` when they differ in none). An option a run
    did not log (it was made before the option existed) is left out of its label."""
    keys = sorted(set().union(*map(_option_keys, runs)))
    value = [{k: _option_value(k, r.params[k]) if k in r.params else None for k in keys} for r in runs]
    differ = [k for k in keys if len({v[k] for v in value}) > 1]

    def label(v: dict) -> str:
        if not differ:
            return "(same options)"
        return ", ".join(f"{k}={v[k]}" for k in differ if v[k] is not None) or f"(did not log {', '.join(differ)})"

    return [f"{rid} {label(v)}" for rid, v in zip(ids, value)]


REPLICA = "/"  # separates a candidate's replicas (the same options under other seeds) in loso_runs / scored_on


def _split_replicas(entries: list[str], what: str) -> list[list[str]]:
    """``['a+b/c+d', ...]`` -> ``[['a+b', 'c+d'], ...]``; every entry with as many replicas, no run twice."""
    reps = [[p.strip() for p in e.split(REPLICA)] for e in entries]
    if any(not p for r in reps for p in r):
        raise SelectError(f"{what}: an empty replica around a {REPLICA!r} in {entries}")
    try:  # no run pooled twice, no analysis listed twice, replicas included
        parse_run_ids(",".join(p for r in reps for p in r))
    except CompareError as exc:
        raise SelectError(f"{what}: {exc}") from None
    if len({len(r) for r in reps}) > 1:
        raise SelectError(f"{what}: every candidate needs the same number of replicas (one per seed, separated by "
                          f"{REPLICA!r}), got {[len(r) for r in reps]}")
    return reps


def _seed(run: LosoRun) -> str:
    """The seed a (pooled) LOSO run ran with, one spelling; '' where it did not log one."""
    return " | ".join(sorted({_option_value("seed", v) for v in run.params.get("seed", "").split(" | ")}))


def check_replicas(ids: list[list[str]], runs: list[list[LosoRun]], what: str) -> list[str]:
    """Replicas must be the same options under other seeds, replica ``k`` of every candidate under
    one seed (the rule compares seed by seed). Returns the seeds in replica order; refuses, naming
    the culprit, a replica whose seed is missing, repeated or not the other candidates', or whose
    options differ from its candidate's first replica in anything but the seed (of the options both
    logged: a run made before an option existed did not log it)."""
    seeds = [_seed(r) for r in runs[0]]
    if len(seeds) == 1:
        return seeds
    for i, (cand, reps) in enumerate(zip(ids, runs)):
        got = [_seed(r) for r in reps]
        for rid, sd in zip(cand, got):
            if not sd or "|" in sd:
                raise SelectError(f"{what} {i}: replica {rid!r} has no single seed (logged {sd!r}); replicas are "
                                  f"runs of the same options under other seeds")
        if len(set(got)) < len(got):
            raise SelectError(f"{what} {i}: replicas {cand} repeat a seed ({got}); each replica needs its own")
        if got != seeds:
            raise SelectError(f"{what} {i}: replicas {cand} ran with seeds {got}, candidate 0's with {seeds}; replica "
                              f"k of every candidate must run under the same seed")
        for rid, r in zip(cand[1:], reps[1:]):
            # Options both runs logged: a run made before an option existed ran without it.
            for k in sorted(_option_keys(reps[0]) & _option_keys(r) - {"seed"}):
                a, b = (_option_value(k, x.params[k]) for x in (reps[0], r))
                if a != b:
                    raise SelectError(f"{what} {i}: replica {rid!r} has {k}={b}, replica {cand[0]!r} {k}={a}; "
                                      "replicas differ in the seed only")
    return seeds


def select(loso_runs: str, folds: str = "subject", n_boot: int = N_BOOT, seed: int = 0, scored_on: str = "",
           min_share: float = 0.0, echo: bool = True) -> SelectResult:
    """Cross-fitted choice among candidate LOSO runs (comma-separated, ``a+b`` pools, ``a/b/c``
    replicas: the candidate's options under other seeds, see :func:`choose`); ``scored_on``: the
    runs each candidate is scored on, one entry per candidate in the same order and form (its
    ``+``-joined runs may overlap in patients, see :func:`fold_counts`; '' = the candidates' own runs);
    ``min_share``: the share of paired subject resamples a candidate must be higher in as well
    (:func:`cross_fitted_choice`; 0 = no such clause). Logs a ``select`` run (tag
    ``ecg.role=select``) with ``choices.csv``, ``per_subject.csv``, ``estimate.csv``,
    ``estimate.json``, ``choice_vs_first_by_subject.csv`` (:func:`choice_differences`) and
    ``summary.txt``. Everything is validated before the run is written."""
    if not isinstance(n_boot, int) or n_boot < 1:
        raise SelectError(f"bootstrap must be a positive whole number of resamples, got {n_boot!r}")
    if not isinstance(seed, int) or seed < 0:
        raise SelectError(f"seed must be a non-negative whole number, got {seed!r}")
    check_min_share(min_share)  # before any run is read
    ids = parse_run_ids(loso_runs)
    if len(ids) < 2:
        raise SelectError(f"loso_runs: a choice needs at least two candidates (comma-separated), got {ids}")
    score_ids = parse_run_ids(scored_on) if scored_on.strip() else ids
    if len(score_ids) != len(ids):
        raise SelectError(f"scored_on must give one entry per candidate: {len(ids)} candidates, "
                          f"{len(score_ids)} entries")
    reps, score_reps = _split_replicas(ids, "loso_runs"), _split_replicas(score_ids, "scored_on")
    if len(score_reps[0]) != len(reps[0]):
        raise SelectError(f"scored_on must give each candidate's {len(reps[0])} replica(s), got {len(score_reps[0])}")
    client = MlflowClient()
    loaded: dict[str, LosoRun] = {}

    def parts(entry: str) -> list[LosoRun]:
        for p in entry.split("+"):
            if p not in loaded:
                loaded[p] = load_loso_run(client, p, with_predictions=False)
        return [loaded[p] for p in entry.split("+")]

    runs_of = [[pool(parts(e)) for e in cand] for cand in reps]
    first = runs_of[0][0]
    scoring: list[list[list[ScoringRun]]] = []
    for cand in score_reps:  # an entry's runs may overlap in patients: not pooled, each kept whole
        scoring.append([])
        for entry in cand:
            for p in parts(entry):
                if p.labels != first.labels:
                    raise SelectError(f"scored_on: {p.run_id!r} has labels {p.labels}, {ids[0]!r} has {first.labels}")
            scoring[-1].append([ScoringRun(subject_count_table(p, VARIANT), base_training_subjects(client, p))
                                for p in parts(entry)])
    for rid, cand in zip(ids, runs_of):
        for r in cand:
            if r.labels != first.labels:
                raise SelectError(f"loso_runs: {rid!r} has labels {r.labels}, {ids[0]!r} has {first.labels}")
    seeds = check_replicas(reps, runs_of, "loso_runs candidate")
    for i, cand in enumerate(score_reps if len(seeds) > 1 else []):
        for k, entry in enumerate(cand):
            for p in parts(entry):
                if _seed(p) != seeds[k]:
                    raise SelectError(f"scored_on entry {i}: run {p.run_id!r} (replica {k}) ran with seed "
                                      f"{_seed(p)!r}, replica {k} of the candidates with {seeds[k]!r}")
    runs = [cand[0] for cand in runs_of]  # the first replica names each candidate
    tables = [[subject_count_table(r, VARIANT) for r in cand] for cand in runs_of]
    plan = subject_folds(list(tables[0][0].index), folds)
    sel = cross_fitted_choice(tables, plan, scoring, min_share, n_boot, seed)
    labels = candidate_labels(ids, runs)
    table, boot = estimate_table(sel, labels, n_boot, seed)
    sel.folds["kept"] = boot.kept(sel)
    # The scoring runs that would make each fold blind to its subjects; listed where the folds are few
    # enough to run them (not one per subject).
    blind_to = blind_records(list(first.children.patient.unique()), plan) if len(plan) <= FEW_FOLDS else None

    with tracking.run_to_log_into(runs[0].experiment_id, "select") as active, tempfile.TemporaryDirectory() as tmp:
        run_id = active.info.run_id
        mlflow.set_tags({"ecg.role": "select", "loso_run_ids": ",".join(ids),
                         **{f"loso_run_id.{i}": rid for i, rid in enumerate(ids)},
                         "scored_on": ",".join(score_ids),
                         "scored_without_fold": ",".join(sorted(set(sel.folds.scored_without_fold)))})
        logged = MlflowClient().get_run(run_id).data.params
        params = {"loso_runs": ",".join(ids), "folds": folds, "bootstrap": n_boot, "seed": seed,
                  "scored_on": scored_on, "min_share": min_share}
        mlflow.log_params({k: v for k, v in params.items() if k not in logged})  # `mlflow run` logged its own
        last = table.iloc[-1]
        metrics = {f"selected_{k}{suffix}": float(last[f"{k}{suffix}"]) for k in uncertainty.STATISTICS
                   for suffix in ("", "_ci_low", "_ci_high", "_vs_0")}
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        out = Path(tmp)
        sel.folds.to_csv(out / "choices.csv")
        sel.per_subject.to_csv(out / "per_subject.csv")
        table.to_csv(out / "estimate.csv", index=False)
        moved = choice_differences(sel)
        moved.to_csv(out / "choice_vs_first_by_subject.csv")
        doc = {"folds": folds, "rule": rule_text(seeds, min_share), "seeds": seeds if len(seeds) > 1 else None,
               "min_share": min_share,
               "candidates": labels, "scored_on": score_ids,
               "scored_without_fold": sel.folds.scored_without_fold.to_dict(),
               "choice_kept_in_resamples": sel.folds.kept.round(4).to_dict(),
               "records_without_fold": blind_to,
               "estimate": {k: _finite(last[k]) for k in uncertainty.STATISTICS},
               "counts": dict(zip(EC57_COUNTS, sel.pooled.sum(axis=0).tolist())),
               "choice_vs_first_by_subject": [{"subject": s, **{k: int(v) for k, v in r.items()}}
                                              for s, r in moved.iterrows()],
               "estimate_per_seed": {sd: {k: _finite(v) for k, v in replica_rates(sel, k).items()}
                                     for k, sd in enumerate(seeds)} if len(seeds) > 1 else None}
        (out / "estimate.json").write_text(json.dumps(doc, indent=1))
        text = summary_text(table, sel, folds, blind_to, seeds, moved=moved)
        (out / "summary.txt").write_text(text + "\n")
        mlflow.log_artifacts(tmp)
    if echo:
        print(text)
        print(f"\nselect run {run_id}: artifacts estimate.csv, estimate.json, choices.csv, per_subject.csv, "
              "choice_vs_first_by_subject.csv, summary.txt")
    return SelectResult(run_id, sel, table)
