"""Entry point ``prepare``: build (or reuse) the beat dataset and log it to the MLflow run.

``mlflow run . -e prepare`` creates the run and passes its id in ``MLFLOW_RUN_ID``;
``mlflow.start_run()`` below resumes it. Parameters are checked and the dataset is built
before anything is logged, so a bad parameter or file ends the run with one line on stderr
and no artifacts.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without installing the package

import argparse  # noqa: E402

from ecg_mlflow.dataset import (  # noqa: E402
    PrepareConfig, include_paced_from_param, log_to_mlflow, prepare, window_from_param,
    window_offset_from_param,
)
from ecg_mlflow.records import DataError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prepare", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="", help="WFDB record directory ('' = $ECG_DATA_DIR, else download cache)")
    p.add_argument("--records", default="all", help="'all' or record ids separated by commas")
    p.add_argument("--label-scheme", default="aami", help="aami or raw")
    p.add_argument("--include-paced", default="auto", help="auto (out under aami), true or false")
    p.add_argument("--window", default="160", help="samples per beat window (a whole number)")
    p.add_argument("--window-offset", default="0",
                   help="samples the window moves back from centred: the R peak at index window // 2 + offset")
    p.add_argument("--finetune-minutes", default="10", help="minutes at the start of each record for fine-tuning")
    p.add_argument("--signal-filter", default="highpass", help="none, highpass (0.5 Hz) or bandpass (0.5-40 Hz)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """Parameters as a :class:`PrepareConfig`; ``ValueError`` naming the parameter when one is bad."""
    try:
        finetune_minutes = float(args.finetune_minutes)
    except ValueError:
        raise ValueError(f"finetune_minutes must be a positive number, got {args.finetune_minutes!r}") from None
    return PrepareConfig(
        data_dir=args.data_dir or None,
        records=args.records,
        label_scheme=args.label_scheme,
        include_paced=include_paced_from_param(args.include_paced),
        window=window_from_param(args.window),
        window_offset=window_offset_from_param(args.window_offset),
        finetune_minutes=finetune_minutes,
        signal_filter=args.signal_filter.strip().lower(),
    ).validated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ds = prepare(config_from_args(args), verbose=True)
    except (ValueError, DataError) as exc:
        # One line naming the parameter or file; the traceback would only bury it.
        print(f"prepare: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    meta = ds.meta
    print(f"prepare: {len(ds)} beats from {len(ds.records)} records, label scheme {meta['label_scheme']} "
          f"({', '.join(f'{i} {c}' for i, c in enumerate(ds.classes))}), digest {ds.digest}")
    if meta["paced_excluded"]:
        print(f"prepare: paced records left out: {', '.join(meta['paced_excluded'])} (include_paced=true keeps them)")
    if meta["missing_primary_lead"]:
        leads = ", ".join(f"{r} ({'/'.join(meta['leads'][r])})" for r in meta["missing_primary_lead"])
        print(f"prepare: records without an MLII lead (first stored lead used instead): {leads}")
    dropped = ds.summary().filter(like="dropped_").sum()
    print("prepare: dropped beats: " + ", ".join(f"{k.removeprefix('dropped_')} {int(v)}" for k, v in dropped.items()))

    import mlflow  # imported late: a bad parameter fails fast, without MLflow's start-up time

    with mlflow.start_run() as run:
        log_to_mlflow(ds, context="prepare")
    print(f"prepare: logged dataset {ds.digest} to run {run.info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
