"""A whole run with every path an s3:// URL on a real S3 server (moto, 127.0.0.1): shards made into the
bucket, two epochs trained from it on Ray Train with checkpoints in it, stopped and resumed, evaluated
and registered from it. The job's folder stays empty: nothing of the run is written to the local disk
(Ray's and the OS's temporary folders aside), MLflow's artifacts included."""

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs import evaluate, make_shards, register
from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_config
from pipeline.training.job import run_training
from tests.s3_server import S3Server, s3_environment
from tests.training.test_train import epochs_logged, fail_once, tiny_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.mlflow, pytest.mark.cost(100)]

BUCKET = "team"


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Server:
    """The S3 server and its AWS_* environment, set before the process's Ray instance starts (its workers
    inherit it, as pods and VMs of a cluster get theirs). This module runs in a process of its own."""
    with s3_environment(tmp_path_factory.mktemp("s3"), BUCKET, mlflow_artifacts=True) as server:
        yield server


@pytest.fixture(scope="session")
def local_ray(s3, local_ray):
    """The process's Ray instance (tests/conftest.py), started only once the S3 environment is set."""
    return local_ray


def test_shards_train_resume_evaluate_register_all_in_the_bucket(
    s3, local_ray, tmp_path, monkeypatch, capsys
):
    job_dir, tracking, markers = tmp_path / "job", tmp_path / "tracking", tmp_path / "markers"
    for folder in (job_dir, tracking, markers):
        folder.mkdir()
    monkeypatch.chdir(job_dir)
    data = f"s3://{BUCKET}/shards"
    uri = f"sqlite:///{tracking / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("tests", artifact_location=f"s3://{BUCKET}/mlflow")
    for split, num, seed in (("train", 24, "0"), ("val", 8, "1")):
        make_shards.main(
            ["--format", "synthetic", "--out", data, "--split", split, "--num", str(num), "--seed", seed,
             "--image-size", "96", "--shard-size", "8"]
        )  # fmt: skip
    overrides = [
        *tiny_overrides(tmp_path, Path("unused"), "s3-run"),
        f"data.root={data}",
        f"ray.storage_path=s3://{BUCKET}/ray",
        f"mlflow.tracking_uri={uri}",
        "ray.max_failures=0",
        "ray.num_workers=1",  # two workers are test_train's business; here the storage is
        "train.steps_per_epoch=2",
    ]
    stop = fail_once(markers / "stopped", epoch=1, batch=0, rank=0)
    with pytest.raises(Exception, match="injected worker failure"):
        run_training(load_config(None, overrides), loop_extras={"step_hooks": [stop]})
    # the end of training registers the best checkpoint as a Ray task (the checks and export off the driver)
    registering = ["mlflow.register=true", "mlflow.model_name=s3-det"]
    summary = run_training(load_config(None, [*overrides, *registering]))

    assert summary.best_checkpoint.startswith(f"s3://{BUCKET}/ray/s3-run/checkpoint_")
    assert [h["epoch"] for h in load_checkpoint(summary.latest_checkpoint).history] == [1, 2]
    assert epochs_logged(uri, summary.mlflow_run_id) == [1, 2]

    capsys.readouterr()
    evaluate.main(["--checkpoint", summary.best_checkpoint, "--data", data, "--workers", "0"])
    assert capsys.readouterr().out.startswith("COCO bbox")
    champion = MlflowClient(uri).get_model_version_by_alias("s3-det", "champion")
    assert champion.tags["checkpoint"] == summary.best_checkpoint and champion.tags["verified_on"] == "cpu"
    # jobs.register on a cluster (here the module's Ray instance): a Ray task too
    argv = ["--run", summary.mlflow_run_id, "--tracking-uri", uri, "--name", "s3-det", "--address", "auto"]
    assert register.main(argv) == 0
    versions = MlflowClient(uri).search_model_versions("name='s3-det'")
    assert sorted(v.tags["checkpoint"] for v in versions) == [summary.best_checkpoint] * 2

    keys = s3.keys(BUCKET)
    assert "shards/train-manifest.json" in keys and "shards/val-coco.json" in keys
    assert any(k.startswith("ray/s3-run/checkpoint_") and k.endswith("/checkpoint.pt") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith(".onnx") for k in keys)
    assert os.listdir(job_dir) == []
