"""Registration where the training ran: as a Ray task with one training worker's resources (a GPU node's
when it trained on GPUs), and the end-of-training hook (``mlflow.register: true``)."""

from __future__ import annotations

import logging
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline import names, storage
from pipeline.registry.register import RegistrationResult, register_source
from pipeline.registry.source import CheckpointSource
from pipeline.storage import Location
from pipeline.tracking import check_tracking_uri

log = logging.getLogger(__name__)


def task_resources(ray_config: dict[str, Any]) -> dict[str, float]:
    """Ray task options that give registration what one worker of the training had: its CPUs, and one GPU
    when it trained on GPUs (``ray_config``: a Config's ``ray`` section, as a dict or as run params)."""
    use_gpu = str(ray_config.get("use_gpu", False)).lower() == "true"
    return {"num_cpus": float(ray_config.get("cpus_per_worker", 1.0)), "num_gpus": 1.0 if use_gpu else 0.0}


def register_on_ray(
    src: CheckpointSource, name: str, tracking_uri: str, resources: dict[str, float], **options: Any
) -> RegistrationResult:
    """:func:`register_source` as a Ray task with ``resources`` (:func:`task_resources`), on the connected
    Ray cluster: loading, pruning, the mAP check and the export run on a worker node, a GPU one when the
    training had GPUs, while the driver on the head only waits. Not retried: a failed check is final."""
    import ray

    task = ray.remote(max_retries=0, **resources)(register_source)
    log.info("registering %s as a Ray task (%s)", src.checkpoint, resources)
    return ray.get(task.remote(src, name, tracking_uri, **options))


def source_run_resources(src: CheckpointSource, tracking_uri: str) -> dict[str, float]:
    """:func:`task_resources` of the training run that produced ``src`` (its ``ray.*`` params); one CPU
    when the source has no run (a bare checkpoint path)."""
    if src.run_id is None:
        return task_resources({})
    params = MlflowClient(tracking_uri).get_run(src.run_id).data.params
    return task_resources({k.removeprefix("ray."): v for k, v in params.items() if k.startswith("ray.")})


def register_after_training(
    checkpoint_dir: Location,
    run_id: str,
    tracking_uri: str,
    model_name: str,
    *,
    promote: bool = False,
    on_ray: bool = False,
) -> RegistrationResult:
    """The end-of-training hook (``mlflow.register: true``): register ``checkpoint_dir``, which training run
    ``run_id`` produced, logging the registration run into that run's experiment. ``on_ray``: as a Ray task
    with one training worker's resources (:func:`register_on_ray`), else in this process."""
    check_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    src = CheckpointSource(
        checkpoint=storage.locate(checkpoint_dir),
        run_id=run_id,
        experiment_id=run.info.experiment_id,
        ray_job_id=run.data.tags.get(names.RAY_JOB_TAG),
    )
    if on_ray:
        resources = source_run_resources(src, tracking_uri)
        return register_on_ray(src, model_name, tracking_uri, resources, promote=promote)
    return register_source(src, model_name, tracking_uri, promote=promote)
