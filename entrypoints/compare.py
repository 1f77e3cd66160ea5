"""Entry point ``compare``: transfer against no-transfer across patients (see ecg_mlflow.compare).

``mlflow run . -e compare`` creates the run and passes its id in ``MLFLOW_RUN_ID``; the
comparison resumes it. Every LOSO run is validated before anything is logged: a bad run id
exits 2 with one line on stderr naming the run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without installing the package

import argparse  # noqa: E402

from ecg_mlflow.cli import whole_number  # noqa: E402
from ecg_mlflow.compare import N_BOOT, CompareError, compare  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare", description=__doc__.splitlines()[0])
    p.add_argument("--loso-runs", default="",
                   help="LOSO parent run ids, comma-separated; a+b pools runs of different patients into one "
                        "analysis ('' = the newest FINISHED LOSO run)")
    p.add_argument("--experiment", default="",
                   help="experiment (name or id) searched when --loso-runs is empty ('' = active, then ecg-loso)")
    p.add_argument("--bootstrap", type=whole_number("bootstrap", minimum=0), default=N_BOOT,
                   help="bootstrap resamples for the confidence intervals")
    p.add_argument("--seed", type=whole_number("seed", minimum=0), default=0, help="seed of the bootstrap")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        compare(loso_runs=a.loso_runs, experiment=a.experiment, n_boot=a.bootstrap, seed=a.seed)
    except CompareError as exc:  # bad input: one line naming the culprit, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
