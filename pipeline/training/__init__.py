"""The training engine, without Ray: state, step, epoch loop, progress. Ray Train
(``pipeline.training.ray_train``) runs it on N workers; ``pipeline.training.local`` in one process; the
training job (``pipeline.training.job``) prepares the data and tracking around either."""

from pipeline.training.loop import run_epoch, train, validate
from pipeline.training.preemption import StopRequested
from pipeline.training.progress import ProgressBar, ProgressLog, epoch_summary, progress_hook
from pipeline.training.state import TrainingData, TrainState, amp_dtype, build_train_state, restore
from pipeline.training.step import (
    BadStepGuard,
    EpochStats,
    StepEvent,
    StepHook,
    TrainingDiverged,
    train_one_epoch,
)

__all__ = [
    "BadStepGuard",
    "EpochStats",
    "ProgressBar",
    "ProgressLog",
    "StepEvent",
    "StepHook",
    "StopRequested",
    "TrainState",
    "TrainingData",
    "TrainingDiverged",
    "amp_dtype",
    "build_train_state",
    "epoch_summary",
    "progress_hook",
    "restore",
    "run_epoch",
    "train",
    "train_one_epoch",
    "validate",
]
