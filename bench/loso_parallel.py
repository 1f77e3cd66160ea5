"""Wall time of a small LOSO run: sequential against the local process pool, what executor auto
chose for it (and Ray, if asked); each variant's line says how its folds ran (the run's tag).

Each variant runs ``entrypoints/loso.py`` as a fresh process on a fresh SQLite store (a parallel
run on SQLite includes starting its private tracking server), after the dataset is prepared
once. Prints the figures; asserts nothing. The per-patient results are the same in every
variant at equal TensorFlow threads per fold (``--threads``); by default sequential runs with
every core and the pool and auto with cores / workers, so their last digits may differ.

    python bench/loso_parallel.py [--records 100,101,103,105] [--holdout all] [--epochs 2]
                                  [--finetune-epochs 5] [--workers 2] [--threads 0] [--ray]
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script without installing the package

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from mlflow import MlflowClient  # noqa: E402

from ecg_mlflow.dataset import PrepareConfig, prepare  # noqa: E402
from ecg_mlflow.loso import holdout_subjects  # noqa: E402
from ecg_mlflow.resume import EXECUTION_TAG  # noqa: E402


def how_it_ran(tracking_uri: str) -> str:
    """How the LOSO run in a fresh store ran its folds: its ``ecg.execution`` tag ('' if none)."""
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`ecg.role` = 'loso'")
    return runs[0].data.tags.get(EXECUTION_TAG, "") if runs else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("ECG_DATA_DIR", ""))
    p.add_argument("--records", default="100,101,103,105")
    p.add_argument("--holdout", default="all")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0,
                   help="TensorFlow threads per fold in every variant (0: each executor's own default)")
    p.add_argument("--ray", action="store_true", help="also time executor=ray on a local Ray instance")
    args = p.parse_args()
    if not args.data_dir or not Path(args.data_dir, "100.hea").is_file():
        print(f"bench/loso_parallel: no MIT-BIH records in {args.data_dir!r}; set ECG_DATA_DIR or --data-dir",
              file=sys.stderr)
        return 1

    variants = [("sequential", ["--executor", "sequential"]), (f"local, {args.workers} workers", ["--executor", "local"]),
                ("auto", ["--executor", "auto"])]
    if args.ray:
        variants.append((f"ray (local), {args.workers} CPUs", ["--executor", "ray"]))
    with tempfile.TemporaryDirectory(prefix="bench-loso-") as root:
        cache = Path(root) / "cache"
        ds = prepare(PrepareConfig(data_dir=args.data_dir, records=args.records, cache_dir=str(cache / "beats")))
        n_folds = len(holdout_subjects(ds, args.holdout))
        print(f"LOSO on records {args.records} (holdout {args.holdout}: {n_folds} folds, {len(ds)} beats), "
              f"epochs {args.epochs}, finetune_epochs {args.finetune_epochs}, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f}")
        common = ["--data-dir", args.data_dir, "--records", args.records, "--holdout", args.holdout,
                  "--epochs", str(args.epochs), "--finetune-epochs", str(args.finetune_epochs),
                  "--workers", str(args.workers), "--threads", str(args.threads)]
        times = {}
        for name, extra in variants:
            work = Path(root) / name.split(",")[0].split(" ")[0]
            work.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
            env.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", ECG_CACHE_DIR=str(cache),
                       TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(REPO / "entrypoints" / "loso.py"), *common, *extra],
                                  cwd=work, env=env, capture_output=True, text=True)
            times[name] = time.perf_counter() - t0
            status = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode}): {proc.stderr[-500:]}"
            how = how_it_ran(env["MLFLOW_TRACKING_URI"])
            status += f"   (folds ran {how})" if how else ""
            print(f"  {name:28s} {times[name]:7.1f} s   {status}", flush=True)
        base = times["sequential"]
        for name, t in times.items():
            if name != "sequential":
                print(f"  speed-up of {name}: {base / t:.2f}x (wall time includes process, worker and server start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
