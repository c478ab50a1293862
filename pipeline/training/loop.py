"""The epoch loop: the epoch's loader, the steps, validation of the EMA model when due, the metrics.

``train`` runs the remaining epochs of a :class:`TrainState` and hands each epoch's metrics to
``on_epoch_end`` (Ray Train reports and checkpoints there; the local run saves and logs there). A stop
request (SIGTERM) in the middle of an epoch goes to ``on_stop``, which saves the state as it is: its
``step`` is the loader position that ``train_one_epoch`` resumes from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pipeline import names
from pipeline.config import nms_settings
from pipeline.data.loader import Loader, RanksLoader, make_train_loader, make_val_loader
from pipeline.evaluation.evaluate import evaluate_distributed
from pipeline.training.pgi_diagnostics import pgi_diagnostics
from pipeline.training.preemption import StopRequested
from pipeline.training.state import TrainState
from pipeline.training.step import BadStepGuard, StepHook, train_one_epoch

EpochEnd = Callable[[TrainState, dict[str, float]], None]


def train(
    state: TrainState,
    on_epoch_end: EpochEnd,
    hooks: Sequence[StepHook] = (),
    on_stop: Callable[[TrainState], None] | None = None,
) -> None:
    """Train from ``state.epoch`` (or the step within it) to ``train.epochs``; ``on_epoch_end`` after each
    epoch. On a stop request (SIGTERM): ``on_stop``, then StopRequested is raised. Raises
    TrainingDiverged after ``train.max_bad_steps`` skipped steps in a row."""
    guard = BadStepGuard(state.cfg.train.max_bad_steps)
    while state.epoch < state.cfg.train.epochs:
        try:
            metrics = run_epoch(state, hooks, guard)
        except StopRequested:
            if on_stop is not None:
                on_stop(state)
            raise
        on_epoch_end(state, metrics)


def run_epoch(
    state: TrainState, hooks: Sequence[StepHook] = (), guard: BadStepGuard | None = None
) -> dict[str, float]:
    """Train one epoch (from ``state.step`` within it when resumed mid-epoch), validate when due, advance
    ``state`` (epoch, best mAP, history); the metrics, with ``epoch_end_time`` (Unix seconds) stamping the
    epoch so that every copy of it sent to MLflow is the same record."""
    cfg = state.cfg
    mosaic = state.epoch < cfg.train.epochs - cfg.train.close_mosaic
    loader = train_loader(state, mosaic)
    stats = train_one_epoch(state, loader, hooks, guard=guard, batch_ids=loader.last_image_ids)
    metrics = {f"{names.TRAIN_PREFIX}{k}": v for k, v in stats.losses.items()}
    # skipped samples are summed over ranks: the mean times the world size
    metrics.update({f"{names.DATA_PREFIX}{k}": float(v) * state.world for k, v in loader.stats().items()})
    metrics = mean_across_ranks(metrics, state.device)
    elapsed = max(stats.elapsed_s, 1e-9)
    metrics[names.TRAIN_LR] = state.optimizer.param_groups[1]["lr"]
    metrics[names.IMAGES_PER_S] = stats.images * state.world / elapsed
    metrics[names.WORLD_SIZE] = float(state.world)
    if state.resized_from is not None:
        metrics[names.RESIZED_FROM], state.resized_from = float(state.resized_from), None
    metrics[names.LOADER_WAIT] = stats.loader_wait_s / elapsed
    metrics[names.MOSAIC] = float(mosaic)
    metrics[names.SKIPPED_STEPS] = float(stats.skipped_steps)  # the same on every rank
    if state.scaler.is_enabled():
        metrics[names.AMP_SKIPPED_STEPS] = float(stats.amp_skipped_steps)
    # the values the loss really used, so a search can check what each trial trained with
    metrics[names.HP_AUX_WEIGHT] = state.loss_fn.weights["aux"]
    metrics[names.HP_LEAD_WEIGHT] = state.loss_fn.weights["main"]
    metrics[names.HP_TAL_TOPK] = float(state.loss_fn.assigner.topk)
    metrics[names.HP_LR0] = state.schedule.lr0
    state.epoch += 1
    if state.epoch % cfg.train.val_every == 0 or state.epoch == cfg.train.epochs:
        metrics.update(validate(state))
    elif state.history and names.MAP in state.history[-1]:
        metrics[names.MAP] = state.history[-1][names.MAP]
        metrics[names.MAP50] = state.history[-1][names.MAP50]
    every = cfg.train.pgi_diagnostics_every
    if every and state.epoch % every == 0:
        metrics.update(pgi_diagnostics(state))  # every rank runs it (see there); rank 0's are reported
    metrics[names.EPOCH] = state.epoch
    state.best_map = max(state.best_map, metrics.get(names.MAP, 0.0))
    metrics[names.BEST_MAP] = state.best_map
    metrics[names.EPOCH_END_TIME] = time.time()
    state.history.append({k: float(v) for k, v in metrics.items()})
    return metrics


def train_loader(state: TrainState, mosaic: bool) -> Loader | RanksLoader:
    """The run's train loader set to ``state.epoch``: made on the first call, so that its DataLoader
    workers (and their decoded shuffle buffers' processes) are started once per run, not once per epoch.
    A worker playing several data ranks (``state.ranks``) gets one loader per rank, zipped."""
    cfg = state.cfg
    if state.train_loader is None:
        loaders = [
            make_train_loader(
                state.data.train,
                batch_size=cfg.train.batch_size,
                imgsz=cfg.train.imgsz,
                rank=rank,
                world_size=state.data_world,
                num_workers=cfg.data.num_workers,
                epoch=state.epoch,
                seed=cfg.train.seed,
                augment=cfg.data.augment,
                mosaic=mosaic,
                steps_per_epoch=state.steps_per_epoch,
                shuffle_buffer=cfg.data.shuffle_buffer,
            )
            for rank in state.ranks
        ]
        state.train_loader = loaders[0] if len(loaders) == 1 else RanksLoader(loaders)
    state.train_loader.set_epoch(state.epoch, mosaic)
    return state.train_loader


def validate(state: TrainState) -> dict[str, float]:
    """The 12 COCO numbers of the EMA model's main branch on the whole val split (each rank scores its
    share), under their metric names."""
    cfg = state.cfg
    loader = make_val_loader(
        state.data.val,
        batch_size=2 * cfg.train.batch_size,  # no activations kept; NMS rounds cost per batch, not image
        imgsz=cfg.train.imgsz,
        rank=state.rank,
        world_size=state.world,
        num_workers=cfg.data.num_workers,
    )
    share_rank0_buffers(state.ema.module)
    scores = evaluate_distributed(
        state.ema.module,
        loader,
        state.data.val_coco_json,
        state.device,
        **nms_settings(cfg.train),
    )
    return {names.COCO_METRICS[k]: v for k, v in scores.items()}


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the process group (unchanged in one process)."""
    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def share_rank0_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics: each rank's last forward updated its own, and
    rank 0's EMA is the one checkpointed, so the mAP reported must be that model's."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
