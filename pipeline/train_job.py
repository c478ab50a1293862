"""The training job end to end: data, Ray, MLflow run, Ray Train fit, final artifacts, summary."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import ray
import yaml
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import ema_model, load_checkpoint
from pipeline.config import Config
from pipeline.data import DataError, Manifest, read_manifest
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.data.synthetic import write_synthetic_dataset
from pipeline.plots import plot_curves
from pipeline.tracking import check_tracking_uri, resolve_tracking_uri, start_or_resume_run
from pipeline.train import MAP_KEY, fit
from pipeline.validate import render_predictions


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


def prepare_data(cfg: Config) -> tuple[Manifest, Manifest]:
    """The train and val manifests of ``data.root``; the synthetic set is generated there first when
    the config asks for it and the root holds none yet. Missing or broken data is a DataError."""
    root = Path(cfg.data.root)
    s = cfg.data.synthetic
    if s is not None and not manifest_path(root, "train").exists():
        print(
            f"generating the synthetic set ({s.num_train} train, {s.num_val} val images) in {root} ...",
            flush=True,
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
    train, val = read_manifest(manifest_path(root, "train")), read_manifest(manifest_path(root, "val"))
    if not coco_json_path(root, "val").is_file():
        raise DataError(
            f"{coco_json_path(root, 'val')} is missing: write the val split with jobs.make_shards"
        )
    if cfg.model.num_classes is not None and cfg.model.num_classes != train.num_classes:
        raise DataError(
            f"model.num_classes is {cfg.model.num_classes} but {train.path} lists {train.num_classes} classes"
        )
    if val.class_names != train.class_names:
        raise DataError(f"{val.path} and {train.path} list different class names")
    return train, val


def prediction_grid(state: dict[str, Any], cfg: Config, val_manifest: Manifest, count: int = 8) -> np.ndarray:
    """Validation images with true (green) and predicted (red) boxes of a checkpoint's EMA model."""
    loader = make_val_loader(
        val_manifest, batch_size=count, imgsz=cfg.train.imgsz, rank=0, world_size=1, num_workers=0
    )
    return render_predictions(
        ema_model(state), loader, coco_json_path(cfg.data.root, "val"), list(val_manifest.class_names), count
    )


# Ray Train settings for a Ray instance on this one machine. The preemption watcher is one more actor
# process per run (seconds of start-up on a small machine) watching for the drain of a node that an
# autoscaler is about to take back, and no autoscaler drains the only node of a local instance.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(address: str | None) -> None:
    """Attach to ``address`` or ``RAY_ADDRESS`` (a running cluster), else start a local instance on
    127.0.0.1. Its dashboard serves the state API that Ray Train needs to free stopped runs' resources."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
    else:
        # set before ray.init so that the instance's processes (Tune trials too) inherit it
        for name, value in LOCAL_RAY_TRAIN_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1")


def run_training(cfg: Config, loop_extras: dict[str, Any] | None = None) -> TrainingSummary:
    """Train ``cfg`` on Ray Train with MLflow tracking; rerun with the same run name to resume."""
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
            "dataset.manifest_hash": train_manifest.manifest_hash,
            "dataset.val_manifest_hash": val_manifest.manifest_hash,
            "model": cfg.model.name,
        },
    )
    client = MlflowClient(uri)
    ensure_ray(cfg.ray.address)
    client.set_tag(run_id, "ray.job_id", ray.get_runtime_context().get_job_id())
    try:
        result = fit(cfg, tracking=(uri, run_id), loop_extras=loop_extras)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    best = result.get_best_checkpoint(MAP_KEY, "max") if result.best_checkpoints else None
    latest = result.checkpoint
    latest_state: dict[str, Any] | None = None
    if latest is not None:
        with latest.as_directory() as d:
            latest_state = load_checkpoint(d)
    history: list[dict[str, float]] = latest_state["history"] if latest_state is not None else []
    with tempfile.TemporaryDirectory() as d:
        config_file = Path(d) / "config.yaml"
        config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        client.log_artifact(run_id, str(config_file))
        if history:
            client.log_artifact(run_id, str(plot_curves(history, Path(d) / "curves.png")))
        # the grid shows the best checkpoint, loaded a second time only when it is not the latest
        grid_state = latest_state
        if best is not None and (latest is None or best.path != latest.path):
            with best.as_directory() as ckpt:
                grid_state = load_checkpoint(ckpt)
        if grid_state is not None:
            grid = prediction_grid(grid_state, cfg, val_manifest)
            picture = Path(d) / "val_predictions.png"
            cv2.imwrite(str(picture), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
            client.log_artifact(run_id, str(picture))
    best_epoch = max(history, key=lambda h: h.get(MAP_KEY, -1.0)) if history else {}
    if best is not None:
        client.set_tag(run_id, "best_checkpoint", best.path)
    client.set_terminated(run_id, status="FINISHED")
    if cfg.mlflow.register and best is not None:
        from pipeline.registry import register_after_training  # onnx and friends load only when asked

        result = register_after_training(best.path, run_id, uri, cfg.mlflow.model_name)
        print(f"registered {result.model_uri}: {result.promotion.reason}", flush=True)
    return TrainingSummary(
        run_name=cfg.ray.run_name,
        storage_path=cfg.ray.storage_path,
        best_checkpoint=best.path if best is not None else None,
        latest_checkpoint=latest.path if latest is not None else None,
        best_map50_95=float(best_epoch.get(MAP_KEY, 0.0)),
        best_map50=float(best_epoch.get("val/map50", 0.0)),
        epochs=int(history[-1]["epoch"]) if history else 0,
        mlflow_uri=uri,
        mlflow_run_id=run_id,
    )
