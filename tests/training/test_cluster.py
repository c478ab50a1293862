"""A two-node Ray cluster on this machine and a team MLflow server, both started by the test.

Head and a second node join over 127.0.0.1 with token auth, each with its own CPUs; an `mlflow
server` with a sqlite backend serves artifacts over HTTP. A 2-worker training spread over both
nodes reports to that server; then the second node's raylet is killed mid-run and the run must
resume from its last checkpoint on the head, with every epoch reported exactly once; the result
is then registered in the server's model registry, over HTTP like everything else.
"""

import os
import secrets
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.registry.register import register
from tests.conftest import free_port, ray_node_ports, start_group, stop_group
from tests.waiting import accepts_connections, wait_until

pytestmark = [
    pytest.mark.ray,
    pytest.mark.mlflow,
    pytest.mark.slow,
    pytest.mark.cost(100),
    pytest.mark.own_process,
]

BIN = Path(sys.executable).parent
EPOCHS = 3


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return start_group(args, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
        ],
        {**os.environ},
        tmp_path / "mlflow-server.log",
    )
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, "the mlflow server to answer", 120, poll_s=1)
        yield uri
    finally:
        stop_group(server)


@pytest.fixture
def two_nodes(tmp_path):
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Unix socket paths are limited
    head = start(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            *ray_node_ports(),
        ],
        env,
        tmp_path / "head.log",
    )
    address = f"127.0.0.1:{port}"
    nodes = [head]
    try:
        wait_until(lambda: accepts_connections(port) or head.poll() is not None, "the head's GCS port", 120)
        second = start(
            [
                str(BIN / "ray"),
                "start",
                "--block",
                f"--address={address}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                *ray_node_ports(),
            ],
            env,
            tmp_path / "node2.log",
        )
        nodes.append(second)
        wait_for_nodes(address, env, 2, timeout_s=120)
        yield address, env, second
    finally:
        for node in reversed(nodes):
            stop_group(node)


def wait_for_nodes(address: str, env: dict, count: int, timeout_s: float) -> None:
    """Wait until ``count`` nodes of the cluster at ``address`` are alive, polling from ONE probe process (a
    process per poll cost ~2.5 CPU-seconds each: Ray's import and connect); fail with what it saw."""
    script = (
        "import sys, time, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        f"deadline = time.monotonic() + {timeout_s}\n"
        f"while (alive := sum(n['Alive'] for n in ray.nodes())) < {count}:\n"
        "    if time.monotonic() > deadline:\n"
        f"        sys.exit(f'{{alive}} of {count} nodes alive after {timeout_s} s')\n"
        "    time.sleep(0.5)\n"
    )
    probe = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout_s + 60
    )
    assert probe.returncode == 0, f"waiting for {count} nodes: {probe.stderr[-2000:]}"


def train(tmp_path, shards, address, env, uri, name, steps) -> subprocess.Popen:
    overrides = [
        "model.name=yolov9-t",
        f"data.root={shards}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        f"train.epochs={EPOCHS}",
        "train.batch_size=2",
        "train.nominal_batch=4",
        "train.imgsz=64",
        f"train.steps_per_epoch={steps}",
        "train.warmup_min_steps=2",
        "ray.num_workers=2",
        "ray.placement_strategy=SPREAD",
        "ray.max_failures=2",
        f"ray.address={address}",
        f"ray.run_name={name}",
        f"ray.storage_path={tmp_path / 'shared'}",
        f"mlflow.tracking_uri={uri}",
        "mlflow.experiment=cluster",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.train", *overrides],
        env=env,
        cwd=Path(__file__).parents[2],
        stdout=open(tmp_path / f"{name}.log", "w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def epochs_logged(uri: str, name: str) -> list[int]:
    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("cluster").experiment_id],
        filter_string=f"tags.`ray.run_name` = '{name}'",
    )
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/map50_95"))


def test_training_survives_losing_a_node(tmp_path, tiny_shards, two_nodes, mlflow_server):
    address, env, second = two_nodes
    job = train(tmp_path, tiny_shards, address, env, mlflow_server, "two-nodes", steps=4)
    run_dir = tmp_path / "shared" / "two-nodes"
    wait_until(
        lambda: any(p.is_dir() for p in run_dir.glob("checkpoint_*")) or job.poll() is not None,
        "the first checkpoint (or the end of the job)",
        400,
        poll_s=1,
    )
    assert job.poll() is None, (tmp_path / "two-nodes.log").read_text()[-3000:]
    raylets = subprocess.run(["pgrep", "-P", str(second.pid), "-f", "raylet"], capture_output=True, text=True)
    for pid in raylets.stdout.split():
        os.kill(int(pid), 9)  # the second node dies mid-run; its worker goes with it
    assert job.wait(timeout=600) == 0, (tmp_path / "two-nodes.log").read_text()[-3000:]

    log = (tmp_path / "two-nodes.log").read_text()
    latest = max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    assert [h["epoch"] for h in load_checkpoint(latest).history] == list(range(1, EPOCHS + 1))
    assert epochs_logged(mlflow_server, "two-nodes") == list(range(1, EPOCHS + 1)), log[-2000:]
    artifacts = {
        a.path
        for a in MlflowClient(mlflow_server).list_artifacts(
            MlflowClient(mlflow_server)
            .search_runs([MlflowClient(mlflow_server).get_experiment_by_name("cluster").experiment_id])[0]
            .info.run_id
        )
    }
    assert {"config.yaml", "curves.png"} <= artifacts  # uploaded through the server's artifact proxy

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("cluster").experiment_id],
        filter_string="tags.`ray.run_name` = 'two-nodes'",
    )
    result = register(run.info.run_id, "cluster-det", mlflow_server)  # registration over HTTP too
    assert client.get_model_version_by_alias("cluster-det", "champion").version == result.version
    assert result.tags["source_run_id"] == run.info.run_id
