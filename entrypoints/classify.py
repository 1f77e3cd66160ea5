"""Entry point ``classify``: the beats of a record classified by a logged model (see ecg_mlflow.classify).

``mlflow run . -e classify`` creates the run and passes its id in ``MLFLOW_RUN_ID``; the
classification logs into it. The record, the model and the tracking server are checked before any
signal is read: bad input exits 2 with one line on stderr naming the culprit, and logs nothing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without installing the package

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from ecg_mlflow import cli  # noqa: E402
from ecg_mlflow.classify import BEATS, ClassifyConfig, classify, start_minute_from_param  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(prog="classify", description=__doc__.splitlines()[0])
    p.add_argument("--record", required=True, help="the record's name in the data directory, e.g. 103")
    p.add_argument("--model-uri", required=True,
                   help="models:/<prefix>-transfer-<record>@newest, models:/<prefix>-base-<subject>@newest or "
                        "runs:/<run id>/model")
    p.add_argument("--data-dir", default="", help="WFDB record directory (default: $ECG_DATA_DIR, else download cache)")
    p.add_argument("--beats", default="auto",
                   help=f"{', '.join(BEATS)}: the record's reference beats, or beats found by a QRS detector "
                        f"(auto: the reference beats where the record has a .atr file)")
    p.add_argument("--start-minute", type=cli.from_value_parser(start_minute_from_param), default=None,
                   help="classify beats from this minute on (auto: the model run's fine-tune minutes for a "
                        "record of the subject the model was made for, else 0)")
    a = p.parse_args()
    result = classify(ClassifyConfig(record=a.record, model_uri=a.model_uri, data_dir=a.data_dir or None,
                                     beats=a.beats.strip().lower(), start_minute=a.start_minute))
    counts = np.bincount(result.predicted, minlength=len(result.beats.classes))
    stats = [f"{name} {result.metrics[key]:.4f}" for key, name in (
        ("veb_se", "VEB Se"), ("veb_ppv", "VEB +P"), ("sveb_se", "SVEB Se"), ("sveb_ppv", "SVEB +P"),
        ("detect_se", "detection Se"), ("detect_ppv", "detection +P")) if key in result.metrics]
    print(f"classify: record {a.record}, {len(result.rows)} beats: "
          + ", ".join(f"{c} {n}" for c, n in zip(result.beats.classes, counts))
          + ("; " + ", ".join(stats) if stats else "") + f" (run {result.run_id})")

if __name__ == "__main__":
    cli.run_main(main)
