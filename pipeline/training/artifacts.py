"""Pictures of a run written beside each epoch's checkpoint (loss/mAP curves so far, the EMA model's
predictions on a few val images), so that a run that dies late still has them and MLflow shows them while
the run goes on."""

from __future__ import annotations

from pathlib import Path

import cv2
import torch

from pipeline import names
from pipeline.data.loader import make_val_loader
from pipeline.pgi import plot_pgi
from pipeline.plots import plot_curves
from pipeline.training.state import TrainState
from pipeline.validate import render_predictions

CURVES_PNG = "curves.png"
GRID_IMAGES = 8


def write_epoch_artifacts(state: TrainState, directory: str | Path) -> list[Path]:
    """``curves.png``, the PGI diagnostics plot (when the run has them) and the prediction grid in
    ``directory``; their paths. Call on rank 0 only."""
    directory = Path(directory)
    written = [plot_curves(state.history, directory / CURVES_PNG)] if state.history else []
    if any(k.startswith(names.PGI_PREFIX) for h in state.history for k in h):
        written.append(plot_pgi(state.history, directory / names.PGI_PNG))
    loader = make_val_loader(
        state.data.val,
        batch_size=GRID_IMAGES,
        imgsz=state.cfg.train.imgsz,
        rank=0,
        world_size=1,
        num_workers=0,
    )
    with torch.no_grad():
        grid = render_predictions(state.ema.module, loader, state.data.val_coco_json, GRID_IMAGES)
    picture = directory / names.PREDICTIONS_PNG
    cv2.imwrite(str(picture), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return [*written, picture]
