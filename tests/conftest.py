"""Shared fixtures: a small synthetic shard set on disk and one local Ray instance pinned to 127.0.0.1."""

from pathlib import Path

import pytest

TINY_SYNTHETIC = {"num_train": 48, "num_val": 12, "image_size": 128, "seed": 0, "shard_size": 12}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Train and val shards of the synthetic set (train-manifest.json, val-manifest.json, val-coco.json)."""
    from pipeline.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny-shards")
    write_synthetic_dataset(root, **TINY_SYNTHETIC)
    return root


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray instance for the whole session, shut down by the session that started it."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
