"""The PGI study: arms as a search space, the study config end to end on the synthetic set (Ray Tune,
MLflow), and the report's table, figures and conclusion."""

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.report import main as report_main
from pipeline.config import load_config
from pipeline.search.space import SearchError, build_space, trial_config
from pipeline.search.study_report import ArmSummary, conclusion
from pipeline.search.tune import run_search

pytestmark = [pytest.mark.cost(80), pytest.mark.process_group("searches")]

STUDY = Path(__file__).parents[2] / "jobs" / "configs" / "study-pgi.yaml"
ARMS = ["reference", "swapped", "equal", "lead-guided", "no-aux", "gelan"]
# the arms the end-to-end run trains: each one checked there for what it sets (the others' settings are
# checked by the first test, and they train a step in test_engine); three trials where six would add three
# Ray Train runs and nothing checked
RUN_ARMS = ["reference", "no-aux", "gelan"]


def test_each_arm_of_the_study_sets_its_own_settings_and_nothing_else():
    cfg = load_config(STUDY)
    space = build_space(cfg.tune.space, cfg.to_dict())
    assert sorted(space["arm"]["grid_search"]) == sorted(ARMS)
    assert space["train.seed"] == {"grid_search": [0, 1, 2]}
    swapped = trial_config(cfg.to_dict(), {"arm": "swapped", "train.seed": 2}, "t")
    assert (swapped.loss.aux_weight, swapped.loss.lead_weight, swapped.train.seed) == (1.0, 0.25, 2)
    guided = trial_config(cfg.to_dict(), {"arm": "lead-guided", "train.seed": 0}, "t")
    assert (guided.loss.assign, guided.loss.aux_weight, guided.model.name) == (
        "lead_guided",
        0.25,
        "yolov9-t",
    )
    gelan = trial_config(cfg.to_dict(), {"arm": "gelan", "train.seed": 0}, "t")
    assert gelan.model.name == "gelan-t"


def test_an_arm_with_an_unknown_key_stops_the_search_naming_the_arm():
    cfg = load_config(STUDY)
    cfg.tune.space["arm"]["arms"]["typo"] = {"loss.aux_wieght": 0.5}
    with pytest.raises(SearchError, match=r"tune.space.arm.typo: .*loss.aux_wieght"):
        build_space(cfg.tune.space, cfg.to_dict())


def arm(name: str, seeds: int, best: tuple[float, float]) -> ArmSummary:
    nan = (math.nan, math.nan)
    figures = {"best map50_95": best, "best map50": nan, "final map50_95": nan, "final map50": nan}
    return ArmSummary(name, seeds, {**figures, "epochs to target": nan}, 0)


def test_the_conclusion_calls_a_difference_real_only_beyond_twice_the_seed_spread():
    # pooled spread of two 3-seed arms with std 0.02 and 0.02 is 0.02: 0.03 is within 2 x 0.02, 0.05 is not
    lines = conclusion([arm("equal", 3, (0.55, 0.02)), arm("reference", 3, (0.50, 0.02)),
                        arm("gelan", 3, (0.47, 0.02))])  # fmt: skip
    assert "equal vs reference: best mAP50-95 +0.0500, more than twice the seed spread (0.0200)." in lines
    assert "gelan vs reference: best mAP50-95 -0.0300, within the seed spread (2 x 0.0200)." in lines


def test_with_one_seed_per_arm_the_conclusion_says_there_is_no_spread_to_judge_by():
    lines = conclusion([arm("swapped", 1, (0.3, math.nan)), arm("reference", 1, (0.2, math.nan))])
    assert lines[0].startswith("One seed per arm: there is no seed spread")
    assert "swapped vs reference: best mAP50-95 +0.1000, no spread to judge it against." in lines


def test_arms_that_learned_nothing_are_not_compared():
    lines = conclusion([arm("reference", 2, (0.001, 0.0005)), arm("swapped", 2, (0.0, 0.0))])
    assert len(lines) == 1 and "nothing is concluded" in lines[0]


@pytest.mark.ray
@pytest.mark.slow
def test_the_study_runs_every_arm_and_the_report_has_them_all(local_ray, tiny_shards, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        STUDY,
        [
            f"data.root={tiny_shards}",
            "data.synthetic=null",
            "train.epochs=2",
            "train.batch_size=2",
            "train.nominal_batch=2",
            "train.imgsz=64",
            "train.steps_per_epoch=1",
            "train.warmup_min_steps=0",
            "train.close_mosaic=1",
            f"ray.storage_path={tmp_path / 'ray'}",
            f"mlflow.tracking_uri={uri}",
        ],
    )
    cfg.tune.space["train.seed"] = {"grid": [0]}
    arms = cfg.tune.space["arm"]["arms"]
    cfg.tune.space["arm"]["arms"] = {name: arms[name] for name in RUN_ARMS}
    rows = run_search(cfg)
    assert sorted(r.params["arm"] for r in rows) == sorted(RUN_ARMS)
    assert all(r.status == "completed" and r.epochs == 2 for r in rows)

    client = MlflowClient(uri)
    used = {r.params["arm"]: client.get_run(r.mlflow_run_id).data.metrics for r in rows}
    assert (used["reference"]["hp/aux_weight"], used["reference"]["hp/lead_weight"]) == (0.25, 1.0)
    assert used["no-aux"]["hp/aux_weight"] == 0.0 and used["no-aux"]["pgi/backbone_p3/aux_grad_norm"] == 0.0
    assert used["reference"]["pgi/backbone_p3/aux_grad_norm"] > 0
    assert "pgi/backbone_p3/main_grad_norm" in used["gelan"]
    assert not any(k.endswith("aux_grad_norm") for k in used["gelan"])

    capsys.readouterr()  # the search's own output
    report_main(["--search", "study-pgi", "--tracking-uri", uri, "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "report.md").read_text()
    assert text == capsys.readouterr().out.split("written to")[0].rstrip("\n") + "\n"
    table = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    for name in RUN_ARMS:
        assert table.count(name) >= 2  # the arm table and the trials table
    assert "## Conclusion" in text and "![mAP curves](map_curves.png)" in text
    parent = client.search_runs(
        [client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id], "tags.`tune.name` = 'study-pgi'"
    )[0]
    logged = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report.md", "map_curves.png", "pgi_by_arm.png"}
