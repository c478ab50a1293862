"""Registration: source resolution, the pre-registration checks, the champion rule, and the whole path
from a checkpoint on disk to a served model version (real sqlite MLflow stores, no mocks)."""

import base64
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs import predict
from pipeline.checkpoint import TrainingCheckpoint, load_checkpoint, save_checkpoint
from pipeline.config import Config
from pipeline.data import read_manifest
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.errors import RegistrationError
from pipeline.evaluation.evaluate import evaluate_checkpoint
from pipeline.registry.on_ray import register_after_training
from pipeline.registry.promotion import CHAMPION, decide_promotion
from pipeline.registry.register import register
from pipeline.registry.source import resolve_source
from pipeline.registry.verify import max_relative_difference, recorded_map, verify_map, verify_outputs
from pipeline.tracking import TrackingError, experiment_id
from tests.conftest import free_port, start_group, stop_group, val_jpegs, wait_until_serving
from yolov9 import build_model, prune

REPO = Path(__file__).resolve().parents[2]
IMGSZ = 128


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics, so that folding them into the convs is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def write_checkpoint(directory: Path, data_root: Path, seed: int = 0) -> Path:
    """A yolov9-t checkpoint (4 classes) trained on nothing, with its val mAP recorded the way training
    records it (evaluate_checkpoint on the same val shards)."""
    torch.manual_seed(seed)
    model = build_model("yolov9-t", num_classes=4)
    _randomise_batchnorm(model, seed)
    cfg = Config()
    cfg.model.name, cfg.data.root, cfg.train.imgsz = "yolov9-t", str(data_root), IMGSZ
    train, val = (
        read_manifest(manifest_path(data_root, "train")),
        read_manifest(manifest_path(data_root, "val")),
    )
    state = TrainingCheckpoint(
        model=model.state_dict(),
        ema={"model": model.state_dict(), "updates": 10},
        epoch=1,
        step=10,
        config=cfg,
        best_map=0.0,
        model_name="yolov9-t",
        num_classes=4,
        class_names=list(train.class_names),
        manifest_hash=train.manifest_hash,
        val_manifest_hash=val.manifest_hash,
    )
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory, state)
    scores = evaluate_checkpoint(directory, data_root, num_workers=0)
    metrics = {"val/map50_95": scores["map50_95"], "val/map50": scores["map50"], "epoch": 1.0}
    save_checkpoint(
        directory, replace(state, best_map=scores["map50_95"], history=[metrics], metrics=metrics)
    )
    return directory


@pytest.fixture(scope="module")
def checkpoint(tiny_shards, tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_000001", tiny_shards)


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# --- the champion rule -------------------------------------------------------------------------------


def test_first_version_becomes_champion():
    assert decide_promotion(None, None, 0.1, "h1").promote


def test_better_map_on_same_manifest_is_promoted():
    assert decide_promotion(0.30, "h1", 0.31, "h1").promote


def test_worse_map_is_not_promoted():
    decision = decide_promotion(0.30, "h1", 0.20, "h1")
    assert not decision.promote and "0.2000 does not beat the champion's 0.3000" in decision.reason


def test_equal_map_is_not_promoted():
    assert not decide_promotion(0.30, "h1", 0.30, "h1").promote


def test_different_val_manifest_is_not_promoted_and_says_why():
    decision = decide_promotion(0.10, "h1", 0.90, "h2")
    assert not decision.promote and "h1" in decision.reason and "h2" in decision.reason


def test_force_promotes_a_worse_model():
    assert decide_promotion(0.30, "h1", 0.0, "h2", force=True).promote


# --- the checks -------------------------------------------------------------------------------------


def test_map_mismatch_names_both_numbers():
    with pytest.raises(RegistrationError, match="0.2500 but the checkpoint recorded 0.3000"):
        verify_map(0.25, 0.30)


def test_map_within_tolerance_passes():
    verify_map(0.3004, 0.3000)


def test_relative_difference_uses_box_scale_for_boxes_and_one_for_probabilities():
    expected = torch.zeros(1, 5, 2)
    expected[0, :4] = 200.0  # boxes: scale 200 px
    got = expected.clone()
    got[0, 0, 0] += 0.1  # 0.1 px / 200 px = 5e-4, not 0.1
    got[0, 4, 1] += 3e-4  # probability: absolute, below the box figure
    assert max_relative_difference(expected, got) == pytest.approx(5e-4, rel=1e-3)


@pytest.mark.slow
def test_pruned_model_with_other_weights_fails_the_output_check():
    dual = build_model("yolov9-t", num_classes=4).eval()
    other = build_model("yolov9-t", num_classes=4)
    _randomise_batchnorm(other, seed=1)
    with pytest.raises(RegistrationError, match="differ from the dual model's main branch"):
        verify_outputs(dual, prune(other), torch.rand(1, 3, 64, 64))


def bare_checkpoint(**fields) -> TrainingCheckpoint:
    """A checkpoint of an untrained yolov9-t (4 classes) with a minimal config, ``fields`` set."""
    model = build_model("yolov9-t", num_classes=4)
    required = {
        "model": model.state_dict(),
        "ema": {"model": model.state_dict(), "updates": 1},
        "epoch": 1,
        "step": 1,
        "config": Config(),
        "best_map": 0.0,
        "model_name": "yolov9-t",
        "num_classes": 4,
    }
    return TrainingCheckpoint(**{**required, **fields})


def test_recorded_map_is_the_checkpoint_epochs_entry():
    history = [{"epoch": 1.0, "val/map50_95": 0.1}, {"epoch": 2.0, "val/map50_95": 0.2, "val/map50": 0.4}]
    assert recorded_map(bare_checkpoint(epoch=2, history=history)) == (0.2, 0.4)


def test_checkpoint_without_validation_is_refused():
    with pytest.raises(RegistrationError, match="records no val/map50_95"):
        recorded_map(bare_checkpoint(history=[{"epoch": 1.0}]))


# --- sources ----------------------------------------------------------------------------------------


def test_run_id_resolves_to_its_best_checkpoint_tag(store, tmp_path):
    client = MlflowClient(store)
    exp = client.create_experiment("train")
    run = client.create_run(exp, tags={"best_checkpoint": str(tmp_path / "ckpt"), "ray.job_id": "02000000"})
    src = resolve_source(run.info.run_id, client)
    assert (src.checkpoint, src.run_id, src.ray_job_id) == (tmp_path / "ckpt", run.info.run_id, "02000000")


def test_run_without_best_checkpoint_is_refused(store):
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("train"))
    with pytest.raises(RegistrationError, match="has no 'best_checkpoint' tag"):
        resolve_source(run.info.run_id, client)


def test_experiment_name_resolves_to_the_parent_run(store):
    client = MlflowClient(store)
    exp = client.create_experiment("tune")
    parent = client.create_run(exp, tags={"best_checkpoint": "/best/trial"})
    client.create_run(exp, tags={"best_checkpoint": "/a/trial", "mlflow.parentRunId": parent.info.run_id})
    assert resolve_source("tune", client).checkpoint == Path("/best/trial")


def test_unknown_source_is_refused(store):
    with pytest.raises(
        RegistrationError, match="neither a checkpoint path, an MLflow run id, nor an experiment"
    ):
        resolve_source("no-such-thing", MlflowClient(store))


# --- refused checkpoints register nothing -----------------------------------------------------------


def _registered_models(store: str) -> list:
    return MlflowClient(store).search_registered_models()


def test_corrupt_checkpoint_is_refused_and_nothing_registered(store, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"\x00garbage")
    with pytest.raises(RegistrationError, match="not a loadable checkpoint"):
        register(tmp_path / "bad", "det", store)
    assert _registered_models(store) == []


def test_foreign_checkpoint_is_refused_and_nothing_registered(store, tmp_path):
    torch.save(build_model("yolov9-t", num_classes=4).state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(RegistrationError, match="not a yolov9-ray training checkpoint"):
        register(tmp_path / "foreign.pt", "det", store)
    assert _registered_models(store) == []


def test_checkpoint_without_class_names_or_history_is_refused_and_nothing_registered(store, tmp_path):
    save_checkpoint(tmp_path, bare_checkpoint())
    with pytest.raises(RegistrationError, match="lacks \\['class_names', 'history'\\]"):
        register(tmp_path, "det", store)
    assert _registered_models(store) == []


def test_checkpoint_without_training_config_is_refused_and_nothing_registered(store, tmp_path):
    recorded = {**bare_checkpoint().to_state_dict(), "config": {"train": {"epochs": 5}}}
    torch.save(recorded, tmp_path / "checkpoint.pt")
    missing = "\\['config.train.imgsz', 'config.data.root', 'config.loss.tal_topk'\\]"
    with pytest.raises(RegistrationError, match=missing):
        register(tmp_path, "det", store)
    assert _registered_models(store) == []


@pytest.mark.slow
def test_wrong_recorded_map_is_refused_and_nothing_registered(store, checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    measured = state.metrics["val/map50_95"]
    fake = {**state.metrics, "val/map50_95": measured + 0.05}
    save_checkpoint(tmp_path, replace(state, history=[fake], metrics=fake))
    with pytest.raises(
        RegistrationError, match=f"{measured:.4f} but the checkpoint recorded {measured + 0.05:.4f}"
    ):
        register(tmp_path, "det", store)
    assert _registered_models(store) == []


# --- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(checkpoint, tmp_path_factory):
    """A store where the checkpoint was registered three times: from its training run (the first
    champion), again by path (equal mAP, so not promoted), and by the training hook with ``promote=True``."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(
        experiment_id(client, uri, "train"),
        tags={"best_checkpoint": str(checkpoint), "ray.job_id": "03000000"},
    )
    first = register(run.info.run_id, "yolov9-det", uri)
    second = register(checkpoint, "yolov9-det", uri)
    forced = register_after_training(checkpoint, run.info.run_id, uri, "yolov9-det", promote=True)
    return uri, first, second, forced


@pytest.mark.slow
@pytest.mark.mlflow
def test_first_registration_is_promoted_with_training_tags(registry, checkpoint):
    uri, first, _, _ = registry
    version = MlflowClient(uri).get_model_version("yolov9-det", "1")
    state = load_checkpoint(checkpoint)
    assert first.version == "1" and first.promotion.promote
    assert version.tags["dataset.val_manifest_hash"] == state.val_manifest_hash
    assert version.tags["dataset.manifest_hash"] == state.manifest_hash
    assert json.loads(version.tags["class_names"]) == state.class_names
    assert version.tags["loss.tal_topk"] == str(state.config.loss.tal_topk)
    assert version.tags["ray.job_id"] == "03000000" and version.tags["imgsz"] == str(IMGSZ)
    assert float(version.tags["map50_95"]) == pytest.approx(state.metrics["val/map50_95"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.mlflow
def test_registration_that_does_not_beat_the_champion_is_not_promoted(registry):
    uri, _, second, _ = registry
    version = MlflowClient(uri).get_model_version("yolov9-det", "2")
    assert second.version == "2" and not second.promotion.promote
    assert "does not beat the champion" in version.tags["promotion"]


@pytest.mark.slow
@pytest.mark.mlflow
def test_forced_registration_takes_the_alias(registry):
    uri, _, _, forced = registry
    assert forced.tags["ray.job_id"] == "03000000" and forced.tags["source_run_id"]
    assert (
        MlflowClient(uri).get_model_version_by_alias("yolov9-det", CHAMPION).version
        == int(forced.version)
        == 3
    )


@pytest.mark.slow
@pytest.mark.mlflow
def test_onnx_and_torchscript_files_are_logged(registry):
    uri, first, _, _ = registry
    names = {a.path for a in MlflowClient(uri).list_artifacts(first.logging_run_id, "export")}
    assert names == {"export/model.onnx", "export/model.torchscript.pt"}


@pytest.mark.slow  # the registry fixture
def test_predict_with_a_model_the_store_does_not_hold_names_it(registry, tmp_path):
    uri, _, _, _ = registry
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"\xff\xd8 not decoded before the model loads")
    argv = ["--model", "models:/absent@champion", "--source", str(images), "--out", str(tmp_path / "out")]
    with pytest.raises(TrackingError, match="cannot load --model models:/absent@champion: .*absent"):
        predict.main([*argv, "--tracking-uri", uri])


@pytest.mark.slow
@pytest.mark.mlflow
def test_champion_predicts_in_a_fresh_process_like_the_evaluator(registry, tiny_shards, checkpoint, tmp_path):
    """jobs.predict on the val JPEGs gives, in original pixels, the boxes the mAP evaluator scores
    against the ground truth."""
    from pipeline.checkpoint import ema_model
    from pipeline.data.loader import make_val_loader
    from pipeline.evaluation.coco import detections_from_predictions, load_ground_truth, results_json
    from yolov9.postprocess import non_max_suppression

    uri, _, _, _ = registry
    ids = val_jpegs(tiny_shards, tmp_path / "images")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.predict",
            "--model",
            "models:/yolov9-det@champion",
            "--source",
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "out"),
            "--conf",
            "0.0001",
            "--max-det",
            "20",
        ],
        check=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    served = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert set(served) == set(ids) and all((tmp_path / "out" / name).is_file() for name in ids)
    loader = make_val_loader(read_manifest(manifest_path(tiny_shards, "val")), 16, IMGSZ, 0, 1, 0)
    model = ema_model(load_checkpoint(checkpoint))
    truth = load_ground_truth(coco_json_path(tiny_shards, "val"))
    reference = []
    with torch.no_grad():  # the evaluator's path: val loader letterbox, dual model, its box mapping
        for images, metas in loader:
            preds = non_max_suppression(
                model(images.float() / 255), conf_thres=1e-4, iou_thres=0.45, max_det=20
            )
            reference.extend(results_json(detections_from_predictions(preds, metas, truth)))
    assert sum(len(d["boxes"]) for d in served.values()) > 0
    for name, image_id in ids.items():
        ref = [d for d in reference if d["image_id"] == image_id]
        ref_boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in ref)]).reshape(-1, 4)
        # an untrained model scores everything near conf, where the two paths' float noise decides: top 5 only
        for box in served[name]["boxes"][:5]:
            assert (
                np.abs(ref_boxes - np.asarray(box)).max(1).min() < 0.5
            )  # a reference box within half a pixel


@pytest.mark.slow
@pytest.mark.mlflow
def test_mlflow_models_serve_answers_a_posted_image(registry, tiny_shards, tmp_path):
    uri, _, _, _ = registry
    jpeg = (tmp_path / "images" / sorted(val_jpegs(tiny_shards, tmp_path / "images"))[0]).read_bytes()
    port = free_port()
    # mlflow runs `uvicorn` from PATH: the one next to this interpreter
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    command = ["mlflow", "models", "serve", "-m", "models:/yolov9-det@champion", "--env-manager", "local"]
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        server = start_group(  # its own process group: the uvicorn worker it starts stops with it
            [sys.executable, "-m", *command, "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_until_serving(port, server, log)
            body = {
                "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode()]]},
                "params": {"conf": 0.0001, "max_det": 7},
            }
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                predictions = json.loads(response.read())["predictions"]
        finally:
            stop_group(server)
    assert len(predictions) == 1 and set(predictions[0]) == {"boxes", "scores", "classes", "class_names"}
    assert 0 < len(predictions[0]["boxes"]) <= 7
    classes = read_manifest(manifest_path(tiny_shards, "val")).class_names
    assert predictions[0]["class_names"] == [classes[c] for c in predictions[0]["classes"]]
