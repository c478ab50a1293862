"""A search on a cluster that starts with no worker: a head with 0 CPUs (as the shipped KubeRay and
launcher clusters have) and one worker type with min 0, scaled by Ray's autoscaler with its fake
multi-node provider (worker nodes are processes on this machine, on 127.0.0.1). The search must not
refuse to start for lack of workers: its trials wait until the autoscaler has added them.

The head is a `ray start --head --block` in a process group of its own, stopped by that group; not
`ray.cluster_utils.AutoscalingCluster`, whose start and shutdown run `ray stop --force`, which stops every
Ray process on the machine, other test sessions' too.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.search.tune import run_search
from tests.conftest import free_port, ray_node_ports, start_group, stop_group
from tests.search.test_tune import small_search

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_process, pytest.mark.cost(55)]

BIN = Path(sys.executable).parent
WORKER_TYPE = "cpu-worker"


def autoscaling_config(gcs_port: int) -> dict:
    """A cluster config for the fake multi-node provider: the head holds nothing, workers of 1 CPU come
    and go (min 0, max 2) and are dropped after 6 idle seconds."""
    node_types = {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    }
    return {
        "cluster_name": "autoscaling-test",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


@pytest.fixture
def autoscaling_cluster(tmp_path, monkeypatch):
    """The head's address, with this process's environment set to reach it (token auth)."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    token = secrets.token_hex(16)
    for name, value in {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}.items():
        monkeypatch.setenv(name, value)
    reset_auth_token_state()  # Ray read its token settings when it was imported: read them again
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gcs = free_port()
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    log = tmp_path / "ray-head.log"
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths have a limit
    with log.open("w") as out:
        head = start_group(
            [
                str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={gcs}", "--num-cpus=0", f"--autoscaling-config={config}",
                "--include-dashboard=false", f"--temp-dir={temp_dir}", *ray_node_ports(),
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield f"127.0.0.1:{gcs}", head, log
    finally:
        import ray

        ray.shutdown()
        stop_group(head)
        stop_leftovers(temp_dir)


def stop_leftovers(temp_dir: str) -> None:
    """Stop what the fake provider's worker nodes left running outside the head's process group (their log
    monitors outlived every run): the processes whose command line names this cluster's own temp dir."""
    found = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True)
    for pid in found.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_search_starts_on_a_cluster_with_no_workers_and_the_autoscaler_adds_them(
    autoscaling_cluster, tmp_path, tiny_shards
):
    import ray

    address, head, log = autoscaling_cluster
    deadline = time.monotonic() + 120
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            break
        except ConnectionError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the head did not come up: {log.read_text()[-2000:]}") from None
            time.sleep(2)
    assert ray.cluster_resources().get("CPU", 0) == 0  # nothing to run a trial on yet

    space = "{loss.aux_weight: {grid: [0.25, 0.5]}}"
    overrides = small_search(tmp_path, tiny_shards, "autoscaled", space)
    cfg = load_config(None, [*overrides, f"ray.address={address}", "train.epochs=1", "tune.scheduler=fifo"])
    rows = run_search(cfg)

    assert sorted(r.status for r in rows) == ["completed", "completed"]
    # every node the cluster had, alive or gone: the autoscaler drops idle workers after 6 s, which the end
    # of a search on a busy machine can outlast (seen in the suite)
    assert len(ray.nodes()) > 1, "the autoscaler added no worker node"
