"""Command-line plumbing shared by the entry points in ``entrypoints/``.

MLproject passes every parameter as text (``float`` parameters as ``"160.0"``), so the
parsers here accept integral floats for whole numbers and reject anything else with a
message that names the parameter.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) buries the entry points' own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from typing import Callable

from ecg_mlflow.dataset import (
    PrepareConfig, include_paced_from_param, window_from_param, window_offset_from_param,
)
from ecg_mlflow.lifetime import watch_parent_from_env
from ecg_mlflow.records import DataError

# TrainConfig is imported inside the functions that need it: it brings TensorFlow, which an
# entry point that only parses numbers (compare) should not pay for.


def whole_number(name: str, minimum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") from None
        if not value.is_integer() or (minimum is not None and value < minimum):
            at_least = "" if minimum is None else f" >= {minimum}"
            raise argparse.ArgumentTypeError(f"{name} must be a whole number{at_least}, got {text!r}")
        return int(value)

    return parse


def from_value_parser(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a parser that raises ``ValueError`` (such as those in ``dataset``)."""
    def wrapped(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return wrapped


def number(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None

    return parse


def share(name: str) -> Callable[[str], float]:
    """A share from 0 to 1 (``0.9`` for 90 %)."""
    def parse(text: str) -> float:
        value = number(name)(text)
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"{name} must be a share from 0 to 1 (0.9 for 90 %), got {text!r}")
        return value

    return parse


def boolean(name: str) -> Callable[[str], bool]:
    def parse(text: str) -> bool:
        value = text.strip().lower()
        if value not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{name} must be true or false, got {text!r}")
        return value == "true"

    return parse


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    d = PrepareConfig()
    p.add_argument("--data-dir", default="", help="WFDB record directory (default: $ECG_DATA_DIR, else download cache)")
    p.add_argument("--records", default="all", help="record ids separated by commas, or 'all'")
    p.add_argument("--label-scheme", default=d.label_scheme, help="aami or raw")
    p.add_argument("--include-paced", type=from_value_parser(include_paced_from_param), default=None,
                   help="auto (excluded under aami), true or false")
    p.add_argument("--window", type=from_value_parser(window_from_param), default=d.window,
                   help="samples per beat window")
    p.add_argument("--window-offset", type=from_value_parser(window_offset_from_param), default=d.window_offset,
                   help="samples the window moves back from centred: the R peak at index window // 2 + offset")
    p.add_argument("--finetune-minutes", type=number("finetune_minutes"), default=d.finetune_minutes)
    p.add_argument("--signal-filter", default=d.signal_filter,
                   help="none, highpass (0.5 Hz) or bandpass (0.5-40 Hz): applied to each record before beats are cut")


def add_train_args(p: argparse.ArgumentParser) -> None:
    from ecg_mlflow.training import TrainConfig

    d = TrainConfig()
    p.add_argument("--model", default=d.model)
    p.add_argument("--epochs", type=whole_number("epochs"), default=d.epochs)
    p.add_argument("--batch-size", type=whole_number("batch_size"), default=d.batch_size)
    p.add_argument("--learning-rate", type=number("learning_rate"), default=d.learning_rate)
    p.add_argument("--finetune-epochs", type=whole_number("finetune_epochs"), default=d.finetune_epochs)
    p.add_argument("--finetune-batch-size", type=whole_number("finetune_batch_size"), default=d.finetune_batch_size)
    p.add_argument("--finetune-learning-rate", type=number("finetune_learning_rate"), default=d.finetune_learning_rate)
    p.add_argument("--seed", type=whole_number("seed"), default=d.seed)
    p.add_argument("--class-weight", default=d.class_weight, help="none, balanced or sqrt (loss weight per class)")
    p.add_argument("--jit-compile", type=boolean("jit_compile"), default=d.jit_compile, help="XLA-compile training")
    p.add_argument("--finetune-layers", default=d.finetune_layers,
                   help="head, last (the last convolution and the head) or all: layers transfer re-trains")
    p.add_argument("--finetune-replay", type=whole_number("finetune_replay"), default=d.finetune_replay,
                   help="beats per class from the base-training subjects mixed into each fine-tune set")
    p.add_argument("--focal-gamma", type=number("focal_gamma"), default=d.focal_gamma,
                   help="0 = cross-entropy; gamma > 0: focal loss, each beat's cross-entropy times (1 - p)^gamma "
                        "(p: the probability of its true class), in base training and fine-tuning")
    p.add_argument("--ema", type=number("ema"), default=d.ema,
                   help="0 = off; m in (0, 1), e.g. 0.99: each training ends on the exponential moving average of "
                        "its weights (momentum m), in base training and fine-tuning")
    p.add_argument("--subject-balance", type=number("subject_balance"), default=d.subject_balance,
                   help="0 = off; p in (0, 1]: in base training a beat's loss weight inside its class goes as its "
                        "subject's count of that class to the power -p (1: each subject weighs the same)")
    p.add_argument("--finetune-premature", type=whole_number("finetune_premature"), default=d.finetune_premature,
                   help="made-up S beats added to each patient's fine-tune set: its own fine-tune N beats read with "
                        "the rhythm of S beats from the base-training subjects (0 = none)")
    p.add_argument("--finetune-replay-early", type=whole_number("finetune_replay_early"),
                   default=d.finetune_replay_early,
                   help="N beats that came early (previous RR under 0.9 of the local or five-minute mean), "
                        "from the base-training subjects, added to each fine-tune set (0 = none)")
    p.add_argument("--finetune-replay-select", default=d.finetune_replay_select,
                   help="random: each class's replayed beats drawn at random; nearest: those whose features in the "
                        "base model lie nearest the mean of the patient's fine-tune beats'")
    p.add_argument("--lr-schedule", default=d.lr_schedule,
                   help="constant, or cosine: each training's rate decays from its learning rate to 0 over its epochs")
    p.add_argument("--precision", default=d.precision, help="auto (mixed on a GPU), float32 or mixed")
    p.add_argument("--rr-features", default=d.rr_features,
                   help="all; relative: without the local mean RR in seconds (the heart rate); "
                        "long: all, plus previous and local RR over the average RR of about five minutes; "
                        "irregular: long, plus how irregular the rhythm is before the beat; "
                        "sequence: long, plus the last eight RR intervals over the five-minute average; "
                        "lagged: long, plus an irregularity that bigeminy and trigeminy leave low")
    p.add_argument("--dropout", type=number("dropout"), default=d.dropout,
                   help="dropout rate on the flattened beat features while training (0 = none)")
    p.add_argument("--finetune-blend", type=number("finetune_blend"), default=d.finetune_blend,
                   help="transfer weights = blend x fine-tuned + (1 - blend) x base weights (1 = fine-tuned only)")
    p.add_argument("--ensemble", type=whole_number("ensemble"), default=d.ensemble,
                   help="base models per fold (seeds seed, seed + 1, ...), each fine-tuned; their logits averaged")
    p.add_argument("--augment", type=number("augment"), default=d.augment,
                   help="strength of random gain, baseline shift and noise on training beats (0 = none)")
    p.add_argument("--augment-shift", type=whole_number("augment_shift"), default=d.augment_shift,
                   help="most samples (360 Hz) a training beat's window moves off its R peak, afresh every epoch "
                        "(0 = none); for beats from a QRS detector")
    p.add_argument("--sveb-gate", type=number("sveb_gate"), default=d.sveb_gate,
                   help="0 = off; q in (0, 1): transfer calls S only for beats that come earlier than q of "
                        "the training subjects' S beats (previous RR over local or five-minute mean RR)")
    p.add_argument("--sveb-regular", type=number("sveb_regular"), default=d.sveb_regular,
                   help="0 = off; q in (0, 1): transfer calls S only for beats whose rhythm before is no more "
                        "irregular than that before q of the training subjects' S beats")
    p.add_argument("--regular-measure", default=d.regular_measure,
                   help="the irregularity sveb_regular reads: successive (the change between successive RR "
                        "intervals) or lagged (the smallest over lags 1-3, which ectopic beats raise less)")
    p.add_argument("--early-sveb", type=number("early_sveb"), default=d.early_sveb,
                   help="0 = off; q in (0, 1): transfer calls S instead of N for beats in regular rhythm that come "
                        "earlier than all but q of the training subjects' N beats in regular rhythm "
                        "(previous RR over the five-minute average)")
    p.add_argument("--early-sveb-rate", type=number("early_sveb_rate"), default=d.early_sveb_rate,
                   help="0 = any rate; beats a minute (e.g. 100, tachycardia): early_sveb acts only where the "
                        "local heart rate (60 / local mean RR) is at least this")
    p.add_argument("--early-reference", default=d.early_reference,
                   help="what early_sveb reads the previous RR against: mean (the five-minute mean RR) or median "
                        "(the five-minute median RR, which runs of tachycardia pull down less)")
    p.add_argument("--sveb-af", type=number("sveb_af"), default=d.sveb_af,
                   help="0 = off; q in (0, 1): transfer calls no S where a detector of atrial fibrillation and "
                        "flutter, trained on the training subjects' rhythm annotations, reads the rhythm before the "
                        "beat so, at a threshold that would take S from q of their S beats")
    p.add_argument("--recent-reference", default=d.recent_reference,
                   help="recent_cnn reads each beat against the 20 beats before it (all) or the 20 before it "
                        "that came on time (ontime: previous RR at least 0.9 of the five-minute average)")
    p.add_argument("--kernel-size", type=whole_number("kernel_size"), default=d.kernel_size,
                   help="the convolutions' kernel in samples (360 Hz); 3 = the seed notebook's")
    p.add_argument("--width", type=whole_number("width"), default=d.width,
                   help="multiplies the convolutions' filters; 1 = the seed notebook's 16/32/64")
    p.add_argument("--core-window", type=whole_number("core_window"), default=d.core_window,
                   help="0 = off; c: the convolutions see only the c samples centred on the R peak, and a coarse "
                        "context branch reads the whole window (make it longer, e.g. --window 256 --window-offset 48)")
    p.add_argument("--registry-prefix", default="ecg", help="registered models are <prefix>-transfer-<record> ...")


def prepare_config(a: argparse.Namespace) -> PrepareConfig:
    return PrepareConfig(data_dir=a.data_dir or None, records=a.records, window=a.window,
                         window_offset=a.window_offset,
                         label_scheme=a.label_scheme, include_paced=a.include_paced,
                         finetune_minutes=a.finetune_minutes, signal_filter=a.signal_filter.strip().lower())


def train_config(a: argparse.Namespace):
    """The :class:`ecg_mlflow.training.TrainConfig` of parsed training arguments."""
    from ecg_mlflow.training import TrainConfig

    return TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.learning_rate,
                       finetune_epochs=a.finetune_epochs, finetune_batch_size=a.finetune_batch_size,
                       finetune_learning_rate=a.finetune_learning_rate, seed=a.seed,
                       class_weight=a.class_weight, jit_compile=a.jit_compile,
                       finetune_layers=a.finetune_layers.strip().lower(), precision=a.precision.strip().lower(),
                       lr_schedule=a.lr_schedule.strip().lower(),
                       finetune_replay=a.finetune_replay, finetune_replay_early=a.finetune_replay_early,
                       finetune_replay_select=a.finetune_replay_select.strip().lower(),
                       finetune_premature=a.finetune_premature, focal_gamma=a.focal_gamma, ema=a.ema,
                       subject_balance=a.subject_balance,
                       rr_features=a.rr_features.strip().lower(),
                       dropout=a.dropout, ensemble=a.ensemble,
                       finetune_blend=a.finetune_blend, augment=a.augment, augment_shift=a.augment_shift,
                       sveb_gate=a.sveb_gate, sveb_regular=a.sveb_regular,
                       regular_measure=a.regular_measure.strip().lower(), early_sveb=a.early_sveb,
                       early_sveb_rate=a.early_sveb_rate, early_reference=a.early_reference.strip().lower(),
                       sveb_af=a.sveb_af,
                       recent_reference=a.recent_reference.strip().lower(), kernel_size=a.kernel_size,
                       width=a.width, core_window=a.core_window)


def loso_parser(description: str | None = None, parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of the ``loso`` entry point (``entrypoints/loso.py``); ``nested`` checks its
    candidates' options with the same parser."""
    from ecg_mlflow.executors import EXECUTORS

    p = parser_class(description=description)
    add_prepare_args(p)
    add_train_args(p)
    p.add_argument("--holdout", default="all", help="subjects to hold out (record ids, commas), or 'all'")
    p.add_argument("--executor", default="auto",
                   help=f"where folds run: {', '.join(EXECUTORS)} (auto: local where two or more folds fit the cores, "
                        f"base training reads 250,000 beats or more and no GPU is seen; else sequential; "
                        f"threads 0 = cores / workers either way)")
    p.add_argument("--workers", type=whole_number("workers"), default=2,
                   help="worker processes (local) or CPUs of a local Ray instance")
    p.add_argument("--ray-address", default="", help="an existing Ray cluster (e.g. 10.0.0.5:6379); '' = local Ray")
    p.add_argument("--ray-gpus-per-task", type=number("ray_gpus_per_task"), default=0.0,
                   help="GPUs each Ray fold task asks for")
    p.add_argument("--threads", type=whole_number("threads"), default=0,
                   help="TensorFlow threads per fold; 0 = automatic (a seed repeats only at equal counts)")
    p.add_argument("--base-folds", type=whole_number("base_folds"), default=0,
                   help="0: a base model per held-out subject; k >= 2: k groups of subjects share one (quick runs)")
    p.add_argument("--evaluate-on", default="test",
                   help="test, or validation: the second half of the fine-tune minutes (for choosing options)")
    p.add_argument("--resume-run-id", default="", help="the id of an interrupted or failed LOSO run to finish")
    p.add_argument("--base-run-id", default="",
                   help="the id of a LOSO run whose base models to take (same data and base-training parameters)")
    return p


def loso_config(a: argparse.Namespace):
    """The :class:`ecg_mlflow.experiment.LosoConfig` of parsed ``loso`` arguments (not yet validated)."""
    from ecg_mlflow.executors import ExecConfig
    from ecg_mlflow.experiment import LosoConfig

    execution = ExecConfig(executor=a.executor.strip().lower(), workers=a.workers, ray_address=a.ray_address.strip(),
                           ray_gpus_per_task=a.ray_gpus_per_task, threads=a.threads)
    return LosoConfig(prepare=prepare_config(a), train=train_config(a), holdout=a.holdout,
                      registry_prefix=a.registry_prefix, execution=execution,
                      resume_run_id=a.resume_run_id.strip() or None, base_folds=a.base_folds,
                      evaluate_on=a.evaluate_on.strip().lower(), base_run_id=a.base_run_id.strip() or None)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Let SIGTERM (a process manager, ``timeout``, ``nested`` stopping its LOSO run) stop this
    process the way Ctrl-C does, so that its ``finally`` blocks run: fold workers and a private
    tracking server are stopped, and its run ends FAILED instead of staying RUNNING."""
    signal.signal(signal.SIGTERM, _interrupt)


def end_given_run_failed() -> None:
    """End the run this process was given (``MLFLOW_RUN_ID``, set by ``mlflow run`` or ``nested``)
    FAILED where it is still RUNNING: an entry point stopped before it began that run, whose parent
    may be gone (killed) and so cannot end it. Tries once, briefly: the process is on its way out."""
    run_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
    if not run_id:
        return
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # the store unreachable, the run gone: it stays as it is
        print(f"warning: could not end run {run_id} FAILED: {exc}", file=sys.stderr)


def run_main(main: Callable[[], object]) -> None:
    """Run an entry point; bad input exits 2 with one line naming the culprit, not a traceback;
    Ctrl-C or SIGTERM exits 130 after cleaning up, and so does the loss of a parent that asked this
    process to watch it (``nested``'s LOSO runs; :mod:`ecg_mlflow.lifetime`), even before the
    entry point began its run."""
    try:
        stop_on_sigterm()
        watch_parent_from_env()
        main()
    except (ValueError, DataError, ConnectionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        end_given_run_failed()
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
