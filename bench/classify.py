"""Beats from a QRS detector against the reference beats: every transfer model of a LOSO run
classifies its record twice with ``classify`` (``beats=annotations``, then ``beats=detect``), and the
pooled figures of both are printed side by side, with two rows between them that take apart what
the detected beats lose: the reference beats each moved to the point of the detection that matches it
(where the windows sit), and the detected beats each moved to the point of the reference beat it
matches (which beats there are, hence the RR intervals).

Each record is classified from the LOSO run's fine-tune minutes on (``start_minute=auto``), so the
``annotations`` row repeats the LOSO run's transfer figures; the ``detect`` row says what a user
without reference annotations gets. EC57 gross statistics over the detected beats that a reference
beat matches (within 150 ms), plus how many reference beats were found (detection Se) and how many
detections were beats (detection +P). Asserts nothing. The classify runs go to the experiment
``--experiment`` (made if missing) of the store in ``MLFLOW_TRACKING_URI``.

    python bench/classify.py --loso-run <run id> [--data-dir DIR] [--experiment classify-bench]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without installing the package

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from ecg_mlflow.classify import (MATCH_S, ClassifyConfig, beat_dataset, beats_at, classify, load_model,  # noqa: E402
                                 match_beats)
from ecg_mlflow.dataset import record_part  # noqa: E402
from ecg_mlflow.filters import filtered  # noqa: E402
from ecg_mlflow.metrics import confusion, ec57_counts  # noqa: E402
from ecg_mlflow.records import read_record, resolve_data_dir  # noqa: E402
from ecg_mlflow.splits import TEST  # noqa: E402
from ecg_mlflow.training import BeatSource, predict_logits  # noqa: E402

MOVED = ("reference beats at detected points", "detected beats at reference points")


def moved_beats(record: str, model_uri: str, data_dir: str | None, detected: np.ndarray) -> dict[str, np.ndarray]:
    """The confusion matrices of ``record``'s test beats under the two :data:`MOVED` beat lists, each
    classified as ``classify`` would; ``detected``: the detections' samples at 360 Hz."""
    loaded = load_model(model_uri)
    rec = filtered(read_record(resolve_data_dir(data_dir), record), loaded.signal_filter)
    start = loaded.finetune_minutes or 0.0
    reference = record_part(rec, loaded.window, loaded.label_scheme, start, loaded.window_offset)
    matched = match_beats(detected, reference["sample"], int(round(MATCH_S * rec.fs)))
    hit = matched >= 0
    at_detected, at_reference = reference["sample"].copy(), detected.copy()
    at_detected[matched[hit]], at_reference[hit] = detected[hit], reference["sample"][matched[hit]]
    out = {}
    for name, peaks in zip(MOVED, (at_detected, at_reference)):
        part = beats_at(rec, np.unique(peaks), loaded.window, reference, loaded.window_offset)
        ds = beat_dataset(part, start, loaded.label_scheme, loaded.window, loaded.window_offset)
        rows = np.flatnonzero((ds.part == TEST) & (ds.label >= 0))
        logits = predict_logits(loaded.model, BeatSource.from_dataset(ds, loaded.recent_reference), rows)
        predicted = np.argmax(logits, axis=1)
        out[name] = confusion(ds.label[rows].astype(int), predicted, len(ds.classes))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loso-run", required=True, help="a finished LOSO run whose transfer models to use")
    p.add_argument("--data-dir", default=os.environ.get("ECG_DATA_DIR", ""), help="MIT-BIH records (default $ECG_DATA_DIR)")
    p.add_argument("--experiment", default="classify-bench", help="where the classify runs are logged")
    args = p.parse_args()
    client = mlflow.MlflowClient()
    loso = client.get_run(args.loso_run)
    variants = client.search_runs([loso.info.experiment_id],
                                  f"tags.loso_run_id = '{args.loso_run}' and tags.variant = 'transfer'")
    models = {}
    for run in variants:
        (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        models[run.data.tags["patient"]] = f"models:/{version.name}/{version.version}"
    if not models:
        print(f"bench/classify: LOSO run {args.loso_run} has no registered transfer model", file=sys.stderr)
        return 1
    mlflow.set_experiment(args.experiment)

    cms, found, reference, detected, seconds = {}, 0, 0, 0, {}
    for record in sorted(models):
        for beats in ("annotations", "detect"):
            t0 = time.perf_counter()
            done = classify(ClassifyConfig(record=record, model_uri=models[record], data_dir=args.data_dir or None,
                                           beats=beats))
            seconds[beats] = seconds.get(beats, 0.0) + time.perf_counter() - t0
            labelled = done.beats.label[done.rows] >= 0  # detected beats that no reference beat matches have none
            cm = confusion(done.beats.label[done.rows[labelled]].astype(int), done.predicted[labelled],
                           len(done.beats.classes))
            cms[beats] = cms.get(beats, 0) + cm
            if beats == "detect":
                found += int(done.metrics["n_matched"])
                reference += int(done.metrics["n_reference"])
                detected += int(done.metrics["n_classified"])
                for name, moved in moved_beats(record, models[record], args.data_dir or None,
                                               done.beats.sample).items():
                    cms[name] = cms.get(name, 0) + moved
        classes = done.beats.classes

    print(f"classify, {len(models)} records of LOSO run {args.loso_run}, transfer models, EC57 gross, %")
    print(f"{'beats':<36} {'VEB Se':>7} {'VEB +P':>7} {'SVEB Se':>8} {'SVEB +P':>8} {'beats scored':>13} "
          f"{'s/record':>9}")
    for beats in ("annotations", *MOVED, "detect"):
        cm = cms[beats]
        c = ec57_counts(cm, classes)
        stat = lambda tp, other: 100 * tp / (tp + other) if tp + other else float("nan")  # noqa: E731
        print(f"{beats:<36} {stat(c['veb_tp'], c['veb_fn']):7.2f} {stat(c['veb_tp'], c['veb_fp']):7.2f} "
              f"{stat(c['sveb_tp'], c['sveb_fn']):8.2f} {stat(c['sveb_tp'], c['sveb_fp']):8.2f} {int(cm.sum()):13,d} "
              + (f"{seconds[beats] / len(models):9.1f}" if beats in seconds else ""))
    print(f"detection: {found:,} of {reference:,} reference beats found (Se {100 * found / reference:.2f}), "
          f"{detected - found:,} of {detected:,} detections not a reference beat (+P {100 * found / detected:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
