"""Model-registry entries: one registered model per patient (transfer) and per held-out subject (base).

Registry stages are deprecated, so versions carry tags and the alias :data:`ALIAS` points at the
newest one: ``models:/ecg-transfer-208@newest``.
"""

from __future__ import annotations

from mlflow import MlflowClient
import mlflow

ALIAS = "newest"


def transfer_model_name(prefix: str, record: str) -> str:
    return f"{prefix}-transfer-{record}"


def base_model_name(prefix: str, subject: str) -> str:
    return f"{prefix}-base-{subject}"


def register(model_uri: str, name: str, tags: dict[str, object], alias: str = ALIAS) -> str:
    """Register ``model_uri`` as a new version of ``name``, tag it, point ``alias`` at it; returns the version."""
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    MlflowClient().set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def source_run_id(model_uri: str) -> str | None:
    """The run that produced a model given as ``runs:/<id>/...``, ``models:/<name>@<alias>``,
    ``models:/<name>/<version>`` or ``models:/m-<logged model id>``; ``None`` when unknown."""
    client = MlflowClient()
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/"):].split("/", 1)[0]
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias).run_id
    if "/" in ref:
        name, version = ref.split("/", 1)
        return client.get_model_version(name, version).run_id
    return client.get_logged_model(ref).source_run_id
