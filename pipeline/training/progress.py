"""Progress within an epoch, for a person watching: a line every N seconds, or a live bar in a terminal.

A COCO epoch is ~900 steps; without this nothing is said between two epoch summaries. The line costs
one host sync (the running losses) per line, not per step.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from pipeline import names
from pipeline.training.state import TrainState
from pipeline.training.step import StepEvent

log = logging.getLogger(__name__)


def eta_s(elapsed_s: float, done: int, total: int) -> float:
    """Seconds until ``total`` units (steps, epochs) are done, at the rate of the ``done`` ones so far."""
    return elapsed_s / max(done, 1) * (total - done)


def progress_line(event: StepEvent, world: int) -> str:
    """``epoch E step s/S total=.. box=.. ... 123.4 img/s ETA 5.2 min`` (losses are running means)."""
    done = event.batch + 1
    means = (event.loss_sums / done).tolist()
    losses = " ".join(f"{k}={v:.3f}" for k, v in zip(event.loss_names, means, strict=True))
    rate = event.images * world / max(event.elapsed_s, 1e-9)
    eta = eta_s(event.elapsed_s, done, event.steps)
    return (
        f"epoch {event.epoch + 1} step {done}/{event.steps} {losses} {rate:.1f} img/s ETA {eta / 60:.1f} min"
    )


class ProgressLog:
    """Step hook: on rank 0, one progress line every ``every_s`` seconds (0: none), through ``logging``."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last = time.monotonic()

    def __call__(self, state: TrainState, event: StepEvent) -> None:
        if state.rank != 0 or self.every_s <= 0:
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info(progress_line(event, state.world))


class ProgressBar:
    """Step hook: a live bar on a terminal (tqdm), one per epoch, with the running losses."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from tqdm import tqdm

        self._tqdm, self.stream, self.bar = tqdm, stream or sys.stderr, None

    def __call__(self, state: TrainState, event: StepEvent) -> None:
        if state.rank != 0:
            return
        if event.batch == 0:
            self.bar = self._tqdm(
                total=event.steps, desc=f"epoch {event.epoch + 1}", file=self.stream, leave=False
            )
        self.bar.update(1)
        if event.batch % 10 == 0 or event.batch + 1 == event.steps:  # a host sync: not every step
            means = (event.loss_sums / (event.batch + 1)).tolist()
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in zip(event.loss_names, means, strict=True)})
        if event.batch + 1 == event.steps:
            self.bar.close()


def epoch_summary(metrics: dict[str, float], epochs: int, eta_s: float) -> str:
    """The line for a finished epoch: losses per branch, mAP, speed, loader wait and the run's ETA."""
    losses = " ".join(
        f"{k.removeprefix(names.TRAIN_PREFIX)}={v:.3f}"
        for k, v in sorted(metrics.items())
        if k.startswith(names.TRAIN_PREFIX) and k.endswith(names.LOSS_PARTS)
    )
    line = (
        f"epoch {int(metrics[names.EPOCH])}/{epochs} {losses} "
        f"mAP50-95={metrics.get(names.MAP, float('nan')):.4f} "
        f"mAP50={metrics.get(names.MAP50, float('nan')):.4f} "
        f"{metrics[names.IMAGES_PER_S]:.1f} img/s{workers(metrics)} "
        f"loader-wait={metrics[names.LOADER_WAIT]:.0%} ETA {eta_s / 60:.1f} min"
    )
    skipped = {k: int(v) for k, v in metrics.items() if k.startswith(names.DATA_PREFIX) and v}
    if skipped:
        line += (
            f"\nepoch {int(metrics[names.EPOCH])}: skipped unreadable data {skipped} (see the worker logs)"
        )
    return line


def workers(metrics: dict[str, float]) -> str:
    """The epoch line's ``on N workers`` for an epoch a Ray worker group trained, with the resize that
    happened in it (elastic runs)."""
    size = metrics.get(names.WORLD_SIZE)
    if size is None:
        return ""
    text = f" on {int(size)} worker{'s' if size != 1 else ''}"
    before = metrics.get(names.RESIZED_FROM)
    if before is not None:
        text += f" (resized from {int(before)}: {resize_reason(int(before), int(size))})"
    return text


def resize_reason(before: int, now: int) -> str:
    """Why an elastic group changed size: Ray Train shrinks one only after losing a worker, and grows it
    when its resize check finds room."""
    return "a worker was lost" if now < before else "room for more workers appeared"


def progress_hook(every_s: float, stream: TextIO | None = None) -> ProgressLog | ProgressBar:
    """A live bar when ``stream`` (default stderr) is a terminal, else lines every ``every_s`` seconds."""
    stream = stream or sys.stderr
    return ProgressBar(stream) if stream.isatty() else ProgressLog(every_s)
