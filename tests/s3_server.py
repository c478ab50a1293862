"""A real S3-compatible server for tests: moto's standalone server (HTTP, on 127.0.0.1), started as a
process of its own and stopped by its process group. Clients reach it the way they reach any S3 store:
through the standard ``AWS_*`` environment (``AWS_ENDPOINT_URL`` names it)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.conftest import free_port, start_group, stop_group, wait_until_serving


@dataclass
class S3Server:
    """A running moto server and the environment that points S3 clients at it."""

    process: subprocess.Popen
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> None:
        pafs.S3FileSystem(
            endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
            region="us-east-1", allow_bucket_creation=True,
        ).create_dir(name)  # fmt: skip

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket``."""
        fs = pafs.S3FileSystem(
            endpoint_override=self.endpoint, access_key="testing", secret_key="testing", region="us-east-1"
        )
        found = fs.get_file_info(pafs.FileSelector(bucket, recursive=True))
        return sorted(i.path.removeprefix(f"{bucket}/") for i in found if i.type == pafs.FileType.File)

    def stop(self) -> None:
        stop_group(self.process)


def start_s3_server(log: Path) -> S3Server:
    """Start moto's server on a free port of 127.0.0.1; returns once it answers."""
    port = free_port()
    with log.open("w") as out:
        process = start_group(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_until_serving(port, process, log, timeout_s=60, path="/moto-api/")
    return S3Server(process, f"http://127.0.0.1:{port}")


@contextmanager
def s3_environment(folder: Path, bucket: str, mlflow_artifacts: bool = False) -> Iterator[S3Server]:
    """A started server with ``bucket`` created and its AWS_* environment (with ``mlflow_artifacts``, MLflow's
    S3 endpoint too) set in this process for the ``with`` block (set before a module's Ray instance starts,
    its workers inherit it, as pods and VMs of a cluster get theirs); stopped at the end."""
    server = start_s3_server(folder / "moto.log")
    server.create_bucket(bucket)
    extra = {"MLFLOW_S3_ENDPOINT_URL": server.endpoint} if mlflow_artifacts else {}
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in {**server.env, **extra}.items():
                env.setenv(name, value)
            yield server
    finally:
        server.stop()
