"""Hyperparameter search with Ray Tune over any config key (by default the PGI loss weights and the
TAL top-k). Each trial is a full Ray Train run of the training loop, reporting every epoch so ASHA
can stop weak trials; MLflow holds a parent run for the search and one nested run per trial. The space
and a trial's config: ``space.py``; the finished trials, their ranking and the parent run's table:
``trials.py``.

A search space in the config maps dotted keys to one domain each::

    tune:
      space:
        loss.aux_weight: {uniform: [0.1, 1.0]}
        loss.tal_topk: {choice: [5, 7, 10, 13, 16]}
        train.lr0: {loguniform: [0.001, 0.02]}
        loss.assign: {grid: [independent, lead_guided]}

``arms`` is a grid over named sets of settings (the key names the arm in each trial's params)::

        arm: {arms: {reference: {loss.aux_weight: 0.25}, single-branch: {model.name: gelan-t}}}
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import ray
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from pipeline import names, storage
from pipeline.checkpoint import load_checkpoint
from pipeline.config import Config, load_config
from pipeline.search.space import (
    SPACE_FILE,
    SearchError,
    build_space,
    check_same_space,
    space_record,
    trial_config,
)
from pipeline.search.trials import TrialRow, finalise_trials, log_summary, no_trial_finished
from pipeline.tracking import (
    TrackingOutbox,
    check_tracking_uri,
    epoch_records,
    experiment_id,
    flatten,
    resolve_tracking_uri,
)
from pipeline.training.job import prepare_data, run_training
from pipeline.training.ray_train import ensure_ray, fit
from pipeline.weights.sources import resolve_weights

log = logging.getLogger(__name__)
# Each epoch report of a trial waits up to this long for its MLflow records to be sent: ASHA may stop the
# trial as soon as it sees the report. Bounded so that an unreachable server only slows a trial down.
TRIAL_TRACKING_DRAIN_S = 30.0


@dataclass(frozen=True)
class Search:
    """What every trial of one search shares, handed to the trials beside their sampled params (so that
    Tune's trial config, which it prints and stores with each result, is the sampled values alone)."""

    name: str
    base: dict[str, Any]  # the training config every trial starts from (``Config.to_dict()``)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def _trial(config: dict[str, Any], search: Search) -> None:
    """Tune function: one Ray Train run, metrics forwarded to Tune each epoch, tracked in a nested run."""
    context = tune.get_context()
    params = config["params"]
    run_name = f"{search.name}-{context.get_trial_id()}"
    client = MlflowClient(search.tracking_uri)
    run = client.create_run(
        search.experiment_id,
        run_name=run_name,
        tags={
            names.PARENT_RUN_TAG: search.parent_run_id,
            names.TRIAL_ID_TAG: context.get_trial_id(),
            names.TRIAL_STATUS_TAG: names.TRIAL_RUNNING,
            # where the trial's weights started (empty: from scratch)
            names.PRETRAINED_PATH_TAG: search.base["model"]["weights"] or "",
        },
    )
    run_id = run.info.run_id
    client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
    # The run's final status is written by the driver alone (_finalise_trials, from Tune's view): when ASHA
    # stops a trial, this function is torn down with an exception that looks like any other, and a status
    # written here landed after the driver's and turned a trial stopped early into an errored one.
    cfg = trial_config(search.base, params, run_name)
    result = fit(
        cfg,
        tracking=(search.tracking_uri, run_id),
        callbacks=[TuneReportCallback()],
        tracking_drain_s=TRIAL_TRACKING_DRAIN_S,
    )
    send_missing_epochs(search.tracking_uri, run_id, result)


def send_missing_epochs(uri: str, run_id: str, result: ray.train.Result) -> None:
    """Send the epochs of the final checkpoint's history that the run lacks: the MLflow callback's thread
    ends with Ray Train's controller, and what it had queued (a short trial's every epoch) goes with it."""
    if result.checkpoint is None:
        return
    with result.checkpoint.as_directory() as d:
        history = load_checkpoint(d).history
    outbox = TrackingOutbox(uri)
    outbox.add(*epoch_records(uri, run_id, history))
    if not outbox.send(patience_s=60.0):
        log.warning("MLflow %s: %d epoch records of run %s not sent (%s)", uri, len(outbox), run_id,
                    outbox.last_error)  # fmt: skip


def _param(key: str, value: Any) -> Param:
    return Param(key, str(value))


def _scheduler(cfg: Config):
    if cfg.tune.scheduler == "asha":
        return tune.schedulers.ASHAScheduler(
            max_t=cfg.train.epochs,
            grace_period=cfg.tune.grace_period,
            reduction_factor=cfg.tune.reduction_factor,
            time_attr="epoch",
        )
    if cfg.tune.scheduler == "fifo":
        return tune.schedulers.FIFOScheduler()
    raise SearchError(f"tune.scheduler must be asha or fifo, got {cfg.tune.scheduler!r}")


def search_algorithm(cfg: Config, space: dict[str, Any], concurrent: int):
    """The search algorithm, seeded with ``train.seed`` so that the same config samples the same trials;
    it also caps the trials run side by side at ``concurrent``."""
    if cfg.tune.search_alg in ("random", "grid"):
        # Tune's variant generator: random samples, grid_search expanded
        return BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.train.seed)
    if cfg.tune.search_alg == "optuna":
        if any(isinstance(v, dict) and "grid_search" in v for v in space.values()):
            raise SearchError("tune.search_alg optuna cannot take grid domains; use choice")
        from ray.tune.search.optuna import OptunaSearch  # optional dependency: pip install optuna

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=concurrent)
    raise SearchError(f"tune.search_alg must be random, grid or optuna, got {cfg.tune.search_alg!r}")


def concurrent_trials(cfg: Config) -> int:
    """Trials to run side by side.

    On a cluster this job attached to (``ray.address`` or ``RAY_ADDRESS``): ``tune.max_concurrent_trials``,
    whatever is up right now. Such a cluster may scale (KubeRay, the cluster launcher: a head with no CPUs,
    GPU workers from zero); the trials Tune starts ask for their workers, that pending demand is what makes
    the autoscaler add nodes, and trials wait in Tune's queue until they are up. On the local instance this
    process started, which cannot grow: as many as its CPUs (and GPUs) hold, and a SearchError when not one
    trial fits, rather than waiting forever.
    """
    available = ray.cluster_resources()
    workers = cfg.ray.min_workers  # an elastic trial starts on its smallest group
    per_trial_cpu = workers * cfg.ray.cpus_per_worker
    fits = math.floor(available.get("CPU", 0) / per_trial_cpu)
    if cfg.ray.use_gpu:
        fits = min(fits, math.floor(available.get("GPU", 0) / (workers * cfg.ray.gpus_per_worker)))
    wanted = cfg.tune.max_concurrent_trials
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        if fits < wanted:
            log.info(
                "the cluster holds %d of %d concurrent trials now (%s); the others wait for the autoscaler",
                max(fits, 0), wanted, available,
            )  # fmt: skip
        return wanted
    if fits < 1:
        raise SearchError(
            f"one trial needs {workers} workers x {cfg.ray.cpus_per_worker} CPU"
            f"{' + GPUs' if cfg.ray.use_gpu else ''}, more than the local Ray instance has ({available}); "
            "on a cluster that scales, give its address (ray.address or RAY_ADDRESS)"
        )
    return min(fits, wanted)


def _parent_run(client: MlflowClient, cfg: Config, resuming: bool) -> tuple[str, str]:
    """(experiment id, run id) of the search's parent run: the latest of this search when resuming, or new."""
    exp_id = experiment_id(client, client.tracking_uri, cfg.mlflow.experiment)
    if resuming:
        query = f"tags.`{names.SEARCH_TAG}` = '{cfg.tune.name}'"
        for run in client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"]):
            return exp_id, run.info.run_id
    run = client.create_run(
        exp_id,
        run_name=cfg.tune.name,
        tags={names.SEARCH_TAG: cfg.tune.name, names.STORAGE_TAG: cfg.ray.storage_path},
    )
    items = [_param(k, v) for k, v in flatten(cfg.to_dict()).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return exp_id, run.info.run_id


def run_search(cfg: Config) -> list[TrialRow]:
    """Run (or resume, same ``tune.name`` and ``ray.storage_path``) the search; returns the table."""
    check_metric_in_every_report(cfg)
    space = build_space(cfg.tune.space, cfg.to_dict())
    path = str(storage.locate(cfg.ray.storage_path, cfg.tune.name))  # a folder, or a URL in object storage
    resuming = tune.Tuner.can_restore(path)
    if resuming:
        check_same_space(cfg, path)
    prepare_data(cfg)
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_tracking_uri(uri)
    ensure_ray(cfg.ray.address)
    cfg = starting_weights(cfg, uri)
    base = cfg.to_dict()
    client = MlflowClient(uri)
    exp_id, parent_id = _parent_run(client, cfg, resuming)
    # The trial function only drives its Ray Train run: it asks for a little memory and no CPU, so the
    # CPUs (and GPUs) all go to the trials' Ray Train workers.
    search = Search(cfg.tune.name, base, uri, exp_id, parent_id)
    trainable = tune.with_resources(tune.with_parameters(_trial, search=search), {"memory": 64 * 2**20})
    param_space = {"params": space}
    if resuming:
        log.info("resuming the search in %s", path)
        tuner = tune.Tuner.restore(path, trainable, param_space=param_space, resume_errored=False)
    else:
        storage.write_bytes(
            storage.locate(path, SPACE_FILE), json.dumps(space_record(cfg), indent=1).encode()
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                num_samples=cfg.tune.num_samples,
                scheduler=_scheduler(cfg),
                search_alg=search_algorithm(cfg, space, concurrent_trials(cfg)),
            ),
            run_config=tune.RunConfig(name=cfg.tune.name, storage_path=cfg.ray.storage_path),
        )
    results = tuner.fit()
    rows = finalise_trials(client, exp_id, parent_id, results, cfg)
    log_summary(client, parent_id, rows, cfg)
    if rows and all(r.status == names.TRIAL_ERRORED for r in rows):
        raise SearchError(no_trial_finished(rows))
    return rows


def check_metric_in_every_report(cfg: Config) -> None:
    """Tune needs ``tune.metric`` in every epoch's report (a report without it errors the trial), and a
    ``val/`` metric is measured only every ``train.val_every`` epochs: refuse a search where it would be
    missing, before any data or trial."""
    if not cfg.tune.metric.startswith(names.VAL_PREFIX):
        return
    searched = "train.val_every" in cfg.tune.space
    if cfg.train.val_every > 1 or searched:
        setting = (
            "tune.space searches train.val_every" if searched else f"train.val_every={cfg.train.val_every}"
        )
        raise SearchError(
            f"{setting}, but tune.metric {cfg.tune.metric} is a validation metric, which Tune needs after "
            "every epoch: set train.val_every=1 for a search, or rank trials by a train/ metric"
        )


def starting_weights(cfg: Config, uri: str) -> Config:
    """``cfg`` with ``model.weights`` a local path every trial can read: the best checkpoint of the
    ``tune.warm_start`` run (trained first when it has not finished yet), else ``model.weights`` resolved
    (MLflow URIs are looked up here, on the driver), else unchanged."""
    if cfg.tune.warm_start is None:
        if cfg.model.weights is None:
            return cfg
        weights = resolve_weights(cfg.model.weights, uri)
    else:
        start = load_config(cfg.tune.warm_start, [f"mlflow.tracking_uri={uri}"])
        weights = finished_best_checkpoint(start, uri)
        if weights is None:
            log.info(
                "tune.warm_start: %s has no finished run yet; training it first (its best checkpoint "
                "starts every trial)",
                cfg.tune.warm_start,
            )
            weights = run_training(start).best_checkpoint
            if weights is None:
                raise SearchError(f"tune.warm_start: training {cfg.tune.warm_start} left no checkpoint")
        log.info("every trial starts from %s", weights)
    return replace(cfg, model=replace(cfg.model, weights=weights))


def finished_best_checkpoint(cfg: Config, uri: str) -> str | None:
    """The best checkpoint of the newest finished run of ``cfg`` (same experiment, run name and storage)
    that still exists (on disk or in object storage), or None."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    query = (
        f"tags.`{names.RUN_NAME_TAG}` = '{cfg.ray.run_name}' and "
        f"tags.`{names.STORAGE_TAG}` = '{cfg.ray.storage_path}' and attributes.status = 'FINISHED'"
    )
    for run in client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time DESC"]):
        best = run.data.tags.get(names.BEST_CHECKPOINT_TAG)
        if best and storage.exists(best):
            return best
    return None
