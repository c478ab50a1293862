"""MLflow tracking of a training run: reachability check, run creation/resumption, metrics, artifacts.

The run is created on the driver before any worker starts (an unreachable server fails the job at
once). Per-epoch metrics are logged with ``log_epoch_metrics``: by pipeline.train.MlflowEpochLogger, a Ray
Train callback on the controller, once per persisted report (a restarted worker group neither loses nor
duplicates an epoch), or by the local run after each epoch.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.errors import PipelineError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(PipelineError, RuntimeError):
    """The MLflow tracking server or store cannot be used."""


def resolve_tracking_uri(configured: str | None) -> str:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else the local sqlite store, with a relative sqlite
    path made absolute against the current folder.

    Call it on the driver: Ray Tune runs each trial in a working directory of its own (and a Ray Train
    worker may run on another node), where a relative ``sqlite:///mlflow.db`` would open a new, empty
    database instead of the user's.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # sqlite:///relative/path.db -> sqlite:////absolute/path.db (SQLAlchemy's four-slash form)
        path, sep, query = uri.removeprefix("sqlite:///").partition("?")
        uri = f"sqlite:///{Path(path).expanduser().resolve()}{sep}{query}"
    return uri


def check_tracking_uri(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, with the URI in the message, if the store cannot be reached or written."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered /health with HTTP {response.status}")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable: {e}") from e
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLflow 3 refuses plain file stores ({uri}); use sqlite:///path.db or http://host:port"
        )


def experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name`` in the store at ``uri``, created if missing.

    On a sqlite store a new experiment keeps its artifacts in ``mlartifacts/`` next to the database file.
    MLflow's default is ``./mlruns`` of whatever folder the creating process runs in, which for a Ray job
    is a temporary working directory that disappears with the job.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        location = (folder / re.sub(r"[^A-Za-z0-9._-]", "_", name)).as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_or_resume_run(
    uri: str, experiment: str, run_name: str, storage_path: str, params: dict[str, Any], tags: dict[str, str]
) -> str:
    """The id of the unfinished MLflow run of this Ray run (same name and storage), or a new one."""
    client = MlflowClient(uri)
    exp_id = experiment_id(client, uri, experiment)
    query = f"tags.`{names.RUN_NAME_TAG}` = '{run_name}' and tags.`{names.STORAGE_TAG}` = '{storage_path}'"
    for run in client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"]):
        if run.info.status != "FINISHED":
            client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    run = client.create_run(
        exp_id,
        run_name=run_name,
        tags={names.RUN_NAME_TAG: run_name, names.STORAGE_TAG: storage_path, **tags},
    )
    items = [mlflow.entities.Param(k, str(v)) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):  # the server takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_epoch_metrics(uri: str, run_id: str, metrics: dict[str, Any]) -> None:
    """One epoch's numeric metrics, logged at step = ``metrics["epoch"]``."""
    epoch = int(metrics.get(names.EPOCH, 0))
    now_ms = int(time.time() * 1000)
    values = [
        mlflow.entities.Metric(k, float(v), now_ms, epoch)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and k != names.EPOCH
    ]
    MlflowClient(uri).log_batch(run_id, metrics=values)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr0": 0.01}}`` -> ``{"train.lr0": 0.01}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
