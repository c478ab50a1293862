"""Distributed training of the dual-branch YOLOv9 on Ray Train.

``train_worker`` is the per-worker loop (DDP via Ray Train); ``fit`` builds the TorchTrainer from a
Config and runs it. Rerunning ``fit`` with the same ``ray.run_name`` and ``ray.storage_path``
resumes from the latest checkpoint; ``ray.max_failures`` restarts a failed worker group from it.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import Config, config_from_dict
from pipeline.data import read_manifest
from pipeline.data.loader import make_train_loader, make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.ema import ModelEMA, unwrap
from pipeline.optimizer import Schedule, accumulation_steps, build_sgd
from pipeline.validate import evaluate_distributed
from yolov9 import build_model
from yolov9.loss import DualDetectionLoss

MAP_KEY = "val/map50_95"

# Ray Train reads these from the driver's environment and hands them to its controller and workers.
# The controller acts on a report or on the end of training only when it next polls the workers,
# every 2 s by default: up to 2 s after each epoch's report and about 4 s at the end of every run.
# A poll is one tiny actor call per worker, so polling four times as often costs nothing measurable.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp``: none on CPU; bf16 where supported for 'auto'."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def _world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry: train, validate every ``val_every`` epochs, report, checkpoint."""
    cfg: Config = config_from_dict(loop_config["config"])
    rank, world = _world()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)

    train_manifest = read_manifest(manifest_path(cfg.data.root, "train"))
    class_names = list(train_manifest.class_names)
    num_classes = cfg.model.num_classes or len(class_names)
    model = build_model(cfg.model.name, num_classes=num_classes)
    if cfg.model.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # channels-last (NHWC) is the layout oneDNN and cuDNN run convolutions fastest in, forward and backward
    model.to(device, memory_format=torch.channels_last)
    ema = ModelEMA(model, cfg.train.ema_decay, cfg.train.ema_tau)

    global_batch = cfg.train.batch_size * world
    accumulate = accumulation_steps(cfg.train.nominal_batch, global_batch)
    weight_decay = cfg.train.weight_decay * global_batch * accumulate / cfg.train.nominal_batch
    optimizer = build_sgd(model, cfg.train.lr0, cfg.train.momentum, weight_decay)
    dtype = amp_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    start_epoch, step, best_map, history = 0, 0, 0.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best_map = state["epoch"], state["step"], state["best_map"]
        history = list(state.get("history", []))

    model = ray.train.torch.prepare_model(model, move_to_device=False)
    loss_fn = DualDetectionLoss(unwrap(model), **cfg.loss.__dict__)
    steps_per_epoch = cfg.train.steps_per_epoch or max(train_manifest.num_samples // global_batch, 1)
    schedule = Schedule(
        lr0=cfg.train.lr0,
        lrf=cfg.train.lrf,
        epochs=cfg.train.epochs,
        steps_per_epoch=steps_per_epoch,
        momentum=cfg.train.momentum,
        warmup_epochs=cfg.train.warmup_epochs,
        warmup_min_steps=cfg.train.warmup_min_steps,
        warmup_bias_lr=cfg.train.warmup_bias_lr,
        warmup_momentum=cfg.train.warmup_momentum,
        cosine=cfg.train.cosine,
    )
    val_manifest = read_manifest(manifest_path(cfg.data.root, "val"))
    category_ids = list(range(1, num_classes + 1))

    for epoch in range(start_epoch, cfg.train.epochs):
        mosaic = epoch < cfg.train.epochs - cfg.train.close_mosaic
        loader = make_train_loader(
            train_manifest,
            batch_size=cfg.train.batch_size,
            imgsz=cfg.train.imgsz,
            rank=rank,
            world_size=world,
            num_workers=cfg.data.num_workers,
            epoch=epoch,
            seed=cfg.train.seed,
            augment=cfg.data.augment,
            mosaic=mosaic,
            steps_per_epoch=steps_per_epoch,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        sums: torch.Tensor | None = None  # running [total, *parts] on the device: no host sync per part
        names: list[str] = []
        model.train()
        wait, start, images_seen = 0.0, time.perf_counter(), 0
        fetch_start = time.perf_counter()
        last_opt_step = step
        for i, (images, targets) in enumerate(loader):
            wait += time.perf_counter() - fetch_start
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last).float() / 255
            targets = targets.to(device)
            schedule.apply(optimizer, epoch, step)
            accumulate = schedule.accumulate_at(step, cfg.train.nominal_batch, global_batch)
            boundary = step + 1 - last_opt_step >= accumulate or i == steps_per_epoch - 1
            sync = nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss, parts = loss_fn(model(images), targets)
                # the one host sync per step: a non-finite step must not reach the weights
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch} step {step}")
                scaler.scale(loss).backward()
            if boundary:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                ema.update(model)
                last_opt_step = step + 1
            names = ["total", *parts]
            values = torch.stack([loss.detach().float(), *(v.float() for v in parts.values())])
            sums = values if sums is None else sums + values
            step += 1
            images_seen += images.shape[0]
            _maybe_inject_failure(loop_config, rank, epoch, i)
            fetch_start = time.perf_counter()
        elapsed = time.perf_counter() - start
        n = max(steps_per_epoch, 1)
        totals = sums.tolist() if sums is not None else []
        metrics = {f"train/{k}": v / n for k, v in zip(names, totals, strict=True)}
        # skipped samples are summed over ranks: the mean times the world size
        metrics.update({f"data/{k}": float(v) * world for k, v in loader.stats().items()})
        metrics = _mean_across_ranks(metrics, device)
        metrics["train/lr"] = optimizer.param_groups[1]["lr"]
        metrics["train/images_per_s"] = images_seen * world / max(elapsed, 1e-9)
        metrics["train/loader_wait_fraction"] = wait / max(elapsed, 1e-9)
        metrics["train/mosaic"] = float(mosaic)
        # the values the loss really used, so a search can check what each trial trained with
        metrics["hp/aux_weight"] = loss_fn.weights["aux"]
        metrics["hp/lead_weight"] = loss_fn.weights["main"]
        metrics["hp/tal_topk"] = float(loss_fn.assigner.topk)
        metrics["hp/lr0"] = schedule.lr0
        if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs:
            val_loader = make_val_loader(
                val_manifest,
                batch_size=cfg.train.batch_size,
                imgsz=cfg.train.imgsz,
                rank=rank,
                world_size=world,
                num_workers=min(cfg.data.num_workers, 1),
            )
            _share_rank0_buffers(ema.module)
            scores = evaluate_distributed(
                ema.module,
                val_loader,
                coco_json_path(cfg.data.root, "val"),
                category_ids,
                device,
                conf_thres=cfg.train.val_conf,
                iou_thres=cfg.train.val_iou,
                max_det=cfg.train.val_max_det,
            )
            metrics[MAP_KEY] = scores["map50_95"]
            metrics["val/map50"] = scores["map50"]
        elif history and MAP_KEY in history[-1]:
            metrics[MAP_KEY] = history[-1][MAP_KEY]
            metrics["val/map50"] = history[-1]["val/map50"]
        metrics["epoch"] = epoch + 1
        best_map = max(best_map, metrics.get(MAP_KEY, 0.0))
        metrics["val/best_map50_95"] = best_map
        history.append({k: float(v) for k, v in metrics.items()})
        _report(
            rank,
            metrics,
            {
                "model": unwrap(model).state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "config": loop_config["config"],
                "best_map": best_map,
                "model_name": cfg.model.name,
                "num_classes": num_classes,
                "class_names": class_names,
                "manifest_hash": train_manifest.manifest_hash,
                "val_manifest_hash": val_manifest.manifest_hash,
                "history": history,
                "metrics": metrics,
            },
        )


def _share_rank0_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics: each rank's last forward updated its own, and
    rank 0's EMA is the one checkpointed, so the mAP reported must be that model's."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _maybe_inject_failure(loop_config: dict[str, Any], rank: int, epoch: int, batch: int) -> None:
    """Fault-injection hook for the recovery tests: ``fail_once = {"epoch", "batch", "rank", "marker"}``
    raises once (a marker file remembers it) in the middle of that epoch."""
    spec = loop_config.get("fail_once")
    if not spec or (spec["epoch"], spec["batch"], spec["rank"]) != (epoch, batch, rank):
        return
    marker = Path(spec["marker"])
    if not marker.exists():
        marker.write_text("failed once")
        raise RuntimeError(f"injected worker failure at epoch {epoch}, batch {batch}")


def _report(rank: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
    """Report the epoch; rank 0 attaches the checkpoint (all ranks hold the same weights)."""
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class EpochPrinter(ray.train.UserCallback):
    """One line per reported epoch (epoch, losses, mAP, images/s, ETA) in the job's log."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.started = time.time()  # wall clock: the callback runs in the controller process
        self.first_epoch: int | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        m = metrics[0]
        epoch = int(m["epoch"])
        if self.first_epoch is None:
            self.first_epoch = epoch - 1
        done = epoch - self.first_epoch
        eta = (time.time() - self.started) / max(done, 1) * (self.epochs - epoch)
        losses = " ".join(
            f"{k.removeprefix('train/')}={v:.3f}"
            for k, v in sorted(m.items())
            if k.startswith("train/") and k.endswith(("box", "cls", "dfl"))
        )
        print(
            f"epoch {epoch}/{self.epochs} {losses} mAP50-95={m.get(MAP_KEY, float('nan')):.4f} "
            f"mAP50={m.get('val/map50', float('nan')):.4f} {m['train/images_per_s']:.1f} img/s "
            f"loader-wait={m['train/loader_wait_fraction']:.0%} ETA {eta / 60:.1f} min",
            flush=True,
        )
        skipped = {k: int(v) for k, v in m.items() if k.startswith("data/") and v}
        if skipped:
            print(
                f"epoch {epoch}: skipped unreadable data {skipped} (see the worker logs for examples)",
                flush=True,
            )


class MlflowEpochLogger(ray.train.UserCallback):
    """Logs rank 0's metrics of each persisted report to an MLflow run (step = epoch), on the controller.

    mlflow is imported at the first report, not with this module: Ray Train unpickles the run's callbacks
    in every worker too, where importing mlflow would add seconds to each worker's start.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if not metrics:
            return
        rank0 = metrics[0]
        epoch = int(rank0.get("epoch", 0))
        values = {k: float(v) for k, v in rank0.items() if isinstance(v, (int, float)) and k != "epoch"}
        now_ms = int(time.time() * 1000)
        MlflowClient(self.tracking_uri).log_batch(
            self.run_id, metrics=[Metric(k, v, now_ms, epoch) for k, v in values.items()]
        )


def fit(
    cfg: Config,
    tracking: tuple[str, str] | None = None,
    loop_extras: dict[str, Any] | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,
) -> ray.train.Result:
    """Run ``train_worker`` on ``cfg.ray.num_workers`` Ray Train workers; resumes a run of the same name.

    ``tracking`` is (MLflow tracking URI, run id) for per-epoch metrics. ``loop_extras`` adds keys
    to the loop config (the fault-injection hook of the tests). Exports ``RAY_TRAIN_ENV`` to this process's
    environment where the variables are unset, for Ray Train to pass on.
    """
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)  # a value the user exported wins
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    # MLflow first: a Tune scheduler may end the trial as soon as it sees the report
    logger = [MlflowEpochLogger(*tracking)] if tracking is not None else []
    callbacks = [EpochPrinter(cfg.train.epochs), *logger, *(callbacks or [])]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), **(loop_extras or {})},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.ray.run_name,
            storage_path=cfg.ray.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=MAP_KEY,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
