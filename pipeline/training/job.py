"""The training job end to end: data, MLflow run, the fit (Ray Train, or local), final artifacts, summary."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline import names, storage
from pipeline.checkpoint import RunCheckpoints, TrainingCheckpoint, ema_model, load_checkpoint
from pipeline.config import Config, nms_settings
from pipeline.data import DataError, Manifest
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path, read_splits
from pipeline.data.synthetic import write_synthetic_dataset
from pipeline.evaluation.evaluate import Evaluation, evaluate_model, render_predictions
from pipeline.evaluation.table import write_artifacts
from pipeline.plots import drawn, plot_curves, write_rgb
from pipeline.tracking import (
    UNSENT_FILE,
    TrackingOutbox,
    TrackingRecord,
    check_tracking_uri,
    epoch_records,
    resolve_tracking_uri,
    start_or_resume_run,
)
from pipeline.training.artifacts import CURVES_PNG
from pipeline.training.local import fit_local, local_run_dir
from pipeline.weights.sources import record_start_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSummary:
    """Where a finished training put its results."""

    run_name: str
    storage_path: str
    best_checkpoint: str | None
    latest_checkpoint: str | None
    best_map50_95: float
    best_map50: float
    epochs: int
    mlflow_uri: str
    mlflow_run_id: str
    unsent_tracking: str | None = None  # records MLflow did not take (see jobs.sync_tracking)


def prepare_data(cfg: Config) -> tuple[Manifest, Manifest]:
    """The train and val manifests of ``data.root``; the synthetic set is generated there first when
    the config asks for it and the root holds none yet. Missing or broken data is a DataError."""
    root = cfg.data.root
    s = cfg.data.synthetic
    if s is not None and not storage.exists(manifest_path(root, "train")):
        log.info(
            "generating the synthetic set (%d train, %d val images) in %s ...", s.num_train, s.num_val, root
        )
        write_synthetic_dataset(
            root,
            num_train=s.num_train,
            num_val=s.num_val,
            image_size=s.image_size,
            seed=s.seed,
            shard_size=s.shard_size,
            overwrite=True,
        )
    train, val = read_splits(root, cfg.data.allow_pipe)
    if cfg.model.num_classes is not None and cfg.model.num_classes != train.num_classes:
        raise DataError(
            f"model.num_classes is {cfg.model.num_classes} but {train.path} lists {train.num_classes} classes"
        )
    return train, val


def prediction_grid(
    state: TrainingCheckpoint, cfg: Config, val_manifest: Manifest, count: int = 8
) -> np.ndarray:
    """Validation images of a checkpoint's EMA model: found objects, misses and false positives."""
    loader = make_val_loader(
        val_manifest, batch_size=count, imgsz=cfg.train.imgsz, rank=0, world_size=1, num_workers=0
    )
    return render_predictions(ema_model(state), loader, coco_json_path(cfg.data.root, "val"), count)


def run_training(
    cfg: Config, *, local: bool = False, loop_extras: dict[str, Any] | None = None
) -> TrainingSummary:
    """Train ``cfg`` with MLflow tracking, on Ray Train or (``local``) in this process without Ray; rerun
    with the same run name to resume. ``loop_extras`` goes to the Ray workers' loop config (its
    ``step_hooks`` to the local run too)."""
    train_manifest, val_manifest = prepare_data(cfg)
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_tracking_uri(uri)
    run_id = start_or_resume_run(
        uri,
        cfg.mlflow.experiment,
        cfg.ray.run_name,
        cfg.ray.storage_path,
        params=cfg.to_dict(),
        tags={
            names.MANIFEST_HASH_TAG: train_manifest.manifest_hash,
            names.VAL_MANIFEST_HASH_TAG: val_manifest.manifest_hash,
            "model": cfg.model.name,
        },
    )
    client = MlflowClient(uri)
    try:
        # workers get model.weights as a local path; the transfer is checked once, here
        cfg = record_start_weights(cfg, cfg.model.num_classes or train_manifest.num_classes, uri, run_id)
        if local:
            checkpoints = fit_local(
                cfg, tracking=(uri, run_id), hooks=(loop_extras or {}).get("step_hooks", ())
            )
        else:
            checkpoints = _fit_on_ray(cfg, client, (uri, run_id), loop_extras)
    except BaseException:
        outbox = TrackingOutbox(uri)
        outbox.add(TrackingRecord("status", run_id, value="FAILED"))
        _deliver(outbox, cfg, local, patience_s=min(cfg.train.tracking_patience_s, 30.0))
        raise
    history = checkpoints.latest.history if checkpoints.latest is not None else []
    unsent = _finish_tracking(uri, run_id, cfg, local, val_manifest, checkpoints)
    if cfg.mlflow.register and checkpoints.best_path is not None:
        _register(cfg, checkpoints.best_path, run_id, uri, local, tracking_complete=unsent is None)
    best_epoch = max(history, key=lambda h: h.get(names.MAP, -1.0)) if history else {}
    return TrainingSummary(
        run_name=cfg.ray.run_name,
        storage_path=cfg.ray.storage_path,
        best_checkpoint=checkpoints.best_path,
        latest_checkpoint=checkpoints.latest_path,
        best_map50_95=float(best_epoch.get(names.MAP, 0.0)),
        best_map50=float(best_epoch.get(names.MAP50, 0.0)),
        epochs=int(history[-1][names.EPOCH]) if history else 0,
        mlflow_uri=uri,
        mlflow_run_id=run_id,
        unsent_tracking=str(unsent) if unsent is not None else None,
    )


def _finish_tracking(
    uri: str, run_id: str, cfg: Config, local: bool, val_manifest: Manifest, checkpoints: RunCheckpoints
) -> Path | None:
    """Send what a finished run's MLflow run lacks: every epoch it does not hold yet (the live logger's
    queue dies with the run), the final artifacts, the best checkpoint's tag and FINISHED. Returns the file
    holding what could not be sent (None: all sent)."""
    history = checkpoints.latest.history if checkpoints.latest is not None else []
    outbox = TrackingOutbox(uri)
    outbox.add(*epoch_records(uri, run_id, history))
    _log_final_artifacts(outbox, run_id, cfg, val_manifest, checkpoints)
    if checkpoints.best_path is not None:
        outbox.add(TrackingRecord("tag", run_id, name=names.BEST_CHECKPOINT_TAG, value=checkpoints.best_path))
    outbox.add(TrackingRecord("status", run_id, value="FINISHED"))
    return _deliver(outbox, cfg, local, patience_s=cfg.train.tracking_patience_s)


def _register(
    cfg: Config, best_path: str, run_id: str, uri: str, local: bool, *, tracking_complete: bool
) -> None:
    """``mlflow.register: true``: register the run's best checkpoint, unless its tracking is incomplete
    (the registration would point at a run that lacks its record)."""
    if not tracking_complete:
        log.warning("not registering: the run's tracking is not complete in %s (see above)", uri)
        return
    from pipeline.registry.on_ray import register_after_training  # onnx and friends load only when asked

    # on Ray, the checks and the export run as a task with a training worker's resources, not here
    result = register_after_training(best_path, run_id, uri, cfg.mlflow.model_name, on_ray=not local)
    log.info("registered %s: %s", result.model_uri, result.promotion.reason)


def unsent_tracking_path(cfg: Config, local: bool) -> Path:
    """Where a run that could not reach MLflow leaves what it could not send: beside its checkpoints, or
    in the current folder when those are in object storage."""
    if "://" in cfg.ray.storage_path:
        return Path.cwd() / f"{cfg.ray.run_name}-{UNSENT_FILE}"
    return (local_run_dir(cfg) if local else Path(cfg.ray.storage_path) / cfg.ray.run_name) / UNSENT_FILE


def _deliver(outbox: TrackingOutbox, cfg: Config, local: bool, patience_s: float) -> Path | None:
    """Send the outbox, waiting up to ``patience_s`` for the server; what is left goes to the run's
    unsent-tracking file, whose path is returned (and said)."""
    if outbox.send(patience_s):
        return None
    path = outbox.write_unsent(unsent_tracking_path(cfg, local))
    log.warning(
        "MLflow %s did not answer for %.0f s (%s): the run's remaining tracking records are in %s; "
        "send them later with: python -m jobs.sync_tracking %s",
        outbox.uri, patience_s, outbox.last_error, path, path,
    )  # fmt: skip
    return path


def _fit_on_ray(
    cfg: Config, client: MlflowClient, tracking: tuple[str, str], loop_extras: dict[str, Any] | None
) -> RunCheckpoints:
    """Ray Train's fit; its latest and best checkpoints, loaded (from wherever Ray's storage is)."""
    import ray

    from pipeline.training.ray_train import ensure_ray, fit  # Ray Train loads only for a Ray run

    ensure_ray(cfg.ray.address)
    client.set_tag(tracking[1], names.RAY_JOB_TAG, ray.get_runtime_context().get_job_id())
    result = fit(cfg, tracking=tracking, loop_extras=loop_extras)
    best = result.get_best_checkpoint(names.MAP, "max") if result.best_checkpoints else None
    latest = result.checkpoint

    def load(checkpoint: Any) -> TrainingCheckpoint | None:
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_checkpoint(d)

    def location(checkpoint: Any) -> str | None:
        # Ray's path is within its file system ("bucket/run/checkpoint_..." on S3): make it a URL again
        return None if checkpoint is None else storage.url_of(checkpoint.filesystem, checkpoint.path)

    latest_state = load(latest)
    same = best is None or (latest is not None and best.path == latest.path)
    return RunCheckpoints(
        latest_path=location(latest),
        latest=latest_state,
        best_path=location(best),
        best=latest_state if same else load(best),
    )


def _log_final_artifacts(
    client: TrackingOutbox, run_id: str, cfg: Config, val_manifest: Manifest, checkpoints: RunCheckpoints
) -> None:
    """The config, the loss/mAP curves, a grid of the best checkpoint's val predictions and its full
    evaluation (per-class AP table, precision-recall curves, confusion matrix)."""
    with tempfile.TemporaryDirectory() as d:
        config_file = Path(d) / "config.yaml"
        config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        client.log_artifact(run_id, str(config_file))
        pictures = []
        if checkpoints.latest is not None and checkpoints.latest.history:
            history = checkpoints.latest.history
            pictures += drawn("the loss/mAP curves", lambda: plot_curves(history, Path(d) / CURVES_PNG))
        shown = checkpoints.best or checkpoints.latest
        if shown is not None:
            pictures += drawn(
                "the val prediction grid",
                lambda: write_rgb(prediction_grid(shown, cfg, val_manifest), Path(d) / names.PREDICTIONS_PNG),
            )
        for path in pictures:  # logged before the evaluation, which may fail on its own
            client.log_artifact(run_id, str(path))
        if shown is not None:
            for path in write_artifacts(_evaluation(shown, cfg, val_manifest), d):
                client.log_artifact(run_id, str(path))


def _evaluation(state: TrainingCheckpoint, cfg: Config, val_manifest: Manifest) -> Evaluation:
    """A checkpoint's EMA model evaluated in this process as validation does it."""
    loader = make_val_loader(
        val_manifest,
        batch_size=cfg.train.batch_size,
        imgsz=cfg.train.imgsz,
        rank=0,
        world_size=1,
        num_workers=0,
    )
    return evaluate_model(
        ema_model(state),
        loader,
        coco_json_path(cfg.data.root, "val"),
        torch.device("cpu"),
        **nms_settings(cfg.train),
    )
