"""The training engine, without Ray: state, step, epoch loop, progress. Ray Train (``pipeline.train``)
runs it on N workers; ``pipeline.training.local`` runs it in one process."""

from pipeline.training.loop import run_epoch, train, validate
from pipeline.training.progress import ProgressBar, ProgressLog, epoch_summary, progress_hook
from pipeline.training.state import TrainingData, TrainState, amp_dtype, build_train_state, restore
from pipeline.training.step import EpochStats, NonFiniteLossError, StepEvent, StepHook, train_one_epoch

__all__ = [
    "EpochStats",
    "NonFiniteLossError",
    "ProgressBar",
    "ProgressLog",
    "StepEvent",
    "StepHook",
    "TrainState",
    "TrainingData",
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
