"""SIGTERM to a worker mid-epoch: the run checkpoints there and the rerun resumes at that step.

In a module of its own, so it gets a Ray instance no earlier run has used (see the closing note of issue 16).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.training.job import run_training
from pipeline.training.preemption import stop_requested
from tests import waiting
from tests.training.test_train import tiny_config
from tests.waiting import wait_until

pytestmark = pytest.mark.cost(65)

BIN = Path(sys.executable).parent
CPU = torch.device("cpu")

# The step hooks run in Ray workers, which need not be able to import this test module: send its helpers
# along by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(waiting)


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_to_a_worker_mid_epoch_checkpoints_and_the_rerun_resumes_at_that_step(
    tmp_path, tiny_shards, local_ray
):
    def sigterm_rank1(state, event) -> None:
        if (event.epoch, event.batch, state.rank) == (0, 0, 1):
            os.kill(os.getpid(), signal.SIGTERM)
            wait_until(stop_requested, "the SIGTERM handler's stop request", 10)  # the next step is the last

    first_step = tmp_path / "first-step"

    def record_first_step(state, event) -> None:
        if state.rank == 0 and not first_step.exists():
            first_step.write_text(f"{event.epoch} {event.batch}")

    settings = ["train.epochs=1", "train.steps_per_epoch=4", "ray.max_failures=0"]
    with pytest.raises(Exception, match="SIGTERM"):
        run_training(
            tiny_config(tmp_path, tiny_shards, "preempted", *settings),
            loop_extras={"step_hooks": [sigterm_rank1]},
        )

    summary = run_training(
        tiny_config(tmp_path, tiny_shards, "preempted", *settings),
        loop_extras={"step_hooks": [record_first_step]},
    )
    assert first_step.read_text() == "0 2"  # steps 0 and 1 were done before the stop: not trained again
    state = load_checkpoint(summary.latest_checkpoint)
    assert state.epoch == 1 and state.step == 4 and [h["epoch"] for h in state.history] == [1]
