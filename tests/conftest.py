"""Shared fixtures: a small synthetic shard set on disk and one local Ray instance pinned to 127.0.0.1."""

import json
import os
import random
import signal
import socket
import subprocess
import tarfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.isolation import (  # noqa: F401 -- hooks: modules using local_ray run in a process of their own
    SHARED_ENV,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    pytest_runtestloop,
    pytest_sessionfinish,
    pytest_unconfigure,
    write_module_times,
)

# The reference implementation's own files (../shared/fixtures/reference-checkpoints/README.md), resolved:
# paths derived from them are compared with paths the code resolves (../shared may be a symlink).
REFERENCE_CHECKPOINTS = (
    Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference-checkpoints"
).resolve()
GELAN_T_NC3 = REFERENCE_CHECKPOINTS / "gelan-t-nc3.pt"  # random weights, 3 classes

TINY_SYNTHETIC = {"num_train": 48, "num_val": 12, "image_size": 128, "seed": 0, "shard_size": 12}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Train and val shards of the synthetic set (train-manifest.json, val-manifest.json, val-coco.json)."""
    from pipeline.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny-shards")
    write_synthetic_dataset(root, **TINY_SYNTHETIC)
    return root


@pytest.fixture(scope="session")
def three_class_shards(tmp_path_factory) -> Path:
    """Val shards of the synthetic set without its fourth class (crosses unlabelled), the class count of
    ``gelan-t-nc3.pt``: 6 images of 128 px."""
    import dataclasses

    from pipeline.data.synthetic import SYNTHETIC_CLASSES, synthetic_records
    from pipeline.data.writer import write_shards

    root = tmp_path_factory.mktemp("three-classes")
    records = []
    for r in synthetic_records(6, 128, seed=1):
        keep = r.classes < 3
        records.append(dataclasses.replace(r, boxes=r.boxes[keep], classes=r.classes[keep]))
    write_shards(records, list(SYNTHETIC_CLASSES[:3]), root, "val", shard_size=6)
    return root


# Ports for the servers tests start: below the OS's ephemeral range (32768-60999 here), which every bind to
# port 0 draws from (Ray's own servers in a test process running beside this one among them), and above
# Ray's worker ports (10002-19999). A port taken from the ephemeral range was once bound by another test
# process's Ray instance before `mlflow ui` could bind it, and the test talked to Ray's gRPC server.
TEST_PORTS = range(20000, 32768)
_claimed: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and that no other test of this session was given: claimed
    by a file in the session's shared folder (tests/isolation.py), so test processes running side by side
    never share one, and a server a test stopped never has its port handed to the next."""
    shared = os.environ.get(SHARED_ENV)
    claims = Path(shared) / "ports" if shared else None
    if claims:
        claims.mkdir(exist_ok=True)
    draw = random.SystemRandom()
    for _ in range(1000):
        port = draw.choice(TEST_PORTS)
        if port in _claimed:
            continue
        _claimed.add(port)
        if claims:
            try:
                (claims / str(port)).touch(exist_ok=False)
            except FileExistsError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {TEST_PORTS} after 1000 tries")


def ray_node_ports() -> list[str]:
    """`ray start` flags giving a node's agents and managers ports of their own (``free_port``). Left to
    Ray, every node's dashboard agent listens on 52365: with another Ray instance of the suite holding it,
    a head's job agent never came up and `ray job submit` waited until the test failed (seen in CI:
    "Failed to bind to port 52365 ... address already in use"); the other ports Ray picks by probing the
    OS's ephemeral range, which the suite's other instances draw from too."""
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port")  # fmt: skip
    return [f"--{flag}={free_port()}" for flag in flags]


def start_group(args: list[str], **popen: Any) -> subprocess.Popen:
    """Start a server in a process group of its own, so that ``stop_group`` stops it and all it spawns.

    SIGINT is reset to its default in the child: a shell starts background jobs (a CI runner's, say) with
    SIGINT ignored, children inherit that, and a server that ignores SIGINT would not stop on it."""
    return subprocess.Popen(args, start_new_session=True, preexec_fn=_default_sigint, **popen)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_group(process: subprocess.Popen) -> None:
    """Interrupt the process group a test started (a server and what it spawned), SIGKILL if it hangs.

    SIGINT, as Ctrl-C would: a blocking `ray start` shuts its node down in about 2 s on SIGINT but takes
    over 30 s on SIGTERM."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def local_ray():
    """The local Ray instance of a test process, shut down when the process's tests end. A module that uses
    it runs apart, in a pytest process of its own or of its `process_group` (`tests/isolation.py`): one
    instance per process, never a second one after the first."""
    import ray

    from pipeline.training.ray_train import LOCAL_RAY_TRAIN_ENV, start_local_ray

    started = not ray.is_initialized()
    with pytest.MonkeyPatch.context() as env:
        if started:
            # the settings the job gives a local instance of its own, set before ray.init for its processes
            for name, value in LOCAL_RAY_TRAIN_ENV.items():
                env.setenv(name, os.environ.get(name, value))
            # The dashboard serves the state API that Ray Train uses to release the resources of runs
            # whose driver was stopped (a trial ended by ASHA), so it stays on, on 127.0.0.1.
            start_local_ray(
                # Four logical CPUs on two cores: a search of two concurrent 1-worker trials once waited
                # 300 s for a CPU that a stopped trial's worker group still held (its placement group not
                # yet removed) and then timed out; two spare CPUs let the next trial start meanwhile.
                num_cpus=4,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=free_port(),
                log_to_driver=False,
            )
        yield ray
        if started:
            # bounded: after some fault-injection runs ray.shutdown() blocks in Ray's disconnect; the
            # module's process ends anyway and its parent stops what it leaves (tests/isolation.py)
            stopper = threading.Thread(target=ray.shutdown, daemon=True)
            stopper.start()
            stopper.join(timeout=15)
            os.environ.pop("RAY_ADDRESS", None)  # start_local_ray's: the instance is gone


def val_jpegs(shards: Path, out: Path) -> dict[str, int]:
    """The val images of a shard set written as JPEG files (their shard bytes) -> {file name: image_id}."""
    out.mkdir()
    ids = {}
    for tar_path in sorted(shards.glob("val-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".jpg"):
                    meta = json.loads(tar.extractfile(members[name[:-4] + ".json"]).read())
                    (out / name).write_bytes(tar.extractfile(member).read())
                    ids[name] = int(meta["image_id"])
    return ids


def wait_until_serving(
    port: int, server: subprocess.Popen, log: Path, timeout_s: float = 120, path: str = "/ping"
) -> None:
    """Return once a server on 127.0.0.1:``port`` answers ``path``; fail with its log if it dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not come up: {log.read_text()[-2000:]}") from None
            time.sleep(1)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite store, served artifacts) a test may stop and restart."""
    from tests.training.test_faults import MlflowServer

    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


SLOW_S = 30.0


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Name the tests that took over ``SLOW_S`` (setup, call and teardown together) without the `slow`
    mark: the inner loop (`-m "not slow"`) stays short only while every long test carries it."""
    seconds: dict[str, float] = {}
    marked: dict[str, bool] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(report, pytest.TestReport):
                seconds[report.nodeid] = seconds.get(report.nodeid, 0.0) + report.duration
                marked[report.nodeid] = "slow" in report.keywords
    unmarked = sorted((s, nodeid) for nodeid, s in seconds.items() if s > SLOW_S and not marked[nodeid])
    write_module_times(terminalreporter)
    if unmarked:
        terminalreporter.section(f"tests over {SLOW_S:.0f} s without the slow mark")
        for s, nodeid in reversed(unmarked):
            terminalreporter.write_line(f"{s:.1f} s  {nodeid}")
