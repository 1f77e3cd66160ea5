"""Where LOSO folds run: in this process, in local worker processes, or as Ray tasks.

A fold (one held-out subject) is described by a small, picklable :class:`FoldTask`: the path of
the prepared Parquet file, the subject, the configuration and where to log. It never carries beat
arrays; each worker process reads the dataset once, memory-mapped (:func:`worker_dataset`), and
logs its runs to the tracking store itself, as children of the LOSO parent run. What a fold
returns (:class:`FoldOutcome`) is small: per patient and variant the test metrics and the
confusion matrix, from which the parent computes the ``gross_*`` / ``avg_*`` metrics.

Executors (parameter ``executor``):

- ``auto`` (the entry point's default): ``local`` where that pays, else ``sequential``
  (:func:`resolve`), at the same thread count either way (cores / workers unless ``threads``);
- ``sequential``: folds one after the other in this process (the library's default);
- ``local``: ``workers`` processes started with the ``spawn`` method (a process that has started
  TensorFlow is never forked); a worker that dies fails only the fold it held, and is replaced;
- ``ray``: one Ray task per fold (``num_cpus=threads``, ``num_gpus=ray_gpus_per_task``) on the
  cluster at ``ray_address``, or on a local Ray instance sized for ``workers`` such tasks.

Every fold runs TensorFlow with ``threads`` intra-op threads (0 = automatic), in every executor:
the float rounding of a training step depends on how many threads split it, so only equal
thread counts let a seed repeat a run's numbers exactly (checked: 1 and 2 threads give weights
that differ in the last bits). N workers x ``threads`` should not exceed the cores.

The embedded SQLite store takes one writer at a time, and several processes that each open it
can fail with ``database is locked``. :func:`concurrent_store` therefore starts a private
``mlflow server`` on a free loopback port over the same SQLite file for ``local`` / ``ray``, so
that one process writes the database and the workers talk HTTP (with retries) to it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from ecg_mlflow.lifetime import watch_parent

EXECUTORS = ("auto", "sequential", "local", "ray")

# MLflow's HTTP client retries failed requests (connection refused, 5xx, 429) with exponential
# backoff. MLflow's defaults are 7 retries, factor 2 and a 120 s timeout. For a LOSO run that
# should ride out a tracking-server restart: the most retries MLflow accepts (10) and factor 1,
# so the first retries come after 2, 4, 8 s (a quick restart is picked up fast) and the last
# ones are spaced 120 s apart: about 8 minutes in all before a fold gives up. A 60 s timeout
# per request, so a hung server is retried rather than waited on for two minutes.
HTTP_RETRY_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
# Environment a worker needs from the parent (a Ray node does not inherit the driver's).
_FORWARDED_ENV = (*HTTP_RETRY_DEFAULTS, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                  "TF_CPP_MIN_LOG_LEVEL", "ECG_CACHE_DIR")


@dataclass(frozen=True)
class ExecConfig:
    """How folds are run (plain values). ``workers`` sizes the local pool and a local Ray instance."""

    executor: str = "sequential"
    workers: int = 2
    ray_address: str = ""  # "" = start a local Ray instance
    ray_gpus_per_task: float = 0.0
    threads: int = 0  # TensorFlow threads per fold; 0 = automatic (see resolved_threads)

    def validated(self) -> "ExecConfig":
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {self.executor!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, got {self.workers!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be a whole number >= 0 (0 = automatic), got {self.threads!r}")
        gpus = self.ray_gpus_per_task
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 64:
            raise ValueError(f"ray_gpus_per_task must be a number in [0, 64], got {gpus!r}")
        if self.executor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise ValueError("executor 'ray' needs the ray package: pip install -r requirements.txt") from None
        return self

    @property
    def resolved_threads(self) -> int:
        """Threads per fold: ``threads`` when set; else TensorFlow's own default (every core) for
        ``sequential`` (0), and the cores shared out among the workers for ``local`` and ``ray``.
        Call it on a configuration from :func:`resolve` (``auto`` is not an executor of its own)."""
        if self.executor == "auto":
            raise ValueError("executor 'auto' has no thread count until resolved (executors.resolve)")
        # 0 for sequential: leave TensorFlow's own default alone (fold_threads: every core).
        return 0 if self.executor == "sequential" and self.threads == 0 else fold_threads(self)

    def params(self) -> dict[str, object]:
        return {"executor": self.executor, "workers": self.workers, "ray_address": self.ray_address,
                "ray_gpus_per_task": self.ray_gpus_per_task, "threads": self.threads}


@dataclass(frozen=True)
class FoldTask:
    """One held-out subject, as a worker needs it: no arrays, only where to find and log things.

    ``done``: (record, variant) pairs already FINISHED (a resumed run skips them).
    ``base_model_uri`` / ``base_run_id``: a FINISHED base model to reuse instead of training one.
    """

    dataset_path: str
    subject: str
    config: Any  # ecg_mlflow.experiment.LosoConfig (not imported here: this module stays light)
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    done: frozenset = frozenset()
    base_model_uri: str | None = None
    base_run_id: str | None = None
    threads: int = 0
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class FoldOutcome:
    """What a fold sends back: the patient results it logged (``ecg_mlflow.experiment.PatientResult``),
    and ``error`` (one line) when it failed."""

    subject: str
    results: list = field(default_factory=list)
    error: str | None = None
    worker: str = ""


FoldFn = Callable[[FoldTask], FoldOutcome]
OnDone = Callable[[FoldTask, FoldOutcome], None]
OnStart = Callable[[FoldTask], None]


def _noop(task: FoldTask) -> None:
    return None


def http_retry_defaults() -> dict[str, str]:
    """Set :data:`HTTP_RETRY_DEFAULTS` in ``os.environ`` where the user has not; returns the values in force."""
    for k, v in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in HTTP_RETRY_DEFAULTS}


def forwarded_env() -> dict[str, str]:
    """The parent's settings a worker applies (retry policy, credentials, cache dir)."""
    return {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}


# ---------------------------------------------------------------------------------------------
# Inside a worker


_DATASETS: dict[str, Any] = {}
_CONFIGURED: dict[str, int] = {}


def configure_worker(threads: int, env: dict[str, str] | None = None) -> None:
    """Apply the parent's environment and cap TensorFlow's threads (once per process).

    TensorFlow fixes its thread pools when its runtime starts, so this runs before the first op.
    """
    for k, v in (env or {}).items():
        os.environ.setdefault(k, v)
    # A run id inherited from `mlflow run` would make mlflow.start_run() resume that run.
    os.environ.pop("MLFLOW_RUN_ID", None)
    if threads <= 0 or _CONFIGURED.get("threads") == threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        _CONFIGURED["threads"] = threads
    except RuntimeError:
        # The runtime already started in this process (a caller that used TensorFlow before
        # run_loso): its pools stay as they are, and the numbers may differ in the last digits.
        current = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
        if current != threads and _CONFIGURED.get("warned") != threads:
            print(f"[loso] note: TensorFlow already runs with {current} intra-op threads in this process, "
                  f"not threads={threads}; results may differ in the last digits from a fresh process",
                  flush=True)
            _CONFIGURED["warned"] = threads


def remember_dataset(ds: Any) -> None:
    """Make a dataset already loaded in this process available to :func:`worker_dataset`."""
    if ds.path is not None:
        _DATASETS[str(Path(ds.path).resolve())] = ds


def worker_dataset(path: str) -> Any:
    """The prepared dataset at ``path``, read (memory-mapped) once per process."""
    from ecg_mlflow.dataset import load

    key = str(Path(path).resolve())
    if key not in _DATASETS:
        _DATASETS[key] = load(key)
    return _DATASETS[key]


def _call_fold(fn: FoldFn, task: FoldTask) -> FoldOutcome:
    configure_worker(task.threads, task.env)
    try:
        outcome = fn(task)
    except Exception as exc:  # the fold's own runs were ended FAILED by their context managers
        traceback.print_exc()
        outcome = FoldOutcome(task.subject, [], f"{type(exc).__name__}: {exc}")
    outcome.worker = f"pid {os.getpid()}"
    return outcome


# ---------------------------------------------------------------------------------------------
# Executors: run(fn, tasks, on_done, on_start) calls on_start(task) when a fold is handed to a
# worker and on_done(task, outcome) when it ends, in completion order; a fold's failure is an
# outcome with an error, never an exception.


class SequentialExecutor:
    """Folds one after another in this process."""

    def run(self, fn: FoldFn, tasks: list[FoldTask], on_done: OnDone, on_start: OnStart = _noop) -> None:
        for task in tasks:
            on_start(task)
            on_done(task, _call_fold(fn, task))


def _local_worker(conn, threads: int, env: dict[str, str], parent: int) -> None:
    """A pool process: receive (fn, task), send back the outcome, until told to stop (None).
    Exits at once when ``parent`` (the LOSO process) is gone, killed without a chance to stop it."""
    watch_parent(parent, lambda: os._exit(1))
    # Before TensorFlow is imported (unpickling fn imports it): OpenMP/MKL pools too.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(threads, 1)))
    configure_worker(0, env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, task = job
        conn.send(_call_fold(fn, task))


@dataclass
class _Worker:
    process: Any
    conn: Any
    task: FoldTask | None = None


class LocalExecutor:
    """``workers`` spawned processes; each takes the next fold when it is free.

    A worker that dies (killed, out of memory, ``os._exit``) fails the fold it held, with its exit
    code; a fresh worker takes its place while folds are left.
    """

    def __init__(self, workers: int, threads: int):
        self.workers, self.threads = workers, threads
        self.ctx = multiprocessing.get_context("spawn")

    def _start(self) -> _Worker:
        parent_end, child_end = self.ctx.Pipe()
        p = self.ctx.Process(target=_local_worker, args=(child_end, self.threads, forwarded_env(), os.getpid()),
                             name="ecg-loso-worker", daemon=True)
        p.start()
        child_end.close()
        return _Worker(p, parent_end)

    def run(self, fn: FoldFn, tasks: list[FoldTask], on_done: OnDone, on_start: OnStart = _noop) -> None:
        pending = list(tasks)
        pool = [self._start() for _ in range(min(self.workers, len(pending)))]
        try:
            while pending or any(w.task for w in pool):
                for i, w in enumerate(pool):
                    if w.task is not None or not pending:
                        continue
                    if not w.process.is_alive():  # died while idle: replace it, nothing was lost
                        w.conn.close()
                        pool[i] = w = self._start()
                    w.task = pending.pop(0)
                    on_start(w.task)
                    print(f"[loso] subject {w.task.subject} -> worker pid {w.process.pid}", flush=True)
                    try:
                        w.conn.send((fn, w.task))
                    except OSError:  # it died just now; the sentinel below reports the fold failed
                        pass
                busy = [w for w in pool if w.task is not None]
                ready = wait_any([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for w in busy:
                    if w.conn not in ready and w.process.sentinel not in ready:
                        continue
                    task, outcome = w.task, None
                    try:
                        if w.conn.poll():
                            outcome = w.conn.recv()
                    except (EOFError, OSError):
                        outcome = None
                    if outcome is None:  # no answer: the process is gone
                        w.process.join(timeout=5)
                        outcome = FoldOutcome(task.subject, [], f"worker process pid {w.process.pid} died "
                                                                 f"(exit code {w.process.exitcode})",
                                              f"pid {w.process.pid}")
                        pool.remove(w)
                        if pending:
                            pool.append(self._start())
                    w.task = None
                    on_done(task, outcome)
        finally:
            for w in pool:
                with contextlib.suppress(OSError, BrokenPipeError):
                    w.conn.send(None)
            for w in pool:
                w.process.join(timeout=10)
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join(timeout=5)
                w.conn.close()


def _ray_fold(fn: FoldFn, task: FoldTask) -> FoldOutcome:
    return _call_fold(fn, task)


class RayExecutor:
    """One Ray task per fold on the cluster at ``address`` (or a local instance with ``workers`` CPUs).

    A task is not retried (``max_retries=0``): a worker that dies fails its fold, which a resume
    re-runs; retrying inside Ray would log a second set of runs for the same fold.
    """

    def __init__(self, address: str, workers: int, gpus_per_task: float, threads: int = 1):
        self.address, self.workers, self.gpus, self.threads = address, workers, gpus_per_task, threads

    def run(self, fn: FoldFn, tasks: list[FoldTask], on_done: OnDone, on_start: OnStart = _noop) -> None:
        import ray

        started = not ray.is_initialized()
        if started:
            if self.address:
                # An existing cluster: ship this package to its workers (the dataset path and the
                # tracking server must be reachable from every node).
                import ecg_mlflow

                ray.init(address=self.address, runtime_env={"py_modules": [os.path.dirname(ecg_mlflow.__file__)]})
            else:
                ray.init(num_cpus=self.workers * self.threads, include_dashboard=False,
                         object_store_memory=80 * 1024 * 1024, configure_logging=False)
        # A task holds as many CPUs as it runs TensorFlow threads, so Ray does not oversubscribe a node.
        remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus, max_retries=0)(_ray_fold)
        try:
            refs = {}
            for t in tasks:
                on_start(t)
                refs[remote.remote(fn, t)] = t
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    task = refs.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # WorkerCrashedError, TaskCancelledError, ...
                        outcome = FoldOutcome(task.subject, [], f"Ray task failed: {type(exc).__name__}: "
                                                                f"{str(exc).splitlines()[0] if str(exc) else ''}")
                    on_done(task, outcome)
        finally:
            if started:
                ray.shutdown()


# Below about this much base training (beats read: epochs x training beats, summed over the
# folds) a run finishes as soon in this process as on a pool, which takes about 15 s to start (a
# private tracking server, worker processes that each load TensorFlow and the dataset). Measured
# on a 2-core CPU at one thread per fold (bench/loso_parallel.py --threads 1): six subjects at 4
# epochs (252,000 beats) 72 s in this process against 59 s on the pool; at 1 epoch 54 s against
# 51 s; records 100,101,200 at 1 epoch 24 s against 37 s.
AUTO_MIN_WORK = 250_000


def resolve(cfg: ExecConfig, folds: int, work: int, tracking_uri: str, cores: int | None = None,
            gpus: int = 0) -> ExecConfig:
    """``cfg`` with executor ``auto`` made concrete for a run of ``folds`` folds whose base
    training reads ``work`` beats (epochs x training beats, summed over the folds); any other
    executor is returned as it is.

    Under ``auto`` every fold runs with ``threads`` TensorFlow threads, or when 0 with ``cores //
    workers`` (at least 1; ``cores`` default: this machine's), whichever way it runs: so a seed
    repeats a fold's numbers whether it ran on the pool or in this process, in a resume or with
    another run's base models. The folds run on a ``local`` pool of ``min(workers, folds)``
    processes when that is two or more, ``work`` is at least :data:`AUTO_MIN_WORK`, no GPU is
    seen (``gpus``: the GPUs TensorFlow sees; folds in separate processes would each claim the
    whole GPU's memory) and other processes can reach the store (not an in-memory
    ``sqlite://``); otherwise ``sequential``.
    """
    if cfg.executor != "auto":
        return cfg
    cores = (os.cpu_count() or 1) if cores is None else cores
    threads = fold_threads(cfg, cores)
    workers = min(cfg.workers, folds, max(1, cores // threads))
    shared = not tracking_uri.startswith("sqlite:") or _sqlite_file(tracking_uri) is not None
    if workers >= 2 and work >= AUTO_MIN_WORK and not gpus and shared:
        return replace(cfg, executor="local", workers=workers, threads=threads)
    return replace(cfg, executor="sequential", threads=threads)


def fold_threads(cfg: ExecConfig, cores: int | None = None) -> int:
    """The TensorFlow intra-op thread count every fold of a run under ``cfg`` runs with: ``threads``
    when set; else every core (``sequential``: TensorFlow's own default) or the cores shared out
    among the workers (``auto``, ``local``, ``ray``). ``cores`` default: this machine's. A seed
    repeats a fold's numbers only at the same count, which is why runs are compared by it."""
    cores = (os.cpu_count() or 1) if cores is None else cores
    if cfg.threads > 0:
        return cfg.threads
    return cores if cfg.executor == "sequential" else _cores_per_worker(cores, cfg.workers)


def _cores_per_worker(cores: int, workers: int) -> int:
    """The cores shared out among ``workers`` (at least one each): the thread count of 0."""
    return max(1, cores // workers)


def make_executor(cfg: ExecConfig) -> SequentialExecutor | LocalExecutor | RayExecutor:
    if cfg.executor == "local":
        return LocalExecutor(cfg.workers, cfg.resolved_threads)
    if cfg.executor == "ray":
        return RayExecutor(cfg.ray_address, cfg.workers, cfg.ray_gpus_per_task, cfg.resolved_threads)
    return SequentialExecutor()


# ---------------------------------------------------------------------------------------------
# A store that takes concurrent writers


def _sqlite_file(tracking_uri: str) -> str | None:
    """The database file of a ``sqlite:///path`` URI; None for an in-memory one (``sqlite://``,
    ``sqlite:///:memory:``), which no other process can open."""
    path = tracking_uri.split("?", 1)[0]
    db_file = path[len("sqlite:///"):] if path.startswith("sqlite:///") else ""
    return db_file if db_file and db_file != ":memory:" else None


def needs_private_server(tracking_uri: str, cfg: ExecConfig) -> bool:
    """True for an embedded SQLite store with parallel workers."""
    return tracking_uri.startswith("sqlite:") and cfg.executor != "sequential"


def check_store_for_executor(tracking_uri: str, cfg: ExecConfig) -> None:
    """Refuse combinations whose workers cannot reach the store: a SQLite file (served on this
    machine's loopback) with a Ray cluster elsewhere. Raises ``ValueError`` naming ``ray_address``."""
    if cfg.executor != "ray" or not cfg.ray_address or not tracking_uri.startswith(("sqlite:", "file:", "/")):
        return
    host = urlsplit(cfg.ray_address if "://" in cfg.ray_address else f"ray://{cfg.ray_address}").hostname or ""
    if cfg.ray_address not in ("auto", "local") and host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(
            f"ray_address={cfg.ray_address!r}: the nodes of a Ray cluster cannot write the local store "
            f"{tracking_uri}; start a tracking server they can reach (e.g. PostgreSQL-backed, "
            f"python -m ecg_mlflow.server --host 0.0.0.0 ...) and set MLFLOW_TRACKING_URI=http://<host>:<port>"
        )


@contextlib.contextmanager
def concurrent_store(tracking_uri: str, cfg: ExecConfig) -> Iterator[str]:
    """The tracking URI the workers log to.

    For a ``sqlite:`` URI with executor ``local`` / ``ray``: a private ``mlflow server`` on a free
    127.0.0.1 port over the same database file, for the duration of the block (then stopped), so
    the workers' writes are serialised by one process. Artifacts still go straight to the
    experiment's artifact location (a local directory for experiments created on the embedded
    store). Any other URI is returned as it is.
    """
    if not needs_private_server(tracking_uri, cfg):
        yield tracking_uri
        return
    from ecg_mlflow.server import start_server

    db_file = _sqlite_file(tracking_uri)
    if db_file is None:
        raise ValueError(f"executor {cfg.executor!r} needs a SQLite database file (sqlite:///path/to/mlflow.db), "
                         f"got MLFLOW_TRACKING_URI={tracking_uri!r}")
    log_dir = Path(tempfile.mkdtemp(prefix="ecg-loso-store-"))
    t0 = time.monotonic()
    # Artifacts of experiments created on the embedded store stay where they are (local paths);
    # the server's own artifact root is only used by experiments made through a server.
    server = start_server(backend_store_uri=tracking_uri,
                          artifacts_destination=str(Path(db_file).resolve().parent / "mlartifacts"),
                          log_path=log_dir / "server.log", timeout=120)
    print(f"[loso] {tracking_uri} is served to the workers by a private tracking server at {server.url} "
          f"(started in {time.monotonic() - t0:.1f} s)", flush=True)
    try:
        yield server.url
    finally:
        server.stop()


def describe(cfg: ExecConfig) -> str:
    """Where and how a configuration from :func:`resolve` runs its folds, in words."""
    n = cfg.resolved_threads
    threads = f"{n} TensorFlow thread(s) per fold" if n else "TensorFlow's own thread count (every core)"
    if cfg.executor == "local":
        return f"on a local pool of {cfg.workers} worker processes, {threads}"
    if cfg.executor == "ray":
        where = f"Ray cluster {cfg.ray_address}" if cfg.ray_address else \
            f"a local Ray instance ({cfg.workers * n} CPUs)"
        return f"as Ray tasks on {where}, {threads}, {cfg.ray_gpus_per_task:g} GPU(s) per task"
    return f"one after another in this process, {threads}"
