"""Entry point ``blend``: the mean class probabilities of several LOSO runs' models on the same
patients, logged as a LOSO run that ``compare`` reads (see ecg_mlflow.blend).

Every run is checked before any model is loaded: a bad run id or runs that do not fit together
exit 2 with one line on stderr naming the run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without installing the package

import argparse  # noqa: E402

from ecg_mlflow import cli  # noqa: E402
from ecg_mlflow.blend import blend  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(prog="blend", description=__doc__.splitlines()[0])
    p.add_argument("--loso-runs", default="", help="two or more LOSO run ids of the same patients, comma-separated")
    p.add_argument("--data-dir", default="", help="WFDB record directory (default: $ECG_DATA_DIR, else download cache)")
    a = p.parse_args()
    blend(a.loso_runs, data_dir=a.data_dir or None)


if __name__ == "__main__":
    cli.run_main(main)
