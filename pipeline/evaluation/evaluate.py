"""Validation: run the (EMA) main branch over the val shards and score it with pycocotools.

Each rank evaluates its own part of the val split; its detections (one float array, never a Python dict
per detection) are gathered on rank 0, scored there once and the 12 COCO numbers broadcast, so all ranks
report the same figures and no rank waits on a collective for longer than its own share of the work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.checkpoint import ema_model, load_checkpoint
from pipeline.config import nms_settings
from pipeline.data import DataError, read_manifest
from pipeline.data.letterbox import letterbox_boxes
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.evaluation.coco import (
    CocoScores,
    GroundTruth,
    coco_evaluate,
    detections_from_predictions,
    load_ground_truth,
)
from pipeline.evaluation.confusion import CONF_THRES, confusion_matrix, match_image
from pipeline.plots import draw_boxes, image_grid
from yolov9.postprocess import non_max_suppression

# RGB: objects found and the detections that found them; objects missed; detections that found nothing.
FOUND, MISSED, FALSE_POSITIVE = (0, 200, 0), (255, 140, 0), (230, 0, 30)


@dataclass(frozen=True)
class Evaluation:
    """A model's full result on a val split: COCO scores, the detections ``(N, 7)`` they were computed
    from (``pipeline.evaluation.coco``) and the confusion matrix (``pipeline.evaluation.confusion``)."""

    scores: CocoScores
    detections: np.ndarray
    confusion: np.ndarray
    class_names: list[str]


@torch.no_grad()
def predict_detections(
    model: nn.Module,
    loader: Iterable,
    ground_truth: GroundTruth,
    device: torch.device,
    conf_thres: float = 0.001,
    iou_thres: float = 0.7,
    max_det: int = 300,
) -> np.ndarray:
    """Detections ``(N, 7)`` in original-image pixels for every image the loader yields. Images go in
    channels-last, the layout training gives the model; on a GPU the forward pass runs under autocast
    (NMS and the mapping back stay in float32 and float64)."""
    model.eval()
    parts = [np.zeros((0, 7))]
    for images, metas in loader:
        x = images.to(device, non_blocking=True, memory_format=torch.channels_last).float() / 255
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out = model(x)
        preds = non_max_suppression(
            out.float(), conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, multi_label=True
        )
        parts.append(detections_from_predictions(preds, metas, ground_truth))
    return np.concatenate(parts)


def _on_root(detections: np.ndarray) -> np.ndarray | None:
    """Every rank's detections, concatenated on rank 0 (None on the others)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return detections
    is_root = dist.get_rank() == 0
    gathered: list[np.ndarray | None] | None = [None] * dist.get_world_size() if is_root else None
    dist.gather_object(detections, gathered, dst=0)
    return np.concatenate(gathered) if is_root else None


def evaluate_distributed(
    model: nn.Module, loader: Iterable, gt_json: str | Path, device: torch.device, **nms: float
) -> dict[str, float]:
    """The 12 COCO numbers (``pipeline.evaluation.coco.STATS``) over the whole val split, identical on every
    rank. ``nms`` takes ``conf_thres``, ``iou_thres`` and ``max_det`` of :func:`predict_detections`."""
    ground_truth = load_ground_truth(gt_json)
    detections = _on_root(predict_detections(model, loader, ground_truth, device, **nms))
    result = [coco_evaluate(ground_truth, detections).stats if detections is not None else None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def evaluate_model(
    model: nn.Module, loader: Iterable, gt_json: str | Path, device: torch.device, **nms: float
) -> Evaluation:
    """Everything ``jobs.evaluate`` and the run's artifacts show, in one process: COCO scores, the
    detections and the confusion matrix (at ``pipeline.evaluation.confusion.CONF_THRES`` / ``IOU_THRES``)."""
    ground_truth = load_ground_truth(gt_json)
    detections = predict_detections(model, loader, ground_truth, device, **nms)
    return Evaluation(
        scores=coco_evaluate(ground_truth, detections),
        detections=detections,
        confusion=confusion_matrix(ground_truth, detections),
        class_names=ground_truth.class_names,
    )


@torch.no_grad()
def render_predictions(
    model: nn.Module,
    loader: Iterable,
    gt_json: str | Path,
    count: int = 8,
    conf_thres: float = CONF_THRES,
) -> np.ndarray:
    """A grid of the first ``count`` letterboxed val images, each detection matched to the ground truth
    as the confusion matrix matches them: found objects and their detections in green, missed objects
    in orange, false positives in red (crowd regions are not drawn)."""
    ground_truth = load_ground_truth(gt_json)
    names = ground_truth.class_names
    model.eval()
    device = next(model.parameters()).device
    tiles = []
    for images, metas in loader:
        preds = non_max_suppression(
            model(images.to(device).float() / 255).float(), conf_thres=conf_thres, iou_thres=0.7, max_det=100
        )
        detections = detections_from_predictions(preds, metas, ground_truth)
        for image, meta, pred in zip(images, metas, preds, strict=True):
            ids = int(meta["image_id"])
            match = match_image(ground_truth, ids, detections[detections[:, 0] == ids])
            # ground truth: original pixels -> the stored image -> the letterboxed tile
            big_h, big_w = ground_truth.sizes[ids]
            h, w = meta["orig_shape"]
            scale = np.array([w / big_w, h / big_h] * 2, np.float32)
            truth = letterbox_boxes(match.gt_boxes * scale, meta["ratio"], meta["pad"])
            p = pred.cpu().numpy()
            labels = [f"{names[int(c)]} {s:.2f}" for s, c in p[:, 4:6]]
            found, correct = match.gt_found, match.det_correct
            wrong = ~correct & ~match.det_ignored
            tile = image.permute(1, 2, 0).numpy()
            tile = draw_boxes(tile, truth[found], [names[c] for c in match.gt_classes[found]], FOUND)
            missed = [f"missed {names[c]}" for c in match.gt_classes[~found]]
            tile = draw_boxes(tile, truth[~found], missed, MISSED)
            tile = draw_boxes(tile, p[correct, :4], [labels[i] for i in np.flatnonzero(correct)], FOUND, 1)
            wrong_labels = [f"FP {labels[i]}" for i in np.flatnonzero(wrong)]
            tiles.append(draw_boxes(tile, p[wrong, :4], wrong_labels, FALSE_POSITIVE, 1))
            if len(tiles) == count:
                return image_grid(tiles)
    return image_grid(tiles)


def checkpoint_evaluation(
    checkpoint: str | Path,
    data_root: str | Path,
    imgsz: int | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    device: str = "cpu",
) -> Evaluation:
    """The full evaluation of a training checkpoint's EMA main branch on the val shards of ``data_root``
    (``imgsz`` defaults to the training image size), with the NMS settings its validation used."""
    state = load_checkpoint(checkpoint)
    manifest = read_manifest(manifest_path(data_root, "val"))
    if list(manifest.class_names) != list(state.class_names):
        raise DataError(
            f"{manifest.path} lists classes {manifest.class_names}, the checkpoint was trained on "
            f"{state.class_names}"
        )
    loader = make_val_loader(
        manifest,
        batch_size=batch_size,
        imgsz=imgsz or state.train_image_size(),
        rank=0,
        world_size=1,
        num_workers=num_workers,
    )
    return evaluate_model(
        ema_model(state).to(device, memory_format=torch.channels_last),
        loader,
        coco_json_path(data_root, "val"),
        torch.device(device),
        **nms_settings(state.config.train),
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    imgsz: int | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    device: str = "cpu",
) -> dict[str, float]:
    """The 12 COCO numbers of :func:`checkpoint_evaluation`."""
    return checkpoint_evaluation(checkpoint, data_root, imgsz, batch_size, num_workers, device).scores.stats
