"""Per-epoch validation: run the (EMA) main branch over the val shards, COCO mAP with pycocotools.

Each rank evaluates its own part of the val split; detections are gathered on rank 0, the mAP is
computed there once and broadcast, so all ranks report the same figures and no rank
waits on a collective for longer than its own share of the work.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.checkpoint import ema_model, load_checkpoint
from pipeline.coco_eval import coco_map, detections_from_predictions
from pipeline.data import DataError, read_manifest
from pipeline.data.augment import letterbox_boxes
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.plots import draw_boxes, image_grid
from yolov9.postprocess import non_max_suppression


@torch.no_grad()
def predict_detections(
    model: nn.Module,
    loader: Iterable,
    category_ids: list[int],
    device: torch.device,
    conf_thres: float = 0.001,
    iou_thres: float = 0.7,
    max_det: int = 300,
) -> list[dict]:
    """COCO-format detections (original-image pixels) for every image the loader yields."""
    model.eval()
    detections: list[dict] = []
    for images, metas in loader:
        x = images.to(device, non_blocking=True).float() / 255
        preds = non_max_suppression(
            model(x).float(), conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, multi_label=True
        )
        detections.extend(detections_from_predictions([p.cpu() for p in preds], metas, category_ids))
    return detections


def evaluate_distributed(
    model: nn.Module,
    loader: Iterable,
    gt_json: str | Path,
    category_ids: list[int],
    device: torch.device,
    **nms: float,
) -> dict[str, float]:
    """mAP@0.5:0.95 and mAP@0.5 over the whole val split, identical on every rank. ``nms`` takes
    ``conf_thres``, ``iou_thres`` and ``max_det`` of :func:`predict_detections`."""
    detections = predict_detections(model, loader, category_ids, device, **nms)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return coco_map(gt_json, detections)
    is_root = dist.get_rank() == 0
    gathered: list[list[dict] | None] | None = [None] * dist.get_world_size() if is_root else None
    dist.gather_object(detections, gathered, dst=0)
    result = [coco_map(gt_json, [d for part in gathered for d in part])] if is_root else [None]
    dist.broadcast_object_list(result, src=0)
    return result[0]


@torch.no_grad()
def render_predictions(
    model: nn.Module,
    loader: Iterable,
    gt_json: str | Path,
    class_names: list[str],
    count: int = 8,
    conf_thres: float = 0.25,
) -> np.ndarray:
    """A grid of the first ``count`` letterboxed val images: true boxes in green, predictions in red."""
    gt = json.loads(Path(gt_json).read_text())
    truth: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        truth.setdefault(a["image_id"], []).append(a)
    model.eval()
    device = next(model.parameters()).device
    tiles = []
    for images, metas in loader:
        preds = non_max_suppression(
            model(images.to(device).float() / 255).float(), conf_thres=conf_thres, iou_thres=0.7, max_det=100
        )
        for image, meta, pred in zip(images, metas, preds, strict=True):
            tile = image.permute(1, 2, 0).numpy()
            anns = truth.get(meta["image_id"], [])
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            xyxy = np.concatenate((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), 1)
            boxes = letterbox_boxes(xyxy, meta["ratio"], meta["pad"])
            tile = draw_boxes(tile, boxes, [class_names[a["category_id"] - 1] for a in anns], (0, 200, 0))
            p = pred.cpu().numpy()
            labels = [f"{class_names[int(c)]} {s:.2f}" for s, c in p[:, 4:6]]
            tiles.append(draw_boxes(tile, p[:, :4], labels, (220, 0, 0), thickness=1))
            if len(tiles) == count:
                return image_grid(tiles)
    return image_grid(tiles)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    imgsz: int | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    device: str = "cpu",
) -> dict[str, float]:
    """COCO mAP of a training checkpoint's EMA main branch on the val shards of ``data_root``
    (``imgsz`` defaults to the training image size)."""
    state = load_checkpoint(checkpoint)
    manifest = read_manifest(manifest_path(data_root, "val"))
    if list(manifest.class_names) != list(state.class_names):
        raise DataError(
            f"{manifest.path} lists classes {manifest.class_names}, the checkpoint was trained on "
            f"{state.class_names}"
        )
    model = ema_model(state).to(device)
    loader = make_val_loader(
        manifest,
        batch_size=batch_size,
        imgsz=imgsz or state.train_image_size(),
        rank=0,
        world_size=1,
        num_workers=num_workers,
    )
    return evaluate_distributed(
        model,
        loader,
        coco_json_path(data_root, "val"),
        list(range(1, len(manifest.class_names) + 1)),
        torch.device(device),
    )
