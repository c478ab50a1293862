"""Shards, manifests and ground truth in object storage: written to and read from a real S3 server (moto's,
on 127.0.0.1) through the standard AWS_* environment, as on a cluster with a bucket."""

import hashlib
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs import make_shards
from pipeline import names, storage
from pipeline.data import DataError, read_manifest
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.evaluation.coco import load_ground_truth
from pipeline.storage import StorageError
from pipeline.weights.pretrained import PretrainedError, sha256_of
from pipeline.weights.sources import resolve_weights
from tests.conftest import free_port
from tests.s3_server import S3Server, s3_environment

BUCKET = "shards"


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    with s3_environment(tmp_path_factory.mktemp("s3"), BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def bucket_val(s3: S3Server) -> str:
    """A val split of 10 synthetic images written by jobs.make_shards into the bucket: its root URL."""
    root = f"s3://{BUCKET}/synthetic"
    argv = ["--format", "synthetic", "--out", root, "--split", "val", "--num", "10", "--image-size", "96"]
    make_shards.main([*argv, "--shard-size", "4"])
    return root


def test_make_shards_writes_tars_manifest_and_ground_truth_to_the_bucket(s3, bucket_val):
    assert s3.keys(BUCKET) == [
        "synthetic/val-000000.tar",
        "synthetic/val-000001.tar",
        "synthetic/val-000002.tar",
        "synthetic/val-coco.json",
        "synthetic/val-manifest.json",
    ]


def test_a_manifest_in_the_bucket_lists_its_shards_beside_it(bucket_val):
    manifest = read_manifest(manifest_path(bucket_val, "val"))
    assert manifest.path == f"{bucket_val}/val-manifest.json"
    assert manifest.shard_urls == [f"{bucket_val}/val-00000{i}.tar" for i in range(3)]
    assert manifest.num_samples == 10


def test_val_images_stream_from_the_bucket_and_are_scored_against_its_ground_truth(bucket_val):
    manifest = read_manifest(manifest_path(bucket_val, "val"))
    loader = make_val_loader(manifest, batch_size=4, imgsz=96, rank=0, world_size=1, num_workers=0)
    ids = [m["image_id"] for _, metas in loader for m in metas]
    assert sorted(ids) == list(range(1, 11))
    assert loader.stats() == {"corrupt_samples": 0, "shard_errors": 0}
    assert sorted(load_ground_truth(coco_json_path(bucket_val, "val")).sizes) == sorted(ids)


def test_the_same_shards_read_from_disk_and_from_the_bucket_give_the_same_content_hash(bucket_val, tmp_path):
    local = tmp_path / "copy"
    for name in storage.list_names(bucket_val):
        storage.write_bytes(local / name, storage.read_bytes(f"{bucket_val}/{name}"))
    remote = read_manifest(manifest_path(bucket_val, "val"))
    assert read_manifest(local / "val-manifest.json").manifest_hash == remote.manifest_hash


def test_writing_over_a_split_in_the_bucket_needs_overwrite(bucket_val):
    argv = ["--format", "synthetic", "--out", bucket_val, "--split", "val", "--num", "10"]
    with pytest.raises(DataError, match="already holds split 'val'"):
        make_shards.main(argv)


def test_a_registered_file_in_the_bucket_is_checked_against_its_recorded_sha256(s3, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    weights = f"s3://{BUCKET}/weights/registered.pt"
    storage.write_bytes(weights, b"the registered bytes")
    recorded = hashlib.sha256(b"the registered bytes").hexdigest()
    client.create_registered_model("det")
    tags = {names.SOURCE_CHECKPOINT_TAG: weights, names.LINEAGE_SHA256_TAG: recorded}
    client.create_model_version("det", "file:///nowhere/model", tags=tags)
    assert sha256_of(weights) == recorded
    assert resolve_weights("models:/det/1", uri) == weights

    storage.write_bytes(weights, b"other bytes")
    with pytest.raises(PretrainedError, match=f"{weights} has changed since version 1 was registered"):
        resolve_weights("models:/det/1", uri)


def test_a_missing_bucket_is_named(s3):
    with pytest.raises(DataError, match="not found"):
        read_manifest("s3://no-such-bucket/shards/val-manifest.json")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.read_bytes("s3://no-such-bucket/shards/val-manifest.json")


def test_a_missing_key_is_named(s3):
    with pytest.raises(StorageError, match=f"s3://{BUCKET}/nothing/here.json: not found"):
        storage.read_bytes(f"s3://{BUCKET}/nothing/here.json")


def test_an_unreachable_endpoint_is_named(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="cannot reach the object store"):
        read_manifest(f"s3://{BUCKET}/synthetic/val-manifest.json")


def test_pipe_shard_names_are_refused_unless_allowed(tiny_shards: Path, tmp_path: Path):
    data = json.loads((tiny_shards / "val-manifest.json").read_text())
    data["shards"][0]["name"] = "pipe:curl -s http://example.com/val-000000.tar"
    path = tmp_path / "val-manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="runs a shell command; refused unless data.allow_pipe: true"):
        read_manifest(path)
    assert read_manifest(path, allow_pipe=True).shard_urls[0].startswith("pipe:curl")
