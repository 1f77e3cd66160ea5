"""Training speed and where LOSO wall time goes, on the real MIT-BIH data.

Prints figures; asserts nothing. In one run it measures:

1. base-model training throughput (beats/s) of the seed notebook's path — its Sequential model
   (ReLU on the logits, as written) fitted with ``model.fit`` on NumPy arrays at batch 32 —
   against this project's path (``BeatSource`` tf.data pipeline, ``TrainConfig`` defaults and
   the variants given by ``--configs``), on the same beats and epochs, and the ratio of medians
   over ``--repeats`` interleaved repeats (this 2-core machine varies by tens of percent);
   and, unless ``--no-parallel``, the machine's throughput with two base models trained at once,
   one core each (how folds run with ``executor=local workers=2 threads=1``);
2. the time to prepare the dataset (cold, fresh cache directory; and cached);
3. the share of LOSO wall time spent in tracking calls (every MLflow call of a small in-process
   LOSO run is timed; a local SQLite store);
4. the wall time of a full default LOSO: measured with ``--full`` (20+ minutes here), otherwise
   estimated from the small run's per-subject time and labelled as an estimate. Its folds run one
   after another in this process, where the tracking calls can be timed; the ``loso`` entry
   point's ``executor=auto`` runs two at once on a machine with two cores or more (README, "Speed").

    python bench/training.py [--data-dir DIR] [--beats 40000] [--epochs 2] [--repeats 3]
                             [--configs 256,256+xla,1024,1024+xla] [--full]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script without installing the package

import argparse  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpu_description() -> str:
    """The CPU's model name and the vector extensions that set TensorFlow's CPU speed (Linux; else
    what ``platform`` knows): figures from machines with and without AVX-512 differ about 2x."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda name: next((line.split(":", 1)[1].strip() for line in info.splitlines()  # noqa: E731
                               if line.startswith(name)), "")
    flags = set(field("flags").split())
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    # oneDNN (TensorFlow's CPU kernels) can be held below what the CPU has; a figure should say so.
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return (f"{field('model name') or platform.machine()} ({' '.join(vector) or 'no AVX2'})"
            + (f", oneDNN held to {cap}" if cap else ""))


def seed_path_model(window: int, n_classes: int):
    """The notebook's model exactly as written (including ReLU on the logits)."""
    from tensorflow.keras import layers, models

    m = models.Sequential([
        layers.Input((window, 2)),
        layers.Conv1D(16, 3, activation="relu"), layers.MaxPool1D(2),
        layers.Conv1D(32, 3, activation="relu"), layers.MaxPool1D(2),
        layers.Conv1D(64, 3, activation="relu"), layers.MaxPool1D(2),
        layers.Flatten(), layers.Dense(32, activation="relu"), layers.Dense(n_classes, activation="relu"),
    ])
    import tensorflow as tf

    m.compile(optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
    return m


def epoch_timer() -> tuple[list[float], object]:
    """A list that fills with each epoch's wall time, and the ``on_epoch(epoch, logs)`` that fills it
    (the callback ``train_base`` takes; the seed path gets it through ``_EpochHook``)."""
    seconds, last = [], [time.perf_counter()]

    def on_epoch(epoch: int, logs: dict) -> None:
        seconds.append(time.perf_counter() - last[0])
        last[0] = time.perf_counter()

    return seconds, on_epoch


def steady_rate(n_beats: int, seconds: list[float]) -> float:
    """Beats/s of the epochs after the first (which pays tracing and compilation)."""
    return n_beats / float(np.median(seconds[1:]))


def _bench_source(ds, n: int):
    """A fixed random ``n`` beats of the dataset (seed 0) as a BeatSource, and its rows."""
    from ecg_mlflow.training import BeatSource

    idx = np.sort(np.random.default_rng(0).choice(len(ds), size=min(n, len(ds)), replace=False))
    templates, record_index, rr_patient = ds.patient_context()
    source = BeatSource(ds.x[idx], ds.label[idx], ds.rr_features()[idx], (templates, record_index[idx], rr_patient[idx]))
    return source, np.arange(len(idx))


def bench_training(ds, n: int, epochs: int, configs: list[tuple[int, bool]], repeats: int,
                   parallel: tuple[str | None, str] | None = None) -> None:
    """Throughput rows; ``parallel`` = (data_dir, cache dir) adds the two-models-at-once row."""
    import keras

    from ecg_mlflow.training import TrainConfig, _EpochHook, seed_everything, train_base

    source, rows = _bench_source(ds, n)
    x, y, idx, defaults = source.x_np, source.y_np, rows, TrainConfig()
    print(f"\n1. base training throughput: {len(idx)} beats; each measurement is {epochs} timed epoch(s) after a "
          f"first epoch that pays tracing; {repeats} interleaved repeat(s), median (min-max) shown")

    def seed_path() -> tuple[float, float]:
        # The seed normalised with min-max per lead; that cost is outside fit and not counted.
        keras.backend.clear_session()
        seed_everything(0)
        model, (seconds, on_epoch) = seed_path_model(ds.x.shape[1], len(ds.classes)), epoch_timer()
        hist = model.fit(x, y[:, None], batch_size=32, epochs=epochs + 1, verbose=0,
                         callbacks=[_EpochHook(on_epoch, "")])
        return steady_rate(len(idx), seconds), hist.history["accuracy"][-1]

    def ours(bs: int, jit: bool) -> tuple[float, float]:
        keras.backend.clear_session()
        cfg = TrainConfig(batch_size=bs, learning_rate=defaults.learning_rate * (bs / defaults.batch_size) ** 0.5,
                          jit_compile=jit, epochs=epochs + 1)
        seconds, on_epoch = epoch_timer()
        _, hist = train_base(source, rows, len(ds.classes), cfg, on_epoch=on_epoch)
        return steady_rate(len(idx), seconds), hist["accuracy"][-1]

    names = ["seed notebook path (fit on NumPy, batch 32)"] + [
        f"this project (batch {bs}{', XLA' if jit else ''}"
        f"{', default' if (bs, jit) == (defaults.batch_size, defaults.jit_compile) else ''})" for bs, jit in configs]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    both = "two models at once, one core each (batch 256)"
    if parallel is not None:
        runs[both] = []
    for _ in range(repeats):  # interleaved, so a change of load on the machine hits every path alike
        runs[names[0]].append(seed_path())
        for name, (bs, jit) in zip(names[1:], configs):
            runs[name].append(ours(bs, jit))
        if parallel is not None:  # machine throughput; the accuracy column does not apply
            runs[both].append((side_by_side(*parallel, len(idx), epochs), float("nan")))
    seed_median = float(np.median([r for r, _ in runs[names[0]]]))
    for name in runs:
        rates = [r for r, _ in runs[name]]
        med = float(np.median(rates))
        print(f"   {name:52s} {med:8.0f} beats/s ({min(rates):.0f}-{max(rates):.0f})   "
              f"acc {runs[name][-1][1]:.4f}   {med / seed_median:.2f}x".replace("acc nan   ", "acc   -      "))


def _side_by_side_worker(args: tuple) -> list[tuple[float, float]]:
    """One of the parallel trainers: one TensorFlow thread (as ``executor=local`` with
    ``threads=1`` gives each fold), the same beats and configuration as the single-model
    measurement. Returns (start, end) wall-clock times of every epoch."""
    data_dir, cache, n, epochs = args
    from ecg_mlflow.executors import configure_worker

    configure_worker(1)
    from ecg_mlflow.dataset import PrepareConfig, prepare
    from ecg_mlflow.training import TrainConfig, train_base

    ds = prepare(PrepareConfig(data_dir=data_dir, cache_dir=cache))
    source, rows = _bench_source(ds, n)
    times, last = [], [time.time()]

    def on_epoch(epoch: int, logs: dict) -> None:
        now = time.time()
        times.append((last[0], now))
        last[0] = now

    train_base(source, rows, len(ds.classes), TrainConfig(epochs=epochs + 1), on_epoch=on_epoch)
    return times


def side_by_side(data_dir: str | None, cache: str, n: int, epochs: int) -> float:
    """Machine throughput (beats/s) of two base models trained at once, one core each: how LOSO
    folds run on ``executor=local workers=2 threads=1``. The timed span runs from the earlier
    start of the first timed epoch to the later end of the last, so any time one trainer runs
    alone counts against the figure."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        runs = pool.map(_side_by_side_worker, [(data_dir, cache, n, epochs)] * 2)
    start, end = min(t[1][0] for t in runs), max(t[-1][1] for t in runs)
    return 2 * n * epochs / (end - start)


class CallTimer:
    """Wraps MLflow's logging functions and accumulates the time spent inside them."""

    NAMES = ["log_metrics", "log_metric", "log_params", "log_param", "set_tags", "set_tag", "log_dict", "log_text",
             "log_figure", "log_artifact", "log_input", "start_run", "end_run", "register_model", "get_run"]

    def __init__(self):
        self.total = 0.0
        self.by_name: dict[str, float] = {}

    def install(self) -> None:
        import mlflow
        import mlflow.keras

        targets = [(mlflow, n) for n in self.NAMES if hasattr(mlflow, n)] + [(mlflow.keras, "log_model")]
        from mlflow import MlflowClient

        targets.append((MlflowClient, "set_registered_model_alias"))
        for owner, name in targets:
            setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, fn, name):
        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                self.total += dt
                self.by_name[name] = self.by_name.get(name, 0.0) + dt
        return timed


def bench_loso(data_dir: str, cache: str, holdout: int, full: bool, store: str | None) -> None:
    import mlflow

    from ecg_mlflow.dataset import PrepareConfig
    from ecg_mlflow.loso import LosoConfig, run_loso
    from ecg_mlflow.splits import subject_of
    from ecg_mlflow.records import MITDB_RECORDS
    from ecg_mlflow.labels import PACED_RECORDS

    with tempfile.TemporaryDirectory() as tmp:
        where = os.path.abspath(store) if store else tmp  # --store keeps the run (and its results)
        os.makedirs(where, exist_ok=True)
        os.chdir(where)
        mlflow.set_tracking_uri(f"sqlite:///{where}/mlflow.db")
        mlflow.set_experiment("bench")
        subjects = list(dict.fromkeys(subject_of(r) for r in MITDB_RECORDS if r not in PACED_RECORDS))
        timer = CallTimer()
        timer.install()
        chosen = subjects if full else subjects[:holdout]
        cfg = LosoConfig(prepare=PrepareConfig(data_dir=data_dir, cache_dir=cache), holdout=",".join(chosen))
        print(f"\n3. tracking share: LOSO with default parameters, {len(chosen)} of {len(subjects)} held-out subjects"
              f"{' (the full run)' if full else ''}, base models trained on every other subject")
        t = time.perf_counter()
        run_loso(cfg)
        wall = time.perf_counter() - t
        print(f"   LOSO wall time {wall:.1f} s; tracking calls {timer.total:.1f} s = {100 * timer.total / wall:.1f} % of it")
        for name, sec in sorted(timer.by_name.items(), key=lambda kv: -kv[1])[:6]:
            print(f"      {name:28s} {sec:6.2f} s")
        print("\n4. full default LOSO (44 non-paced records, 43 subjects, base + transfer; folds one after another):")
        if full:
            print(f"   measured: {wall / 60:.1f} min")
        else:
            print(f"   estimate from {len(chosen)} subjects: {wall / len(chosen) * len(subjects) / 60:.1f} min "
                  f"(run with --full to measure)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("ECG_DATA_DIR", ""))
    p.add_argument("--beats", type=int, default=40000, help="beats for the throughput comparison")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per throughput measurement")
    p.add_argument("--configs", default="256,256+xla,1024,1024+xla",
                   help="this project's batch sizes to time, '+xla' for XLA compilation")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every throughput measurement")
    p.add_argument("--holdout", type=int, default=3, help="held-out subjects in the tracking-share run")
    p.add_argument("--full", action="store_true", help="time the full 43-subject LOSO (20+ minutes)")
    p.add_argument("--store", default="", help="directory whose mlflow.db keeps the LOSO run (default: a temporary one)")
    p.add_argument("--no-parallel", action="store_true",
                   help="leave out the row of two models trained at once, one core each")
    p.add_argument("--skip-training", action="store_true", help="skip the throughput comparison (1.)")
    a = p.parse_args()

    from ecg_mlflow.dataset import PrepareConfig, prepare

    print(f"machine: {os.cpu_count()} cores, {cpu_description()}")
    cache = tempfile.mkdtemp(prefix="bench-cache-")
    t = time.perf_counter()
    ds = prepare(PrepareConfig(data_dir=a.data_dir or None, cache_dir=cache))
    cold = time.perf_counter() - t
    t = time.perf_counter()
    prepare(PrepareConfig(data_dir=a.data_dir or None, cache_dir=cache))
    cached = time.perf_counter() - t
    configs = [(int(c.split("+")[0]), c.endswith("+xla")) for c in a.configs.split(",")]
    if not a.skip_training:
        bench_training(ds, a.beats, a.epochs, configs, a.repeats,
                       None if a.no_parallel else (a.data_dir or None, cache))
    print(f"\n2. prepare (aami, 44 records, {len(ds)} beats): cold {cold:.2f} s, cached {cached:.2f} s")
    bench_loso(a.data_dir or None, cache, a.holdout, a.full, a.store or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
