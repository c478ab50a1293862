"""``model.weights`` on the driver: MLflow URIs resolved to files (a real sqlite store), the transfer
recorded on the run, and a training job that starts from another run's best checkpoint."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_config
from pipeline.training.job import run_training
from pipeline.weights.pretrained import PretrainedError, load_source, sha256_of
from pipeline.weights.sources import record_start_weights, resolve_weights

pytestmark = pytest.mark.cost(90)

# canonical: resolved sources are compared with it (../shared may be a symlink)
FIXTURES = (
    Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "reference-checkpoints"
).resolve()


@pytest.fixture
def store(tmp_path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def new_run(client: MlflowClient, **tags: str) -> str:
    experiment = client.create_experiment(
        "weights", artifact_location=(Path(client.tracking_uri[10:]).parent / "a").as_uri()
    )
    return client.create_run(experiment, tags=tags).info.run_id


def test_a_run_uri_is_that_runs_best_checkpoint(store, tmp_path):
    uri, client = store
    checkpoint = tmp_path / "checkpoint_000003"
    checkpoint.mkdir()
    run_id = new_run(client, **{names.BEST_CHECKPOINT_TAG: str(checkpoint)})
    assert resolve_weights(f"runs:/{run_id}", uri) == str(checkpoint)
    assert resolve_weights(f"runs:/{run_id}/best_checkpoint", uri) == str(checkpoint)
    with pytest.raises(PretrainedError, match="expected runs:/<run id> or runs:/<run id>/best_checkpoint"):
        resolve_weights(f"runs:/{run_id}/model", uri)


def test_a_run_without_a_best_checkpoint_is_named(store):
    uri, client = store
    run_id = new_run(client)
    with pytest.raises(PretrainedError, match=f"runs:/{run_id}: the run has no 'best_checkpoint' tag"):
        resolve_weights(f"runs:/{run_id}", uri)


def registered(client: MlflowClient, name: str, **tags: str) -> None:
    client.create_registered_model(name)
    version = client.create_model_version(name, "file:///nowhere/model", tags=tags)
    client.set_registered_model_alias(name, "champion", version.version)


def test_a_registered_model_is_the_file_it_was_made_from(store):
    uri, client = store
    file = FIXTURES / "gelan-t-nc3.pt"
    registered(
        client, "det", **{names.SOURCE_CHECKPOINT_TAG: str(file), names.LINEAGE_SHA256_TAG: sha256_of(file)}
    )
    assert resolve_weights("models:/det@champion", uri) == str(file)
    assert resolve_weights("models:/det/1", uri) == str(file)


def test_a_registered_file_that_changed_since_is_refused(store, tmp_path):
    uri, client = store
    file = tmp_path / "weights.pt"
    file.write_bytes(b"the registered bytes")
    registered(
        client, "det", **{names.SOURCE_CHECKPOINT_TAG: str(file), names.LINEAGE_SHA256_TAG: sha256_of(file)}
    )
    file.write_bytes(b"other bytes")
    with pytest.raises(PretrainedError, match="has changed since version 1 was registered"):
        resolve_weights("models:/det@champion", uri)


def test_a_missing_local_file_is_named(store, tmp_path):
    uri, _ = store
    with pytest.raises(PretrainedError, match=f"no file or checkpoint directory at {tmp_path / 'nope.pt'}"):
        resolve_weights(str(tmp_path / "nope.pt"), uri)


def test_the_transfer_is_recorded_once_and_a_resumed_run_keeps_its_record(store):
    uri, client = store
    run_id = new_run(client)
    file = str(FIXTURES / "gelan-t-nc3.pt")
    cfg = load_config(None, ["model.name=yolov9-t", f"model.weights={file}"])
    resolved = record_start_weights(cfg, 3, uri, run_id)
    assert resolved.model.weights == file
    run = client.get_run(run_id)
    # gelan-t's 1339 tensors fill yolov9-t's main branch; the auxiliary neck (layers 23-29) and the head's
    # aux half stay fresh (the transfer tests count them)
    assert run.data.params[names.PRETRAINED_LOADED] == "1339"
    assert run.data.params[names.PRETRAINED_REINITIALISED] == "0"
    assert run.data.tags[names.LINEAGE_SHA256_TAG] == sha256_of(file)
    assert run.data.tags[names.PRETRAINED_SOURCE_TAG] == file
    # the rerun of the same run names another source: the run keeps the file it started from
    again = record_start_weights(
        load_config(None, ["model.name=yolov9-t", "model.weights=runs:/x"]), 3, uri, run_id
    )
    assert again.model.weights == file


@pytest.mark.slow
def test_a_local_training_job_starts_from_another_runs_best_checkpoint(tmp_path, tiny_shards):
    def config(name: str, *extra: str):
        return load_config(
            None,
            [
                "model.name=yolov9-t",
                f"data.root={tiny_shards}",
                "data.num_workers=0",
                "train.epochs=1",
                "train.batch_size=2",
                "train.imgsz=64",
                "train.steps_per_epoch=2",
                "train.warmup_min_steps=1",
                f"ray.run_name={name}",
                f"ray.storage_path={tmp_path / 'runs'}",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                *extra,
            ],
        )

    first = run_training(config("first"), local=True)
    second = run_training(
        config("second", f"model.weights=runs:/{first.mlflow_run_id}", "model.freeze=3"), local=True
    )
    run = MlflowClient(second.mlflow_uri).get_run(second.mlflow_run_id)
    assert run.data.tags[names.PRETRAINED_PATH_TAG] == first.best_checkpoint
    assert run.data.tags[names.LINEAGE_SHA256_TAG] == sha256_of(Path(first.best_checkpoint) / "checkpoint.pt")
    assert run.data.params[names.PRETRAINED_LOADED] == "1772"  # same model, same classes: everything
    # frozen layers 0-2 are exactly the first run's EMA weights after an epoch of training
    start = load_checkpoint(first.best_checkpoint).ema["model"]
    end = load_checkpoint(second.latest_checkpoint).model
    layer_2 = [k for k in end if k.startswith("layers.2.")]
    assert layer_2 and all((end[k] == start[k]).all() for k in layer_2)
    assert not (end["layers.5.cv1.conv.weight"] == start["layers.5.cv1.conv.weight"]).all()


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_run_with_frozen_layers_starts_from_a_reference_file_on_two_workers(
    tmp_path, tiny_shards, local_ray
):
    file = FIXTURES / "yolov9-t.pt"
    cfg = load_config(
        None,
        [
            "model.name=yolov9-t",
            f"model.weights={file}",
            "model.freeze=10",  # the backbone; DDP must cope with parameters that never get a gradient
            f"data.root={tiny_shards}",
            "data.num_workers=0",
            "train.epochs=1",
            "train.batch_size=2",
            "train.nominal_batch=4",
            "train.imgsz=64",
            "train.steps_per_epoch=2",
            "train.warmup_min_steps=1",
            "ray.num_workers=2",
            "ray.cpus_per_worker=1",
            "ray.run_name=frozen",
            f"ray.storage_path={tmp_path / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    summary = run_training(cfg)
    params = MlflowClient(summary.mlflow_uri).get_run(summary.mlflow_run_id).data.params
    # 80 -> 4 classes (the transfer tests work these counts out)
    assert [
        params[k] for k in (names.PRETRAINED_LOADED, names.PRETRAINED_REINITIALISED, names.PRETRAINED_FRESH)
    ] == [
        "1700",
        "12",
        "60",
    ]
    trained = load_checkpoint(summary.latest_checkpoint).model
    reference = load_source(file).model.state_dict()
    backbone = [k for k in trained if any(k.startswith(f"layers.{i}.") for i in range(10))]
    assert any(k.endswith("running_var") for k in backbone)
    assert all((trained[k] == reference[k]).all() for k in backbone)
    assert not (trained["layers.10.cv1.conv.weight"] == reference["layers.10.cv1.conv.weight"]).all()
