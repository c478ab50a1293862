"""A diverged model stops the job as typed, once, with its cause as the job's one error line.

Every step's loss is infinite (an infinite box gain). The job runs in a process and Ray instance of its own:
after a diverged run the same Ray instance does not start the next Ray Train run (see the closing note of
issue 16), and that must not stall other tests. This module uses no shared Ray instance.
"""

import os
import subprocess
import sys

import pytest

from tests.test_train import tiny_overrides

pytestmark = [pytest.mark.cost(25), pytest.mark.own_process]


@pytest.mark.ray
@pytest.mark.slow
def test_a_persistent_nan_stops_the_job_once_with_its_cause(tmp_path, tiny_shards):
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
