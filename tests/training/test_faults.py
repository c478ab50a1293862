"""What long runs meet: a tracking server that goes away (and comes back, or not), non-finite losses once
and for good, a truncated latest checkpoint, SIGTERM to a worker mid-epoch.

Everything is real: Ray Train workers with DDP over gloo, an `mlflow server` on 127.0.0.1 started, stopped
and restarted by the test on the same port and backing store. Faults are injected through step hooks,
which run in the worker process after a step: they stop the server, send SIGTERM to their own process,
or make the model's next forward see NaN input. Runs are tiny (yolov9-t at 64 px, a few steps).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.training import TrainingData, TrainingDiverged, build_train_state, run_epoch, train_one_epoch
from pipeline.training.ema import unwrap
from pipeline.training.job import run_training
from tests.conftest import free_port, start_group, stop_group
from tests.training.test_engine import batches, config
from tests.training.test_train import tiny_config
from tests.waiting import wait_until

pytestmark = pytest.mark.cost(100)

BIN = Path(sys.executable).parent
CPU = torch.device("cpu")
# The step hooks run in Ray workers, which need not be able to import this test module: send its helpers
# along by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class MlflowServer:
    """An `mlflow server` on 127.0.0.1 with a sqlite store in ``folder``; restartable on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.process = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'server.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
        ]
        log = open(self.folder / "mlflow-server.log", "a")  # noqa: SIM115 -- the server writes it while it runs
        self.process = start_group(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: healthy(self.uri), f"the mlflow server on {self.uri} to answer", 120)
        except TimeoutError as waited:
            log_tail = (self.folder / "mlflow-server.log").read_text()[-2000:]
            raise TimeoutError(f"{waited}; its log ends:\n{log_tail}") from None

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)


def healthy(uri: str) -> bool:
    try:
        return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
    except OSError:
        return False


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def nan_input_once(epoch: int, batch: int, rank: int):
    """A step hook: after that step of that rank, the model's next forward sees NaN images (once)."""

    def hook(state, event) -> None:
        if (event.epoch, event.batch, state.rank) != (epoch, batch, rank):
            return

        def poison(module, inputs):
            handle.remove()
            return (inputs[0] * float("nan"),)

        handle = unwrap(state.model).register_forward_pre_hook(poison)

    return hook


# -- non-finite losses, in the engine --------------------------------------------------------------------


def test_a_skipped_nan_step_leaves_batchnorm_statistics_as_if_the_batch_was_never_seen(tiny_shards):
    cfg = config(tiny_shards, "train.nominal_batch=2", "train.steps_per_epoch=3")
    data = TrainingData.read(str(tiny_shards))
    b0, b1, b2 = batches(3)
    with_nan = build_train_state(cfg, data, CPU)
    stats = train_one_epoch(with_nan, [b0, b1, b2], [nan_input_once(0, 0, 0)])
    without = build_train_state(cfg, data, CPU)
    train_one_epoch(without, [b0, b2])

    assert stats.skipped_steps == 1 and with_nan.step == 3
    assert with_nan.ema.updates == 2  # one optimizer step a batch (nominal batch 2), none for the NaN one
    buffers = dict(unwrap(without.model).named_buffers())
    for name, value in unwrap(with_nan.model).named_buffers():
        assert torch.equal(value, buffers[name]), name  # batch 2's forward ran on the same weights in both


def test_a_skipped_step_is_counted_and_names_the_images_of_its_batch(tiny_shards, caplog):
    cfg = config(tiny_shards, "train.epochs=1")
    state = build_train_state(cfg, TrainingData.read(str(tiny_shards)), CPU)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.step"):
        metrics = run_epoch(state, [nan_input_once(0, 0, 0)])
    assert metrics["train/skipped_steps"] == 1.0 and state.step == 2
    (warning,) = [r.getMessage() for r in caplog.records]
    ids = [int(i) for i in warning.split("images [")[1].rstrip("]").split(",")]
    assert warning.startswith("skipped epoch 1, step 1 on rank 0: non-finite loss nan")
    assert len(ids) == 2 and all(1 <= i <= 48 for i in ids)  # the 48 synthetic train images, ids from 1


def test_a_diverged_run_stops_with_a_one_line_cause_that_the_jobs_print():
    error = TrainingDiverged("training diverged: 20 steps in a row skipped (last: non-finite loss at ...)")
    assert isinstance(error, PipelineError) and "\n" not in str(error)  # jobs.cli prints it as `error: ...`


# -- non-finite losses on Ray -------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_a_nan_batch_on_one_rank_is_skipped_on_every_rank_and_training_goes_on(
    tmp_path, tiny_shards, local_ray
):
    cfg = tiny_config(tmp_path, tiny_shards, "nan-once", "train.epochs=1", "ray.max_failures=0")
    summary = run_training(cfg, loop_extras={"step_hooks": [nan_input_once(0, 0, 1)]})
    state = load_checkpoint(summary.latest_checkpoint)
    assert state.step == 3 and state.history[0]["train/skipped_steps"] == 1.0
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())
    assert steps_of(summary.mlflow_uri, summary.mlflow_run_id, "train/skipped_steps") == [1]


# -- tracking outages --------------------------------------------------------------------------------------


@pytest.mark.mlflow
@pytest.mark.slow
def test_a_tracking_server_that_never_returns_leaves_a_file_that_sync_tracking_replays(
    tmp_path, tiny_shards, mlflow_server, caplog
):
    uri, pgid = mlflow_server.uri, mlflow_server.process.pid

    def server_dies(state, event) -> None:
        if (event.epoch, event.batch) == (1, 0):
            os.killpg(pgid, signal.SIGINT)
            wait_until(lambda: not healthy(uri), "the mlflow server to stop", 60)

    cfg = config(
        tiny_shards,
        f"ray.storage_path={tmp_path / 'runs'}",
        "ray.run_name=gone",
        f"mlflow.tracking_uri={uri}",
        "train.tracking_patience_s=2",
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.training.job"):
        summary = run_training(cfg, local=True, loop_extras={"step_hooks": [server_dies]})

    unsent = tmp_path / "runs" / "gone" / "local" / "unsent-tracking.jsonl"
    assert summary.epochs == 2 and summary.unsent_tracking == str(unsent) and unsent.is_file()
    assert f"python -m jobs.sync_tracking {unsent}" in caplog.text

    mlflow_server.stop()
    mlflow_server.start()  # same port, same store
    done = subprocess.run(
        [sys.executable, "-m", "jobs.sync_tracking", str(unsent)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert not unsent.exists()
    for key in ("train/total", "val/map50_95"):
        assert steps_of(uri, summary.mlflow_run_id, key) == [1, 2], key
    client = MlflowClient(uri)
    assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"
    assert {"curves.png", "val_predictions.png", "config.yaml"} <= {
        a.path for a in client.list_artifacts(summary.mlflow_run_id)
    }


# -- checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_shards, caplog):
    overrides = [
        f"ray.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "ray.run_name=cut",
        "train.keep_checkpoints=3",
    ]
    run_training(config(tiny_shards, *overrides), local=True)
    run_dir = tmp_path / "runs" / "cut" / "local"
    latest = run_dir / "checkpoint_000002" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # an upload cut short

    with caplog.at_level(logging.WARNING, logger="pipeline.training.local"):
        summary = run_training(config(tiny_shards, *overrides, "train.epochs=3"), local=True)
    assert f"resuming from {run_dir / 'checkpoint_000001'} instead of the unreadable latest" in caplog.text
    state = load_checkpoint(summary.latest_checkpoint)
    assert state.epoch == 3 and state.step == 6  # epoch 2 trained again from epoch 1's state, then epoch 3
    assert [h["epoch"] for h in state.history] == [1, 2, 3]


# -- images as people store them ---------------------------------------------------------------------------


def phone_photo() -> bytes:
    """A 64 x 32 (w x h) stored JPEG whose EXIF orientation 6 says: turn 90 degrees clockwise to display.
    Stored pixels: black, with a white 16 x 8 block at columns 0-15, rows 0-7 (top left). Displayed (32 x 64),
    that block is at the top right: columns 24-31, rows 0-15."""
    import io

    from PIL import Image

    stored = Image.new("RGB", (64, 32))
    stored.paste((255, 255, 255), (0, 0, 16, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def camera_photo(orientation: int | None) -> bytes:
    """A 32x16 JPEG with an EXIF block (a camera model, and the orientation tag when given)."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0110] = "test camera"  # Model
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    Image.new("RGB", (32, 16), (90, 120, 30)).save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


@pytest.mark.parametrize("orientation", [None, 1])
def test_a_photo_with_exif_that_needs_no_turn_keeps_its_bytes(orientation):
    import numpy as np

    from pipeline.data.encode import encode_record
    from pipeline.data.readers import Record

    photo = camera_photo(orientation)
    assert b"Exif\x00\x00" in photo
    record = Record(
        "cam", "cam.jpg", np.array([[2, 2, 20, 10]], np.float32), np.array([0]), image_bytes=photo
    )
    sample, problems = encode_record(record, num_classes=1, max_side=None)
    assert sample.jpeg == photo and (sample.width, sample.height) == (32, 16)
    assert problems == [("kept_exif_not_turned", "cam.jpg (source id cam)")]


def test_a_photo_with_exif_shrunk_to_max_side_is_reported_resized_not_kept():
    import numpy as np

    from pipeline.data.encode import encode_record
    from pipeline.data.readers import Record

    record = Record(
        "cam", "cam.jpg", np.array([[2, 2, 20, 10]], np.float32), np.array([0]), image_bytes=camera_photo(1)
    )
    sample, problems = encode_record(record, num_classes=1, max_side=16)
    assert (sample.width, sample.height) == (16, 8) and b"Exif\x00\x00" not in sample.jpeg
    assert problems == [("resized", "cam.jpg (source id cam)")]


def test_the_header_size_of_a_rotated_photo_is_its_displayed_size():
    from pipeline.data.image_header import image_size

    assert image_size(phone_photo()) == (32, 64)  # YOLO's normalised labels scale by the displayed size


def test_a_box_drawn_on_the_displayed_photo_lands_on_the_same_pixels_in_the_shard():
    import cv2
    import numpy as np

    from pipeline.data.encode import encode_record
    from pipeline.data.readers import Record

    box = np.array([[24, 0, 32, 16]], np.float32)  # the white block, as a person saw it
    record = Record("phone", "phone.jpg", box, np.array([0]), image_bytes=phone_photo())
    sample, problems = encode_record(record, num_classes=1, max_side=None)

    assert (sample.width, sample.height) == (32, 64) and np.array_equal(sample.boxes, box)
    assert ("reencoded_exif_turned", "phone.jpg (source id phone)") in problems
    stored = cv2.imdecode(
        np.frombuffer(sample.jpeg, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION
    )
    assert stored.shape == (
        64,
        32,
    )  # no EXIF left to turn it again: what a reader decodes is what was labelled
    assert stored[2:14, 26:30].min() > 200 and stored[20:, :].max() < 60  # white inside the box, black below
