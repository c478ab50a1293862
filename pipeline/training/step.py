"""One epoch of optimisation steps: AMP forward, the dual loss, gradient accumulation to the nominal
batch (DDP's gradient all-reduce only on the boundary step), clipping, the optimizer and the EMA.

A step whose loss is not finite is skipped: no optimizer or EMA update, the BatchNorm running
statistics its forward changed are put back, and the accumulation window it was part of is dropped. So
is a window whose gradients are not finite. Every rank takes the same decision (one small all-reduce per
step, which also carries a stop request), so DDP never waits on a rank that skipped.

Host syncs. The step reads one small flag tensor back from the device, once, after the backward and the
gradient clipping: [loss not finite, stop requested, gradients not finite]. Nothing else in the step
(the loss, the assigner, the clipping) waits for the device, so on a GPU the host queues the next
step's work while this one runs. The price: the backward of a non-finite loss runs before it is skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import PipelineError
from pipeline.training.preemption import StopRequested, stop_requested
from pipeline.training.state import TrainState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepEvent:
    """What a step hook sees after step ``batch`` (0-based) of the epoch; ``loss_sums`` (device tensor)
    holds the running sums of ``[total, *loss parts]`` named by ``loss_names`` over the steps not skipped."""

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
    """One worker's epoch: mean losses (``total`` and each part) over the steps trained, images, seconds,
    seconds waiting on data, steps skipped for a non-finite loss or gradients, and optimizer steps the
    fp16 loss scaler skipped (its own overflow handling)."""

    losses: dict[str, float]
    images: int
    elapsed_s: float
    loader_wait_s: float
    skipped_steps: int = 0
    amp_skipped_steps: int = 0


class TrainingDiverged(PipelineError, FloatingPointError):
    """``train.max_bad_steps`` steps in a row had a non-finite loss or gradients."""


@dataclass
class BadStepGuard:
    """Counts skipped steps in a row over a whole run; ``max_in_a_row`` of them stop it."""

    max_in_a_row: int
    in_a_row: int = 0

    def skipped(self, what: str) -> None:
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"training diverged: {self.in_a_row} steps in a row skipped (last: {what}); "
                f"lower train.lr0 or check the data, then rerun"
            )

    def stepped(self) -> None:
        self.in_a_row = 0


class BatchNormSnapshot:
    """The model's BatchNorm running statistics, saved before each forward and put back after a skipped
    one (a NaN batch would otherwise leave NaN running means in every later evaluation)."""

    def __init__(self, model: nn.Module) -> None:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.buffers = [b for m in norms for b in m.buffers(recurse=False)]
        self.saved = [b.clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)  # one kernel on a GPU, not one per buffer

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)


def train_one_epoch(
    state: TrainState,
    loader: Iterable,
    hooks: Sequence[StepHook] = (),
    *,
    guard: BadStepGuard | None = None,
    batch_ids: Callable[[], Sequence[int]] | None = None,
) -> EpochStats:
    """Train ``state`` on the ``state.steps_per_epoch`` batches of ``loader`` (uint8 images (B, 3, S, S),
    targets (M, 6) [index in batch, class, x1, y1, x2, y2] pixels; or a list of such, one per data rank
    the worker plays: ``RanksLoader``); ``state.step`` advances by one a batch.
    The epoch counter is the caller's. Calls each hook after every step.

    A state saved mid-epoch (``state.step`` past the epoch's first step) resumes at its batch: the loader's
    batches are a function of (seed, epoch, rank), so the first ones are drawn and dropped. ``batch_ids``
    names the images of the current batch in the warning for a skipped step. Raises TrainingDiverged after
    ``guard.max_in_a_row`` skipped steps in a row, StopRequested after a step that saw a stop request
    (SIGTERM on any rank)."""
    cfg, steps = state.cfg.train, state.steps_per_epoch
    guard = guard or BadStepGuard(cfg.max_bad_steps)
    first = resume_position(state)
    state.model.train()
    bn = BatchNormSnapshot(state.model)
    tally = EpochTally()
    last_optimizer_step = state.step
    start = fetch_start = time.perf_counter()
    for i, batch in enumerate(loader if first < steps else ()):
        if i < first:
            fetch_start = time.perf_counter()
            continue
        tally.wait_s += time.perf_counter() - fetch_start
        state.schedule.apply(state.optimizer, state.epoch, state.step)
        accumulate = state.schedule.accumulate_at(state.step, cfg.nominal_batch, state.global_batch)
        boundary = state.step + 1 - last_optimizer_step >= accumulate or i == steps - 1
        micro_batches = batch if isinstance(batch, list) else [batch]
        loss, parts = forward_backward(state, micro_batches, boundary, bn)
        grad_norm = unscale_and_clip(state) if boundary else None
        verdict = agree_on_step(state, loss, grad_norm)
        where = f"epoch {state.epoch + 1}, step {state.step}"
        if verdict.loss_bad:
            skip_step(state, bn, grad_norm)
            last_optimizer_step = state.step + 1
            if verdict.loss_bad_here:
                ids = list(batch_ids()) if batch_ids is not None else []
                log.warning("skipped %s on rank %d: non-finite loss %s; images %s", where, state.rank,
                            loss.item(), ids)  # fmt: skip
            tally.count_outcome("nonfinite_loss", guard, where)
        else:
            if boundary:
                outcome = optimizer_step(state, grads_finite=not verdict.grads_bad)
                last_optimizer_step = state.step + 1
                tally.count_outcome(outcome, guard, where)
            tally.add_losses(loss, parts)
        state.step += 1
        tally.images += sum(images.shape[0] for images, _ in micro_batches)
        event = tally.event(state, i, time.perf_counter() - start)
        for hook in hooks:
            hook(state, event)
        if verdict.stop:
            raise StopRequested(f"stopped on SIGTERM after step {state.step} (epoch {state.epoch + 1})")
        fetch_start = time.perf_counter()
    return tally.stats(max(steps - first - tally.skipped, 1), time.perf_counter() - start)


def resume_position(state: TrainState) -> int:
    """The batch of the current epoch to start at: a mid-epoch checkpoint's position, else 0 (also when
    the position lies outside [0, steps]: the schedule changed, so the epoch starts over)."""
    first = state.step - state.epoch * state.steps_per_epoch
    return first if 0 < first <= state.steps_per_epoch else 0


def forward_backward(
    state: TrainState,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    boundary: bool,
    bn: BatchNormSnapshot,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward (autocast), the dual loss and its backward for the step's batch of each data rank this
    worker plays (one, unless an elastic run is on fewer workers than its data ranks); returns the mean
    (loss, parts) over them, on the device. Between accumulation boundaries DDP keeps gradients local: one
    all-reduce per optimizer step, with the last batch's backward. Every rank runs the backward, even of a
    non-finite loss (the step drops it after)."""
    model = state.model
    # a loss computed per micro-batch (across_ranks off) is one process's: DDP's gradient average over
    # the workers is turned back into their sum here, as the loss does itself when it spans the ranks
    scale = state.world if state.world > 1 and not state.loss_fn.across_ranks else 1
    bn.save()
    results = []
    for j, (images, targets) in enumerate(micro_batches):
        images = images.to(state.device, non_blocking=True, memory_format=torch.channels_last).float() / 255
        # targets stay on the CPU: the loss checks their values there and copies them without blocking
        last = boundary and j == len(micro_batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(state.device.type, dtype=state.amp, enabled=state.amp is not None):
                loss, parts = state.loss_fn(model(images), targets)
            state.scaler.scale(loss * scale if scale != 1 else loss).backward()
        results.append((loss, parts))
    if len(results) == 1:
        return results[0]
    n = len(results)
    return (
        sum(r[0] for r in results) / n,
        {k: sum(r[1][k] for r in results) / n for k in results[0][1]},
    )


@dataclass(frozen=True)
class StepVerdict:
    """What every rank agreed on for one step."""

    loss_bad_here: bool  # this rank's loss is not finite
    loss_bad: bool  # some rank's loss is not finite
    stop: bool  # some rank was asked to stop
    grads_bad: bool  # the (all-reduced, so equal) gradients are not finite


def agree_on_step(state: TrainState, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> StepVerdict:
    """The step's one host sync: [this rank's loss is not finite, a stop was requested, the gradients are
    not finite], max-reduced over the ranks so that all take the same decision."""
    flags = torch.stack(
        [
            (~torch.isfinite(loss.detach())).float(),
            torch.full((), float(stop_requested()), device=loss.device),  # a fill: no host-to-device copy
            (~torch.isfinite(grad_norm)).float()
            if grad_norm is not None
            else torch.zeros((), device=loss.device),
        ]
    )
    distributed = state.world > 1 and dist.is_available() and dist.is_initialized()
    local_bad = flags[0].clone() if distributed else flags[0]
    if distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop, bad_grads = (bool(v) for v in flags.tolist())
    # read only when the step is bad: no second sync on a good step
    return StepVerdict(
        loss_bad_here=bad and bool(local_bad.item()), loss_bad=bad, stop=stop, grads_bad=bad_grads
    )


def skip_step(state: TrainState, bn: BatchNormSnapshot, grad_norm: torch.Tensor | None) -> None:
    """Undo what a step with a non-finite loss did: its BatchNorm statistics and the gradients of its
    whole accumulation window."""
    bn.restore()
    state.optimizer.zero_grad(set_to_none=True)
    if grad_norm is not None and state.scaler.is_enabled():
        state.scaler.update()  # closes the unscale_ above (and backs the fp16 scale off)


@dataclass
class EpochTally:
    """One worker's running figures over an epoch. ``sums`` ([total, *parts]) stays on the device: no
    host sync per loss part."""

    sums: torch.Tensor | None = None
    names: tuple[str, ...] = ()
    images: int = 0
    wait_s: float = 0.0
    skipped: int = 0
    amp_skipped: int = 0

    def add_losses(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.names = ("total", *parts)
        values = torch.stack([loss.detach().float(), *(v.float() for v in parts.values())])
        self.sums = values if self.sums is None else self.sums + values

    def count_outcome(self, outcome: str, guard: BadStepGuard, where: str) -> None:
        """Count a step's outcome (``optimizer_step``'s, or ``nonfinite_loss`` for a step skipped before it)
        and tell the guard."""
        if outcome == "nonfinite_loss":
            self.skipped += 1
            guard.skipped(f"non-finite loss at {where}")
        elif outcome == "nonfinite":
            self.skipped += 1
            log.warning("skipped the optimizer step at %s: non-finite gradients", where)
            guard.skipped(f"non-finite gradients at {where}")
        else:
            self.amp_skipped += outcome == "amp_skipped"
            guard.stepped()

    def event(self, state: TrainState, batch: int, elapsed_s: float) -> StepEvent:
        sums = self.sums if self.sums is not None else torch.zeros(1)
        return StepEvent(state.epoch, batch, state.steps_per_epoch, self.images, elapsed_s, sums,
                         self.names or ("total",))  # fmt: skip

    def stats(self, trained_steps: int, elapsed_s: float) -> EpochStats:
        totals = self.sums.tolist() if self.sums is not None else []
        return EpochStats(
            losses={k: v / trained_steps for k, v in zip(self.names, totals, strict=True)},
            images=self.images,
            elapsed_s=elapsed_s,
            loader_wait_s=self.wait_s,
            skipped_steps=self.skipped,
            amp_skipped_steps=self.amp_skipped,
        )


def unscale_and_clip(state: TrainState) -> torch.Tensor:
    """Unscale the gradients (fp16) and clip their norm to ``train.clip_grad_norm``; returns the norm
    before clipping as a device tensor (not read here: the step reads it with its other flags)."""
    state.scaler.unscale_(state.optimizer)
    return torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.cfg.train.clip_grad_norm)


def optimizer_step(state: TrainState, grads_finite: bool) -> str:
    """Step on the clipped gradients, clear them and update the EMA. Returns ``"ok"``, ``"nonfinite"``
    (gradients not finite without a loss scaler: nothing updated) or ``"amp_skipped"`` (the fp16 scaler
    found an overflow and skipped the step, as it is built to; the EMA is not updated either)."""
    if not state.scaler.is_enabled():
        if not grads_finite:  # the same on every rank: the gradients were all-reduced
            state.optimizer.zero_grad(set_to_none=True)
            return "nonfinite"
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.ema.update(state.model)
        return "ok"
    scale = state.scaler.get_scale()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler.get_scale() < scale:
        return "amp_skipped"
    state.ema.update(state.model)
    return "ok"
