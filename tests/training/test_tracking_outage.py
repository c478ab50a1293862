"""A tracking server that goes away mid-run and comes back: every epoch reaches MLflow once.

In a module of its own, so it gets a Ray instance no earlier run has used: after other Ray Train runs in the
same instance this run did not start (see the closing note of issue 16).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient

from pipeline.training.job import run_training
from tests import waiting
from tests.training.test_faults import healthy, steps_of
from tests.training.test_train import tiny_config
from tests.waiting import wait_until

pytestmark = pytest.mark.cost(70)

BIN = Path(sys.executable).parent
CPU = torch.device("cpu")

# The step hooks run in Ray workers, which need not be able to import this test module: send its helpers
# along by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(waiting)


def controller_output(ray_module) -> list[str]:
    """The lines Ray Train's controllers (and every other worker process) of this instance printed."""
    logs = Path(ray_module._private.worker._global_node.get_logs_dir_path())
    return [
        line for f in sorted(logs.glob("worker-*.out")) for line in f.read_text(errors="replace").splitlines()
    ]


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_a_tracking_server_that_goes_away_and_comes_back_gets_every_epoch_once_and_is_told_once(
    tmp_path, tiny_shards, local_ray, mlflow_server
):
    restart = tmp_path / "restart-now"
    uri, pgid = mlflow_server.uri, mlflow_server.process.pid

    def outage(state, event) -> None:
        if state.rank != 0 or event.batch != 0:
            return
        if event.epoch == 1:  # down while epoch 2 ends and is reported
            os.killpg(pgid, signal.SIGINT)
            wait_until(lambda: not healthy(uri), "the mlflow server to stop", 60)
        if event.epoch == 2:  # back before epoch 3 ends
            restart.write_text("now")
            wait_until(lambda: healthy(uri), "the restarted mlflow server to answer", 120)

    def restarter() -> None:
        try:
            wait_until(restart.exists, "the outage hook to ask for the restart", 600)
        except TimeoutError:
            return  # the run ended before its second epoch: the test fails on its own assertions
        mlflow_server.start()

    thread = threading.Thread(target=restarter, daemon=True)
    thread.start()
    cfg = tiny_config(
        tmp_path,
        tiny_shards,
        "outage",
        "train.epochs=3",
        "train.steps_per_epoch=2",
        f"mlflow.tracking_uri={uri}",
    )
    summary = run_training(cfg, loop_extras={"step_hooks": [outage]})
    thread.join(timeout=1)

    assert restart.exists() and summary.unsent_tracking is None
    for key in ("train/total", "val/map50_95", "train/lr", "train/skipped_steps"):
        assert steps_of(uri, summary.mlflow_run_id, key) == [1, 2, 3], key
    client = MlflowClient(uri)
    assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"
    assert {"curves.png", "val_predictions.png"} <= {
        a.path for a in client.list_artifacts(summary.mlflow_run_id)
    }
    # the job log: one warning when the server went away, one line when it answered again, none per retry
    told = [line for line in controller_output(local_ray) if f"MLflow {uri} " in line]
    assert len(told) == 2, told
    assert "unreachable" in told[0] and "records queued" in told[0] and "answers again" in told[1], told
