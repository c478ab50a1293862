"""Checkpoints hold tensors and plain data, load with weights_only=True, and refuse foreign files; a run
resumes from its newest checkpoint that loads."""

import pickle
from dataclasses import replace

import pyarrow.fs
import pytest
import ray.train
import torch

from pipeline.checkpoint import CheckpointError, TrainingCheckpoint, load_checkpoint, save_checkpoint
from pipeline.config import Config
from pipeline.training.ray_train import resume_checkpoint, run_checkpoints
from yolov9 import build_model


def minimal_state() -> TrainingCheckpoint:
    model = build_model("gelan-t", num_classes=2)
    return TrainingCheckpoint(
        model=model.state_dict(),
        ema={"model": model.state_dict(), "updates": 3},
        epoch=2,
        step=40,
        config=Config(),
        best_map=0.25,
        model_name="gelan-t",
        num_classes=2,
    )


def test_saved_checkpoint_loads_with_weights_only(tmp_path):
    save_checkpoint(tmp_path, minimal_state())
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert raw["epoch"] == 2 and raw["ema"]["updates"] == 3


def test_directory_or_file_path_both_load(tmp_path):
    path = save_checkpoint(tmp_path, minimal_state())
    assert load_checkpoint(tmp_path).step == 40
    assert load_checkpoint(path).best_map == 0.25


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


def test_pickled_module_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": torch.nn.Linear(1, 1)}, path)  # a pickled module, as older YOLO stacks write
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_checkpoint(path)


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(path)


def test_foreign_state_dict_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(build_model("gelan-t", num_classes=2).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a yolov9-ray training checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, minimal_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_a_state_dict_missing_a_field_is_refused_naming_it():
    state = minimal_state().to_state_dict()
    del state["ema"]
    with pytest.raises(CheckpointError, match="lacks \\['ema'\\]"):
        TrainingCheckpoint.from_state_dict(state)


def test_a_state_dict_with_an_unknown_key_is_refused_naming_it():
    state = {**minimal_state().to_state_dict(), "optimiser": {}}
    with pytest.raises(CheckpointError, match="unknown keys \\['optimiser'\\]"):
        TrainingCheckpoint.from_state_dict(state)


def test_a_checkpoint_round_trips_every_field(tmp_path):
    state = minimal_state()
    state.history = [{"epoch": 1.0, "val/map50_95": 0.2}]
    state.class_names = ["a", "b"]
    loaded = load_checkpoint(save_checkpoint(tmp_path, state))
    assert loaded.history == state.history and loaded.class_names == ["a", "b"]
    assert all(torch.equal(loaded.model[k], v) for k, v in state.model.items())


def test_a_checkpoint_of_another_version_is_refused(tmp_path):
    torch.save({**minimal_state().to_state_dict(), "version": 99}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="version 99, expected 1"):
        load_checkpoint(tmp_path)


def test_the_config_is_written_as_plain_data_and_read_back_typed(tmp_path):
    state = minimal_state()
    state.config.train.imgsz = 320
    path = save_checkpoint(tmp_path, state)
    assert torch.load(path, weights_only=True)["config"]["train"]["imgsz"] == 320
    loaded = load_checkpoint(path)
    assert loaded.config == state.config and loaded.train_image_size() == 320


def test_a_recorded_config_with_a_value_no_run_could_use_is_refused_naming_the_file(tmp_path):
    state = minimal_state().to_state_dict()
    state["config"]["train"]["imgsz"] = 100
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt: its training config.*train.imgsz"):
        load_checkpoint(tmp_path)


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"format": "yolov9-ray/training-checkpoint"}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


# --- which checkpoint a Ray Train run resumes from -----------------------------------------------------


def run_folder_with(tmp_path, names: dict[str, int | None]):
    """A run folder holding ``checkpoint_<name>`` folders: a checkpoint at ``step``, or a truncated one."""
    for name, step in names.items():
        folder = tmp_path / f"checkpoint_{name}"
        folder.mkdir()
        path = save_checkpoint(folder, replace(minimal_state(), step=step or 0))
        if step is None:
            path.write_bytes(path.read_bytes()[:100])
    return pyarrow.fs.LocalFileSystem(), str(tmp_path)


def test_a_run_resumes_from_its_newest_checkpoint_even_one_ray_never_recorded(tmp_path):
    """Ray 2.60 can drop a stopping worker's last report: its checkpoint exists but is not Ray's latest."""
    fs, folder = run_folder_with(tmp_path, {"2026-12-07_10-00-00.1": 40, "2026-12-07_10-05-00.2": 42})
    recorded = ray.train.Checkpoint(f"{folder}/checkpoint_2026-12-07_10-00-00.1", filesystem=fs)
    assert resume_checkpoint(recorded, fs, folder, torch.device("cpu")).step == 42
    assert resume_checkpoint(None, fs, folder, torch.device("cpu")).step == 42


def test_a_truncated_newest_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    fs, folder = run_folder_with(tmp_path, {"2026-12-07_10-00-00.1": 40, "2026-12-07_10-05-00.2": None})
    assert run_checkpoints(fs, folder)[0].endswith("10-05-00.2")
    assert resume_checkpoint(None, fs, folder, torch.device("cpu")).step == 40


def test_a_run_without_checkpoints_starts_afresh(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    assert resume_checkpoint(None, fs, str(tmp_path / "new-run"), torch.device("cpu")) is None


def test_an_unrecorded_folder_that_does_not_load_starts_the_run_afresh(tmp_path):
    """A worker that fails while its first checkpoint uploads leaves a folder Ray never recorded."""
    fs, folder = run_folder_with(tmp_path, {"2026-12-07_10-00-00.1": None})
    assert resume_checkpoint(None, fs, folder, torch.device("cpu")) is None


def test_a_recorded_checkpoint_that_does_not_load_is_an_error_naming_the_run(tmp_path):
    fs, folder = run_folder_with(tmp_path, {"2026-12-07_10-00-00.1": None})
    recorded = ray.train.Checkpoint(f"{folder}/checkpoint_2026-12-07_10-00-00.1", filesystem=fs)
    with pytest.raises(CheckpointError, match=f"no checkpoint of the run at {folder} loads"):
        resume_checkpoint(recorded, fs, folder, torch.device("cpu"))
