"""What a registration starts from: a checkpoint folder (local or a URL) and, when known, the MLflow run
and Ray job that produced it, resolved from what the user typed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import names, storage
from pipeline.errors import RegistrationError
from pipeline.storage import Location

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class CheckpointSource:
    """Where a checkpoint came from: its directory (a local Path or a URL) and, when known, the MLflow run
    that produced it."""

    checkpoint: Location
    run_id: str | None = None
    experiment_id: str | None = None
    ray_job_id: str | None = None


def resolve_source(source: Location, client: MlflowClient) -> CheckpointSource:
    """A checkpoint path, an MLflow run id (its ``best_checkpoint`` tag) or an experiment name (its
    most recent run carrying a ``best_checkpoint`` tag, parent runs first: a tune experiment's parent
    run points at the best trial's checkpoint) -> CheckpointSource. RegistrationError when it is none of
    these."""
    text = str(source)
    if storage.is_url(text) or Path(text).exists():
        return CheckpointSource(checkpoint=storage.locate(text))
    if _RUN_ID.match(text):
        try:
            run = client.get_run(text)
        except MlflowException as e:
            raise RegistrationError(
                f"{text} is no checkpoint path and no run of the tracking store: {e}"
            ) from e
        return source_of_run(run)
    experiment = client.get_experiment_by_name(text)
    if experiment is None:
        raise RegistrationError(
            f"{text!r} is neither a checkpoint path, an MLflow run id, nor an experiment name"
        )
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{names.BEST_CHECKPOINT_TAG} LIKE '%'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise RegistrationError(
            f"experiment {text!r} has no run with a '{names.BEST_CHECKPOINT_TAG}' tag (unfinished?)"
        )
    parents = [r for r in runs if names.PARENT_RUN_TAG not in r.data.tags]
    return source_of_run((parents or runs)[0])


def source_of_run(run: Any) -> CheckpointSource:
    path = run.data.tags.get(names.BEST_CHECKPOINT_TAG)
    if not path:
        raise RegistrationError(
            f"run {run.info.run_id} has no '{names.BEST_CHECKPOINT_TAG}' tag: did its training finish?"
        )
    return CheckpointSource(
        checkpoint=storage.locate(path),
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        ray_job_id=run.data.tags.get(names.RAY_JOB_TAG),
    )
