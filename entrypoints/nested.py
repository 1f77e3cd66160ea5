"""Entry point ``nested``: the cross-fitted choice among option sets, made end to end (see ecg_mlflow.nested).

Plans each candidate's LOSO run over all records and its runs blind to each fold, reuses finished
runs of the same options in the experiment, runs the rest nested under this run, then makes the
``select`` choice in this run. Exit status 2: bad input (nothing logged, one line naming the
culprit); 1: a LOSO run of the plan failed (rerun the same command: finished runs are reused);
130: interrupted (Ctrl-C or SIGTERM; the LOSO run under way is stopped the same way).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import argparse  # noqa: E402

from ecg_mlflow import cli  # noqa: E402
from ecg_mlflow.analysis import N_BOOT, CompareError  # noqa: E402
from ecg_mlflow.nested import PlanRunFailed, nested  # noqa: E402
from ecg_mlflow.records import DataError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nested", description=__doc__.splitlines()[0])
    p.add_argument("--candidates", required=True,
                   help="loso option sets separated by ';', each key=value pairs separated by spaces, the "
                        "incumbent first (it wins ties); an empty set = the defaults")
    p.add_argument("--common", default="", help="loso parameters every run shares, key=value separated by spaces")
    p.add_argument("--data-dir", default="", help="WFDB record directory (default: $ECG_DATA_DIR, else download cache)")
    p.add_argument("--records", default="all", help="record ids separated by commas, a set (half1, half2), or 'all'")
    p.add_argument("--folds", default="4", help="'halves' or a number of groups (2..8)")
    p.add_argument("--scoring-base-folds", type=cli.whole_number("scoring_base_folds"), default=4,
                   help="base_folds of each scoring run (0 = a base model per subject)")
    p.add_argument("--reuse", default="experiment",
                   help="where to look for finished LOSO runs of a planned run's options to reuse: "
                        "experiment (this run's), all (every experiment) or none")
    p.add_argument("--bootstrap", type=cli.whole_number("bootstrap", minimum=1), default=N_BOOT,
                   help="bootstrap resamples for the confidence intervals")
    p.add_argument("--seed", type=cli.whole_number("seed", minimum=0), default=0, help="seed of the bootstrap")
    p.add_argument("--seeds", default="",
                   help="LOSO seeds, comma-separated (e.g. 42,7,123): every run of the plan once per seed, and a "
                        "candidate replaces the first only if it scores higher under each; '' = the options' seed")
    p.add_argument("--min-share", type=cli.share("min_share"), default=0.0,
                   help="a candidate must also be higher than the first in at least this share of paired subject "
                        "resamples of the subjects it is scored on, under each seed (0.9: 90 %%); 0 = no such clause")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cli.stop_on_sigterm()
    try:
        nested(a.candidates, common=a.common, data_dir=a.data_dir, records=a.records, folds=a.folds,
               scoring_base_folds=a.scoring_base_folds, reuse=a.reuse.strip().lower(), n_boot=a.bootstrap, seed=a.seed,
               seeds=a.seeds, min_share=a.min_share)
    except PlanRunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (CompareError, ValueError, DataError, ConnectionError, FileNotFoundError) as exc:  # bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the LOSO run under way was stopped, this run ended FAILED
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
