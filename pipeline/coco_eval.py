"""COCO bbox evaluation: NMS output -> COCO detection dicts -> mAP via pycocotools.

Detections follow the COCO results format: ``{image_id, category_id, bbox: [x, y, w, h], score}``
with the box in original-image pixels.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

META_KEYS = ("image_id", "orig_shape", "ratio", "pad")
# Positions in COCOeval.stats (area "all", maxDets 100).
STAT_INDEX = {"map50_95": 0, "map50": 1, "map75": 2}


def _to_original(boxes: torch.Tensor, meta: Mapping[str, Any]) -> torch.Tensor:
    """Letterboxed xyxy ``(n, 4)`` input pixels -> xyxy original-image pixels, clipped to the image."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"image meta lacks {missing}; expected keys {list(META_KEYS)}")
    h, w = (float(v) for v in meta["orig_shape"])
    ratio = float(meta["ratio"])
    left, top = (float(v) for v in meta["pad"])
    if ratio <= 0 or h <= 0 or w <= 0:
        raise ValueError(f"image {meta['image_id']}: ratio and orig_shape must be > 0, got {ratio}, {(h, w)}")
    pad = boxes.new_tensor([left, top, left, top])
    limit = boxes.new_tensor([w, h, w, h])
    return torch.min(((boxes - pad) / ratio).clamp(min=0), limit)


def detections_from_predictions(
    preds: Sequence[torch.Tensor], metas: Sequence[Mapping[str, Any]], category_ids: Sequence[int]
) -> list[dict]:
    """COCO detection dicts for per-image NMS output.

    ``preds[i]``: ``(n, 6)`` ``[x1, y1, x2, y2, score, class]`` in letterboxed input pixels (xyxy).
    ``metas[i]``: ``{image_id, orig_shape: (h, w), ratio: letterbox scale, pad: (left, top) pixels}``.
    ``category_ids[c]``: the COCO category id of model class ``c``.
    Boxes are mapped back with ``(xy - pad) / ratio`` and clipped to the original image; bbox values
    are rounded to 3 decimals and scores to 5.
    """
    if len(preds) != len(metas):
        raise ValueError(f"got {len(preds)} predictions but {len(metas)} image metas")
    detections = []
    for pred, meta in zip(preds, metas, strict=True):
        if pred.ndim != 2 or pred.shape[1] != 6:
            raise ValueError(f"expected predictions of shape (n, 6), got {tuple(pred.shape)}")
        pred = pred.detach().to("cpu", torch.float64)
        boxes = _to_original(pred[:, :4], meta)
        classes = pred[:, 5]
        if len(classes) and (
            (classes != classes.round()).any() or classes.min() < 0 or classes.max() >= len(category_ids)
        ):
            raise ValueError(
                f"class indices must be integers in [0, {len(category_ids)}), got {classes.tolist()}"
            )
        image_id = int(meta["image_id"])
        for (x1, y1, x2, y2), score, c in zip(
            boxes.tolist(), pred[:, 4].tolist(), classes.tolist(), strict=True
        ):
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": int(category_ids[int(c)]),
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(score, 5),
                }
            )
    return detections


def _load_gt(gt_json: str | Path | Mapping) -> COCO:
    """COCO ground truth from a file or an already-parsed dict, checked for the keys COCOeval reads."""
    if isinstance(gt_json, Mapping):
        dataset = copy.deepcopy(dict(gt_json))
    else:
        path = Path(gt_json)
        if not path.is_file():
            raise FileNotFoundError(f"COCO ground-truth file not found: {path}")
        dataset = json.loads(path.read_text())
        if not isinstance(dataset, dict):
            raise ValueError(f"{path}: expected a COCO JSON object, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"COCO ground truth lacks '{key}'")
    if not dataset["annotations"]:
        raise ValueError("COCO ground truth has no annotations: mAP is undefined")
    for ann in dataset["annotations"]:
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "area") if k not in ann]
        if missing:
            raise ValueError(f"COCO ground-truth annotation {ann.get('id')} lacks {missing}")
    gt = COCO()
    gt.dataset = dataset
    with _quiet_pycocotools():
        gt.createIndex()
    return gt


@contextlib.contextmanager
def _quiet_pycocotools() -> Iterator[None]:
    """Mute the progress lines pycocotools prints on every call.

    redirect_stdout is not enough: inside a Ray Train worker print() is patched to log through the root
    logger, so the lines would still reach the job's output, 40 of them per validation.
    """
    original = builtins.print
    builtins.print = _print_nothing
    try:
        yield
    finally:
        builtins.print = original


def _print_nothing(*args: object, **kwargs: object) -> None:
    return None


def coco_map(gt_json: str | Path | Mapping, detections: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """COCO bbox mAP of ``detections`` against ``gt_json`` (a path or a parsed COCO dict).

    Returns ``{"map50_95", "map50", "map75"}`` in [0, 1] (COCOeval, area "all", 100 detections per
    image). No detections scores 0. Detections on images or categories absent from the ground truth
    raise ValueError.
    """
    gt = _load_gt(gt_json)
    if not detections:
        return dict.fromkeys(STAT_INDEX, 0.0)
    unknown_images = {d["image_id"] for d in detections} - set(gt.getImgIds())
    if unknown_images:
        raise ValueError(
            f"detections on image ids absent from the ground truth: {sorted(unknown_images)[:10]}"
        )
    unknown_cats = {d["category_id"] for d in detections} - set(gt.getCatIds())
    if unknown_cats:
        raise ValueError(f"detections with category ids absent from the ground truth: {sorted(unknown_cats)}")
    # loadRes adds keys to each dict it is given: keep the caller's detections untouched.
    results = [dict(d, bbox=list(d["bbox"])) for d in detections]
    with _quiet_pycocotools():
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[i]) for name, i in STAT_INDEX.items()}
