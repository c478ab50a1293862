"""The validation picture of a real (untrained) model on a few synthetic val images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import read_manifest
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.data.synthetic import SYNTHETIC_CLASSES, synthetic_records
from pipeline.data.writer import write_shards
from pipeline.evaluation.evaluate import FALSE_POSITIVE, FOUND, MISSED, render_predictions
from yolov9 import build_model


@pytest.fixture(scope="module")
def val_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val")
    write_shards(synthetic_records(4, 96, seed=3), list(SYNTHETIC_CLASSES), root, "val", shard_size=4)
    return root


def model_with_class_bias(shift: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("yolov9-t", num_classes=len(SYNTHETIC_CLASSES))
    for tower in (*model.head.cv3, *model.head.cv5):
        tower[-1].bias.data += shift
    return model.eval()


def grid_of(model: torch.nn.Module, root: Path) -> np.ndarray:
    manifest = read_manifest(manifest_path(root, "val"))
    loader = make_val_loader(manifest, batch_size=4, imgsz=64, rank=0, world_size=1, num_workers=0)
    return render_predictions(model, loader, coco_json_path(root, "val"), count=4)


def drawn(grid: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((grid == colour).all(-1).any())


def test_objects_no_detection_found_are_drawn_as_misses(val_root):
    # an untrained model scores every box far below 0.25: every object is missed, nothing else is drawn
    grid = grid_of(model_with_class_bias(0.0), val_root)
    assert grid.shape == (64, 4 * 64, 3)
    assert drawn(grid, MISSED) and not drawn(grid, FOUND) and not drawn(grid, FALSE_POSITIVE)


def test_detections_on_nothing_are_drawn_as_false_positives(val_root):
    # class biases of +20: every anchor detects every class with a score near 1
    grid = grid_of(model_with_class_bias(20.0), val_root)
    assert drawn(grid, FALSE_POSITIVE)
