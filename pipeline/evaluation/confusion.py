"""Detections matched to the ground truth at one confidence and IoU: which objects were found, which
were missed, which detections are false positives, and the confusion matrix of the classes.

Not a score (mAP comes from pycocotools only): a count of what a user sees at a working threshold.
Matching is class-agnostic, one to one, highest IoU first, so that a detection of the wrong class on
an object shows up as that confusion. A detection that matches nothing but lies inside a crowd region
(intersection over its own area >= the IoU threshold, COCO's crowd rule) is ignored, as COCO ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.coco import GroundTruth

CONF_THRES = 0.25  # detections counted: score >= this
IOU_THRES = 0.5  # a detection and an object match at IoU >= this


@dataclass(frozen=True)
class ImageMatch:
    """One image's matching. ``gt_boxes`` (G, 4) xyxy original pixels and ``gt_classes`` (G,) of the
    non-crowd objects; ``gt_found`` (G,): matched by a detection of its class; ``det_correct`` (D,): the
    detection matched an object of its class; ``det_ignored`` (D,): unmatched, on a crowd region;
    ``pairs`` (P, 2) [detection index, object index] of every match, whatever the classes."""

    gt_boxes: np.ndarray
    gt_classes: np.ndarray
    gt_found: np.ndarray
    det_classes: np.ndarray
    det_correct: np.ndarray
    det_ignored: np.ndarray
    pairs: np.ndarray


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), 1)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    return np.clip(rb - lt, 0, None).prod(-1)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def match_image(
    ground_truth: GroundTruth, image_id: int, detections: np.ndarray, iou_thres: float = IOU_THRES
) -> ImageMatch:
    """Match one image's detections ``(D, 7)`` (``pipeline.evaluation.coco`` layout) to its ground truth."""
    anns = ground_truth.coco.imgToAnns.get(image_id, [])
    class_of = {c: i for i, c in enumerate(ground_truth.category_ids)}
    objects = [a for a in anns if not a.get("iscrowd", 0) and a["category_id"] in class_of]
    crowds = [a for a in anns if a.get("iscrowd", 0)]
    gt_boxes = _xyxy(np.array([a["bbox"] for a in objects], np.float64).reshape(-1, 4))
    gt_classes = np.array([class_of[a["category_id"]] for a in objects], np.int64)
    det_boxes = _xyxy(detections[:, 1:5].reshape(-1, 4))
    det_classes = np.array([class_of[int(c)] for c in detections[:, 6]], np.int64)

    inter = _intersection(det_boxes, gt_boxes)
    union = _area(det_boxes)[:, None] + _area(gt_boxes)[None, :] - inter
    iou = inter / np.maximum(union, np.finfo(np.float64).tiny)
    pairs = []
    det_used, gt_used = np.zeros(len(det_boxes), bool), np.zeros(len(gt_boxes), bool)
    candidates = np.argwhere(iou >= iou_thres)
    for d, g in candidates[np.argsort(-iou[tuple(candidates.T)], kind="stable")]:
        if not det_used[d] and not gt_used[g]:
            det_used[d] = gt_used[g] = True
            pairs.append((d, g))
    pairs_array = np.array(pairs, np.int64).reshape(-1, 2)
    same = det_classes[pairs_array[:, 0]] == gt_classes[pairs_array[:, 1]]
    det_correct, gt_found = np.zeros(len(det_boxes), bool), np.zeros(len(gt_boxes), bool)
    det_correct[pairs_array[same, 0]] = True
    gt_found[pairs_array[same, 1]] = True

    crowd_boxes = _xyxy(np.array([a["bbox"] for a in crowds], np.float64).reshape(-1, 4))
    inside = _intersection(det_boxes, crowd_boxes) / np.maximum(_area(det_boxes), 1e-12)[:, None]
    det_ignored = ~det_used & (inside >= iou_thres).any(1)
    return ImageMatch(gt_boxes, gt_classes, gt_found, det_classes, det_correct, det_ignored, pairs_array)


def confusion_matrix(
    ground_truth: GroundTruth,
    detections: np.ndarray,
    conf_thres: float = CONF_THRES,
    iou_thres: float = IOU_THRES,
) -> np.ndarray:
    """Counts ``(K + 1, K + 1)``: row = true class, column = detected class, index K = background. Row c
    column K: objects of class c that no detection matched; row K column c: detections of class c that
    matched no object (false positives). Detections with score < ``conf_thres`` are left out."""
    k = len(ground_truth.category_ids)
    matrix = np.zeros((k + 1, k + 1), np.int64)
    detections = detections[detections[:, 5] >= conf_thres]
    order = np.argsort(detections[:, 0], kind="stable")
    detections = detections[order]
    image_ids = detections[:, 0].astype(np.int64)
    for image_id in ground_truth.coco.getImgIds():
        lo, hi = np.searchsorted(image_ids, [image_id, image_id + 1])
        match = match_image(ground_truth, image_id, detections[lo:hi], iou_thres)
        det_classes, (d, g) = match.det_classes, match.pairs.T
        np.add.at(matrix, (match.gt_classes[g], det_classes[d]), 1)
        missed = np.ones(len(match.gt_classes), bool)
        missed[g] = False
        np.add.at(matrix, (match.gt_classes[missed], k), 1)
        spurious = np.ones(len(det_classes), bool)
        spurious[d] = False
        spurious &= ~match.det_ignored
        np.add.at(matrix, (k, det_classes[spurious]), 1)
    return matrix
