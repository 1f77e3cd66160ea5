"""Entry point ``select``: an honest estimate of the best of several option sets (see ecg_mlflow.selection).

Each subject's figures come from the candidate LOSO run that scores best on the other subjects.
``mlflow run . -e select`` creates the run and passes its id in ``MLFLOW_RUN_ID``; the choice
resumes it. Every run and the folds are validated before anything is logged: bad input exits 2
with one line on stderr naming the culprit.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without installing the package

import argparse  # noqa: E402

from ecg_mlflow.cli import share, whole_number  # noqa: E402
from ecg_mlflow.analysis import N_BOOT, CompareError  # noqa: E402
from ecg_mlflow.selection import select  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="select", description=__doc__.splitlines()[0])
    p.add_argument("--loso-runs", required=True,
                   help="candidate LOSO parent run ids, comma-separated, the incumbent first (it wins ties); "
                        "a+b pools runs of different patients into one candidate; a/b/c gives a candidate's runs "
                        "under several seeds (it must then be higher than the first under each)")
    p.add_argument("--folds", default="subject",
                   help="'subject' (each subject's choice made on all the others), 'halves' or a number of groups")
    p.add_argument("--scored-on", default="",
                   help="the runs each candidate is scored on, in the same form and order (e.g. runs inside each "
                        "half, a+b; seeds separated by /); '' = the candidates' own runs")
    p.add_argument("--bootstrap", type=whole_number("bootstrap", minimum=1), default=N_BOOT,
                   help="bootstrap resamples for the confidence intervals")
    p.add_argument("--seed", type=whole_number("seed", minimum=0), default=0, help="seed of the bootstrap")
    p.add_argument("--min-share", type=share("min_share"), default=0.0,
                   help="a candidate must also be higher than the first in at least this share of paired subject "
                        "resamples of the subjects it is scored on, under each seed (0.9: 90 %%); 0 = no such clause")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        select(loso_runs=a.loso_runs, folds=a.folds, n_boot=a.bootstrap, seed=a.seed, scored_on=a.scored_on,
               min_share=a.min_share)
    except CompareError as exc:  # bad input: one line naming the culprit, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
