"""The README walked as a newcomer walks it: every command typed as written, one after the other, in one
fresh folder, with the default settings (relative ``sqlite:///mlflow.db``, the shipped configs).

1. ``python -m jobs.train``: the demo generates its synthetic shards, starts its own local Ray, trains
   yolov9-t with two workers and must end with a model that clearly learned (an untrained one scores ~0).
2. ``python -m jobs.tune``: the search demo, cut to two short trials by overrides, default tracking URI.
3. ``python -m jobs.register --run yolov9-demo --name yolov9-det``: the demo's run, verified and registered.
   ``python -m jobs.evaluate --checkpoint BEST --data data/synthetic --json scores.json`` on the demo's best
   checkpoint, and
   ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` (on a free port) showing the demo's experiment.
4. ``python -m jobs.predict --model models:/yolov9-det@champion --source photos --out predictions``.
5. ``mlflow models serve -m models:/yolov9-det@champion --env-manager local -h 127.0.0.1 -p PORT``, and
   ``python -m jobs.serve --model models:/yolov9-det@champion --port PORT`` answering the README's curl.
"""

import base64
import csv
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_config
from pipeline.data import read_manifest
from pipeline.data.manifest import manifest_path
from tests.conftest import free_port, start_group, stop_group, val_jpegs, wait_until_serving

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cost(450), pytest.mark.own_process]

LEARNED_MAP50 = 0.5
# what a newcomer's shell has: none of the settings a developer or a cluster may have exported
ENV = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
BIN = Path(sys.executable).parent


def typed(folder: Path, *command: str, timeout: int) -> subprocess.CompletedProcess:
    """A README command run in ``folder`` as typed: ``python -m jobs.x ...`` with the venv's interpreter."""
    return subprocess.run(
        [sys.executable, "-m", *command], cwd=folder, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("newcomer")


@pytest.fixture(scope="module")
def store(folder) -> MlflowClient:
    """The MLflow store the README's commands use by default: ``mlflow.db`` in the folder they ran in."""
    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


@pytest.fixture(scope="module")
def demo(folder) -> str:
    return succeeded(typed(folder, "jobs.train", timeout=900))


@pytest.fixture(scope="module")
def search(demo, folder) -> str:
    cut_down = ["tune.num_samples=2", "train.epochs=1", "train.steps_per_epoch=4"]
    return succeeded(typed(folder, "jobs.tune", *cut_down, timeout=600))


@pytest.fixture(scope="module")
def registered(demo, folder) -> str:
    return succeeded(
        typed(folder, "jobs.register", "--run", "yolov9-demo", "--name", "yolov9-det", timeout=600)
    )


def test_the_demo_trains_a_detector_that_learned(demo, folder, store):
    found = re.search(r"best mAP@0\.5:0\.95 ([\d.]+), mAP@0\.5 ([\d.]+) after (\d+) epochs", demo)
    assert found, demo[-2000:]
    map50_95, map50, epochs = float(found[1]), float(found[2]), int(found[3])
    assert map50 >= LEARNED_MAP50, f"the demo model did not learn: mAP@0.5 {map50}"
    assert map50_95 > 0.2

    checkpoint = re.search(r"best checkpoint:\s+(\S+)", demo)[1]
    state = load_checkpoint(checkpoint)
    assert state.epoch <= epochs and state.best_map == pytest.approx(map50_95, abs=1e-4)
    assert (folder / "data" / "synthetic" / "val-coco.json").is_file()

    (run,) = store.search_runs([store.get_experiment_by_name("yolov9-demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.aux_weight"] == "0.25" and run.data.params["model.name"] == "yolov9-t"
    assert run.data.tags["dataset.manifest_hash"] and run.data.tags["dataset.val_manifest_hash"]
    assert len(store.get_metric_history(run.info.run_id, "val/map50_95")) == epochs
    assert {"config.yaml", "curves.png", "val_predictions.png"} <= {
        a.path for a in store.list_artifacts(run.info.run_id)
    }


def test_fine_tuning_the_demo_scores_in_one_epoch_what_a_fresh_start_does_not(demo, folder, store):
    (run,) = store.search_runs(
        [store.get_experiment_by_name("yolov9-demo").experiment_id], "tags.`ray.run_name` = 'demo'"
    )
    scratch_first_epoch = min(store.get_metric_history(run.info.run_id, "val/map50_95"), key=lambda m: m.step)
    command = [
        "jobs.train",
        f"model.weights=runs:/{run.info.run_id}",
        "train.epochs=1",
        "train.steps_per_epoch=8",  # a quarter of the demo's epoch: what transfers is the weights
        "ray.run_name=finetune",
    ]
    tuned = succeeded(typed(folder, *command, timeout=600))
    found = re.search(r"best mAP@0\.5:0\.95 ([\d.]+), mAP@0\.5 ([\d.]+) after 1 epochs", tuned)
    assert scratch_first_epoch.value < 0.05 and float(found[1]) > 0.3, (scratch_first_epoch.value, found[0])


def test_evaluate_rescores_the_demos_best_checkpoint(demo, folder):
    best = re.search(r"best checkpoint:\s+(\S+)", demo)[1]
    command = ["jobs.evaluate", "--checkpoint", best, "--data", "data/synthetic", "--json", "scores.json"]
    table = succeeded(typed(folder, *command, timeout=300))
    assert "circle" in table and "square" in table  # the per-class rows of the printed table
    scores = json.loads((folder / "scores.json").read_text())["stats"]
    assert scores["map50_95"] == pytest.approx(load_checkpoint(best).best_map, abs=1e-3)


def test_mlflow_ui_shows_the_demos_experiment(demo, folder, tmp_path):
    port = free_port()
    log = tmp_path / "ui.log"
    command = [str(BIN / "mlflow"), "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--port", str(port)]
    with log.open("wb") as err:
        server = start_group(command, cwd=folder, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_until_serving(port, server, log, path="/health")
            url = (
                f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=yolov9-demo"
            )
            with urllib.request.urlopen(url, timeout=30) as response:
                assert json.loads(response.read())["experiment"]["name"] == "yolov9-demo"
        finally:
            stop_group(server)


def test_the_search_logs_every_trial_into_the_users_store(search, store):
    counts = re.search(r"^(\d) completed, (\d) stopped early, 0 errored$", search, re.M)
    assert counts and int(counts[1]) + int(counts[2]) == 2, search[-2000:]
    experiment = store.get_experiment_by_name("yolov9-tune-demo")
    runs = store.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert {a.path for a in store.list_artifacts(parent.info.run_id)} >= {
        "trials.csv",
        "trials.png",
        "best_config.yaml",
    }


def test_the_search_starts_from_the_demo_and_ranks_its_trials(demo, search, store, tmp_path):
    experiment = store.get_experiment_by_name("yolov9-tune-demo")
    (parent,) = store.search_runs([experiment.experiment_id], "tags.`tune.name` = 'tune-demo'")
    with open(store.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))) as f:
        best = [float(row["best_map"]) for row in csv.DictReader(f)]
    # from the demo's trained model a trial keeps a real mAP; a search that cannot rank scores all alike
    assert min(best) > 0.1 and len({round(b, 4) for b in best}) == len(best), best
    demo_best = re.search(r"best checkpoint:\s+(\S+)", demo)[1]
    trials = store.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {t.data.tags["pretrained.path"] for t in trials} == {demo_best}


def test_the_best_trials_config_is_a_training_config(search, store, tmp_path):
    experiment = store.get_experiment_by_name("yolov9-tune-demo")
    (parent,) = store.search_runs([experiment.experiment_id], "tags.`tune.name` = 'tune-demo'")
    best = store.download_artifacts(parent.info.run_id, "best_config.yaml", str(tmp_path))
    cfg = load_config(best, ["train.epochs=30", "ray.run_name=final"])
    assert cfg.ray.run_name == "final" and cfg.model.name == "yolov9-t"


def test_the_demos_run_registers_as_the_champion(registered, store):
    assert re.search(r"^registered models:/yolov9-det/1 ", registered, re.M), registered[-2000:]
    champion = store.get_model_version_by_alias("yolov9-det", "champion")
    assert str(champion.version) == "1"
    assert float(champion.tags["map50_95"]) > 0.2


def test_predict_draws_and_lists_detections_for_a_folder_of_photos(registered, folder):
    photos = val_jpegs(folder / "data" / "synthetic", folder / "photos")
    command = ["jobs.predict", "--model", "models:/yolov9-det@champion", "--source", "photos"]
    succeeded(typed(folder, *command, "--out", "predictions", timeout=300))
    detections = json.loads((folder / "predictions" / "detections.json").read_text())
    assert set(detections) == set(photos)
    assert all((folder / "predictions" / name).is_file() for name in photos)
    assert sum(len(d["boxes"]) for d in detections.values()) >= len(photos)  # a trained model finds shapes


def test_mlflow_models_serve_answers_with_detections(registered, folder, tmp_path):
    photos = val_jpegs(folder / "data" / "synthetic", tmp_path / "photos")
    jpeg = (tmp_path / "photos" / sorted(photos)[0]).read_bytes()
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode()]]}}
    port = free_port()
    log = tmp_path / "serve.log"
    # `mlflow` as the README types it, found on PATH next to this interpreter (with the uvicorn it runs)
    env = {**ENV, "PATH": f"{BIN}{os.pathsep}{ENV.get('PATH', '')}"}
    command = ["mlflow", "models", "serve", "-m", "models:/yolov9-det@champion", "--env-manager", "local"]
    with log.open("wb") as err:
        server = start_group(
            [*command, "-h", "127.0.0.1", "-p", str(port)],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_until_serving(port, server, log)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                (prediction,) = json.loads(response.read())["predictions"]
        finally:
            stop_group(server)
    assert len(prediction["boxes"]) >= 1
    classes = read_manifest(manifest_path(folder / "data" / "synthetic", "val")).class_names
    assert prediction["class_names"] == [classes[c] for c in prediction["classes"]]


def test_the_ray_serve_endpoint_answers_a_posted_photo(registered, folder, tmp_path):
    """``python -m jobs.serve --model models:/yolov9-det@champion`` (on a free port: 8000 may be taken), then
    the README's curl (at the default conf): one photo's bytes with its Content-Type."""
    photos = val_jpegs(folder / "data" / "synthetic", tmp_path / "photos")
    jpeg = (tmp_path / "photos" / sorted(photos)[0]).read_bytes()
    port = free_port()
    log = tmp_path / "jobs-serve.log"
    command = [
        sys.executable,
        "-m",
        "jobs.serve",
        "--model",
        "models:/yolov9-det@champion",
        "--port",
        str(port),
    ]
    with log.open("wb") as out:
        server = start_group(command, cwd=folder, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until_serving(port, server, log, timeout_s=300, path="/healthz")
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/", data=jpeg, headers={"Content-Type": "image/jpeg"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
        finally:
            stop_group(server)
    assert server.returncode == 0, log.read_text()[-3000:]
    assert answer["version"] == "1" and len(answer["predictions"][0]["boxes"]) >= 1
