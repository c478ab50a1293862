"""What Ray Train's controller does with each epoch a run reports: one line in the job's log
(``EpochPrinter``) and the metrics and pictures sent to MLflow without ever holding up the run
(``MlflowEpochLogger``). Both run in the controller process, not on the workers."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray.train

from pipeline import names
from pipeline.training import epoch_summary
from pipeline.training.artifacts import CURVES_PNG
from pipeline.training.progress import eta_s


def is_epoch_report(metrics: list[dict[str, Any]]) -> bool:
    """Whether a report is a finished epoch (not a stop or a mid-epoch checkpoint)."""
    return bool(metrics) and names.EPOCH in metrics[0] and names.PREEMPTED not in metrics[0]


class EpochPrinter(ray.train.UserCallback):
    """One line per reported epoch (epoch, losses, mAP, images/s, ETA) in the job's log."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.started = time.time()  # wall clock: the callback runs in the controller process
        self.first_epoch: int | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not is_epoch_report(metrics):
            return
        m = metrics[0]
        epoch = int(m[names.EPOCH])
        if self.first_epoch is None:
            self.first_epoch = epoch - 1
        done = epoch - self.first_epoch
        eta = eta_s(time.time() - self.started, done, done + self.epochs - epoch)
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
    """Sends rank 0's metrics of each persisted epoch report (step = epoch) and the pictures beside its
    checkpoint to an MLflow run, from the controller, without ever holding up or failing the run: records
    queue in a TrackingOutbox that a thread of this callback sends, retrying with backoff while the server
    is away. What is still queued when the run ends is not lost: the job sends every epoch missing from
    the run from the final checkpoint's history (``pipeline.training.job``).

    mlflow is imported at the first report, not with this module: Ray Train unpickles the run's callbacks
    in every worker too, where importing mlflow would add seconds to each worker's start.

    ``drain_s``: how long a report waits for its records to be sent (0: not at all). A Tune trial needs it:
    the scheduler may stop the trial as soon as it sees the report, killing this callback's thread with the
    epoch still queued (seen: an ASHA-stopped trial's run without metrics).
    """

    def __init__(self, tracking_uri: str, run_id: str, drain_s: float = 0.0) -> None:
        self.tracking_uri, self.run_id, self.drain_s = tracking_uri, run_id, drain_s
        self._outbox: Any = None
        self._wake, self._drained = threading.Event(), threading.Event()

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "drain_s": self.drain_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["run_id"], state["drain_s"])

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            if is_epoch_report(metrics):
                self._drained.clear()
                self._queue(metrics[0], checkpoint)
                if self.drain_s > 0 and not self._drained.wait(self.drain_s):
                    _controller_log().warning(
                        "MLflow: epoch not sent within %.0f s, still queued", self.drain_s
                    )
        except Exception as e:  # noqa: BLE001 -- a callback error would be a controller error
            _controller_log().warning("MLflow logging of this epoch failed: %s", e)

    def _queue(self, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None) -> None:
        from pipeline.tracking import TrackingOutbox, artifact_record, epoch_record

        records = [epoch_record(self.run_id, metrics)]
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                pictures = [Path(d) / CURVES_PNG, Path(d) / names.PREDICTIONS_PNG, Path(d) / names.PGI_PNG]
                records += [artifact_record(self.run_id, p) for p in pictures if p.is_file()]
        if self._outbox is None:
            self._outbox = TrackingOutbox(self.tracking_uri)
            threading.Thread(target=self._send_forever, name="mlflow-outbox", daemon=True).start()
        self._outbox.add(*records)
        self._wake.set()

    def _send_forever(self) -> None:
        """Send what the callback queues; an outage is told twice, when it starts and when it ends."""
        while True:
            self._wake.wait()
            self._wake.clear()
            if not self._outbox.send(patience_s=0):
                self._wait_out_outage()
            if len(self._outbox) == 0:
                self._drained.set()

    def _wait_out_outage(self) -> None:
        """Retry until the server answers: at once when the next epoch is queued (so that a server that came
        back is noticed while the run still goes on), else after 1, 2, 4 ... up to ``max_wait_s`` seconds."""
        away, pause = time.monotonic(), 1.0
        _controller_log().warning(
            "MLflow %s unreachable (%s): training goes on, %d records queued, retried each epoch or sooner",
            self.tracking_uri, self._outbox.last_error, len(self._outbox),
        )  # fmt: skip
        while not self._outbox.send(patience_s=0):
            self._wake.wait(timeout=pause)
            self._wake.clear()
            pause = min(pause * 2, self._outbox.max_wait_s)
        _controller_log().info(
            "MLflow %s answers again after %.0f s: the queued records are sent",
            self.tracking_uri, time.monotonic() - away,
        )  # fmt: skip
