"""``model.weights`` on the driver: MLflow URIs resolved to a file location, the transfer recorded on the run.

Every worker reads the starting weights itself (:func:`pipeline.weights.pretrained.load_initial_weights`), so
the driver hands them a plain path or an object-store URL (each worker downloads it): ``runs:/<run id>``
(or ``runs:/<run id>/best_checkpoint``) is that training run's ``best_checkpoint``;
``models:/<name>@<alias>`` or ``models:/<name>/<version>`` is the file the registered version was made
from (its ``checkpoint`` tag: the registry keeps only the pruned, fused network, which cannot be trained
further). The driver computes the transfer once and records it on the MLflow run: counts as params, the
source and its sha256 as lineage tags.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import names, storage
from pipeline.config import Config
from pipeline.storage import StorageError
from pipeline.weights.pretrained import PretrainedError, load_source, sha256_of, transfer
from pipeline.weights.published import published_weights
from yolov9 import build_model

log = logging.getLogger(__name__)


def resolve_weights(given: str, tracking_uri: str) -> str:
    """``model.weights`` -> the location of the file or checkpoint directory that holds the weights.

    Local paths and object-store URLs (checked to exist) are returned as given; MLflow URIs are looked up
    in the store at ``tracking_uri``; a published name (``yolov9-c``) is its file in the download cache.
    Raises PretrainedError naming the URI for anything it cannot resolve.
    """
    if given.startswith("runs:/"):
        path = _run_checkpoint(given, MlflowClient(tracking_uri))
    elif given.startswith("models:/"):
        path = _registered_source(given, MlflowClient(tracking_uri))
    else:
        path = published_weights(given)
    if storage.is_url(path):
        try:
            found = storage.exists(path)
        except StorageError as e:
            raise PretrainedError(f"model.weights: {e}") from e
        if not found:
            where = "" if path == given else f" ({given} points there)"
            raise PretrainedError(f"model.weights: nothing at {path}{where}")
        return path
    if not Path(path).exists():
        where = "" if path == given else f" ({given} points there)"
        raise PretrainedError(f"model.weights: no file or checkpoint directory at {path}{where}")
    return path


def _run_checkpoint(uri: str, client: MlflowClient) -> str:
    run_id, _, rest = uri.removeprefix("runs:/").partition("/")
    if not run_id or rest.strip("/") not in ("", names.BEST_CHECKPOINT_TAG):
        raise PretrainedError(
            f"model.weights {uri}: expected runs:/<run id> or runs:/<run id>/{names.BEST_CHECKPOINT_TAG} "
            "(a training run's best checkpoint)"
        )
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise PretrainedError(f"model.weights {uri}: no such run in the tracking store ({e.message})") from e
    path = run.data.tags.get(names.BEST_CHECKPOINT_TAG)
    if not path:
        raise PretrainedError(
            f"model.weights {uri}: the run has no '{names.BEST_CHECKPOINT_TAG}' tag "
            "(did its training finish?)"
        )
    return path


def _registered_source(uri: str, client: MlflowClient) -> str:
    reference = uri.removeprefix("models:/")
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = reference.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as e:
        raise PretrainedError(f"model.weights {uri}: no such registered model version ({e.message})") from e
    path = version.tags.get(names.SOURCE_CHECKPOINT_TAG)
    if not path:
        raise PretrainedError(
            f"model.weights {uri}: version {version.version} records no '{names.SOURCE_CHECKPOINT_TAG}' tag, "
            "and its pruned, fused network cannot be trained"
        )
    recorded = version.tags.get(names.LINEAGE_SHA256_TAG)
    try:
        changed = recorded and storage.is_file(path) and sha256_of(path) != recorded
    except StorageError as e:
        raise PretrainedError(f"model.weights {uri}: {e}") from e
    if changed:
        raise PretrainedError(
            f"model.weights {uri}: {path} has changed since version {version.version} was registered "
            f"(sha256 {recorded[:12]}... recorded)"
        )
    return path


def record_start_weights(cfg: Config, num_classes: int, tracking_uri: str, run_id: str) -> Config:
    """On the driver before any worker starts: ``cfg`` with ``model.weights`` resolved to a local path, the
    transfer into ``cfg.model.name`` with ``num_classes`` classes checked and recorded on MLflow run
    ``run_id`` (params: tensor counts; tags: source, path, sha256). A resumed run keeps its record and its
    path, or, when it trained from scratch, ignores ``model.weights`` (its checkpoint takes precedence)."""
    if cfg.model.weights is None:
        return cfg
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    recorded = run.data.tags.get(names.PRETRAINED_PATH_TAG)
    if recorded is not None:
        path = recorded
    elif run.data.metrics:  # a resumed run that trained without them: it goes on from its checkpoint
        log.info("resuming %s: model.weights is ignored", cfg.ray.run_name)
        return cfg
    else:
        path = resolve_weights(cfg.model.weights, tracking_uri)
        report = transfer(load_source(path), build_model(cfg.model.name, num_classes=num_classes))
        log.info(report.summary())
        for key, value in {
            names.PRETRAINED_LOADED: report.loaded,
            names.PRETRAINED_REINITIALISED: report.reinitialised,
            names.PRETRAINED_FRESH: report.fresh,
        }.items():
            client.log_param(run_id, key, value)
        for key, value in {
            names.PRETRAINED_SOURCE_TAG: cfg.model.weights,
            names.PRETRAINED_PATH_TAG: path,
            names.LINEAGE_SHA256_TAG: report.sha256,
        }.items():
            client.set_tag(run_id, key, value)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=path))
