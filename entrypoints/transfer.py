"""Entry point `transfer`: fine-tune a base model's head on one patient, evaluate both variants."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ecg_mlflow import cli
from ecg_mlflow.experiment import LosoConfig
from ecg_mlflow.loso import run_transfer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    cli.add_prepare_args(p)
    cli.add_train_args(p)
    p.add_argument("--base-model-uri", required=True, help="runs:/<id>/model or models:/<prefix>-base-<subject>@newest")
    p.add_argument("--patient", required=True, help="the record to fine-tune on and evaluate")
    a = p.parse_args()
    run_transfer(LosoConfig(prepare=cli.prepare_config(a), train=cli.train_config(a),
                            registry_prefix=a.registry_prefix), a.base_model_uri, a.patient)


if __name__ == "__main__":
    cli.run_main(main)
