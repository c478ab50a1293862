"""Distributed training on a real local Ray instance with a real sqlite MLflow store.

Each run is tiny (yolov9-t at 64 px, a few synthetic images, 2 epochs) but goes through everything
the real job does: Ray Train workers with DDP over gloo, shards, the dual loss, EMA, validation with
pycocotools, checkpoints and MLflow.
"""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_config
from pipeline.training import StepHook
from pipeline.training.job import run_training

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cost(110)]


def tiny_config(root: Path, shards: Path, name: str, *extra: str):
    return load_config(None, tiny_overrides(root, shards, name, *extra))


def tiny_overrides(root: Path, shards: Path, name: str, *extra: str) -> list[str]:
    """A 2-worker run of yolov9-t at 64 px, 2 epochs of 3 steps, in ``root`` (Ray storage, MLflow store)."""
    return [
        "model.name=yolov9-t",
        f"data.root={shards}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "train.epochs=2",
        "train.batch_size=2",
        "train.nominal_batch=4",
        "train.imgsz=64",
        "train.warmup_min_steps=2",
        "train.close_mosaic=1",
        "train.steps_per_epoch=3",
        "ray.num_workers=2",
        "ray.cpus_per_worker=1",
        f"ray.run_name={name}",
        f"ray.storage_path={root / 'ray'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "mlflow.experiment=tests",
        *extra,
    ]


def fail_once(marker: Path, epoch: int, batch: int, rank: int) -> StepHook:
    """A step hook that raises once (a marker file remembers it) after that step of that rank."""

    def hook(state, event) -> None:
        if (event.epoch, event.batch, state.rank) == (epoch, batch, rank) and not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError(f"injected worker failure at epoch {epoch}, batch {batch}")

    return hook


def epochs_logged(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "val/map50_95"))


def test_a_worker_failure_mid_epoch_restarts_from_the_checkpoint(tmp_path, tiny_shards, local_ray):
    cfg = tiny_config(tmp_path, tiny_shards, "flaky", "ray.max_failures=1")
    hook = fail_once(tmp_path / "failed-once", epoch=1, batch=1, rank=1)
    summary = run_training(cfg, loop_extras={"step_hooks": [hook]})

    assert (tmp_path / "failed-once").exists()
    assert summary.epochs == 2
    assert [h["epoch"] for h in load_checkpoint(summary.latest_checkpoint).history] == [1, 2]
    assert epochs_logged(summary.mlflow_uri, summary.mlflow_run_id) == [1, 2]


def test_rerunning_a_stopped_run_resumes_where_it_stopped(tmp_path, tiny_shards, local_ray):
    hook = fail_once(tmp_path / "stopped", epoch=1, batch=0, rank=0)
    with pytest.raises(Exception, match="injected worker failure"):
        run_training(
            tiny_config(tmp_path, tiny_shards, "resumable", "ray.max_failures=0"),
            loop_extras={"step_hooks": [hook]},
        )

    summary = run_training(tiny_config(tmp_path, tiny_shards, "resumable"))
    state = load_checkpoint(summary.latest_checkpoint)
    assert state.epoch == 2 and state.step == 6  # epoch 1 was not trained again
    assert [h["epoch"] for h in state.history] == [1, 2]
    assert epochs_logged(summary.mlflow_uri, summary.mlflow_run_id) == [1, 2]  # the same MLflow run goes on


def test_an_unreachable_tracking_server_fails_before_training(tmp_path, tiny_shards):
    cfg = tiny_config(tmp_path, tiny_shards, "offline", "mlflow.tracking_uri=http://127.0.0.1:9")
    with pytest.raises(RuntimeError, match="unreachable"):
        run_training(cfg)
    assert not (tmp_path / "ray").exists()
