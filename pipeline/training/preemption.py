"""SIGTERM as a request to stop: the step loop ends after the step in progress and the run is checkpointed.

Kubernetes and Ray signal a process that is about to go away with SIGTERM and kill it a grace period later
(30 s by default on Kubernetes). The handler only sets a flag; ``train_one_epoch`` reads it once per step
(agreed over all ranks, so every rank stops after the same step) and the caller saves a mid-epoch
checkpoint. A watchdog ends the process ``grace_s`` after the signal in case the step loop never gets there
(a peer that died mid-collective, say), so a stop request is never ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# Below Kubernetes' default 30 s grace period: the process ends on its own terms before SIGKILL.
DEFAULT_GRACE_S = 25.0
_requested = threading.Event()
_training = threading.Event()  # SIGTERM means "stop after this step" only while training runs
_watchdogs: list[threading.Timer] = []


class StopRequested(PipelineError):
    """The process was asked to stop (SIGTERM); raised after a completed step, once the run is saved."""


def stop_requested() -> bool:
    """Whether SIGTERM (or ``request_stop``) arrived since the last ``clear_stop_request``."""
    return _requested.is_set()


def request_stop(grace_s: float = DEFAULT_GRACE_S) -> None:
    """Ask the step loop to stop after the current step; end the process ``grace_s`` later regardless."""
    if _requested.is_set():
        return
    _requested.set()
    log.warning("SIGTERM: checkpointing after the current step, exiting within %.0f s", grace_s)
    watchdog = threading.Timer(grace_s, os._exit, args=(128 + signal.SIGTERM,))
    watchdog.daemon = True
    watchdog.start()
    _watchdogs.append(watchdog)


def clear_stop_request() -> None:
    """Forget a stop request and cancel its watchdog (a process that goes on after one: a test, a
    notebook that catches StopRequested)."""
    _requested.clear()
    while _watchdogs:
        _watchdogs.pop().cancel()


def install_sigterm_handler(grace_s: float = DEFAULT_GRACE_S) -> None:
    """Make SIGTERM a stop request while ``training()`` is active, and what it was before otherwise (a Ray
    worker that is shut down after its run must still exit at once). Python installs signal handlers from
    the main thread only: a Ray Train worker calls this through a task on its actor
    (``pipeline.training.ray_train``), the local run from its own thread."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if _training.is_set():
            request_stop(grace_s)
        elif callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


@contextmanager
def training() -> Iterator[None]:
    """The span in which SIGTERM requests a stop (instead of ending the process at once)."""
    _training.set()
    try:
        yield
    finally:
        _training.clear()
