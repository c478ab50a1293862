"""An elastic run (``ray.num_workers=[1, 2]``) on a two-node Ray cluster on this machine (``ray start``, one
CPU per node, token auth): the second node is lost mid-epoch (its worker is sent SIGTERM, as a spot
reclaim does, then the node is killed), the run goes on on one worker from the mid-epoch checkpoint, the
node comes back and the run grows to two workers again. Every epoch must train each of the 48 images
exactly once, counted by image id: the steps a restart threw away are not counted, their redo is.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.training.job import run_training
from tests.conftest import free_port, ray_node_ports, start_group, stop_group
from tests.training.test_cluster import wait_for_nodes
from tests.waiting import accepts_connections, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cost(200), pytest.mark.own_process]

BIN = Path(sys.executable).parent
EPOCHS, BATCH, IMAGES = 3, 2, 48


class IdLog:
    """Step hook: each worker appends (its pid, world size, epoch, step, the step's image ids) to a file.
    Once the file ``hold`` exists, a lone worker waits after its step (up to 300 s) for Ray to replace it by
    a group of two: the run must not end before the node that came back has joined (its ``ray start``, a
    worker's start and Ray's resize check take 20-40 s here, more on a busy machine)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, state, event) -> None:
        hold = self.folder / "hold"
        while state.world == 1 and hold.exists() and time.time() < hold.stat().st_mtime + 300:
            time.sleep(0.5)
        ids = state.train_loader.last_image_ids()
        record = {"pid": os.getpid(), "rank": state.rank, "world": state.world, "epoch": event.epoch,
                  "step": state.step, "ids": ids, "t": time.time()}  # fmt: skip
        with open(self.folder / f"ids-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def records(folder: Path) -> list[dict]:
    rows = [json.loads(line) for p in folder.glob("ids-*.jsonl") for line in p.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["t"])


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    token = secrets.token_hex(16)
    for name, value in {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # the workers unpickle this module's step hook: the nodes' processes import it as pytest named it
    here = Path(__file__).parent
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": f"{here.parents[1]}:{here}"}
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Unix socket paths are limited
    head = start_group(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", "--num-cpus=1",
         f"--temp-dir={temp}", *ray_node_ports()],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    nodes = [head]

    def add_node():
        node = start_group(
            [str(BIN / "ray"), "start", "--block", f"--address={address}", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", *ray_node_ports()],
            env=env, stdout=open(tmp_path / "node.log", "a"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        nodes.append(node)
        return node

    try:
        wait_until(lambda: accepts_connections(port) or head.poll() is not None, "the head's GCS port", 120)
        add_node()
        wait_for_nodes(address, env, 2, timeout_s=120)
        yield address, nodes, add_node
    finally:
        import ray

        ray.shutdown()
        for node in reversed(nodes):
            stop_group(node)


def test_an_elastic_run_shrinks_on_a_lost_node_grows_back_and_trains_each_image_once(
    tmp_path, tiny_shards, cluster, monkeypatch
):
    address, nodes, add_node = cluster
    # a restart first asks for the size the stale resource view still shows; this bounds that wait
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    ids = tmp_path / "ids"
    ids.mkdir()
    cfg = load_config(
        None,
        [
            "model.name=yolov9-t",
            f"data.root={tiny_shards}",
            "data.num_workers=0",
            "data.shuffle_buffer=8",
            f"train.epochs={EPOCHS}",
            f"train.batch_size={BATCH}",
            "train.nominal_batch=4",
            "train.imgsz=64",
            "train.warmup_min_steps=2",
            "train.close_mosaic=1",
            "ray.num_workers=[1, 2]",
            "ray.resize_check_s=5",
            "ray.max_failures=6",
            f"ray.address={address}",
            "ray.run_name=elastic",
            f"ray.storage_path={tmp_path / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "mlflow.experiment=elastic",
        ],
    )
    outcome = {}

    def train() -> None:
        try:
            outcome["summary"] = run_training(cfg, loop_extras={"step_hooks": [IdLog(ids)]})
        except BaseException as e:  # noqa: BLE001 -- reported by the test's thread below
            outcome["error"] = e

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    steps = IMAGES // (BATCH * 2)

    def at(predicate, what: str, timeout_s: float) -> None:
        wait_until(lambda: predicate(records(ids)) or not trainer.is_alive(), what, timeout_s, poll_s=0.5)
        assert trainer.is_alive(), f"the run ended while waiting for {what}: {outcome}"

    # mid-epoch 2 on two workers: SIGTERM to one worker (the spot notice), then the node goes
    at(lambda rs: any(r["world"] == 2 and r["step"] >= steps + 4 for r in rs), "epoch 2, step 4", 400)
    victim = next(r["pid"] for r in reversed(records(ids)) if r["world"] == 2)
    os.kill(victim, signal.SIGTERM)
    run_dir = tmp_path / "ray" / "elastic"
    wait_until(lambda: len(list(run_dir.glob("checkpoint_*"))) >= 2, "the stop's checkpoint", 120, poll_s=0.5)
    lost_at = time.time()
    os.killpg(nodes[1].pid, signal.SIGKILL)
    at(lambda rs: any(r["world"] == 1 for r in rs), "the run on one worker", 300)
    resumed_at = next(r["t"] for r in records(ids) if r["world"] == 1)
    # the node comes back once the one-worker run has finished an epoch of its own
    at(lambda rs: any(r["world"] == 1 and r["step"] % steps == 0 for r in rs), "an epoch on one worker", 300)
    back_at = time.time()
    (ids / "hold").touch()
    add_node()
    trainer.join(timeout=600)
    assert not trainer.is_alive(), "the run did not end"
    assert "error" not in outcome, outcome.get("error")

    summary = outcome["summary"]
    client = MlflowClient(summary.mlflow_uri)

    def history(key: str) -> list[float]:
        metrics = client.get_metric_history(summary.mlflow_run_id, key)
        return [m.value for m in sorted(metrics, key=lambda m: m.step)]

    sizes = history("train/world_size")
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    assert history("train/resized_from") == [2, 1]  # each resize logged once, at the epoch it happened in
    grown_at = next(r["t"] for r in records(ids) if r["world"] == 2 and r["t"] > back_at)
    lost_s, back_s = resumed_at - lost_at, grown_at - back_at
    print(f"world sizes per epoch {sizes}; {lost_s:.1f} s from the node's loss to the first step on one "
          f"worker, {back_s:.1f} s from its return to the first step on two")  # fmt: skip

    # what counted: per (epoch, step), the records of the last worker group that trained it (a restart
    # redoes the steps after its checkpoint; ranks go in lockstep, so that group wrote one per rank)
    by_step: dict[tuple[int, int], list[dict]] = {}
    for r in records(ids):
        by_step.setdefault((r["epoch"], r["step"]), []).append(r)
    for epoch in range(EPOCHS):
        seen = []
        for (e, _), rs in by_step.items():
            if e == epoch:
                world = rs[-1]["world"]
                last = {r["rank"]: r for r in rs if r["world"] == world}
                assert sorted(last) == list(range(world)), rs
                seen += [i for r in last.values() for i in r["ids"]]
        assert sorted(seen) == list(range(1, IMAGES + 1)), (epoch, sorted(seen))
