"""Entry point `loso`: the whole leave-one-subject-out experiment (see ecg_mlflow.loso).

Folds run on an executor (sequential, a local process pool, or Ray); --resume-run-id finishes an
interrupted or failed LOSO run; --base-run-id takes an earlier run's base models. Exit status 2: bad input (nothing logged); 1: some folds failed
(the run ended FAILED and the message says how to resume it).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ecg_mlflow import cli
from ecg_mlflow.executors import EXECUTORS, ExecConfig
from ecg_mlflow.loso import FoldsFailed, LosoConfig, run_loso


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    cli.add_prepare_args(p)
    cli.add_train_args(p)
    p.add_argument("--holdout", default="all", help="subjects to hold out (record ids, commas), or 'all'")
    p.add_argument("--executor", default="sequential", help=f"where folds run: {', '.join(EXECUTORS)}")
    p.add_argument("--workers", type=cli.whole_number("workers"), default=2,
                   help="worker processes (local) or CPUs of a local Ray instance")
    p.add_argument("--ray-address", default="", help="an existing Ray cluster (e.g. 10.0.0.5:6379); '' = local Ray")
    p.add_argument("--ray-gpus-per-task", type=cli.number("ray_gpus_per_task"), default=0.0,
                   help="GPUs each Ray fold task asks for")
    p.add_argument("--threads", type=cli.whole_number("threads"), default=0,
                   help="TensorFlow threads per fold; 0 = automatic (a seed repeats only at equal counts)")
    p.add_argument("--base-folds", type=cli.whole_number("base_folds"), default=0,
                   help="0: a base model per held-out subject; k >= 2: k groups of subjects share one (quick runs)")
    p.add_argument("--evaluate-on", default="test",
                   help="test, or validation: the second half of the fine-tune minutes (for choosing options)")
    p.add_argument("--resume-run-id", default="", help="the id of an interrupted or failed LOSO run to finish")
    p.add_argument("--base-run-id", default="",
                   help="the id of a LOSO run whose base models to take (same data and base-training parameters)")
    a = p.parse_args()
    execution = ExecConfig(executor=a.executor.strip().lower(), workers=a.workers, ray_address=a.ray_address.strip(),
                           ray_gpus_per_task=a.ray_gpus_per_task, threads=a.threads)
    try:
        run_loso(LosoConfig(prepare=cli.prepare_config(a), train=cli.train_config(a), holdout=a.holdout,
                            registry_prefix=a.registry_prefix, execution=execution,
                            resume_run_id=a.resume_run_id.strip() or None, base_folds=a.base_folds,
                            evaluate_on=a.evaluate_on.strip().lower(), base_run_id=a.base_run_id.strip() or None))
    except FoldsFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run_main(main)
