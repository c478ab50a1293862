"""Non-maximum suppression of decoded head outputs, in pure torch (no torchvision).

The eval-mode head (``yolov9.head.decode``) returns ``(B, 4 + nc, A)``: rows 0..3 are boxes as
centre-x, centre-y, width, height (xywh) in input pixels, rows 4.. are class probabilities (after
sigmoid). ``non_max_suppression`` turns that into one ``(n, 6)`` tensor per image of
``[x1, y1, x2, y2, score, class]`` (xyxy input pixels), sorted by score, highest first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Class offset for class-aware NMS: larger than any image side, so boxes of different classes never overlap.
MAX_WH = 7680
# Boxes resolved together by one IoU matrix: 1024^2 bools stay small on any device.
NMS_BLOCK = 1024


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` centre-x, centre-y, width, height -> ``(..., 4)`` x1, y1, x2, y2 (same units)."""
    centre, size = boxes[..., :2], boxes[..., 2:4]
    return torch.cat((centre - size / 2, centre + size / 2), -1)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix ``(N, M)`` of xyxy boxes ``a (N, 4)`` and ``b (M, 4)``; 0 where the union is empty."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    # union >= inter, so an empty union has an empty intersection and the clamp makes that IoU 0.
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def _resolve_block(overlap: torch.Tensor) -> torch.Tensor:
    """Greedy NMS inside one score-sorted block of ``n`` boxes: boolean keep mask ``(n,)``.

    ``overlap[j, i]`` (j < i only) says box j would suppress box i. A box is kept iff no earlier *kept*
    box suppresses it; iterating that rule from "keep all" reaches its unique fixed point (the greedy
    result) after at most as many rounds as the longest alternating suppression chain, which is a
    handful for real detections, and each round is one vectorised pass instead of n Python steps.
    """
    keep = torch.ones(overlap.shape[0], dtype=torch.bool, device=overlap.device)
    while True:
        new = ~(overlap & keep[:, None]).any(0)
        if torch.equal(new, keep):
            return keep
        keep = new


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float, max_keep: int | None = None
) -> torch.Tensor:
    """Greedy NMS: indices ``(k,)`` into ``boxes`` of the kept boxes, by score descending.

    ``boxes`` is ``(N, 4)`` xyxy, ``scores`` ``(N,)``. A box is dropped when its IoU with a kept,
    higher-scored box is > ``iou_thres``; ties in score keep input order. Stops after ``max_keep``
    boxes: later boxes cannot change the decisions about earlier ones.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"expected boxes (N, 4) and scores (N,), got {tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    _check_unit("iou_thres", iou_thres)
    order = scores.argsort(descending=True, stable=True)
    if max_keep is not None:
        if max_keep < 0:
            raise ValueError(f"max_keep must be >= 0, got {max_keep}")
        if max_keep == 0:
            return order[:0]
    ordered = boxes[order]
    kept: list[torch.Tensor] = []
    kept_boxes = ordered[:0]
    n_kept = 0
    for start in range(0, len(order), NMS_BLOCK):
        block = ordered[start : start + NMS_BLOCK]
        alive = torch.ones(len(block), dtype=torch.bool, device=block.device)
        for k in range(0, len(kept_boxes), NMS_BLOCK):  # chunked: kept x block IoU stays bounded
            alive &= (pairwise_iou(kept_boxes[k : k + NMS_BLOCK], block) <= iou_thres).all(0)
        # Only boxes that survive the kept ones can matter, and after the first block that is usually few.
        alive = alive.nonzero().squeeze(1)
        candidates = block[alive]
        keep = alive[_resolve_block((pairwise_iou(candidates, candidates) > iou_thres).triu(1))]
        kept.append(keep + start)
        kept_boxes = torch.cat((kept_boxes, block[keep]))
        n_kept += len(keep)
        if max_keep is not None and n_kept >= max_keep:
            break
    result = order[torch.cat(kept)] if kept else order[:0]
    return result if max_keep is None else result[:max_keep]


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def non_max_suppression(
    prediction: torch.Tensor | Sequence[torch.Tensor],
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 300,
    max_nms: int = 30000,
    class_agnostic: bool = False,
    multi_label: bool = False,
) -> list[torch.Tensor]:
    """Per-image NMS of decoded head output.

    ``prediction``: ``(B, 4 + nc, A)``, boxes xywh in input pixels then class probabilities; a
    tuple/list is taken to be ``(decoded, ...)`` and its element 0 used.
    Candidates are boxes with a class score > ``conf_thres``: the best class only, or with
    ``multi_label`` once per class above the threshold (the setting for mAP evaluation). The
    ``max_nms`` highest-scored candidates go through class-aware NMS (class-agnostic on request),
    and at most ``max_det`` survive.

    Returns ``B`` tensors ``(n, 6)`` ``[x1, y1, x2, y2, score, class]``, xyxy input pixels, score
    descending, on the input's device and dtype.
    """
    if isinstance(prediction, (list, tuple)):
        if not prediction:
            raise ValueError("expected a (B, 4 + nc, A) tensor, got an empty sequence")
        prediction = prediction[0]
    if not isinstance(prediction, torch.Tensor) or prediction.ndim != 3 or prediction.shape[1] < 5:
        shape = tuple(prediction.shape) if isinstance(prediction, torch.Tensor) else type(prediction).__name__
        raise ValueError(f"expected prediction of shape (B, 4 + nc, A) with nc >= 1, got {shape}")
    _check_unit("conf_thres", conf_thres)
    _check_unit("iou_thres", iou_thres)
    if max_det < 1 or max_nms < 1:
        raise ValueError(f"max_det and max_nms must be >= 1, got {max_det} and {max_nms}")
    if not torch.isfinite(prediction).all():
        raise ValueError("prediction contains NaN or inf (diverged model?)")

    out = []
    for x in prediction.transpose(1, 2):  # (A, 4 + nc) per image
        boxes, cls_scores = xywh_to_xyxy(x[:, :4]), x[:, 4:]
        if multi_label:
            i, j = (cls_scores > conf_thres).nonzero(as_tuple=True)
            scores, classes, boxes = cls_scores[i, j], j, boxes[i]
        else:
            scores, classes = cls_scores.max(1)
            mask = scores > conf_thres
            scores, classes, boxes = scores[mask], classes[mask], boxes[mask]
        # topk beats a full sort of the (up to A * nc) multi-label candidates at low conf_thres.
        top = (
            scores.topk(max_nms).indices
            if len(scores) > max_nms
            else scores.argsort(descending=True, stable=True)
        )
        scores, classes, boxes = scores[top], classes[top].to(x.dtype), boxes[top]
        # Offsets up to nc * MAX_WH overflow float16, so NMS runs in at least float32.
        nms_boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
        offset = 0 if class_agnostic else classes[:, None].to(nms_boxes.dtype) * MAX_WH
        keep = nms(nms_boxes + offset, scores, iou_thres, max_keep=max_det)
        out.append(torch.cat((boxes[keep], scores[keep, None], classes[keep, None]), 1))
    return out
