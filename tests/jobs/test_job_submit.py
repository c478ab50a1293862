"""The cluster path: a real `ray start --head` on 127.0.0.1 with token auth, `ray job submit
--working-dir .` of a short training, then the checkpoint and the MLflow run are checked."""

import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from tests.conftest import free_port, ray_node_ports, start_group, stop_group
from tests.waiting import accepts_connections, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cost(65), pytest.mark.own_process]

REPO = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head started as a subprocess and stopped by its own process group."""
    tmp_path = tmp_path_factory.mktemp("head")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    log = open(tmp_path / "ray-head.log", "w")
    head = start_group(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=3",
            f"--temp-dir={tempfile.mkdtemp(prefix='ray', dir='/tmp')}",  # short: socket paths have a limit
            *ray_node_ports(),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        up = lambda: accepts_connections(dashboard) or head.poll() is not None  # noqa: E731
        wait_until(up, "the dashboard port", 120)
        deadline = time.time() + 120
        while True:
            # ready when a job can be submitted: the dashboard answers `ray job list` before the node's
            # job agent is up ("No available agent to submit job"), seen under load in CI
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
                env=env,
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"ray head did not come up: {(tmp_path / 'ray-head.log').read_text()[-2000:]}"
                )
            time.sleep(2)
        yield address, env
    finally:
        stop_group(head)
        log.close()


@pytest.fixture(scope="module")
def submitted(tmp_path_factory, tiny_shards, ray_head) -> tuple[subprocess.CompletedProcess, Path]:
    """``ray job submit ... -- python -m jobs.train ...`` (1 epoch of 2 steps on 2 workers) that ended, and
    the folder of its Ray storage and MLflow store."""
    address, env = ray_head
    tmp_path = tmp_path_factory.mktemp("submitted")
    db = tmp_path / "mlflow.db"
    overrides = [
        "model.name=yolov9-t",
        f"data.root={tiny_shards}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "train.epochs=1",
        "train.batch_size=2",
        "train.nominal_batch=4",
        "train.imgsz=64",
        "train.steps_per_epoch=2",
        "ray.num_workers=2",
        "ray.run_name=submitted",
        f"ray.storage_path={tmp_path / 'ray'}",
        f"mlflow.tracking_uri=sqlite:///{db}",
        "mlflow.experiment=submit",
    ]
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "jobs.train",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    return submit, tmp_path


def test_ray_job_submit_trains_checkpoints_and_tracks(submitted, ray_head):
    (submit, tmp_path), (address, env) = submitted, ray_head
    db = tmp_path / "mlflow.db"
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, job_id],
        env=env,
        capture_output=True,
        text=True,
    )
    assert re.search(rf"{job_id}.*succeeded", status.stdout, re.IGNORECASE), status.stdout

    checkpoints = sorted(p for p in (tmp_path / "ray" / "submitted").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and load_checkpoint(checkpoints[-1]).epoch == 1
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("submit").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.job_id"]


def test_the_job_log_has_the_epoch_line_and_not_rays_per_report_metric_dump(submitted):
    log = submitted[0].stdout + submitted[0].stderr
    assert re.search(r"epoch 1/1 .*mAP50-95=", log), log[-3000:]
    assert "Reporting training result" not in log, log[-3000:]
