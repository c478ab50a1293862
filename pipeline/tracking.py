"""MLflow tracking of a training run: reachability check, run creation/resumption, metrics, artifacts.

The run is created on the driver before any worker starts (an unreachable server fails the job at
once). After that, tracking never stops training: everything is sent through a :class:`TrackingOutbox`,
which keeps records in order, retries them with backoff while the server is away, and writes what it
could not send to a JSON-lines file that ``python -m jobs.sync_tracking`` replays later. Each epoch's
metrics carry the epoch as step and the epoch's end time as timestamp, so the same epoch sent twice
(by the live logger and by the end-of-run reconciliation, or by a replay) is stored once.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.errors import PipelineError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(PipelineError, RuntimeError):
    """The MLflow tracking server or store cannot be used."""


def resolve_tracking_uri(configured: str | None) -> str:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else the local sqlite store, with a relative sqlite
    path made absolute against the current folder.

    Call it on the driver: Ray Tune runs each trial in a working directory of its own (and a Ray Train
    worker may run on another node), where a relative ``sqlite:///mlflow.db`` would open a new, empty
    database instead of the user's.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # sqlite:///relative/path.db -> sqlite:////absolute/path.db (SQLAlchemy's four-slash form)
        path, sep, query = uri.removeprefix("sqlite:///").partition("?")
        uri = f"sqlite:///{Path(path).expanduser().resolve()}{sep}{query}"
    return uri


def check_tracking_uri(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, with the URI in the message, if the store cannot be reached or written."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered /health with HTTP {response.status}")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable: {e}") from e
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLflow 3 refuses plain file stores ({uri}); use sqlite:///path.db or http://host:port"
        )


def check_model_store(uri: str, model: str) -> None:
    """Before ``model`` (a ``models:/`` URI) is read from the store at ``uri``: a sqlite store whose file does
    not exist holds no model, and MLflow would create an empty one there (seconds of table creation, a stray
    ``mlflow.db`` in the user's folder) only to say the model is not registered."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(
            f"cannot load --model {model}: there is no MLflow store at {uri}, so nothing is registered "
            "there (set MLFLOW_TRACKING_URI or --tracking-uri to the store that holds the model)"
        )


def experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name`` in the store at ``uri``, created if missing.

    On a sqlite store a new experiment keeps its artifacts in ``mlartifacts/`` next to the database file.
    MLflow's default is ``./mlruns`` of whatever folder the creating process runs in, which for a Ray job
    is a temporary working directory that disappears with the job.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        location = (folder / re.sub(r"[^A-Za-z0-9._-]", "_", name)).as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_or_resume_run(
    uri: str, experiment: str, run_name: str, storage_path: str, params: dict[str, Any], tags: dict[str, str]
) -> str:
    """The id of the unfinished MLflow run of this Ray run (same name and storage), or a new one."""
    client = MlflowClient(uri)
    exp_id = experiment_id(client, uri, experiment)
    query = f"tags.`{names.RUN_NAME_TAG}` = '{run_name}' and tags.`{names.STORAGE_TAG}` = '{storage_path}'"
    for run in client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"]):
        if run.info.status != "FINISHED":
            client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    run = client.create_run(
        exp_id,
        run_name=run_name,
        tags={names.RUN_NAME_TAG: run_name, names.STORAGE_TAG: storage_path, **tags},
    )
    items = [mlflow.entities.Param(k, str(v)) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):  # the server takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


UNSENT_FILE = "unsent-tracking.jsonl"
METRICS_PER_BATCH = 1000  # the most metrics MLflow takes in one log_batch
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingRecord:
    """One thing to send to a run: ``metrics`` (``values`` at ``step``, ``timestamp_ms``), ``artifact``
    (``data``, the bytes of file ``name``, under ``artifact_path``), ``tag`` (``name`` = ``value``) or
    ``status`` (the run terminated with status ``value``)."""

    kind: str
    run_id: str
    step: int = 0
    timestamp_ms: int = 0
    values: dict[str, float] = field(default_factory=dict)
    name: str = ""
    value: str = ""
    artifact_path: str | None = None
    data: bytes = b""

    def to_json(self, uri: str) -> str:
        """One line of an unsent-tracking file: the record and the store it was meant for."""
        fields = asdict(self)
        fields["data"] = base64.b64encode(self.data).decode("ascii")
        return json.dumps({"uri": uri, **fields})

    @classmethod
    def from_json(cls, line: str) -> tuple[str, TrackingRecord]:
        fields = json.loads(line)
        uri = fields.pop("uri")
        fields["data"] = base64.b64decode(fields.get("data", ""))
        return uri, cls(**fields)


def epoch_record(run_id: str, metrics: dict[str, Any]) -> TrackingRecord:
    """An epoch's numeric metrics at step = epoch, stamped with the epoch's end time (so a copy sent again
    is the same MLflow row and is stored once)."""
    stamp = float(metrics.get(names.EPOCH_END_TIME, time.time()))
    values = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and k not in (names.EPOCH, names.EPOCH_END_TIME)
    }
    return TrackingRecord(
        "metrics",
        run_id,
        step=int(metrics.get(names.EPOCH, 0)),
        timestamp_ms=int(stamp * 1000),
        values=values,
    )


def artifact_record(run_id: str, path: str | Path, artifact_path: str | None = None) -> TrackingRecord:
    """A file to log as an artifact, read now (the file may be gone by the time the server is back)."""
    path = Path(path)
    return TrackingRecord(
        "artifact", run_id, name=path.name, artifact_path=artifact_path, data=path.read_bytes()
    )


def server_reachable(uri: str, timeout_s: float = 5.0) -> bool:
    """Whether an http(s) server answers /health now (other stores are local: always). Asked before each
    send, because MLflow's own client retries a refused connection for minutes before it gives up."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def send_record(client: MlflowClient, record: TrackingRecord) -> None:
    """Send one record; raises whatever MLflow raises."""
    if record.kind == "metrics":
        items = [
            mlflow.entities.Metric(k, v, record.timestamp_ms, record.step) for k, v in record.values.items()
        ]
        for i in range(0, len(items), METRICS_PER_BATCH):
            client.log_batch(record.run_id, metrics=items[i : i + METRICS_PER_BATCH])
    elif record.kind == "artifact":
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / record.name
            path.write_bytes(record.data)
            client.log_artifact(record.run_id, str(path), record.artifact_path)
    elif record.kind == "tag":
        client.set_tag(record.run_id, record.name, record.value)
    elif record.kind == "status":
        client.set_terminated(record.run_id, status=record.value)
    else:
        raise ValueError(f"unknown tracking record kind {record.kind!r}")


class TrackingOutbox:
    """Records for the MLflow store at ``uri``, sent in order; a record that fails stays first in line.

    ``send(patience_s)`` tries until everything is sent or ``patience_s`` has passed, waiting 1, 2, 4, ...
    up to ``max_wait_s`` seconds between tries; it never raises for a tracking failure. ``write_unsent``
    appends what is left to a JSON-lines file. Thread-safe: the Ray controller's logger adds records from
    its callback and sends them from a thread of its own.
    """

    def __init__(self, uri: str, max_wait_s: float = 60.0) -> None:
        self.uri = uri
        self.max_wait_s = max_wait_s
        self.pending: deque[TrackingRecord] = deque()
        self.last_error = ""
        self._lock = threading.Lock()

    def add(self, *records: TrackingRecord) -> None:
        with self._lock:
            self.pending.extend(records)

    def __len__(self) -> int:
        return len(self.pending)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        """Queue a file as ``MlflowClient.log_artifact`` would send it (code that logs files takes either)."""
        self.add(artifact_record(run_id, local_path, artifact_path))

    def send(self, patience_s: float) -> bool:
        """Send what is pending; True when nothing is left."""
        deadline, wait = time.monotonic() + patience_s, 1.0
        client = MlflowClient(self.uri)
        while True:
            if self._send_pending(client):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(wait, left))
            wait = min(wait * 2, self.max_wait_s)

    def _send_pending(self, client: MlflowClient) -> bool:
        while self.pending:
            if not server_reachable(self.uri):
                self.last_error = f"{self.uri} does not answer"
                return False
            record = self.pending[0]
            try:
                send_record(client, record)
            except Exception as e:  # noqa: BLE001 -- tracking must never stop training
                self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                return False
            with self._lock:
                self.pending.popleft()
        return True

    def write_unsent(self, path: str | Path) -> Path | None:
        """Append the pending records to ``path`` (JSON lines) and forget them; None when nothing is left."""
        with self._lock:
            records, self.pending = list(self.pending), deque()
        if not records:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(r.to_json(self.uri) + "\n" for r in records)
        return path


def logged_steps(uri: str, run_id: str, key: str = names.TRAIN_TOTAL) -> set[int] | None:
    """The steps at which ``key`` was logged to the run, or None when the store cannot be asked now."""
    if not server_reachable(uri):
        return None
    try:
        return {m.step for m in MlflowClient(uri).get_metric_history(run_id, key)}
    except Exception:  # noqa: BLE001 -- unknown: the caller sends everything (duplicates are stored once)
        return None


def epoch_records(uri: str, run_id: str, history: Iterable[dict[str, float]]) -> list[TrackingRecord]:
    """The epochs of ``history`` that the run does not hold yet (all of them if the store cannot say)."""
    present = logged_steps(uri, run_id) or set()
    return [epoch_record(run_id, h) for h in history if int(h[names.EPOCH]) not in present]


def read_unsent(path: str | Path) -> list[tuple[str, TrackingRecord]]:
    """The (tracking URI, record) lines of an unsent-tracking file, in order."""
    lines = Path(path).read_text().splitlines()
    try:
        return [TrackingRecord.from_json(line) for line in lines if line.strip()]
    except (ValueError, KeyError, TypeError) as e:
        raise TrackingError(f"{path} is not an unsent-tracking file: {type(e).__name__}: {e}") from e


def replay_unsent(path: str | Path, uri: str | None = None, patience_s: float = 60.0) -> int:
    """Send the records of an unsent-tracking file (to ``uri`` if given, else where each was meant to go),
    in order; the file is left holding only what still could not be sent, or removed. Records already in
    the run (a previous replay that was cut short) are stored once. Returns the number left."""
    path = Path(path)
    left: list[tuple[str, TrackingRecord]] = []
    by_uri: dict[str, TrackingOutbox] = {}
    for target, record in read_unsent(path):
        by_uri.setdefault(uri or target, TrackingOutbox(uri or target)).add(record)
    for outbox in by_uri.values():
        if not outbox.send(patience_s):
            log.warning("MLflow %s: %d records not sent (%s)", outbox.uri, len(outbox), outbox.last_error)
            left += [(outbox.uri, r) for r in outbox.pending]
    if left:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(r.to_json(u) + "\n" for u, r in left))
        os.replace(tmp, path)
    else:
        path.unlink()
    return len(left)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr0": 0.01}}`` -> ``{"train.lr0": 0.01}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
