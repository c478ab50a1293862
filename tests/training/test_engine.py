"""The training engine without Ray: the accumulation boundary, the EMA update count, resume equality, the
non-finite step, progress lines, and the one-process run of a whole config (``--local``)."""

import logging
import math
from dataclasses import replace

import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import load_config
from pipeline.training import (
    ProgressLog,
    StepEvent,
    TrainingData,
    TrainingDiverged,
    build_train_state,
    run_epoch,
    train,
    train_one_epoch,
)
from pipeline.training.progress import progress_line

CPU = torch.device("cpu")
IMGSZ = 64


def config(shards, *extra: str):
    return load_config(
        None,
        [
            "model.name=yolov9-t",
            f"data.root={shards}",
            "data.num_workers=0",
            "data.shuffle_buffer=8",
            "train.epochs=2",
            "train.batch_size=2",
            f"train.imgsz={IMGSZ}",
            "train.close_mosaic=1",
            "train.steps_per_epoch=2",
            "train.warmup_min_steps=2",
            *extra,
        ],
    )


def batches(count: int, batch_size: int = 2, images: torch.Tensor | None = None) -> list:
    """``count`` batches of random uint8 images, each with one 20x20 box of class 0 in every image."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        x = torch.randint(0, 256, (batch_size, 3, IMGSZ, IMGSZ), dtype=torch.uint8, generator=g)
        targets = torch.tensor([[i, 0, 10.0, 10.0, 30.0, 30.0] for i in range(batch_size)])
        out.append((x if images is None else images, targets))
    return out


def optimizer_steps_at(state, loader) -> list[int]:
    """The micro-batch steps (0-based) after which the optimizer stepped during one epoch."""
    stepped: list[int] = []
    state.optimizer.register_step_post_hook(lambda *_: stepped.append(state.step))
    train_one_epoch(state, loader)
    return stepped


@pytest.mark.parametrize(
    ("world", "expected"),
    [
        (1, [3, 5]),  # global batch 2, nominal 8: every 4th step, and the epoch's last step
        (2, [1, 3, 5]),  # global batch 4: every 2nd step
    ],
)
def test_the_optimizer_steps_on_the_accumulation_boundary(tiny_shards, world, expected):
    cfg = config(tiny_shards, "train.nominal_batch=8", "train.steps_per_epoch=6", "train.warmup_epochs=0",
                 "train.warmup_min_steps=0")  # fmt: skip
    state = build_train_state(cfg, TrainingData.read(str(tiny_shards)), CPU, world=world)
    assert optimizer_steps_at(state, batches(6)) == expected
    assert state.ema.updates == len(expected)  # one EMA update per optimizer step
    assert state.step == 6


def test_accumulation_ramps_up_during_warmup(tiny_shards):
    cfg = config(tiny_shards, "train.nominal_batch=8", "train.steps_per_epoch=6", "train.warmup_epochs=0",
                 "train.warmup_min_steps=6")  # fmt: skip
    state = build_train_state(cfg, TrainingData.read(str(tiny_shards)), CPU)
    # accumulation round(interp(step, [0, 6], [1, 4])) is 1, 2, 2, 2, 3, 4 at steps 0..5: a step after
    # step 0 (1 batch), step 2 (2 batches), then 3 batches are not reached before the epoch's last step
    assert optimizer_steps_at(state, batches(6)) == [0, 2, 5]


def test_non_finite_losses_in_a_row_stop_the_run_with_the_cause(tiny_shards):
    cfg = config(tiny_shards, "loss.box=.inf", "train.max_bad_steps=2")  # every loss is infinite
    state = build_train_state(cfg, TrainingData.read(str(tiny_shards)), CPU)
    before = {k: v.clone() for k, v in state.model.named_parameters()}
    with pytest.raises(
        TrainingDiverged, match="2 steps in a row skipped .last: non-finite loss at epoch 1, step 1"
    ):
        train_one_epoch(state, batches(3))
    assert all(torch.equal(before[k], v) for k, v in state.model.named_parameters())
    assert state.ema.updates == 0 and state.step == 1  # the second skipped step stopped the run


def test_resuming_from_a_checkpoint_trains_exactly_like_an_uninterrupted_run(tiny_shards, tmp_path):
    cfg, data = config(tiny_shards), TrainingData.read(str(tiny_shards))
    straight = build_train_state(cfg, data, CPU)
    train(straight, lambda *_: None)

    first = build_train_state(cfg, data, CPU)
    metrics = run_epoch(first)
    save_checkpoint(tmp_path, first.checkpoint(metrics))
    resumed = build_train_state(cfg, data, CPU, resume=load_checkpoint(tmp_path))
    assert (resumed.epoch, resumed.step) == (1, 2)
    train(resumed, lambda *_: None)

    assert (resumed.epoch, resumed.step, resumed.best_map) == (
        straight.epoch,
        straight.step,
        straight.best_map,
    )
    for a, b in [(straight.model, resumed.model), (straight.ema.module, resumed.ema.module)]:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    momentum = [s["momentum_buffer"] for s in straight.optimizer.state_dict()["state"].values()]
    again = [s["momentum_buffer"] for s in resumed.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum, again, strict=True))
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0]


def test_an_epoch_reports_losses_speed_validation_and_the_values_the_loss_used(tiny_shards):
    cfg = config(tiny_shards, "loss.aux_weight=0.5", "loss.tal_topk=7", "train.epochs=1")
    state = build_train_state(cfg, TrainingData.read(str(tiny_shards)), CPU)
    metrics = run_epoch(state)
    assert metrics["epoch"] == 1 and state.epoch == 1 and state.step == 2
    assert metrics["hp/aux_weight"] == 0.5 and metrics["hp/tal_topk"] == 7.0
    assert {"train/total", "train/main/box", "train/aux/cls", "val/map50_95", "val/map50"} <= set(metrics)
    assert metrics["train/images_per_s"] > 0 and 0 <= metrics["train/loader_wait_fraction"] <= 1
    assert state.history == [metrics]


def test_validation_is_skipped_between_val_every_epochs_and_carries_the_last_score(tiny_shards):
    cfg = config(tiny_shards, "train.epochs=3", "train.val_every=2", "train.steps_per_epoch=1")
    state = build_train_state(cfg, TrainingData.read(str(tiny_shards)), CPU)
    first = run_epoch(state)
    assert "val/map50_95" not in first
    second, third = run_epoch(state), run_epoch(state)  # epoch 3 is the last: always validated
    assert "val/map50_95" in second and "val/map50_95" in third


def test_step_hooks_see_every_step_in_order(tiny_shards):
    state = build_train_state(config(tiny_shards), TrainingData.read(str(tiny_shards)), CPU)
    seen: list[tuple[int, int, int]] = []
    train_one_epoch(state, batches(2), [lambda s, e: seen.append((e.epoch, e.batch, e.images))])
    assert seen == [(0, 0, 2), (0, 1, 4)]


def test_the_progress_line_names_step_losses_speed_and_eta():
    event = StepEvent(
        epoch=2, batch=9, steps=40, images=160, elapsed_s=8.0, loss_sums=torch.tensor([30.0, 10.0]),
        loss_names=("total", "main_box"),
    )  # fmt: skip
    # 10 steps done in 8 s: 30 left take 24 s; 160 images x 2 workers in 8 s
    assert (
        progress_line(event, world=2)
        == "epoch 3 step 10/40 total=3.000 main_box=1.000 40.0 img/s ETA 0.4 min"
    )


def test_progress_lines_come_every_n_seconds_on_rank_0_only(tiny_shards, caplog):
    state = build_train_state(config(tiny_shards), TrainingData.read(str(tiny_shards)), CPU)
    event = StepEvent(0, 0, 2, 2, 1.0, torch.tensor([1.0]), ("total",))
    every_step, never = ProgressLog(every_s=0.0), ProgressLog(every_s=3600.0)
    every_step.every_s = 1e-9  # due at once
    with caplog.at_level(logging.INFO, logger="pipeline.training.progress"):
        every_step(state, event)
        never(state, event)
        every_step(replace(state, rank=1), event)
    assert [r.getMessage().split(" step ")[0] for r in caplog.records] == ["epoch 1"]


@pytest.mark.slow
def test_a_local_run_trains_checkpoints_and_resumes_without_ray(tiny_shards, tmp_path):
    from pipeline.training.job import run_training

    overrides = [
        f"ray.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "ray.run_name=local",
        "train.keep_checkpoints=1",
    ]
    summary = run_training(config(tiny_shards, *overrides, "train.epochs=1"), local=True)
    assert summary.epochs == 1 and "/local/local/checkpoint_000001" in summary.latest_checkpoint
    again = run_training(config(tiny_shards, *overrides, "train.epochs=3"), local=True)
    latest = load_checkpoint(again.latest_checkpoint)
    assert latest.epoch == 3 and latest.step == 6  # epoch 1 was resumed, not trained again
    kept = sorted(p.name for p in (tmp_path / "runs" / "local" / "local").iterdir())
    assert "checkpoint_000003" in kept and len(kept) <= 2  # the best one and the latest


@pytest.mark.slow
def test_pictures_that_fail_to_draw_cost_a_warning_each_and_never_the_run(
    tiny_shards, tmp_path, monkeypatch, caplog
):
    import cv2
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

    from pipeline import names
    from pipeline.training.job import run_training

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)  # every matplotlib picture
    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kwargs: False)  # the prediction grids
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    overrides = [
        f"ray.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri={uri}",
        "ray.run_name=undrawn",
    ]
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        summary = run_training(config(tiny_shards, *overrides, "train.epochs=1"), local=True)

    assert summary.epochs == 1 and load_checkpoint(summary.latest_checkpoint).epoch == 1
    # each epoch's curves and grid, then the end of the run's curves, grid, PR curves and confusion matrix
    expected = ["the loss/mAP curves", "the val prediction grid"] * 2
    expected += ["the precision-recall curves", "the confusion matrix"]
    warned = [
        r.getMessage().split(" not drawn (")[0] for r in caplog.records if " not drawn (" in r.getMessage()
    ]
    assert sorted(warned) == sorted(expected)
    client = MlflowClient(uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and "val/map50_95" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", names.PER_CLASS_CSV}


@pytest.mark.parametrize(
    "extra",
    [
        ("loss.assign=lead_guided",),
        ("loss.aux_weight=1.0", "loss.lead_weight=1.0"),
        ("loss.aux_weight=1.0", "loss.lead_weight=0.25"),
    ],
    ids=["lead-guided", "equal", "swapped"],
)
def test_the_study_arms_not_trained_end_to_end_train_a_step(tiny_shards, extra):
    # test_study's Ray run trains three of the six arms; these three train here, in one process
    cfg = config(tiny_shards, *extra, "train.warmup_epochs=0", "train.warmup_min_steps=0")
    state = build_train_state(cfg, TrainingData.read(str(tiny_shards)), CPU)
    before = {k: v.clone() for k, v in state.model.named_parameters()}
    stats = train_one_epoch(state, batches(2))
    assert state.step == 2 and stats.skipped_steps == 0
    assert math.isfinite(stats.losses["total"])
    assert any(not torch.equal(before[k], v) for k, v in state.model.named_parameters())
