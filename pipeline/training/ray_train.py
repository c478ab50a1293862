"""Distributed training of the dual-branch YOLOv9 on Ray Train: the glue between Ray and the engine.

``train_worker`` runs the engine (``pipeline.training``) on each Ray Train worker (DDP via Ray Train);
``fit`` builds the TorchTrainer from a Config and runs it. Rerunning ``fit`` with the same
``ray.run_name`` and ``ray.storage_path`` resumes from the latest checkpoint that loads (a truncated one
is passed over for the one before); ``ray.max_failures`` restarts a failed worker group from it.

What a long run meets: a diverged model (``train.max_bad_steps`` skipped steps in a row) ends the run
with its cause (every worker reports it and returns, so Ray does not restart into the same divergence);
SIGTERM to a worker checkpoints mid-epoch (``pipeline.training.preemption``) before the worker fails, so
a restart or a rerun goes on from that step; an MLflow server that is away delays the metrics, never the
training (``pipeline.training.run_callbacks``).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from ray._private.ray_constants import GCS_PORT_ENVIRONMENT_VARIABLE  # no public name for it
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend  # private: no public hook runs code on every worker at start

from pipeline import names
from pipeline.checkpoint import (
    CheckpointError,
    TrainingCheckpoint,
    load_checkpoint,
    newest_loadable,
    save_checkpoint,
)
from pipeline.config import Config, config_from_dict
from pipeline.training import (
    ProgressLog,
    TrainingData,
    TrainingDiverged,
    TrainState,
    build_train_state,
    train,
)
from pipeline.training.artifacts import write_epoch_artifacts
from pipeline.training.preemption import install_sigterm_handler, training
from pipeline.training.progress import resize_reason
from pipeline.training.run_callbacks import EpochPrinter, MlflowEpochLogger

log = logging.getLogger(__name__)

# Ray Train reads these from the driver's environment and hands them to its controller and workers.
# The controller acts on a report or on the end of training only when it next polls the workers,
# every 2 s by default: up to 2 s after each epoch's report and about 4 s at the end of every run.
# A poll is one tiny actor call per worker, so polling four times as often costs nothing measurable.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


# Ray Train settings for a Ray instance on this one machine. The preemption watcher is one more actor
# process per run (seconds of start-up on a small machine) watching for the drain of a node that an
# autoscaler is about to take back, and no autoscaler drains the only node of a local instance.
# A local instance is a laptop or a CI machine: its worker processes import torch on few, busy cores,
# and Ray Train's 60 s for a worker group to start was seen running out (a search trial errored).
LOCAL_RAY_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}


def ensure_ray(address: str | None) -> None:
    """Attach to ``address`` or ``RAY_ADDRESS`` (a running cluster), else start a local instance on
    127.0.0.1. Its dashboard serves the state API that Ray Train needs to free stopped runs' resources."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
    else:
        start_local_ray(include_dashboard=True, dashboard_host="127.0.0.1")


def start_local_ray(**init: Any) -> str:
    """Start a local Ray instance on 127.0.0.1 (``init``: more ``ray.init`` arguments) whose processes know
    its address; returns it.

    Ray Train's helper actors ask Ray's state API about the run's controller without an address, and the
    API then looks for the machine's Ray instance: with two local instances on one machine (two jobs, or a
    job beside a test) it finds both and the helper's thread dies (``Found multiple active Ray instances``),
    so a crashed run's placement group is never freed. The instance's GCS port is chosen here and
    ``RAY_ADDRESS`` set before ``ray.init``, so every process of the instance inherits its own address;
    ``address="local"`` keeps ``ray.init`` from connecting to it instead of starting it."""
    port = _gcs_port()
    own = f"127.0.0.1:{port}"
    # set before ray.init so that the instance's processes (Tune trials too) inherit them
    for name, value in LOCAL_RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)
    os.environ[GCS_PORT_ENVIRONMENT_VARIABLE] = str(port)
    os.environ["RAY_ADDRESS"] = own  # stays: this process's own state-API calls need it too
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", **init)
    finally:
        del os.environ[GCS_PORT_ENVIRONMENT_VARIABLE]
    return own


def _gcs_port() -> int:
    """A free port for a local instance's GCS, above the OS's ephemeral range when there is room there. A
    port drawn from that range (bound to 0 and released) can be handed to another process's connection or
    server before the GCS binds it: seen in the suite, where several Ray instances start side by side
    ("Failed to start the grpc server. The specified port is 45357")."""
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1])
    except (OSError, IndexError, ValueError):  # not Linux: the OS's choice
        high = 65535
    above = range(high + 1, 65536)
    for port in [*random.sample(above, min(100, len(above))), 0]:  # 0: the OS's choice, last
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise RuntimeError("no free port for the local Ray instance's GCS")


# Ray Train 2.60 logs every `ray.train.report` of every rank at INFO with all its metrics ("Reporting
# training result ..."): twice an epoch, and more than the rest of a job's log. It has no option for it; the
# logger is named by its module's file path, so its level is set by that name (a Ray that moves the module
# logs the lines again; tests/jobs/test_job_submit.py notices).
RAY_REPORT_LOGGER = str(Path(ray.train.__file__).parent / "v2" / "_internal" / "execution" / "context.py")


def quiet_ray_report_log() -> None:
    """Keep Ray Train's per-report metric dump out of the job log (warnings from that logger still show)."""
    logging.getLogger(RAY_REPORT_LOGGER).setLevel(logging.WARNING)


def train_worker(loop_config: dict[str, Any]) -> dict[str, str] | None:
    """Ray Train worker entry: the engine's epoch loop on this worker's rank, resumed from the run's newest
    loadable checkpoint, reporting each epoch (rank 0 attaches the checkpoint). ``loop_config["step_hooks"]``
    adds step hooks (the tests' fault injection). Returns ``{names.STOP_CAUSE: ...}`` when the model
    diverged (rank 0's return value is the run's ``Result.return_value``)."""
    quiet_ray_report_log()
    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    storage = context.get_storage()  # a DeveloperAPI: the run's folder on its file system, for the resume
    device = ray.train.torch.get_device()
    resume = resume_checkpoint(
        ray.train.get_checkpoint(), storage.storage_filesystem, storage.experiment_fs_path, device
    )
    world = context.get_world_size()
    state = build_train_state(
        cfg,
        TrainingData.read(cfg.data.root, cfg.data.allow_pipe),
        device,
        rank=context.get_world_rank(),
        world=world,
        resume=resume,
        # gradients as views into DDP's all-reduce buckets: no copy in and out of the buckets per step
        wrap=lambda model: ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs={"gradient_as_bucket_view": True}
        ),
        data_world=cfg.ray.max_workers if cfg.ray.elastic else world,
    )
    if resume is not None and resume.world_size and resume.world_size != world:
        state.resized_from = resume.world_size
        if state.rank == 0:
            log.warning("%s", resize_line(resume, state))
    hooks = [*loop_config.get("step_hooks", []), ProgressLog(cfg.train.progress_every_s)]
    try:
        with training():
            train(state, report_epoch, hooks, on_stop=report_stop)
    except TrainingDiverged as e:
        # Every rank diverges at the same step (the skip decision is agreed). Returned rather than raised:
        # Ray would restart the workers into the same seeded divergence up to max_failures.
        log.error("%s", e)
        return {names.STOP_CAUSE: str(e)}
    return None


def resize_line(resume: TrainingCheckpoint, state: TrainState) -> str:
    """The one line an elastic run logs when it goes on with another number of workers than it saved with."""
    before, now = resume.world_size, state.world
    reason = resize_reason(before, now)
    return (
        f"resized from {before} to {now} workers ({reason}): going on from epoch {resume.epoch + 1}, step "
        f"{resume.step}, each worker playing {len(state.ranks)} of the {state.data_world} data ranks"
    )


def run_checkpoints(fs: pyarrow.fs.FileSystem, run_folder: str) -> list[str]:
    """The ``checkpoint_<date and time>`` folders of a Ray Train run, newest first (names sort by time)."""
    found = fs.get_file_info(pyarrow.fs.FileSelector(run_folder, allow_not_found=True))
    dirs = [i.path for i in found if i.type == pyarrow.fs.FileType.Directory]
    checkpoints = [p for p in dirs if Path(p).name.startswith("checkpoint_")]
    return sorted(checkpoints, key=lambda p: Path(p).name, reverse=True)


def resume_checkpoint(
    latest: ray.train.Checkpoint | None, fs: pyarrow.fs.FileSystem, run_folder: str, device: torch.device
) -> TrainingCheckpoint | None:
    """The newest checkpoint of the run in ``run_folder`` that loads, or None for a fresh run.

    Every ``checkpoint_*`` folder there is a candidate, newest first, not only Ray's ``latest``: Ray 2.60
    drops the last report of a worker that raises right after it (its poll returns the error without the
    report), so a SIGTERM stop's checkpoint can be written and never recorded. A truncated upload or a
    missing file is passed over (with a warning) for the one before it. Raises CheckpointError when none
    loads although Ray recorded one; with no record (a first epoch's upload cut short by a failure) the
    run starts afresh, as Ray would."""
    candidates = run_checkpoints(fs, run_folder)
    if latest is not None and latest.path not in candidates:
        candidates = sorted([*candidates, latest.path], key=lambda p: Path(p).name, reverse=True)
    if not candidates:
        return None

    def load(path: str) -> TrainingCheckpoint:
        with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
            return load_checkpoint(d, map_location=device)

    loaded = newest_loadable(candidates, load)
    if loaded is not None:
        path, state = loaded
        if latest is None or path != latest.path:
            log.warning("resuming from %s (Ray's latest record: %s)", path, latest.path if latest else "none")
        return state
    if latest is None:  # only folders Ray never recorded, such as an upload cut short: as Ray, start afresh
        log.warning(
            "no checkpoint folder of the run at %s loads and Ray recorded none: starting afresh", run_folder
        )
        return None
    raise CheckpointError(f"no checkpoint of the run at {run_folder} loads; see the warnings above")


def report_epoch(state: TrainState, metrics: dict[str, float]) -> None:
    """Report the epoch to Ray Train. Rank 0 reports the metrics and the checkpoint (every rank holds the
    same weights) with the epoch's pictures beside it; the others report nothing, which keeps Ray's
    per-report log line short.

    The checkpoint is written to a local folder (the snapshot: training may change the weights right
    after) and uploaded by Ray Train in the background: a yolov9-c/e checkpoint with EMA and optimizer
    state is hundreds of megabytes, and its upload to object storage must not hold the GPUs. Ray deletes
    the folder once uploaded; the report reaches the callbacks (metrics, MLflow, Tune) then.
    """
    if state.rank != 0:
        ray.train.report({}, checkpoint=None)
        return
    d = tempfile.mkdtemp(prefix="yolov9-checkpoint-")
    save_checkpoint(d, state.checkpoint(metrics))
    write_epoch_artifacts(state, d)
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(d),
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        delete_local_checkpoint_after_upload=True,
    )


def report_stop(state: TrainState) -> None:
    """After a stop request (SIGTERM): rank 0 reports the state as it is, mid-epoch (its ``step`` is the
    loader position a rerun resumes from); never the best checkpoint (its score is below any mAP)."""
    log.warning("rank %d: checkpointing at step %d (epoch %d) before stopping", state.rank, state.step,
                state.epoch + 1)  # fmt: skip
    if state.rank != 0:
        ray.train.report({}, checkpoint=None)
        return
    metrics = {names.PREEMPTED: float(state.step), names.MAP: -1.0}
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, state.checkpoint(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class PreemptibleTorchConfig(TorchConfig):
    """Ray's torch set-up, plus SIGTERM as a stop request on every worker. Python installs signal handlers
    from a process's main thread only; the train function runs in another thread, but a worker's actor
    tasks (this backend's ``execute``) run on the main thread."""

    @property
    def backend_cls(self) -> type:
        return _PreemptibleTorchBackend


class _PreemptibleTorchBackend(_TorchBackend):
    def on_training_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_sigterm_handler)


def fit(
    cfg: Config,
    tracking: tuple[str, str] | None = None,
    loop_extras: dict[str, Any] | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,
    tracking_drain_s: float = 0.0,
) -> ray.train.Result:
    """Run ``train_worker`` on ``cfg.ray.num_workers`` Ray Train workers (a range: an elastic group that
    Ray Train restarts at the size that fits, from the latest checkpoint); resumes a run of the same name.
    Raises TrainingDiverged with the workers' one-line cause when the model diverged.

    ``tracking`` is (MLflow tracking URI, run id) for per-epoch metrics, each report waiting up to
    ``tracking_drain_s`` for them to be sent (see MlflowEpochLogger). ``loop_extras`` adds keys
    to the loop config (``step_hooks``: the fault injection of the tests). Exports ``RAY_TRAIN_ENV`` to
    this process's environment where the variables are unset, for Ray Train to pass on.
    """
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)  # a value the user exported wins
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    # MLflow first: a Tune scheduler may end the trial as soon as it sees the report
    logger = [MlflowEpochLogger(*tracking, drain_s=tracking_drain_s)] if tracking is not None else []
    callbacks = [EpochPrinter(cfg.train.epochs), *logger, *(callbacks or [])]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), **(loop_extras or {})},
        torch_config=PreemptibleTorchConfig(),
        scaling_config=ScalingConfig(
            num_workers=tuple(cfg.ray.num_workers) if cfg.ray.elastic else cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.ray.placement_strategy,
            elastic_resize_monitor_interval_s=cfg.ray.resize_check_s,
        ),
        run_config=RunConfig(
            name=cfg.ray.run_name,
            storage_path=cfg.ray.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=names.MAP,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if cause := (result.return_value or {}).get(names.STOP_CAUSE):
        raise TrainingDiverged(cause)
    return result
