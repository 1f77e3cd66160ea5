"""MLflow logging helpers: reachability check, epoch metrics, confusion matrices, Keras models.

Every function logs to the active run; the run tree itself is built by :mod:`ecg_mlflow.loso`.

``python -m ecg_mlflow.tracking`` checks that the tracking server of ``MLFLOW_TRACKING_URI``
answers (exit status 2 and one line naming it when it does not). ``make loso`` asks it first:
``mlflow run`` creates its run before an entry point starts, and MLflow's client retries an
unreachable server for about four minutes before it gives up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import tempfile
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np

import mlflow
from mlflow.models import infer_signature

ROLE_TAG = "ecg.role"


def check_tracking_server(timeout_s: float = 5.0) -> str:
    """The tracking URI in force, after checking that an HTTP server answers its ``/health``.

    Raises ``ConnectionError`` naming the URI when it does not, so no work starts against a
    server that cannot take the results.
    """
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise ConnectionError(f"tracking server {uri} answered {resp.status} on /health")
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403):  # an authenticated server is up, just asking for credentials
                raise ConnectionError(f"tracking server {uri} answered HTTP {exc.code} on /health") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(
                f"tracking server {uri} is unreachable ({exc}); start it or set MLFLOW_TRACKING_URI"
            ) from exc
    return uri


def log_new_params(params: dict[str, object]) -> None:
    """Log the params the active run does not have yet. ``mlflow run`` has already logged the entry
    point's parameters as given on the command line; logging them again with normalised values
    (``10`` vs ``10.0``) would be an error."""
    run = mlflow.get_run(mlflow.active_run().info.run_id)
    mlflow.log_params({k: v for k, v in params.items() if k not in run.data.params})


def log_epoch_metrics(epoch: int, logs: dict[str, float]) -> None:
    """Per-epoch training metrics on the active run, ``step`` = epoch (0-based)."""
    mlflow.log_metrics({k: v for k, v in logs.items() if np.isfinite(v)}, step=epoch)


def logged_value(text: str) -> str:
    """A parameter value as logged, read back: ``mlflow run`` logs each value shell-quoted (``''``
    for an empty string, ``'a b'`` for one with a space), the entry points log it as it is."""
    try:
        parts = shlex.split(text)
    except ValueError:  # an unbalanced quote: not shell-quoted
        return text
    return parts[0] if len(parts) == 1 else text


def params_with_parent(run) -> dict[str, str]:
    """The parameters MLflow run ``run`` ran with: its own over its parent's. A LOSO base or variant run
    logs few of its own; its LOSO (or ``transfer``) parent logs them all."""
    parent = run.data.tags.get("mlflow.parentRunId")
    return {**(mlflow.get_run(parent).data.params if parent else {}), **run.data.params}


def run_to_log_into(default_experiment_id: str, run_name: str):
    """The run a summary entry point (``compare``, ``blend``) logs into: the active one, the one
    `mlflow run` created (MLFLOW_RUN_ID), a new one in the active experiment
    (MLFLOW_EXPERIMENT_ID/NAME), or else a new one named ``run_name`` next to the runs it reads."""
    if mlflow.active_run() is not None:
        return contextlib.nullcontext(mlflow.active_run())
    if any(os.environ.get(k) for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")):
        return mlflow.start_run()
    return mlflow.start_run(experiment_id=default_experiment_id, run_name=run_name)


def log_confusion(cm: np.ndarray, classes: list[str], name: str = "confusion_matrix", title: str = "") -> None:
    """``<name>.json`` (``{"labels", "matrix"}``, rows = true, columns = predicted) and ``<name>.png``."""
    from ecg_mlflow.figures import plot_confusion

    mlflow.log_dict({"labels": list(classes), "matrix": np.asarray(cm).astype(int).tolist(),
                     "rows": "true", "columns": "predicted"}, f"{name}.json")
    fig = plot_confusion(np.asarray(cm), list(classes), title or name)
    mlflow.log_figure(fig, f"{name}.png")
    import matplotlib.pyplot as plt

    plt.close(fig)


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged Keras model (given, so MLflow skips slow inference)."""
    reqs = []
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "numpy"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    if not any(r.startswith("tensorflow") for r in reqs):
        raise RuntimeError("TensorFlow is not installed; cannot log a Keras model")
    return reqs


def log_keras_model(model, example_x, name: str = "model") -> str:
    """Log a Keras model under ``name`` with a signature inferred from ``example_x``: beats
    ``(k, window, leads)``, or a dict of named inputs for models that read several.

    Returns the logged model's URI.
    """
    if isinstance(example_x, dict):
        example_x = {k: np.asarray(v[:8], dtype=np.float32) for k, v in example_x.items()}
    else:
        example_x = np.asarray(example_x[:8], dtype=np.float32)
    import keras

    # The signature needs the output's shape and type, not its values: worked out symbolically
    # (any model, Sequential ones never called included), with no predict graph to trace.
    out = model.compute_output_spec(keras.tree.map_structure(
        lambda a: keras.KerasTensor(a.shape, dtype=str(a.dtype)), example_x))
    signature = infer_signature(example_x, np.zeros(out.shape, dtype=out.dtype))
    info = mlflow.keras.log_model(model, name=name, signature=signature, pip_requirements=pip_requirements())
    return info.model_uri


def log_json(obj: dict, path: str) -> None:
    mlflow.log_dict(obj, path)


def log_text_file(text: str, path: str) -> None:
    """Log ``text`` as artifact ``path`` (written through a temporary file)."""
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / Path(path).name
        p.write_text(text)
        mlflow.log_artifact(str(p), os.path.dirname(path) or None)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


if __name__ == "__main__":
    try:
        print(f"tracking store: {check_tracking_server()}")
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
