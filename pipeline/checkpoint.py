"""Training checkpoints: tensors and plain data only, loadable with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipeline import storage
from pipeline.config import Config, ConfigError, config_from_dict
from pipeline.errors import PipelineError
from pipeline.storage import Location
from yolov9 import DetectionModel, build_model

FORMAT = "yolov9-ray/training-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"
# What evaluation and registration read from the recorded config. Training records every key; a config
# lacking one of these is not a training run's, and a default standing in for it would be a wrong answer
# (another image size, another data root), so such a file is refused rather than completed.
RECORDED_CONFIG = (("train", "imgsz"), ("data", "root"), ("loss", "tal_topk"))

log = logging.getLogger(__name__)
T = TypeVar("T")


class CheckpointError(PipelineError, ValueError):
    """A file that is not a readable checkpoint of this project."""


@dataclass
class TrainingCheckpoint:
    """What a training run saves after an epoch: enough to resume it exactly, and what evaluation and
    registration read. Tensors and plain data only, so ``torch.load(weights_only=True)`` reads it.

    On disk it is the dict of :meth:`to_state_dict` (these fields plus ``format`` and ``version``, the
    config as plain data); in memory the config is the typed :class:`~pipeline.config.Config`.
    """

    model: dict[str, torch.Tensor]  # the trained (not averaged) weights
    ema: dict[str, Any]  # {"model": EMA state dict, "updates": EMA updates so far}
    epoch: int  # epochs completed
    step: int  # micro-batch steps completed (the LR schedule's clock)
    config: Config  # the run's
    best_map: float  # best val mAP@0.5:0.95 so far
    model_name: str
    num_classes: int
    optimizer: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    manifest_hash: str = ""
    val_manifest_hash: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per epoch so far
    metrics: dict[str, float] = field(default_factory=dict)  # this epoch's
    world_size: int = 0  # workers of the run when it was saved (0: not recorded, older files)

    def to_state_dict(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"format": FORMAT, "version": VERSION, **state, "config": self.config.to_dict()}

    @classmethod
    def from_state_dict(cls, state: Any, where: str | Path = "checkpoint") -> TrainingCheckpoint:
        """Raise CheckpointError naming ``where`` unless ``state`` is this project's checkpoint layout."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a yolov9-ray training checkpoint (no '{FORMAT}' marker)")
        if state.get("version") != VERSION:
            raise CheckpointError(
                f"{where} has checkpoint version {state.get('version')}, expected {VERSION}"
            )
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(state))
        unknown = sorted(set(state) - names - {"format", "version"})
        recorded = state.get("config")
        if not isinstance(recorded, dict):
            recorded = {}
        missing += [f"config.{s}.{k}" for s, k in RECORDED_CONFIG if k not in (recorded.get(s) or {})]
        if missing or unknown:
            raise CheckpointError(f"{where} lacks {missing} / has unknown keys {unknown}")
        try:
            config = config_from_dict(recorded, f"{where}: its training config")
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        return cls(**{k: v for k, v in state.items() if k in names} | {"config": config})

    def train_image_size(self) -> int:
        """The image side (pixels) the run trained and validated at."""
        return self.config.train.imgsz


def save_checkpoint(directory: str | Path, checkpoint: TrainingCheckpoint) -> Path:
    """Write ``directory/checkpoint.pt`` atomically (a reader never sees half a file)."""
    path = Path(directory) / FILENAME
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint.to_state_dict(), tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Location, map_location: str | torch.device = "cpu") -> TrainingCheckpoint:
    """Load a checkpoint file, or the ``checkpoint.pt`` inside a checkpoint directory, from a local path or
    a URL (``s3://bucket/runs/yolov9/checkpoint_...``: read into memory, nothing written locally).

    Raises CheckpointError naming the file for anything that is not this project's checkpoint:
    a missing file, a corrupt one, one holding pickled objects, or a foreign dictionary; StorageError
    when an object store cannot be reached.
    """
    path = storage.locate(path)
    if storage.is_dir(path):
        path = storage.locate(path, FILENAME)
    if not storage.is_file(path):
        raise CheckpointError(f"no checkpoint at {path}")
    source = path if isinstance(path, Path) else io.BytesIO(storage.read_bytes(path))
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on damage
        raise CheckpointError(
            f"{path} is not a loadable checkpoint (corrupt, or it holds pickled objects that "
            f"weights_only loading refuses): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    return TrainingCheckpoint.from_state_dict(state, path)


def newest_loadable(
    candidates: Sequence[T], load: Callable[[T], TrainingCheckpoint]
) -> tuple[T, TrainingCheckpoint] | None:
    """The first of ``candidates`` (newest first) that ``load`` reads, with what it read, passing over
    (with a warning) any that do not load (a truncated file or upload, a missing file); None if none does.
    Where a run resumes from, with Ray and without."""
    for candidate in candidates:
        try:
            return candidate, load(candidate)
        except (CheckpointError, OSError) as e:
            log.warning("cannot resume from %s (%s); trying the checkpoint before it", candidate, e)
    return None


def ema_model(checkpoint: TrainingCheckpoint) -> DetectionModel:
    """The dual (training) model of a checkpoint with its EMA weights, in eval mode."""
    model = build_model(checkpoint.model_name, num_classes=int(checkpoint.num_classes))
    try:
        model.load_state_dict(checkpoint.ema["model"])
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's EMA weights do not fit {checkpoint.model_name}: {e}") from e
    return model.eval()


@dataclass(frozen=True)
class RunCheckpoints:
    """A finished run's checkpoints, loaded: the latest (what a rerun resumes) and the best by val mAP."""

    latest_path: str | None
    latest: TrainingCheckpoint | None
    best_path: str | None
    best: TrainingCheckpoint | None
