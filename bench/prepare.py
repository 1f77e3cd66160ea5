"""Time ``prepare`` on all 48 MIT-BIH records: cold (fresh cache directory) and cached.

Prints the median of a few runs and beats per second; asserts nothing. Targets: under 10 s
cold and under 1 s cached on a 2-core machine. "Cold" means nothing prepared yet; the
operating system's file cache is warm after the first run, as it is in practice.

    python bench/prepare.py [--data-dir DIR] [--cold-runs 3] [--cached-runs 5] [--workers N]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without installing the package

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from ecg_mlflow.dataset import PrepareConfig, prepare  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("ECG_DATA_DIR", ""),
                   help="MIT-BIH record directory (default $ECG_DATA_DIR)")
    p.add_argument("--cold-runs", type=int, default=3)
    p.add_argument("--cached-runs", type=int, default=5)
    p.add_argument("--workers", type=int, default=None, help="extraction processes (default: one per core)")
    args = p.parse_args()
    if not args.data_dir or not Path(args.data_dir, "100.hea").is_file():
        print(f"bench/prepare: no MIT-BIH records in {args.data_dir!r}; set ECG_DATA_DIR or --data-dir",
              file=sys.stderr)
        return 1

    def config(cache_dir: str) -> PrepareConfig:
        # every record (paced ones too), so the figure covers the whole database
        return PrepareConfig(data_dir=args.data_dir, records="all", include_paced=True, cache_dir=cache_dir,
                             download=False)

    cold, cached = [], []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as root:
        for i in range(args.cold_runs):
            cache_dir = os.path.join(root, f"cold-{i}")  # a fresh cache each time: a full build
            t0 = time.perf_counter()
            ds = prepare(config(cache_dir), workers=args.workers)
            cold.append(time.perf_counter() - t0)
        for _ in range(args.cached_runs):
            t0 = time.perf_counter()
            ds = prepare(config(cache_dir), workers=args.workers)
            cached.append(time.perf_counter() - t0)
        size_mb = ds.path.stat().st_size / 1e6

    n = len(ds)
    cold_s, cached_s = statistics.median(cold), statistics.median(cached)
    print(f"prepare, {len(ds.records)} records, {n} beats, window {ds.meta['window']}, "
          f"{os.cpu_count()} cores, file {size_mb:.0f} MB")
    print(f"  cold   median {cold_s:6.2f} s  ({n / cold_s:9,.0f} beats/s)  runs: "
          + ", ".join(f"{t:.2f}" for t in cold) + "   target < 10 s")
    print(f"  cached median {cached_s:6.2f} s  ({n / cached_s:9,.0f} beats/s)  runs: "
          + ", ".join(f"{t:.2f}" for t in cached) + "   target < 1 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
