"""The engine in one process, without Ray or DDP (``python -m jobs.train --local``): for debugging, a
notebook, or a single GPU. Same config, same checkpoint files, same MLflow metrics as a Ray run.

Checkpoints go to ``<ray.storage_path>/<ray.run_name>/local/checkpoint_<epoch>``, with the epoch's pictures
beside them; the best ``train.keep_checkpoints`` by val mAP and the latest are kept (older ones are deleted
only once a newer one is complete), and a rerun resumes from the latest that loads. SIGTERM saves
``checkpoint_<epoch>_step<step>`` mid-epoch, which a rerun resumes at that step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline import names
from pipeline.checkpoint import (
    CheckpointError,
    RunCheckpoints,
    TrainingCheckpoint,
    load_checkpoint,
    newest_loadable,
    save_checkpoint,
)
from pipeline.config import Config, ConfigError
from pipeline.tracking import TrackingOutbox, artifact_record, epoch_record
from pipeline.training.artifacts import write_epoch_artifacts
from pipeline.training.loop import train
from pipeline.training.preemption import clear_stop_request, install_sigterm_handler, training
from pipeline.training.progress import epoch_summary, eta_s, progress_hook
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
    latest loadable local checkpoint of the run; ``tracking`` is (MLflow URI, run id) for per-epoch metrics
    and pictures, sent when the store answers and otherwise left to the job's end-of-run reconciliation."""
    directory = local_run_dir(cfg)
    device = torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
    latest_path, latest = _latest_loadable(directory)
    data = TrainingData.read(cfg.data.root, cfg.data.allow_pipe)
    state = build_train_state(cfg, data, device, resume=latest)
    if latest_path:
        log.info(
            "resuming %s from %s (epoch %d, step %d)", cfg.ray.run_name, latest_path, state.epoch, state.step
        )
    started, first_epoch = time.monotonic(), state.epoch
    outbox = TrackingOutbox(tracking[0]) if tracking is not None else None

    def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
        path = _save(directory / f"checkpoint_{state.epoch:06d}", state.checkpoint(metrics), metrics)
        pictures = write_epoch_artifacts(state, path)
        _prune(directory, cfg.train.keep_checkpoints)
        if outbox is not None:
            outbox.add(
                epoch_record(tracking[1], metrics), *(artifact_record(tracking[1], p) for p in pictures)
            )
            outbox.send(patience_s=0)  # one try: training does not wait for the server
        left = cfg.train.epochs - state.epoch
        done = state.epoch - first_epoch
        log.info(
            epoch_summary(metrics, cfg.train.epochs, eta_s(time.monotonic() - started, done, done + left))
        )

    def on_stop(state: TrainState) -> None:
        metrics = {names.PREEMPTED: float(state.step)}
        path = _save(
            directory / f"checkpoint_{state.epoch:06d}_step{state.step:09d}",
            state.checkpoint(metrics),
            metrics,
        )
        log.warning("stopped: saved %s; rerun to resume at step %d", path, state.step)

    with _sigterm_stops():
        train(state, on_epoch_end, [*hooks, progress_hook(cfg.train.progress_every_s)], on_stop=on_stop)
    best, last = _ranked(directory)
    return RunCheckpoints(
        latest_path=str(last) if last else None,
        latest=load_checkpoint(last) if last else None,
        best_path=str(best[0]) if best else None,
        best=load_checkpoint(best[0]) if best else None,
    )


def _save(path: Path, checkpoint: TrainingCheckpoint, metrics: dict[str, float]) -> Path:
    """Write a checkpoint folder; its metrics file, written last and atomically, marks it complete."""
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, checkpoint)
    tmp = path / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics))
    os.replace(tmp, path / METRICS_FILE)
    return path


def _latest_loadable(directory: Path) -> tuple[Path | None, TrainingCheckpoint | None]:
    """The newest complete checkpoint of a local run that loads, passing over (with a warning) any that do
    not (a truncated file, a missing one)."""
    found = sorted((p for p in directory.glob("checkpoint_*") if (p / METRICS_FILE).is_file()), reverse=True)
    loaded = newest_loadable(found, load_checkpoint)
    if loaded is not None:
        if loaded[0] != found[0]:
            log.warning("resuming from %s instead of the unreadable latest %s", loaded[0], found[0])
        return loaded
    if found:
        raise CheckpointError(f"no checkpoint in {directory} loads; see the warnings above")
    return None, None


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM requests a stop while training runs in this (main) thread; the previous handler after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    clear_stop_request()
    install_sigterm_handler()
    try:
        with training():
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
