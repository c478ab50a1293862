"""The report of a search (the PGI study, or any search): what each arm reached, how much seeds move it,
and what the gradient diagnostics show, from the search's MLflow runs.

An arm is a trial's searched values other than ``train.seed`` (for the study: its ``arm``), so the trials
of one arm differ by seed only. Per arm: best and final mAP50-95 and mAP50 (mean and sample standard
deviation over seeds), and the epochs each seed took to reach ``target`` of the best mAP50-95 any trial
reached. Written as ``report.md`` with ``map_curves.png`` and ``pgi_by_arm.png`` into a folder and logged
to the search's parent run under ``report/``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.errors import PipelineError
from pipeline.plots import pyplot
from pipeline.training.pgi_diagnostics import GRADIENT_STATS, log_scale_if_positive, stage_names

log = logging.getLogger(__name__)
SEED_PARAM = "train.seed"
ARTIFACT_DIR = "report"
MIN_LEARNED_MAP = 0.01  # below this best mAP50-95 no arm learned enough for a comparison to mean anything


class ReportError(PipelineError, LookupError):
    """No such search, or a search without a finished trial."""


@dataclass
class Trial:
    """One trial's run: its arm, seed, status and per-epoch metrics (``curves[m]``: [(epoch, value)])."""

    run_id: str
    arm: str
    seed: str
    status: str
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def values(self, metric: str) -> list[float]:
        return [v for _, v in self.curves.get(metric, [])]

    def best(self, metric: str) -> float:
        return max(self.values(metric), default=math.nan)

    def final(self, metric: str) -> float:
        return self.values(metric)[-1] if self.values(metric) else math.nan

    def epochs_to(self, level: float) -> int | None:
        """The first epoch whose mAP50-95 reached ``level``; None if none did."""
        return next((int(e) for e, v in self.curves.get(names.MAP, []) if v >= level), None)


@dataclass(frozen=True)
class ArmSummary:
    """Mean and sample standard deviation (NaN for one seed) of each figure over an arm's seeds."""

    arm: str
    seeds: int
    figures: dict[str, tuple[float, float]]  # figure name -> (mean, std)
    reached: int  # seeds that reached the target


FIGURES = ("best map50_95", "best map50", "final map50_95", "final map50", "epochs to target")


def find_search(client: MlflowClient, search: str) -> tuple[str, str]:
    """(experiment id, parent run id) of the newest search named ``search`` in any experiment."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`{names.SEARCH_TAG}` = '{search}'"
    runs = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ReportError(f"no search named {search!r} in the MLflow store {client.tracking_uri}")
    return runs[0].info.experiment_id, runs[0].info.run_id


def load_trials(client: MlflowClient, experiment: str, parent: str) -> list[Trial]:
    """The search's trials (nested runs) with their mAP and ``pgi/`` curves."""
    runs = client.search_runs([experiment], f"tags.`{names.PARENT_RUN_TAG}` = '{parent}'", max_results=10000)
    trials = []
    for run in runs:
        params = run.data.params
        searched = {k: v for k, v in params.items() if k != SEED_PARAM}
        arm = searched.get("arm") or ", ".join(f"{k}={v}" for k, v in sorted(searched.items())) or "all"
        trial = Trial(run.info.run_id, arm, params.get(SEED_PARAM, "-"),
                      run.data.tags.get(names.TRIAL_STATUS_TAG, "?"))  # fmt: skip
        wanted = [names.MAP, names.MAP50, *(k for k in run.data.metrics if k.startswith(names.PGI_PREFIX))]
        for metric in wanted:
            history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
            trial.curves[metric] = [(m.step, m.value) for m in history]
        trials.append(trial)
    return sorted(trials, key=lambda t: (t.arm, t.seed))


def summarise(trials: Sequence[Trial], target: float) -> tuple[list[ArmSummary], float]:
    """Per-arm figures over the completed trials (arms in order of mean best mAP50-95, best first) and the
    mAP50-95 level that "epochs to target" counts to: ``target`` times the best mAP50-95 of any trial."""
    level = target * max((t.best(names.MAP) for t in trials if t.values(names.MAP)), default=math.nan)
    arms: dict[str, list[Trial]] = {}
    for t in trials:
        # a stopped trial had less budget than the others
        if t.values(names.MAP) and t.status == names.TRIAL_COMPLETED:
            arms.setdefault(t.arm, []).append(t)
    out = []
    for arm, group in arms.items():
        reached = [t.epochs_to(level) for t in group]
        per_figure = {
            "best map50_95": [t.best(names.MAP) for t in group],
            "best map50": [t.best(names.MAP50) for t in group],
            "final map50_95": [t.final(names.MAP) for t in group],
            "final map50": [t.final(names.MAP50) for t in group],
            "epochs to target": [float(e) for e in reached if e is not None],
        }
        figures = {k: _mean_std(v) for k, v in per_figure.items()}
        out.append(ArmSummary(arm, len(group), figures, sum(e is not None for e in reached)))
    return sorted(out, key=lambda a: -a.figures["best map50_95"][0]), level


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def conclusion(arms: Sequence[ArmSummary], reference: str = "reference") -> list[str]:
    """Sentences the table supports: how each arm's mean best mAP50-95 compares with the reference arm's
    (or the top arm's) against the seed spread; nothing is called a win that the spread does not allow."""
    if not arms:
        return ["No trial reported a validation mAP: nothing to compare."]
    top = arms[0]
    if top.figures["best map50_95"][0] < MIN_LEARNED_MAP:
        return [
            f"No arm reached a best mAP50-95 of {MIN_LEARNED_MAP} (the top one "
            f"{top.figures['best map50_95'][0]:.4f}): the budget is too small for the arms to differ "
            "meaningfully; nothing is concluded."
        ]
    base = next((a for a in arms if a.arm == reference), top)
    lines = []
    if max(a.seeds for a in arms) < 2:
        lines.append(
            "One seed per arm: there is no seed spread to compare the differences against, so the ranking "
            "below is one run per arm and may not repeat with other seeds; read it as a lead, not a result."
        )
    spreads = [a.figures["best map50_95"][1] for a in arms if not math.isnan(a.figures["best map50_95"][1])]
    for arm in arms:
        if arm is base:
            continue
        diff = arm.figures["best map50_95"][0] - base.figures["best map50_95"][0]
        pooled = _pooled(arm, base)
        if math.isnan(pooled):
            verdict = "no spread to judge it against"
        elif abs(diff) > 2 * pooled:
            verdict = f"more than twice the seed spread ({pooled:.4f})"
        else:
            verdict = f"within the seed spread (2 x {pooled:.4f})"
        lines.append(f"{arm.arm} vs {base.arm}: best mAP50-95 {diff:+.4f}, {verdict}.")
    if spreads:
        lines.append(
            "Seed spread (standard deviation of best mAP50-95 within an arm): "
            f"{min(spreads):.4f} to {max(spreads):.4f}."
        )
    return lines


def _pooled(a: ArmSummary, b: ArmSummary) -> float:
    """Pooled standard deviation of the two arms' best mAP50-95 (NaN when either has one seed)."""
    (_, sa), (_, sb) = a.figures["best map50_95"], b.figures["best map50_95"]
    if math.isnan(sa) or math.isnan(sb):
        return math.nan
    return math.sqrt(((a.seeds - 1) * sa**2 + (b.seeds - 1) * sb**2) / (a.seeds + b.seeds - 2))


def diagnostics_table(trials: Sequence[Trial]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(stages, arm -> {"<stage>/<stat>": value}): each statistic at the last epoch that has it, mean
    over the arm's seeds."""
    stages = stage_names([dict.fromkeys(t.curves) for t in trials])
    table: dict[str, dict[str, list[float]]] = {}
    for t in trials:
        for metric, curve in t.curves.items():
            if metric.startswith(names.PGI_PREFIX) and curve:
                key = metric.removeprefix(names.PGI_PREFIX)
                table.setdefault(t.arm, {}).setdefault(key, []).append(curve[-1][1])
    return stages, {arm: {k: statistics.fmean(v) for k, v in d.items()} for arm, d in table.items()}


def plot_map_curves(trials: Sequence[Trial], path: Path) -> Path:
    """mAP50-95 and mAP50 per epoch, one colour per arm, one line per seed."""
    plt = pyplot()
    arms = sorted({t.arm for t in trials})
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, (names.MAP, names.MAP50), strict=True):
        labelled = set()
        for t in trials:
            curve = t.curves.get(metric, [])
            if curve:
                ax.plot(*zip(*curve, strict=True), marker=".", color=colours[t.arm],
                        label=None if t.arm in labelled else t.arm)  # fmt: skip
                labelled.add(t.arm)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} (EMA main branch); a line per seed")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_diagnostics(stages: list[str], table: dict[str, dict[str, float]], path: Path) -> Path:
    """The arms' diagnostics side by side: a panel per statistic, stages on the x axis, a line per arm
    (last epoch, mean over seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(GRADIENT_STATS), figsize=(4 * len(GRADIENT_STATS), 3.8), squeeze=False)
    for ax, stat in zip(axes[0], GRADIENT_STATS, strict=True):
        for arm, values in sorted(table.items()):
            ys = [values.get(f"{s}/{stat}", np.nan) for s in stages]
            if not all(np.isnan(ys)):
                ax.plot(range(len(stages)), ys, marker="o", label=arm)
        ax.set_xticks(range(len(stages)), stages, rotation=45, ha="right", fontsize=7)
        ax.set_title(stat.replace("_", " "))
        if stat.endswith("norm") or stat == "aux_main_ratio":
            log_scale_if_positive(ax)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("PGI gradient diagnostics at the last epoch (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def markdown(
    search: str, trials: Sequence[Trial], arms: Sequence[ArmSummary], level: float, target: float
) -> str:
    """The report as Markdown: the table per arm, the diagnostics at the last epoch, the conclusion."""
    stages, diag = diagnostics_table(trials)
    seeds = sorted({t.seed for t in trials})
    epochs = max((len(t.values(names.MAP)) for t in trials), default=0)
    lines = [
        f"# Search `{search}`: {len(arms)} arms x {len(seeds)} seed(s) ({', '.join(seeds)}), "
        f"up to {epochs} epochs",
        "",
        f"mAP on the val split (EMA main branch, pycocotools); mean ± sample standard deviation over seeds. "
        f"Epochs to target: first epoch with mAP50-95 >= {target:.0%} of the best any trial reached "
        f"({level:.4f}); n/a when no seed did.",
        "",
        "| arm | seeds | " + " | ".join(FIGURES) + " |",
        "|---|---|" + "---|" * len(FIGURES),
    ]
    for a in arms:
        cells = [_cell(*a.figures[f]) for f in FIGURES[:-1]]
        mean, std = a.figures["epochs to target"]
        cells.append(f"{_cell(mean, std, 1)} ({a.reached}/{a.seeds})" if a.reached else f"n/a (0/{a.seeds})")
        lines.append(f"| {a.arm} | {a.seeds} | " + " | ".join(cells) + " |")
    left_out = [t for t in trials if t.status != names.TRIAL_COMPLETED]
    notes = (
        [f"{len(left_out)} trial(s) did not complete (see Trials) and are left out of the table."]
        if left_out
        else []
    )
    lines += ["", "## Conclusion", "", *(f"- {s}" for s in [*notes, *conclusion(arms)]), ""]
    lines += ["## mAP curves", "", "![mAP curves](map_curves.png)", ""]
    lines += _diagnostics_section(stages, diag)
    lines += [
        "## Trials",
        "",
        "| arm | seed | status | best map50_95 | final map50_95 | run |",
        "|---|---|---|---|---|---|",
    ]
    for t in trials:
        best, final = t.best(names.MAP), t.final(names.MAP)
        lines.append(f"| {t.arm} | {t.seed} | {t.status} | {best:.4f} | {final:.4f} | `{t.run_id}` |")
    return "\n".join(lines) + "\n"


def _diagnostics_section(stages: list[str], diag: dict[str, dict[str, float]]) -> list[str]:
    """The report's gradient-diagnostics table (backbone stages: aux/main norm ratio / cosine) and its
    picture; nothing when no trial logged diagnostics."""
    if not diag:
        return []
    shown = [s for s in stages if s.startswith("backbone")] or stages
    lines = [
        "## Gradient diagnostics (last epoch, mean over seeds)",
        "",
        "What each branch's weighted loss alone sends into each stage "
        "(`pipeline/training/pgi_diagnostics.py`). Backbone "
        "stages, aux/main gradient-norm ratio and cosine similarity:",
        "",
        "| arm | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for arm, values in sorted(diag.items()):
        cells = []
        for s in shown:
            ratio, cos = values.get(f"{s}/aux_main_ratio"), values.get(f"{s}/cosine")
            cells.append("-" if ratio is None else f"{ratio:.3g} / {'-' if cos is None else f'{cos:+.2f}'}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "![diagnostics by arm](pgi_by_arm.png)", ""]
    return lines


def build_report(uri: str, search: str, out: str | Path, target: float = 0.9) -> Path:
    """Write the report of search ``search`` (store ``uri``) into ``out`` and log it to the search's parent
    run; the Markdown file's path."""
    client = MlflowClient(uri)
    experiment, parent = find_search(client, search)
    trials = load_trials(client, experiment, parent)
    if not any(t.values(names.MAP) for t in trials):
        raise ReportError(f"search {search!r} has no trial with a validation mAP ({len(trials)} trials)")
    arms, level = summarise(trials, target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    report.write_text(markdown(search, trials, arms, level, target))
    files = [report, plot_map_curves(trials, out / "map_curves.png")]
    stages, diag = diagnostics_table(trials)
    if diag:
        files.append(plot_diagnostics(stages, diag, out / "pgi_by_arm.png"))
    for f in files:
        client.log_artifact(parent, str(f), ARTIFACT_DIR)
    log.info("report of %s: %s (logged to run %s under %s/)", search, report, parent, ARTIFACT_DIR)
    return report
