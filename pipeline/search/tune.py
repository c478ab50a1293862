"""Hyperparameter search with Ray Tune over any config key (by default the PGI loss weights and the
TAL top-k). Each trial is a full Ray Train run of the training loop, reporting every epoch so ASHA
can stop weak trials; MLflow holds a parent run for the search and one nested run per trial.

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

import csv
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.air.constants import EXPR_ERROR_FILE
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from pipeline import names, storage
from pipeline.checkpoint import load_checkpoint
from pipeline.config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from pipeline.errors import PipelineError
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
SPACE_FILE = "search_space.json"  # in the search's folder: the tune.space it started with
DEFAULT_SPACE: dict[str, dict[str, list]] = {
    "loss.aux_weight": {"uniform": [0.1, 1.0]},
    "loss.lead_weight": {"uniform": [0.25, 1.0]},
    "loss.tal_topk": {"choice": [5, 7, 10, 13, 16]},
}
DOMAINS = {
    "uniform": tune.uniform,
    "loguniform": tune.loguniform,
    "randint": tune.randint,
    "choice": tune.choice,
    "grid": tune.grid_search,
    "arms": tune.grid_search,  # over the arms' names; trial_config applies each arm's settings
}


class SearchError(PipelineError, ValueError):
    """A search that cannot start: bad space, unknown key, no room on the cluster."""


@dataclass(frozen=True)
class TrialRow:
    """One line of the results table."""

    trial: str
    params: dict[str, Any]
    best_map: float
    epochs: int
    status: str  # completed | stopped early | errored
    checkpoint: str | None
    mlflow_run_id: str | None
    error: str | None = None  # the last line of the trial's error
    error_file: str | None = None  # Ray Tune's error.txt of the trial (its whole traceback)


def build_space(space: dict[str, Any], base: dict[str, Any], where: str = "tune.space") -> dict[str, Any]:
    """Ray Tune domains for ``space``; every key must name a config key (checked against ``base``)."""
    domains: dict[str, Any] = {}
    for key, spec in (space or DEFAULT_SPACE).items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise SearchError(f"{where}.{key}: expected one of {{{', '.join(DOMAINS)}: [...]}}, got {spec!r}")
        ((kind, args),) = spec.items()
        if kind == "arms":
            domains[key] = tune.grid_search(list(_check_arms(args, base, f"{where}.{key}")))
            continue
        if not isinstance(args, list) or not args:
            raise SearchError(f"{where}.{key}: {kind} takes a non-empty list, got {args!r}")
        example = args[0]
        try:
            config_from_dict(apply_overrides(base, [f"{key}={yaml.safe_dump(example).strip()}"]), where)
        except ConfigError as e:
            raise SearchError(f"{where}.{key} is not a usable config key: {e}") from e
        domains[key] = DOMAINS[kind](args) if kind in ("choice", "grid") else DOMAINS[kind](*args)
    return domains


def _check_arms(arms: Any, base: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """``arms`` (arm name -> {config key: value}), each arm checked as a whole against ``base``."""
    if not isinstance(arms, dict) or not arms or not all(isinstance(a, dict) and a for a in arms.values()):
        raise SearchError(f"{where}: arms takes a mapping of arm name -> {{config key: value}}, got {arms!r}")
    for name, settings in arms.items():
        try:
            config_from_dict(apply_overrides(base, _overrides(settings)), where)
        except ConfigError as e:
            raise SearchError(f"{where}.{name}: {e}") from e
    return arms


def _overrides(settings: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v).strip()}" for k, v in settings.items()]


def trial_config(base: dict[str, Any], params: dict[str, Any], run_name: str) -> Config:
    """The training config of one trial: the base with the sampled ``params`` set (an ``arms`` key's
    value: that arm's settings)."""
    space = base.get("tune", {}).get("space") or {}
    settings: dict[str, Any] = {}
    for key, value in params.items():
        arms = space.get(key, {}).get("arms")
        settings.update(arms[value] if arms is not None else {key: value})
    return config_from_dict(
        apply_overrides(base, [*_overrides(settings), f"ray.run_name={run_name}"]), "trial"
    )


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
            names.TRIAL_STATUS_TAG: "running",
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
    per_trial_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    fits = math.floor(available.get("CPU", 0) / per_trial_cpu)
    if cfg.ray.use_gpu:
        fits = min(
            fits, math.floor(available.get("GPU", 0) / (cfg.ray.num_workers * cfg.ray.gpus_per_worker))
        )
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
            f"one trial needs {cfg.ray.num_workers} workers x {cfg.ray.cpus_per_worker} CPU"
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
    rows = _finalise_trials(client, exp_id, parent_id, results, cfg)
    _log_summary(client, parent_id, rows, cfg)
    if rows and all(r.status == "errored" for r in rows):
        raise SearchError(no_trial_finished(rows))
    return rows


def space_record(cfg: Config) -> dict[str, Any]:
    """The search space as a search records it when it starts (``SPACE_FILE`` in its folder): plain JSON."""
    return json.loads(json.dumps(cfg.tune.space or DEFAULT_SPACE, sort_keys=True))


def check_same_space(cfg: Config, path: str) -> None:
    """A rerun resumes the search in ``path`` only with the space it started with: Ray's restore checks
    the searched keys alone (and raises a ValueError from deep inside), and new ranges or choices would
    mix trials of two searches in one table. Searches started before the record existed are not checked."""
    recorded = storage.locate(path, SPACE_FILE)
    if not storage.is_file(recorded):
        return
    before, now = json.loads(storage.read_bytes(recorded)), space_record(cfg)
    if before == now:
        return
    changed = [
        f"{key}: {json.dumps(before.get(key))} -> {json.dumps(now.get(key))}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
    ]
    raise SearchError(
        f"search {cfg.tune.name} in {path} started with another tune.space ({'; '.join(changed)}); a rerun "
        f"resumes it only with the same space: give this search a new tune.name, or remove {path} to start "
        f"{cfg.tune.name} afresh (its trials' MLflow runs stay)"
    )


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


def no_trial_finished(rows: list[TrialRow]) -> str:
    """One line for a search in which every trial errored: how many, where their errors are, the first one."""
    files = [r.error_file for r in rows if r.error_file]
    where = f"; error files: {', '.join(files)}" if files else ""
    return f"no trial finished: {len(rows)} of {len(rows)} errored{where}; first error: {rows[0].error}"


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


def _finalise_trials(
    client: MlflowClient, exp_id: str, parent_id: str, results, cfg: Config
) -> list[TrialRow]:
    """Statuses from Tune's view of each trial (the trial itself cannot record that ASHA stopped it)."""
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{names.PARENT_RUN_TAG}` = '{parent_id}'", max_results=10000
    )
    rows = []
    for result in results:
        params = dict((result.config or {}).get("params", {}))
        trial_id = (result.metrics or {}).get("trial_id")
        run = next((r for r in runs if trial_id and r.data.tags.get(names.TRIAL_ID_TAG) == trial_id), None)
        if run is None:  # a trial that failed before its first report: match it by its parameters
            run = next((r for r in runs if r.data.params == {k: str(v) for k, v in params.items()}), None)
        if not params and run is not None:  # Tune does not restore the config of an errored trial
            params = {k: yaml.safe_load(v) for k, v in run.data.params.items()}
        history = result.metrics_dataframe
        epochs = int((result.metrics or {}).get("epoch", 0))
        if result.error is not None:
            status = "errored"
        elif epochs >= cfg.train.epochs:
            status = "completed"
        else:
            status = "stopped early"
        has_metric = history is not None and cfg.tune.metric in history
        best = (
            float(
                history[cfg.tune.metric].max() if cfg.tune.mode == "max" else history[cfg.tune.metric].min()
            )
            if has_metric
            else float("nan")
        )
        checkpoint = None
        if has_metric and "checkpoint_path" in history:
            ranked = history.dropna(subset=["checkpoint_path"]).sort_values(
                cfg.tune.metric, ascending=cfg.tune.mode == "min"
            )
            checkpoint = str(ranked["checkpoint_path"].iloc[0]) if len(ranked) else None
        if run is not None:
            client.set_tag(run.info.run_id, names.TRIAL_STATUS_TAG, status)
            client.set_terminated(run.info.run_id, status="FAILED" if status == "errored" else "FINISHED")
            if checkpoint:
                client.set_tag(run.info.run_id, names.BEST_CHECKPOINT_TAG, checkpoint)
        name = trial_id or (
            run.data.tags.get(names.TRIAL_ID_TAG) if run is not None else Path(result.path).name
        )
        error_file = Path(result.path) / EXPR_ERROR_FILE
        rows.append(
            TrialRow(
                name,
                params,
                best,
                epochs,
                status,
                checkpoint,
                run.info.run_id if run is not None else None,
                error=_last_line(result.error) if result.error is not None else None,
                error_file=str(error_file) if result.error is not None and error_file.is_file() else None,
            )
        )
    return rows


def _last_line(error: BaseException) -> str:
    """The line of a (possibly wrapped, multi-line) exception that says what went wrong."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _log_summary(client: MlflowClient, parent_id: str, rows: list[TrialRow], cfg: Config) -> None:
    keys = sorted({k for r in rows for k in r.params})
    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / "trials.csv"
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["trial", *keys, "best_map", "epochs", "status", "checkpoint", "mlflow_run_id"])
            for r in rows:
                writer.writerow(
                    [
                        r.trial,
                        *(r.params.get(k) for k in keys),
                        r.best_map,
                        r.epochs,
                        r.status,
                        r.checkpoint,
                        r.mlflow_run_id,
                    ]
                )
        client.log_artifact(parent_id, str(table))
        ranked = rank_trials(rows, cfg.tune.mode)
        client.log_artifact(parent_id, str(plot_trials(ranked, cfg.tune.metric, Path(d) / "trials.png")))
        best = next((r for r in ranked if r.status != "errored" and r.checkpoint), None)
        if best is not None:
            best_cfg = Path(d) / "best_config.yaml"
            best_cfg.write_text(
                yaml.safe_dump(
                    trial_config(cfg.to_dict(), best.params, cfg.ray.run_name).to_dict(), sort_keys=False
                )
            )
            client.log_artifact(parent_id, str(best_cfg))
            client.set_tag(parent_id, names.BEST_CHECKPOINT_TAG, best.checkpoint)
            client.set_tag(parent_id, "best_trial", best.trial)
            client.log_metric(parent_id, "best/" + cfg.tune.metric.replace("/", "_"), best.best_map)
    client.set_terminated(parent_id, status="FINISHED")


def rank_trials(rows: list[TrialRow], mode: str = "max") -> list[TrialRow]:
    """Best first by the trial's best metric; errored trials and trials without the metric last."""
    return sorted(
        rows,
        key=lambda r: (
            r.status == "errored" or math.isnan(r.best_map),
            -r.best_map if mode == "max" else r.best_map,
        ),
    )


def ranking_table(rows: list[TrialRow], mode: str = "max") -> str:
    """The trials as a text table, best first (errored trials last): rank, trial, the searched values,
    the best metric, epochs trained and status."""
    keys = sorted({k for r in rows for k in r.params})
    ranked = rank_trials(rows, mode)
    header = ["rank", "trial", *keys, "best", "epochs", "status"]
    lines = [
        [
            str(i),
            r.trial,
            *(_short(r.params.get(k)) for k in keys),
            f"{r.best_map:.4f}",
            str(r.epochs),
            r.status,
        ]
        for i, r in enumerate(ranked, 1)
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
    return "\n".join(
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *lines]
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_trials(ranked: list[TrialRow], metric: str, path: Path) -> Path:
    """One panel per numeric searched key: each trial's best metric against its value, coloured by status
    and labelled with its rank (``ranked`` is best first). A key whose values span more than 10x is drawn
    on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(
        {
            k
            for r in ranked
            for k, v in r.params.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.5), squeeze=False)
    colours = {"completed": "tab:green", "stopped early": "tab:orange", "errored": "tab:red"}
    for ax, key in zip(axes[0], keys, strict=False):
        values = []
        for rank, r in enumerate(ranked, start=1):
            value = r.params.get(key)
            if isinstance(value, (int, float)) and not math.isnan(r.best_map):
                ax.scatter(value, r.best_map, c=colours[r.status], label=r.status)
                ax.annotate(
                    str(rank), (value, r.best_map), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
                values.append(value)
        if values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
