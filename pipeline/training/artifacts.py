"""Pictures of a run written beside each epoch's checkpoint (loss/mAP curves so far, the EMA model's
predictions on a few val images), so that a run that dies late still has them and MLflow shows them while
the run goes on."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import names
from pipeline.data.loader import make_val_loader
from pipeline.evaluation.evaluate import render_predictions
from pipeline.plots import drawn, plot_curves, write_rgb
from pipeline.training.pgi_diagnostics import plot_pgi
from pipeline.training.state import TrainState

CURVES_PNG = "curves.png"
GRID_IMAGES = 8


def write_epoch_artifacts(state: TrainState, directory: str | Path) -> list[Path]:
    """``curves.png``, the PGI diagnostics plot (when the run has them) and the prediction grid in
    ``directory``; the paths of those drawn (one that fails is left out with a warning). Call on rank 0."""
    directory = Path(directory)
    pictures = []
    if state.history:
        pictures += drawn("the loss/mAP curves", lambda: plot_curves(state.history, directory / CURVES_PNG))
    if any(k.startswith(names.PGI_PREFIX) for h in state.history for k in h):
        pictures += drawn("the PGI plot", lambda: plot_pgi(state.history, directory / names.PGI_PNG))
    pictures += drawn(
        "the val prediction grid", lambda: write_prediction_grid(state, directory / names.PREDICTIONS_PNG)
    )
    return pictures


def write_prediction_grid(state: TrainState, path: Path) -> Path:
    """The EMA model's boxes on the first ``GRID_IMAGES`` val images, as one picture."""
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
    return write_rgb(grid, path)
