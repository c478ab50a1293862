"""A real small search: Ray Tune trials that are Ray Train runs, ASHA, a failing trial, MLflow runs."""

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Experiment

from pipeline import names
from pipeline.config import load_config
from pipeline.search.space import SearchError, build_space
from pipeline.search.trials import TrialRow, ranking_table
from pipeline.search.tune import check_metric_in_every_report, run_search, search_algorithm, starting_weights

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cost(110), pytest.mark.process_group("searches")]

# train/total grows with aux_weight (it adds aux_weight x the aux loss), so with "min" ASHA has a
# clear loser at its first rung; -1 is not a valid weight and must fail its trial only.
AUX_WEIGHTS = [0.1, 1.0, 2.0, -1.0]


def small_search(root, shards, name: str, space: str) -> list[str]:
    """Overrides for a search of 1-worker trials of 2 epochs x 2 steps at 64 px over ``space``."""
    return [
        "model.name=yolov9-t",
        f"data.root={shards}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "train.epochs=2",
        "train.batch_size=2",
        "train.nominal_batch=2",
        "train.imgsz=64",
        "train.warmup_min_steps=1",
        "train.steps_per_epoch=2",
        "train.close_mosaic=0",
        "ray.num_workers=1",
        "ray.cpus_per_worker=1",
        "ray.max_failures=0",
        f"ray.storage_path={root / 'ray'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "mlflow.experiment=search",
        f"tune.name={name}",
        "tune.metric=train/total",
        "tune.mode=min",
        "tune.num_samples=1",
        "tune.max_concurrent_trials=2",
        "tune.scheduler=asha",
        "tune.grace_period=1",
        "tune.reduction_factor=2",
        f"tune.space={space}",
    ]


def start_config(root: Path, shards: Path) -> Path:
    """A ``tune.warm_start`` config: one 1-worker epoch of 2 steps, tracked in ``root``'s store."""
    start = {
        "model": {"name": "yolov9-t"},
        "data": {"root": str(shards), "num_workers": 0, "shuffle_buffer": 8},
        "train": {"epochs": 1, "batch_size": 2, "nominal_batch": 2, "imgsz": 64, "steps_per_epoch": 2,
                  "warmup_min_steps": 1, "close_mosaic": 0},
        "ray": {"num_workers": 1, "run_name": "start", "storage_path": str(root / "ray")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "start"},
    }  # fmt: skip
    (root / "start.yaml").write_text(yaml.safe_dump(start))
    return root / "start.yaml"


@pytest.fixture(scope="module")
def search(tmp_path_factory, tiny_shards, local_ray):
    """The module's search: four trials (one errors) from a warm start that the search trains first."""
    root = tmp_path_factory.mktemp("search")
    space = f"{{loss.aux_weight: {{grid: {AUX_WEIGHTS}}}, loss.tal_topk: {{choice: [7, 13]}}}}"
    warm_start = f"tune.warm_start={start_config(root, tiny_shards)}"
    cfg = load_config(None, [*small_search(root, tiny_shards, "small", space), warm_start])
    return cfg, run_search(cfg)


def test_every_trial_ends_with_a_status(search):
    _, rows = search
    assert len(rows) == len(AUX_WEIGHTS)
    by_weight = {r.params["loss.aux_weight"]: r for r in rows}
    assert by_weight[-1.0].status == "errored"
    assert all(by_weight[w].status in ("completed", "stopped early") for w in AUX_WEIGHTS if w > 0)
    assert by_weight[0.1].status == "completed"


def test_asha_stops_a_trial_early(search):
    _, rows = search
    stopped = [r for r in rows if r.status == "stopped early"]
    assert stopped and all(r.epochs < 2 for r in stopped)


def test_trials_trained_with_their_sampled_values(search):
    cfg, rows = search
    client = MlflowClient(cfg.mlflow.tracking_uri)
    for row in rows:
        if row.status == "errored":
            continue
        run = client.get_run(row.mlflow_run_id)
        assert run.data.metrics["hp/aux_weight"] == pytest.approx(row.params["loss.aux_weight"])
        assert run.data.metrics["hp/tal_topk"] == row.params["loss.tal_topk"]


def test_mlflow_holds_the_parent_and_one_nested_run_per_trial(search):
    cfg, rows = search
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("search")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`tune.name` = 'small'")
    nested = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(nested) == len(rows)
    assert {r.data.tags["trial.status"] for r in nested} >= {"completed", "stopped early", "errored"}
    assert all("loss.aux_weight" in r.data.params for r in nested)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.png", "best_config.yaml"} <= artifacts
    best = min((r for r in rows if r.status != "errored"), key=lambda r: r.best_map)
    assert parent.data.tags["best_checkpoint"] == best.checkpoint
    table = client.download_artifacts(parent.info.run_id, "trials.csv")
    with open(table) as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_every_trials_mlflow_status_agrees_with_the_searchs_table(search):
    cfg, rows = search
    client = MlflowClient(cfg.mlflow.tracking_uri)
    for row in rows:
        run = client.get_run(row.mlflow_run_id)
        assert run.data.tags[names.TRIAL_STATUS_TAG] == row.status, row
        assert run.info.status == ("FAILED" if row.status == "errored" else "FINISHED"), row


def test_rerunning_the_search_resumes_without_training_again(search):
    cfg, rows = search
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("search")
    before = len(client.search_runs([exp.experiment_id]))
    again = run_search(cfg)
    assert len(client.search_runs([exp.experiment_id])) == before
    assert sorted((r.params["loss.aux_weight"], r.status) for r in again) == sorted(
        (r.params["loss.aux_weight"], r.status) for r in rows
    )


def test_a_rerun_with_another_space_is_refused_naming_the_change_before_any_trial(search):
    cfg, _ = search
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("search")
    before = len(client.search_runs([exp.experiment_id]))
    space = {**cfg.tune.space, "loss.tal_topk": {"choice": [7, 10]}}
    with pytest.raises(
        SearchError,
        match=r"search small in .* started with another tune.space "
        r'\(loss.tal_topk: \{"choice": \[7, 13\]\} -> \{"choice": \[7, 10\]\}\).* a new tune.name',
    ):
        run_search(replace(cfg, tune=replace(cfg.tune, space=space)))
    assert len(client.search_runs([exp.experiment_id])) == before


def test_an_errored_trial_keeps_its_error_and_error_file(search):
    _, rows = search
    (errored,) = [r for r in rows if r.status == "errored"]
    assert "loss weights must be >= 0" in errored.error
    assert "loss weights must be >= 0" in Path(errored.error_file).read_text()


def test_a_search_whose_every_trial_errors_fails_loudly(tmp_path, tiny_shards, local_ray):
    # a model file that passes the config check (a .yaml path) but that no trial can build
    space = "{model.name: {grid: [no-such-model.yaml]}}"
    cfg = load_config(None, small_search(tmp_path, tiny_shards, "all-fail", space))
    with pytest.raises(
        SearchError,
        match=r"no trial finished: 1 of 1 errored; error files: .*error\.txt; "
        r"first error: .*no-such-model\.yaml",
    ):
        run_search(cfg)


def test_an_unknown_search_key_fails_before_any_trial():
    cfg = load_config(None)
    with pytest.raises(SearchError, match="loss.aux_wieght"):
        build_space({"loss.aux_wieght": {"uniform": [0.1, 1.0]}}, cfg.to_dict())
    with pytest.raises(SearchError, match="expected one of"):
        build_space({"loss.aux_weight": {"between": [0.1, 1.0]}}, cfg.to_dict())


def test_a_search_by_a_validation_metric_measured_every_other_epoch_is_refused_before_any_trial():
    cfg = load_config(None, ["train.val_every=2"])
    with pytest.raises(SearchError, match=r"train.val_every=2, but tune.metric val/map50_95 is a validation"):
        run_search(cfg)
    searched = load_config(None, ["tune.space={train.val_every: {choice: [1, 2]}}"])
    with pytest.raises(SearchError, match=r"tune.space searches train.val_every"):
        run_search(searched)


def test_a_search_by_a_training_metric_may_validate_every_other_epoch():
    check_metric_in_every_report(load_config(None, ["train.val_every=2", "tune.metric=train/total"]))


def test_the_same_seed_samples_the_same_trials():
    def first_trials(seed: int) -> list[dict]:
        cfg = load_config(None, [f"train.seed={seed}"])
        space = build_space(cfg.tune.space, cfg.to_dict())
        algorithm = search_algorithm(cfg, space, concurrent=2)
        algorithm.add_configurations(
            [Experiment("t", lambda config: None, config={"params": space}, num_samples=4)]
        )
        return [algorithm.next_trial().config["params"] for _ in range(2)]

    assert first_trials(0) == first_trials(0) != first_trials(1)


def test_a_warm_start_is_trained_once_and_starts_every_trial(search):
    cfg, rows = search
    client = MlflowClient(cfg.mlflow.tracking_uri)
    start_runs = client.search_runs([client.get_experiment_by_name("start").experiment_id])
    (trained,) = start_runs
    weights = trained.data.tags[names.BEST_CHECKPOINT_TAG]
    assert trained.info.status == "FINISHED"
    trials = [client.get_run(r.mlflow_run_id) for r in rows if r.status != "errored"]
    assert [t.data.tags[names.PRETRAINED_PATH_TAG] for t in trials] == [weights] * 3
    # a second search finds the finished run instead of training it again (run_search starts with this)
    assert starting_weights(cfg, cfg.mlflow.tracking_uri).model.weights == weights
    assert len(client.search_runs([trained.info.experiment_id])) == 1


def test_warm_start_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "search.yaml").write_text("tune: {warm_start: start.yaml}\n")
    cfg = load_config(tmp_path / "configs" / "search.yaml")
    assert cfg.tune.warm_start == str(tmp_path / "configs" / "start.yaml")


def test_the_ranking_table_puts_the_best_trial_first_and_errored_ones_last():
    def row(name: str, best: float, status: str) -> TrialRow:
        return TrialRow(name, {"loss.aux_weight": 0.5}, best, 2, status, None, None)

    rows = [row("a", 0.2, "completed"), row("b", float("nan"), "errored"), row("c", 0.4, "stopped early")]
    lines = ranking_table(rows, "max").splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["c", "a", "b"]
    assert lines[0].split() == ["rank", "trial", "loss.aux_weight", "best", "epochs", "status"]
