"""The engine in one process, without Ray or DDP (``python -m jobs.train --local``): for debugging, a
notebook, or a single GPU. Same config, same checkpoint files, same MLflow metrics as a Ray run.

Checkpoints go to ``<ray.storage_path>/<ray.run_name>/local/checkpoint_<epoch>``; the best
``train.keep_checkpoints`` by val mAP and the latest are kept, and a rerun resumes from the latest.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline import names
from pipeline.checkpoint import RunCheckpoints, load_checkpoint, save_checkpoint
from pipeline.config import Config, ConfigError
from pipeline.tracking import log_epoch_metrics
from pipeline.training.loop import train
from pipeline.training.progress import epoch_summary, progress_hook
from pipeline.training.state import TrainingData, TrainState, build_train_state
from pipeline.training.step import StepHook

log = logging.getLogger(__name__)
LOCAL_DIR = "local"
METRICS_FILE = "metrics.json"  # beside checkpoint.pt: ranks checkpoints without loading their weights


def local_run_dir(cfg: Config) -> Path:
    if "://" in cfg.ray.storage_path:
        raise ConfigError(
            f"a local run keeps its checkpoints on this machine's disk; ray.storage_path is "
            f"{cfg.ray.storage_path} (give a local path)"
        )
    return Path(cfg.ray.storage_path) / cfg.ray.run_name / LOCAL_DIR


def fit_local(
    cfg: Config, tracking: tuple[str, str] | None = None, hooks: Sequence[StepHook] = ()
) -> RunCheckpoints:
    """Train ``cfg`` in this process (GPU when ``ray.use_gpu`` and one is present), resuming from the
    latest local checkpoint of the run; ``tracking`` is (MLflow URI, run id) for per-epoch metrics."""
    directory = local_run_dir(cfg)
    device = torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
    latest = _ranked(directory)[1]
    state = build_train_state(
        cfg, TrainingData.read(cfg.data.root), device, resume=load_checkpoint(latest) if latest else None
    )
    if latest:
        log.info("resuming %s from %s (epoch %d)", cfg.ray.run_name, latest, state.epoch)
    started, first_epoch = time.monotonic(), state.epoch

    def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
        path = directory / f"checkpoint_{state.epoch:06d}"
        path.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, state.checkpoint(metrics))
        (path / METRICS_FILE).write_text(json.dumps(metrics))
        _prune(directory, cfg.train.keep_checkpoints)
        if tracking is not None:
            log_epoch_metrics(*tracking, metrics)
        done = state.epoch - first_epoch
        eta = (time.monotonic() - started) / done * (cfg.train.epochs - state.epoch)
        log.info(epoch_summary(metrics, cfg.train.epochs, eta))

    train(state, on_epoch_end, [*hooks, progress_hook(cfg.train.progress_every_s)])
    best, latest = _ranked(directory)
    return RunCheckpoints(
        latest_path=str(latest) if latest else None,
        latest=load_checkpoint(latest) if latest else None,
        best_path=str(best[0]) if best else None,
        best=load_checkpoint(best[0]) if best else None,
    )


def _ranked(directory: Path) -> tuple[list[Path], Path | None]:
    """(checkpoint dirs by val mAP, best first; the latest one) of a local run."""
    found = sorted(p for p in directory.glob("checkpoint_*") if (p / METRICS_FILE).is_file())
    score = {p: json.loads((p / METRICS_FILE).read_text()).get(names.MAP, -1.0) for p in found}
    return sorted(found, key=lambda p: -score[p]), (found[-1] if found else None)


def _prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` best checkpoints and the latest."""
    best, latest = _ranked(directory)
    for path in best[keep:]:
        if path != latest:
            shutil.rmtree(path)
