"""The state of a training run, without Ray: how it is built, resumed from a checkpoint and saved.

One :class:`TrainState` per worker process. On several workers the model is wrapped for DDP by the
``wrap`` the caller passes (Ray Train's ``prepare_model``); in one process it is the plain model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.checkpoint import TrainingCheckpoint
from pipeline.config import Config, TrainConfig
from pipeline.data import Manifest
from pipeline.data.loader import Loader, RanksLoader
from pipeline.data.manifest import coco_json_path, read_splits
from pipeline.training.ema import ModelEMA, unwrap
from pipeline.training.optimizer import Schedule, build_sgd, images_per_step, linear_scale
from pipeline.training.sync_bn import sync_batchnorm
from pipeline.weights.pretrained import freeze_layers, load_initial_weights
from yolov9 import build_model
from yolov9.loss import DualDetectionLoss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """The train and val splits of ``data.root`` (manifests; the val split's COCO ground truth)."""

    train: Manifest
    val: Manifest
    val_coco_json: str

    @classmethod
    def read(cls, root: str, allow_pipe: bool = False) -> TrainingData:
        """The splits at ``root`` (a local folder or a URL); ``allow_pipe``: ``data.allow_pipe``."""
        train, val = read_splits(root, allow_pipe)
        return cls(train, val, str(coco_json_path(root, "val")))


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp``: none on CPU; bf16 where supported for 'auto'."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


@dataclass
class TrainState:
    """Model, EMA, optimizer, scaler, schedule and loss of one worker, and the counters that a checkpoint
    saves. ``epoch`` and ``step`` count what is done: epochs completed, micro-batch steps taken."""

    cfg: Config
    data: TrainingData
    model: nn.Module  # DDP-wrapped on several workers; ``unwrap(model)`` is the DetectionModel
    ema: ModelEMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    loss_fn: DualDetectionLoss
    device: torch.device
    amp: torch.dtype | None
    rank: int = 0
    world: int = 1
    # The data ranks this worker plays, of ``data_world``: the ranks the data, the steps and the schedule are
    # laid out for. A fixed run plays its own rank of ``world``; an elastic run's are those of its largest
    # group, shared out over the workers it has now, so that a resize changes speed, not what a step holds.
    ranks: tuple[int, ...] = (0,)
    data_world: int = 1
    resized_from: int | None = None  # workers of the checkpoint resumed when not ``world``, until reported
    epoch: int = 0
    step: int = 0
    best_map: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    # made by the first epoch, kept for the run
    train_loader: Loader | RanksLoader | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return unwrap(self.model).num_classes

    @property
    def global_batch(self) -> int:
        """Images per micro-batch step over all data ranks."""
        return self.cfg.train.batch_size * self.data_world

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    def checkpoint(self, metrics: dict[str, float]) -> TrainingCheckpoint:
        """Everything needed to resume after the epoch that produced ``metrics``."""
        return TrainingCheckpoint(
            model=unwrap(self.model).state_dict(),
            ema=self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=self.epoch,
            step=self.step,
            config=self.cfg,
            best_map=self.best_map,
            model_name=self.cfg.model.name,
            num_classes=self.num_classes,
            class_names=list(self.data.train.class_names),
            manifest_hash=self.data.train.manifest_hash,
            val_manifest_hash=self.data.val.manifest_hash,
            history=list(self.history),
            metrics=dict(metrics),
            world_size=self.world,
        )


def build_train_state(
    cfg: Config,
    data: TrainingData,
    device: torch.device,
    *,
    rank: int = 0,
    world: int = 1,
    resume: TrainingCheckpoint | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    data_world: int | None = None,
) -> TrainState:
    """A fresh run of ``cfg`` on ``device``, or the run ``resume`` saved, for worker ``rank`` of ``world``.

    ``data_world`` (default ``world``): the data ranks the run is laid out for; worker ``rank`` plays
    ranks ``rank, rank + world, ...`` of them, one micro-batch each per step (an elastic run on fewer
    workers than its largest group). Its loss is then computed per micro-batch, as accumulation does.

    A fresh run starts from ``model.weights`` when set (a local path: URIs are resolved on the driver).
    The weights are set (seeded, pretrained or resumed) before ``wrap`` is applied, because DDP broadcasts
    rank 0's weights when it wraps the model. ``model.freeze`` applies to both.
    """
    data_world = data_world or world
    ranks = data_ranks(rank, world, data_world)
    torch.manual_seed(cfg.train.seed + rank)
    num_classes = cfg.model.num_classes or data.train.num_classes
    model = _model(cfg, num_classes, device, rank, world, fresh=resume is None)
    ema = ModelEMA(model, cfg.train.ema_decay, cfg.train.ema_tau)
    optimizer, schedule = _optimizer_and_schedule(model, cfg.train, data_world, rank, data.train.num_samples)
    amp = amp_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    state = TrainState(
        cfg=cfg,
        data=data,
        model=model,
        ema=ema,
        optimizer=optimizer,
        scaler=scaler,
        schedule=schedule,
        # an elastic run's workers may hold different numbers of micro-batches: no collective in the loss
        loss_fn=DualDetectionLoss(model, **cfg.loss.__dict__, across_ranks=not cfg.ray.elastic),
        device=device,
        amp=amp,
        rank=rank,
        world=world,
        ranks=ranks,
        data_world=data_world,
    )
    if resume is not None:
        restore(state, resume)
    if wrap is not None:
        state.model = wrap(state.model)
    if device.type == "cuda":
        # fixed input sizes: let cuDNN time its convolution algorithms once per shape and keep the fastest
        torch.backends.cudnn.benchmark = True
    if cfg.train.compile:
        compile_for_training(state)
    return state


def data_ranks(rank: int, world: int, data_world: int) -> tuple[int, ...]:
    """The data ranks worker ``rank`` of ``world`` plays when the run is laid out for ``data_world``."""
    if not 1 <= world <= data_world:
        raise ValueError(f"{world} workers cannot play {data_world} data ranks")
    return tuple(range(rank, data_world, world))


def _model(
    cfg: Config, num_classes: int, device: torch.device, rank: int, world: int, *, fresh: bool
) -> nn.Module:
    """The detection model of ``cfg`` on ``device``: a fresh run's starting weights loaded, BatchNorm over
    all workers' batches when asked on several workers (``sync_bn.py``), the frozen layers frozen."""
    model = build_model(cfg.model.name, num_classes=num_classes)
    if fresh and cfg.model.weights is not None:
        report = load_initial_weights(model, cfg.model.weights)
        if rank == 0:
            log.info(report.summary())
    if cfg.model.sync_bn and world > 1:
        model = sync_batchnorm(model, device)
    freeze_layers(model, cfg.model.freeze)
    # channels-last (NHWC) is the layout oneDNN and cuDNN run convolutions fastest in, forward and backward
    return model.to(device, memory_format=torch.channels_last)


def _optimizer_and_schedule(
    model: nn.Module, t: TrainConfig, world: int, rank: int, num_samples: int
) -> tuple[torch.optim.Optimizer, Schedule]:
    """SGD with its three parameter groups, and the learning-rate, momentum and accumulation schedule."""
    global_batch = t.batch_size * world
    # weight decay acts once per optimizer step: scaled to the images the step sums (training.optimizer)
    scale = linear_scale(t.nominal_batch, global_batch)
    optimizer = build_sgd(model, t.lr0, t.momentum, t.weight_decay * scale)
    if rank == 0 and global_batch > t.nominal_batch:
        log.info(
            "global batch %d (%d workers x %d) exceeds train.nominal_batch %d: each step sums %d images' "
            "gradients, i.e. lr0 and weight decay act x%.2f per step (linear scaling; per image unchanged)",
            global_batch, world, t.batch_size, t.nominal_batch,
            images_per_step(t.nominal_batch, global_batch), scale,
        )  # fmt: skip
    schedule = Schedule(
        lr0=t.lr0,
        lrf=t.lrf,
        epochs=t.epochs,
        steps_per_epoch=t.steps_per_epoch or max(num_samples // global_batch, 1),
        momentum=t.momentum,
        warmup_epochs=t.warmup_epochs,
        warmup_min_steps=t.warmup_min_steps,
        warmup_bias_lr=t.warmup_bias_lr,
        warmup_momentum=t.warmup_momentum,
        cosine=t.cosine,
    )
    return optimizer, schedule


def compile_for_training(state: TrainState, backend: str = "inductor") -> None:
    """``torch.compile`` the (wrapped) model in place (``train.compile``); ``backend`` is torch.compile's.

    Compilation is lazy: the first step of each input shape pays it. The loss stays eager: compiled with
    dynamic shapes (its box count changes every batch), its graphs read sizes back from the device
    (``.item()`` calls counted by HostSyncCounter on a CPU), which is what it is written to avoid.
    """
    state.model = torch.compile(state.model, backend=backend)


def restore(state: TrainState, checkpoint: TrainingCheckpoint) -> None:
    """Load a checkpoint's weights, EMA, optimizer, scaler and counters into an unwrapped state."""
    state.model.load_state_dict(checkpoint.model)
    state.ema.load_state_dict(checkpoint.ema)
    state.optimizer.load_state_dict(checkpoint.optimizer)
    state.scaler.load_state_dict(checkpoint.scaler)
    state.epoch, state.step, state.best_map = checkpoint.epoch, checkpoint.step, checkpoint.best_map
    state.history = list(checkpoint.history)
