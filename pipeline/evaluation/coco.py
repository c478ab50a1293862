"""COCO bbox evaluation with pycocotools: ground truth, NMS output -> COCO results, the 12 COCO numbers,
per-class AP and the precision/recall curves they come from.

Detections travel as one float64 array ``(N, 7)`` per split, the layout pycocotools itself reads
(``COCO.loadRes`` of a numpy array): ``[image_id, x, y, w, h, score, category_id]`` with the box in
original-image pixels. ``results_json`` turns it into the standard COCO results format.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import gc
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline import storage

META_KEYS = ("image_id", "orig_shape", "ratio", "pad")
# COCOeval.stats in order: AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@1/10/100, AR small/medium/large
STATS = (
    "map50_95",
    "map50",
    "map75",
    "map_small",
    "map_medium",
    "map_large",
    "ar1",
    "ar10",
    "ar100",
    "ar_small",
    "ar_medium",
    "ar_large",
)
DETECTION_COLUMNS = 7
# The rounding of the results format (and so of what is scored): 1/1000 pixel, 5 decimals of score.
BOX_DECIMALS, SCORE_DECIMALS = 3, 5


@dataclass(frozen=True)
class GroundTruth:
    """A split's COCO ground truth. ``category_ids[c]``: the category id of model class ``c`` (ids in
    ascending order, as the readers number classes); ``sizes[image_id]``: (height, width) in pixels of
    the original image."""

    coco: COCO
    category_ids: list[int]
    sizes: dict[int, tuple[int, int]]

    @property
    def class_names(self) -> list[str]:
        return [self.coco.cats[i]["name"] for i in self.category_ids]


@dataclass(frozen=True)
class CocoScores:
    """What COCOeval found (area "all", 100 detections per image for the per-class figures).

    ``stats``: the 12 COCO numbers by the names in ``STATS``, -1 where COCO has nothing to score (no
    small objects, say). ``ap50_95``/``ap50``: (K,) per class (model class order), -1 for a class without
    ground truth. ``precision``: (T, R, K) precision at IoU threshold t and recall ``recall_thresholds[r]``
    (COCO's interpolated curve), -1 where undefined."""

    stats: dict[str, float]
    ap50_95: np.ndarray
    ap50: np.ndarray
    precision: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray


def load_ground_truth(gt_json: str | Path | Mapping) -> GroundTruth:
    """COCO ground truth from a file (a local path or a URL) or an already-parsed dict, checked for the
    keys COCOeval reads."""
    if isinstance(gt_json, Mapping):
        dataset = copy.deepcopy(dict(gt_json))
    else:
        path = storage.locate(gt_json)
        if not storage.is_file(path):
            raise FileNotFoundError(f"COCO ground-truth file not found: {path}")
        dataset = json.loads(storage.read_bytes(path))
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
    sizes = {int(i): (int(im.get("height", 0)), int(im.get("width", 0))) for i, im in gt.imgs.items()}
    return GroundTruth(gt, sorted(gt.getCatIds()), sizes)


def _to_original(boxes: torch.Tensor, meta: Mapping[str, Any], original: tuple[int, int]) -> torch.Tensor:
    """Letterboxed xyxy ``(n, 4)`` input pixels -> xyxy pixels of the original image (``original`` (h, w)),
    clipped to it. The loader's ``orig_shape`` is the stored image's, which ``--max-side`` may have shrunk."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"image meta lacks {missing}; expected keys {list(META_KEYS)}")
    h, w = (float(v) for v in meta["orig_shape"])
    ratio = float(meta["ratio"])
    left, top = (float(v) for v in meta["pad"])
    if ratio <= 0 or h <= 0 or w <= 0 or min(original) <= 0:
        raise ValueError(
            f"image {meta['image_id']}: ratio, orig_shape and original size must be > 0, "
            f"got {ratio}, {(h, w)}, {original}"
        )
    big_h, big_w = original
    pad = boxes.new_tensor([left, top, left, top])
    scale = boxes.new_tensor([big_w / w, big_h / h] * 2) / ratio
    limit = boxes.new_tensor([big_w, big_h, big_w, big_h])
    return torch.min(((boxes - pad) * scale).clamp(min=0), limit)


def detections_from_predictions(
    preds: Sequence[torch.Tensor], metas: Sequence[Mapping[str, Any]], ground_truth: GroundTruth
) -> np.ndarray:
    """Detections ``(N, 7)`` (module docstring) for per-image NMS output.

    ``preds[i]``: ``(n, 6)`` ``[x1, y1, x2, y2, score, class]`` in letterboxed input pixels (xyxy).
    ``metas[i]``: ``{image_id, orig_shape: (h, w) of the stored image, ratio: letterbox scale, pad: (left,
    top) pixels}``. Boxes are mapped to the original image of ``ground_truth`` and clipped to it; bbox
    values are rounded to 3 decimals and scores to 5, as they are written to a results file.
    """
    if len(preds) != len(metas):
        raise ValueError(f"got {len(preds)} predictions but {len(metas)} image metas")
    category_ids = torch.tensor(ground_truth.category_ids, dtype=torch.float64)
    parts = [np.zeros((0, DETECTION_COLUMNS))]
    for pred, meta in zip(preds, metas, strict=True):
        if pred.ndim != 2 or pred.shape[1] != 6:
            raise ValueError(f"expected predictions of shape (n, 6), got {tuple(pred.shape)}")
        image_id = int(meta["image_id"])
        if image_id not in ground_truth.sizes:
            raise ValueError(f"image id {image_id} is not in the ground truth")
        pred = pred.detach().to("cpu", torch.float64)
        boxes = _to_original(pred[:, :4], meta, ground_truth.sizes[image_id])
        classes = pred[:, 5]
        if len(classes) and (
            (classes != classes.round()).any() or classes.min() < 0 or classes.max() >= len(category_ids)
        ):
            raise ValueError(
                f"class indices must be integers in [0, {len(category_ids)}), got {classes.tolist()}"
            )
        xy = boxes[:, :2].round(decimals=BOX_DECIMALS)
        wh = (boxes[:, 2:] - boxes[:, :2]).round(decimals=BOX_DECIMALS)
        score = pred[:, 4:5].round(decimals=SCORE_DECIMALS)
        image = torch.full_like(score, image_id)
        category = category_ids[classes.long()][:, None]
        parts.append(torch.cat((image, xy, wh, score, category), 1).numpy())
    return np.concatenate(parts)


def results_json(detections: np.ndarray) -> list[dict[str, Any]]:
    """The standard COCO results format of detections ``(N, 7)``: ``{image_id, category_id, bbox: [x, y,
    w, h], score}`` per detection."""
    return [
        {
            "image_id": int(row[0]),
            "category_id": int(row[6]),
            "bbox": [round(float(v), BOX_DECIMALS) for v in row[1:5]],
            "score": round(float(row[5]), SCORE_DECIMALS),
        }
        for row in detections
    ]


def detections_array(detections: Sequence[Mapping[str, Any]] | np.ndarray) -> np.ndarray:
    """Detections ``(N, 7)`` from results-format dicts (or an array, checked)."""
    if isinstance(detections, np.ndarray):
        array = detections.astype(np.float64, copy=False).reshape(-1, DETECTION_COLUMNS)
    else:
        array = np.array(
            [[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in detections], np.float64
        ).reshape(-1, DETECTION_COLUMNS)
    if not np.isfinite(array).all():
        raise ValueError("detections hold NaN or inf")
    return array


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


@contextlib.contextmanager
def _no_garbage_collection() -> Iterator[None]:
    """Pause the cyclic garbage collector: pycocotools builds a dict per detection and per match, which
    sets off collections that find nothing (those dicts hold no cycles) and cost a fifth of the scoring."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _print_nothing(*args: object, **kwargs: object) -> None:
    return None


def coco_evaluate(ground_truth: GroundTruth, detections: np.ndarray) -> CocoScores:
    """Score detections ``(N, 7)`` against ``ground_truth`` with COCOeval (crowd regions ignored as
    pycocotools does). No detections score 0. Detections on images or categories absent from the ground
    truth raise ValueError."""
    gt = ground_truth.coco
    detections = detections_array(detections)
    unknown_images = set(detections[:, 0].astype(int).tolist()) - set(gt.getImgIds())
    if unknown_images:
        raise ValueError(
            f"detections on image ids absent from the ground truth: {sorted(unknown_images)[:10]}"
        )
    unknown_cats = set(detections[:, 6].astype(int).tolist()) - set(ground_truth.category_ids)
    if unknown_cats:
        raise ValueError(f"detections with category ids absent from the ground truth: {sorted(unknown_cats)}")
    # loadRes of a list: its numpy path reads the array an element at a time, several times slower
    results = [
        {"image_id": int(r[0]), "bbox": r[1:5], "score": r[5], "category_id": int(r[6])}
        for r in detections.tolist()
    ]
    with _quiet_pycocotools(), _no_garbage_collection():
        dt = gt.loadRes(results) if results else _no_results(gt)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision: (T, R, K, areas, maxDets); area "all" is index 0, 100 detections the last maxDets.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    return CocoScores(
        stats={name: float(v) for name, v in zip(STATS, evaluator.stats, strict=True)},
        ap50_95=_mean_defined(precision, axis=(0, 1)),
        ap50=_mean_defined(precision[:1], axis=(0, 1)),
        precision=precision,
        iou_thresholds=np.asarray(evaluator.params.iouThrs),
        recall_thresholds=np.asarray(evaluator.params.recThrs),
    )


def _no_results(gt: COCO) -> COCO:
    """An empty result set (``loadRes`` refuses an empty list)."""
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "annotations": [], "categories": gt.dataset["categories"]}
    dt.createIndex()
    return dt


def _mean_defined(values: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """Mean over ``axis`` of the entries > -1 (COCO's "undefined"), as COCOeval.summarize takes it; -1
    where none is defined."""
    defined = values > -1
    count = defined.sum(axis=axis)
    total = np.where(defined, values, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), -1.0)


def coco_map(
    gt_json: str | Path | Mapping, detections: Sequence[Mapping[str, Any]] | np.ndarray
) -> dict[str, float]:
    """The 12 COCO numbers (``STATS``) of ``detections`` (results-format dicts or ``(N, 7)``) against
    ``gt_json`` (a path or a parsed COCO dict)."""
    return coco_evaluate(load_ground_truth(gt_json), detections_array(detections)).stats
