"""Entry point `loso`: the whole leave-one-subject-out experiment (see ecg_mlflow.loso).

Folds run on an executor (auto, the default: a local process pool where it pays, else one after
another; sequential, local or Ray by name); --resume-run-id finishes an
interrupted or failed LOSO run; --base-run-id takes an earlier run's base models. Exit status 2: bad input (nothing logged); 1: some folds failed
(the run ended FAILED and the message says how to resume it).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ecg_mlflow import cli
from ecg_mlflow.loso import FoldsFailed, run_loso


def main() -> None:
    a = cli.loso_parser(description=__doc__).parse_args()
    try:
        run_loso(cli.loso_config(a))
    except FoldsFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run_main(main)
