"""Entry point `loso`: the whole leave-one-subject-out experiment (see ecg_mlflow.loso)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ecg_mlflow import cli
from ecg_mlflow.loso import LosoConfig, run_loso


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    cli.add_prepare_args(p)
    cli.add_train_args(p)
    p.add_argument("--holdout", default="all", help="subjects to hold out (record ids, commas), or 'all'")
    a = p.parse_args()
    run_loso(LosoConfig(prepare=cli.prepare_config(a), train=cli.train_config(a), holdout=a.holdout,
                        registry_prefix=a.registry_prefix))


if __name__ == "__main__":
    cli.run_main(main)
