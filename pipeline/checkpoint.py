"""Training checkpoints: tensors and plain data only, loadable with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from yolov9 import DetectionModel, build_model

FORMAT = "yolov9-ray/training-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"
REQUIRED = ("model", "ema", "epoch", "step", "config", "best_map", "model_name", "num_classes")


class CheckpointError(PipelineError, ValueError):
    """A file that is not a readable checkpoint of this project."""


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically (a reader never sees half a file)."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    path = Path(directory) / FILENAME
    tmp = path.with_suffix(".tmp")
    torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the ``checkpoint.pt`` inside a checkpoint directory.

    Raises CheckpointError naming the file for anything that is not this project's checkpoint:
    a missing file, a corrupt one, one holding pickled objects, or a foreign dictionary.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on damage
        raise CheckpointError(
            f"{path} is not a loadable checkpoint (corrupt, or it holds pickled objects that "
            f"weights_only loading refuses): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a yolov9-ray training checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, expected {VERSION}")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    return state


def ema_model(state: dict[str, Any]) -> DetectionModel:
    """The dual (training) model of a checkpoint with its EMA weights, in eval mode."""
    model = build_model(state["model_name"], num_classes=int(state["num_classes"]))
    try:
        model.load_state_dict(state["ema"]["model"])
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's EMA weights do not fit {state['model_name']}: {e}") from e
    return model.eval()
