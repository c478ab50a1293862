"""A finished search's trials: their statuses and best scores from Tune's results (recorded on their
MLflow runs), the ranking, and the table, plot and best config logged to the parent run."""

from __future__ import annotations

import csv
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient
from ray.air.constants import EXPR_ERROR_FILE

from pipeline import names
from pipeline.config import Config
from pipeline.plots import pyplot
from pipeline.search.space import trial_config


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


def no_trial_finished(rows: list[TrialRow]) -> str:
    """One line for a search in which every trial errored: how many, where their errors are, the first one."""
    files = [r.error_file for r in rows if r.error_file]
    where = f"; error files: {', '.join(files)}" if files else ""
    return f"no trial finished: {len(rows)} of {len(rows)} errored{where}; first error: {rows[0].error}"


def finalise_trials(
    client: MlflowClient, exp_id: str, parent_id: str, results, cfg: Config
) -> list[TrialRow]:
    """One row per Tune result, its status from Tune's view of the trial (the trial itself cannot record
    that ASHA stopped it), recorded with its best checkpoint on the trial's MLflow run."""
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{names.PARENT_RUN_TAG}` = '{parent_id}'", max_results=10000
    )
    rows = []
    for result in results:
        params = dict((result.config or {}).get("params", {}))
        trial_id = (result.metrics or {}).get("trial_id")
        run = _trial_run(runs, trial_id, params)
        if not params and run is not None:  # Tune does not restore the config of an errored trial
            params = {k: yaml.safe_load(v) for k, v in run.data.params.items()}
        epochs = int((result.metrics or {}).get("epoch", 0))
        status = trial_status(result.error is not None, epochs, cfg.train.epochs)
        best, checkpoint = best_of_history(result.metrics_dataframe, cfg.tune.metric, cfg.tune.mode)
        if run is not None:
            client.set_tag(run.info.run_id, names.TRIAL_STATUS_TAG, status)
            ended = "FAILED" if status == names.TRIAL_ERRORED else "FINISHED"
            client.set_terminated(run.info.run_id, status=ended)
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


def _trial_run(runs: list[Any], trial_id: str | None, params: dict[str, Any]) -> Any:
    """The trial's nested MLflow run: by its trial id, else (a trial that failed before its first report)
    by its parameters; None if it has none."""
    run = next((r for r in runs if trial_id and r.data.tags.get(names.TRIAL_ID_TAG) == trial_id), None)
    if run is None:
        run = next((r for r in runs if r.data.params == {k: str(v) for k, v in params.items()}), None)
    return run


def trial_status(errored: bool, epochs: int, budget: int) -> str:
    """errored, completed (trained all ``budget`` epochs) or stopped early (by the scheduler)."""
    if errored:
        return names.TRIAL_ERRORED
    return names.TRIAL_COMPLETED if epochs >= budget else names.TRIAL_STOPPED


def best_of_history(history: Any, metric: str, mode: str) -> tuple[float, str | None]:
    """(the best ``metric`` of a trial's reports, the checkpoint reported with it); NaN and None when the
    trial never reported the metric. ``history``: Tune's metrics dataframe of the trial (or None)."""
    if history is None or metric not in history:
        return float("nan"), None
    best = float(history[metric].max() if mode == "max" else history[metric].min())
    if "checkpoint_path" not in history:
        return best, None
    ranked = history.dropna(subset=["checkpoint_path"]).sort_values(metric, ascending=mode == "min")
    return best, (str(ranked["checkpoint_path"].iloc[0]) if len(ranked) else None)


def _last_line(error: BaseException) -> str:
    """The line of a (possibly wrapped, multi-line) exception that says what went wrong."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def log_summary(client: MlflowClient, parent_id: str, rows: list[TrialRow], cfg: Config) -> None:
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
        best = next((r for r in ranked if r.status != names.TRIAL_ERRORED and r.checkpoint), None)
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
            r.status == names.TRIAL_ERRORED or math.isnan(r.best_map),
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
    plt = pyplot()

    keys = sorted(
        {
            k
            for r in ranked
            for k, v in r.params.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.5), squeeze=False)
    colours = {
        names.TRIAL_COMPLETED: "tab:green",
        names.TRIAL_STOPPED: "tab:orange",
        names.TRIAL_ERRORED: "tab:red",
    }
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
