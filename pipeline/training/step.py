"""One epoch of optimisation steps: AMP forward, the dual loss, gradient accumulation to the nominal
batch (DDP's gradient all-reduce only on the boundary step), clipping, the optimizer and the EMA."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pipeline.training.state import TrainState


@dataclass(frozen=True)
class StepEvent:
    """What a step hook sees after step ``batch`` (0-based) of the epoch; ``loss_sums`` (device tensor)
    holds the running sums of ``[total, *loss parts]`` named by ``loss_names``."""

    epoch: int  # 0-based epoch being trained
    batch: int
    steps: int  # steps in this epoch
    images: int  # images this worker has trained on this epoch
    elapsed_s: float
    loss_sums: torch.Tensor
    loss_names: tuple[str, ...]


StepHook = Callable[[TrainState, StepEvent], None]


@dataclass(frozen=True)
class EpochStats:
    """One worker's epoch: mean losses (``total`` and each part), images, seconds, seconds waiting on data."""

    losses: dict[str, float]
    images: int
    elapsed_s: float
    loader_wait_s: float


class NonFiniteLossError(FloatingPointError):
    """A step whose loss is NaN or infinite; it is stopped before it reaches the weights."""


def train_one_epoch(state: TrainState, loader: Iterable, hooks: Sequence[StepHook] = ()) -> EpochStats:
    """Train ``state`` on the ``state.steps_per_epoch`` batches of ``loader`` (uint8 images (B, 3, S, S),
    targets (M, 6) [index in batch, class, x1, y1, x2, y2] pixels); ``state.step`` advances by one a batch.
    The epoch counter is the caller's. Calls each hook after every step."""
    cfg, model, steps = state.cfg.train, state.model, state.steps_per_epoch
    model.train()
    sums: torch.Tensor | None = None  # running [total, *parts] on the device: no host sync per part
    names: tuple[str, ...] = ()
    wait, images_seen, last_optimizer_step = 0.0, 0, state.step
    start = fetch_start = time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        wait += time.perf_counter() - fetch_start
        images = images.to(state.device, non_blocking=True, memory_format=torch.channels_last).float() / 255
        targets = targets.to(state.device)
        state.schedule.apply(state.optimizer, state.epoch, state.step)
        accumulate = state.schedule.accumulate_at(state.step, cfg.nominal_batch, state.global_batch)
        boundary = state.step + 1 - last_optimizer_step >= accumulate or i == steps - 1
        # between boundaries DDP keeps gradients local: one all-reduce per optimizer step, not per batch
        sync = nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(state.device.type, dtype=state.amp, enabled=state.amp is not None):
                loss, parts = state.loss_fn(model(images), targets)
            # the one host sync per step: a non-finite step must not reach the weights
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss {loss.item()} at epoch {state.epoch + 1}, step {state.step}"
                )
            state.scaler.scale(loss).backward()
        if boundary:
            optimizer_step(state)
            last_optimizer_step = state.step + 1
        names = ("total", *parts)
        values = torch.stack([loss.detach().float(), *(v.float() for v in parts.values())])
        sums = values if sums is None else sums + values
        state.step += 1
        images_seen += images.shape[0]
        event = StepEvent(state.epoch, i, steps, images_seen, time.perf_counter() - start, sums, names)
        for hook in hooks:
            hook(state, event)
        fetch_start = time.perf_counter()
    totals = sums.tolist() if sums is not None else []
    return EpochStats(
        losses={k: v / max(steps, 1) for k, v in zip(names, totals, strict=True)},
        images=images_seen,
        elapsed_s=time.perf_counter() - start,
        loader_wait_s=wait,
    )


def optimizer_step(state: TrainState) -> None:
    """Unscale, clip, step, clear the gradients and update the EMA."""
    state.scaler.unscale_(state.optimizer)
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.cfg.train.clip_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.update(state.model)
