"""A diverged model stops the job as typed, once, with its cause as the job's one error line.

Every step's loss is infinite (an infinite box gain). The job runs in a process and Ray instance of its own:
after a diverged run the same Ray instance does not start the next Ray Train run (see the closing note of
issue 16), and that must not stall other tests. This module uses no shared Ray instance; another local
instance runs beside the job on purpose, as on a shared machine (and in this suite).
"""

import os
import subprocess
import sys

import pytest

from tests.conftest import start_group, stop_group
from tests.training.test_train import tiny_overrides
from tests.waiting import wait_until

pytestmark = [pytest.mark.cost(50), pytest.mark.own_process]


@pytest.fixture
def another_ray_instance(tmp_path):
    """A second local Ray instance on this machine while the test runs. Ray Train's helper actors once
    asked the state API for "the" local instance, found two and died with a traceback in the job's log
    (pipeline.training.ray_train.start_local_ray)."""
    script = (
        # address="local": without it ray.init joins the cluster that /tmp/ray/ray_current_cluster
        # names, which a `ray start --head` elsewhere (or a dead one's stale file) leaves, and waits on it
        "import ray, time; ray.init(address='local', _node_ip_address='127.0.0.1', include_dashboard=False); "
        "print('up', flush=True); time.sleep(600)"
    )
    log = tmp_path / "other-ray.log"
    with open(log, "w") as out:
        other = start_group([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
    try:
        up = lambda: "up" in log.read_text().split() or other.poll() is not None  # noqa: E731
        wait_until(up, "the other Ray instance", 120)
        assert other.poll() is None, log.read_text()[-2000:]
        yield other
    finally:
        stop_group(other)


@pytest.mark.ray
@pytest.mark.slow
def test_a_persistent_nan_stops_the_job_once_with_its_cause(tmp_path, tiny_shards, another_ray_instance):
    overrides = tiny_overrides(tmp_path, tiny_shards, "diverges", "loss.box=.inf", "train.max_bad_steps=2")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    job = subprocess.run(
        [sys.executable, "-m", "jobs.train", *overrides, "ray.max_failures=2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = job.stdout + job.stderr
    assert job.returncode == 2, output[-3000:]
    # the job's own one-line message (Ray may still flush the workers' log lines after it)
    errors = [line for line in job.stderr.splitlines() if line.startswith("error: ")]
    assert [e[:50] for e in errors] == ["error: training diverged: 2 steps in a row skipped"], output[-3000:]
    assert "Traceback" not in output
    assert output.count("Started training worker group") == 1  # not restarted into the same divergence
