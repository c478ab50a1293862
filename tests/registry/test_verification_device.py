"""Registration checks a checkpoint where its training ran, and compares mAPs measured alike: the recorded
one when the check runs on the kind of device training validated on, else the unpruned model re-measured
on the checking device (a GPU validates under autocast, a CPU in float32: their figures differ)."""

from dataclasses import replace

import pytest
import torch

from pipeline.checkpoint import ema_model, load_checkpoint
from pipeline.registry.on_ray import task_resources
from pipeline.registry.verify import first_val_images, verify_checkpoint
from tests.registry.test_registry import write_checkpoint
from yolov9 import prune


@pytest.mark.slow  # three evaluations of yolov9-t on the tiny val split
def test_a_checkpoint_validated_on_a_gpu_is_checked_against_the_unpruned_model_remeasured_here(
    tiny_shards, tmp_path
):
    state = load_checkpoint(write_checkpoint(tmp_path / "checkpoint", tiny_shards))
    gpu_figure = state.metrics["val/map50_95"] + 0.05  # not what this CPU measures
    metrics = {**state.metrics, "val/map50_95": gpu_figure}
    state.config.ray.use_gpu = True
    state = replace(state, history=[metrics], metrics=metrics)
    dual = ema_model(state)
    pruned = prune(dual)

    verification = verify_checkpoint(
        state, dual, pruned, first_val_images(state, None), None, device=torch.device("cpu")
    )

    assert verification.device == "cpu"
    assert verification.recorded_map50_95 == pytest.approx(gpu_figure)
    assert verification.map50_95 == pytest.approx(verification.dual_map50_95, abs=1e-3)


def test_registration_asks_for_the_resources_of_one_training_worker():
    assert task_resources({"use_gpu": True, "cpus_per_worker": 7.0}) == {"num_cpus": 7.0, "num_gpus": 1.0}
    as_params = {"use_gpu": "False", "cpus_per_worker": "2.0"}  # the training run's MLflow params: strings
    assert task_resources(as_params) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert task_resources({}) == {"num_cpus": 1.0, "num_gpus": 0.0}  # a bare checkpoint: no run to ask
