"""Entry point `train_base`: the base model for one held-out subject (see ecg_mlflow.loso)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ecg_mlflow import cli
from ecg_mlflow.experiment import LosoConfig
from ecg_mlflow.loso import run_train_base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    cli.add_prepare_args(p)
    cli.add_train_args(p)
    p.add_argument("--holdout", required=True, help="the held-out subject (a record id; 202 means subject 201)")
    a = p.parse_args()
    run_train_base(LosoConfig(prepare=cli.prepare_config(a), train=cli.train_config(a),
                              registry_prefix=a.registry_prefix), a.holdout)


if __name__ == "__main__":
    cli.run_main(main)
