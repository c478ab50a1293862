"""Distributed training of the dual-branch YOLOv9 on Ray Train: the glue between Ray and the engine.

``train_worker`` runs the engine (``pipeline.training``) on each Ray Train worker (DDP via Ray Train);
``fit`` builds the TorchTrainer from a Config and runs it. Rerunning ``fit`` with the same
``ray.run_name`` and ``ray.storage_path`` resumes from the latest checkpoint; ``ray.max_failures``
restarts a failed worker group from it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import names
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import Config, config_from_dict
from pipeline.training import (
    ProgressLog,
    TrainingData,
    TrainState,
    build_train_state,
    epoch_summary,
    train,
)

# Ray Train reads these from the driver's environment and hands them to its controller and workers.
# The controller acts on a report or on the end of training only when it next polls the workers,
# every 2 s by default: up to 2 s after each epoch's report and about 4 s at the end of every run.
# A poll is one tiny actor call per worker, so polling four times as often costs nothing measurable.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


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


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry: the engine's epoch loop on this worker's rank, resumed from Ray's latest
    checkpoint, reporting each epoch (rank 0 attaches the checkpoint). ``loop_config["step_hooks"]``
    adds step hooks (the tests' fault injection)."""
    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    resume = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(d, map_location=ray.train.torch.get_device())
    state = build_train_state(
        cfg,
        TrainingData.read(cfg.data.root),
        ray.train.torch.get_device(),
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        resume=resume,
        wrap=lambda model: ray.train.torch.prepare_model(model, move_to_device=False),
    )
    hooks = [*loop_config.get("step_hooks", []), ProgressLog(cfg.train.progress_every_s)]
    train(state, report_epoch, hooks)


def report_epoch(state: TrainState, metrics: dict[str, float]) -> None:
    """Report the epoch to Ray Train. Rank 0 reports the metrics and the checkpoint (every rank holds the
    same weights); the others report nothing, which keeps Ray's per-report log line short."""
    if state.rank != 0:
        ray.train.report({}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, state.checkpoint(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class EpochPrinter(ray.train.UserCallback):
    """One line per reported epoch (epoch, losses, mAP, images/s, ETA) in the job's log."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.started = time.time()  # wall clock: the callback runs in the controller process
        self.first_epoch: int | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        m = metrics[0]
        epoch = int(m[names.EPOCH])
        if self.first_epoch is None:
            self.first_epoch = epoch - 1
        eta = (time.time() - self.started) / max(epoch - self.first_epoch, 1) * (self.epochs - epoch)
        _controller_log().info(epoch_summary(m, self.epochs, eta))


def _controller_log() -> logging.Logger:
    """This module's logger in Ray Train's controller process, where Ray configures only ``ray.train``'s
    loggers: without a handler of its own, INFO lines would go nowhere (the workers' root logger has one)."""
    log = logging.getLogger(__name__)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


class MlflowEpochLogger(ray.train.UserCallback):
    """Logs rank 0's metrics of each persisted report to an MLflow run (step = epoch), on the controller.

    mlflow is imported at the first report, not with this module: Ray Train unpickles the run's callbacks
    in every worker too, where importing mlflow would add seconds to each worker's start.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        from pipeline.tracking import log_epoch_metrics

        if metrics:
            log_epoch_metrics(self.tracking_uri, self.run_id, metrics[0])


def fit(
    cfg: Config,
    tracking: tuple[str, str] | None = None,
    loop_extras: dict[str, Any] | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,
) -> ray.train.Result:
    """Run ``train_worker`` on ``cfg.ray.num_workers`` Ray Train workers; resumes a run of the same name.

    ``tracking`` is (MLflow tracking URI, run id) for per-epoch metrics. ``loop_extras`` adds keys
    to the loop config (``step_hooks``: the fault injection of the tests). Exports ``RAY_TRAIN_ENV`` to
    this process's environment where the variables are unset, for Ray Train to pass on.
    """
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)  # a value the user exported wins
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    # MLflow first: a Tune scheduler may end the trial as soon as it sees the report
    logger = [MlflowEpochLogger(*tracking)] if tracking is not None else []
    callbacks = [EpochPrinter(cfg.train.epochs), *logger, *(callbacks or [])]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), **(loop_extras or {})},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.ray.run_name,
            storage_path=cfg.ray.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=names.MAP,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
