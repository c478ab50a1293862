"""Non-maximum suppression of decoded head outputs, in pure torch (no torchvision).

The eval-mode head (``yolov9.head.decode``) returns ``(B, 4 + nc, A)``: rows 0..3 are boxes as
centre-x, centre-y, width, height (xywh) in input pixels, rows 4.. are class probabilities (after
sigmoid). ``non_max_suppression`` turns that into one ``(n, 6)`` tensor per image of
``[x1, y1, x2, y2, score, class]`` (xyxy input pixels), sorted by score, highest first.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

# Class offset for class-aware NMS: larger than any image side, so boxes of different classes never overlap.
MAX_WH = 7680
# Greedy rounds between checks that every image is done: a check is a host sync on a GPU.
ROUNDS_PER_CHECK = 16
# Score-sorted boxes decided together: a round's work is one window, not every candidate.
NMS_WINDOW = 1024
# Kept boxes checked against a new window at once.
KEPT_CHUNK = 64


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


def greedy_nms(
    boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, iou_thres: float, max_keep: int
) -> torch.Tensor:
    """Greedy NMS of B images at once: indices ``(B, max_keep)`` of the kept boxes, by score descending,
    -1 past each image's last.

    ``boxes`` ``(B, N, 4)`` xyxy, ``scores`` ``(B, N)``, ``valid`` ``(B, N)`` bool (padding is False). A box
    is dropped when its IoU with a kept, higher-scored box is > ``iou_thres``; ties in score keep input
    order. The score-sorted boxes are taken NMS_WINDOW at a time: the boxes kept so far drop what they
    overlap in the window, then each round keeps every image's best remaining box in the window and drops
    what it overlaps there (one vectorised pass over the batch, no IoU matrix). Host syncs only every
    ROUNDS_PER_CHECK rounds: to move on once the window is decided (then dropping the decided boxes) and
    to stop once every image has ``max_keep`` boxes, which is usually within the first window.
    """
    batch, n = scores.shape
    device = boxes.device
    picked = torch.full((batch, max_keep + 1), -1, dtype=torch.long, device=device)  # last: overflow slot
    if n == 0 or max_keep == 0:
        return picked[:, :max_keep]
    order = scores.argsort(dim=1, descending=True, stable=True)
    valid = valid.gather(1, order)
    ordered = boxes.gather(1, order[..., None].expand(-1, -1, 4)).permute(2, 0, 1)
    area = (ordered[2] - ordered[0]).clamp(min=0) * (ordered[3] - ordered[1]).clamp(min=0)
    coords = torch.cat((ordered, area[None]))  # (5, B, N): x1, y1, x2, y2, area
    count = torch.zeros(batch, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    kept, kept_mask = [], []  # per round: the chosen boxes (5, B) and whether each was kept (B,)
    for start in range(0, n, NMS_WINDOW):
        window = coords[:, :, start : start + NMS_WINDOW]
        position = order[:, start : start + NMS_WINDOW]
        alive = valid[:, start : start + NMS_WINDOW].to(torch.uint8)  # argmax takes uint8, not bool
        if kept:
            alive *= ~_suppressed(torch.stack(kept, 2), torch.stack(kept_mask, 1), window, iou_thres)
        for k in itertools.count():
            if k % ROUNDS_PER_CHECK == 0 and k:
                left = alive.sum(1) * (count < max_keep)
                most = int(left.max())
                if most == 0:
                    break
                if most <= alive.shape[1] // 2:  # keep the alive boxes, in order, and drop the rest
                    take = alive.argsort(dim=1, descending=True, stable=True)[:, :most]
                    position, alive = position.gather(1, take), alive.gather(1, take)
                    window = window.gather(2, take[None].expand(5, -1, -1))
            best = alive.argmax(1)  # the first alive box: the best one left, ties in input order
            found = alive[rows, best].bool() & (count < max_keep)
            picked[rows, torch.where(found, count, max_keep)] = position[rows, best]
            count += found
            chosen = window[:, rows, best]
            kept.append(chosen)
            kept_mask.append(found)
            alive *= _iou_with(chosen[..., None], window) <= iou_thres
            alive[rows, best] = 0
        if bool((count >= max_keep).all()):
            break
    picked[:, max_keep] = -1
    return picked[:, :max_keep]


def _iou_with(chosen: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``chosen`` (5, B, ...) with boxes ``window`` (5, B, ...), both as x1, y1, x2, y2, area,
    broadcast (one box per image against a window: (5, B, 1) and (5, B, W)); 0 where the union is empty."""
    x1, y1, x2, y2, area = window
    bx1, by1, bx2, by2, barea = chosen
    inter = (torch.minimum(x2, bx2) - torch.maximum(x1, bx1)).clamp_(min=0)
    inter *= (torch.minimum(y2, by2) - torch.maximum(y1, by1)).clamp_(min=0)
    union = (area + barea).sub_(inter).clamp_(min=torch.finfo(area.dtype).tiny)
    return inter.div_(union)


def _suppressed(
    kept: torch.Tensor, mask: torch.Tensor, window: torch.Tensor, iou_thres: float
) -> torch.Tensor:
    """``(B, W)``: boxes of ``window`` (5, B, W) that a kept box (``kept`` (5, B, R) where ``mask`` (B, R))
    overlaps by IoU > ``iou_thres``; KEPT_CHUNK kept boxes at a time keep the (B, chunk, W) IoU small."""
    hit = torch.zeros(window.shape[1:], dtype=torch.bool, device=window.device)
    for r in range(0, kept.shape[2], KEPT_CHUNK):
        iou = _iou_with(kept[:, :, r : r + KEPT_CHUNK, None], window[:, :, None, :])
        hit |= ((iou > iou_thres) & mask[:, r : r + KEPT_CHUNK, None]).any(1)
    return hit


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float, max_keep: int | None = None
) -> torch.Tensor:
    """Greedy NMS of one image: indices ``(k,)`` into ``boxes`` of the kept boxes, by score descending.

    ``boxes`` is ``(N, 4)`` xyxy, ``scores`` ``(N,)``. A box is dropped when its IoU with a kept,
    higher-scored box is > ``iou_thres``; ties in score keep input order. Stops after ``max_keep``
    boxes: later boxes cannot change the decisions about earlier ones.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"expected boxes (N, 4) and scores (N,), got {tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    _check_unit("iou_thres", iou_thres)
    if max_keep is not None and max_keep < 0:
        raise ValueError(f"max_keep must be >= 0, got {max_keep}")
    limit = len(scores) if max_keep is None else min(max_keep, len(scores))
    valid = torch.ones(1, len(scores), dtype=torch.bool, device=scores.device)
    keep = greedy_nms(boxes[None], scores[None], valid, iou_thres, limit)[0]
    return keep[keep >= 0]


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

    x = prediction.transpose(1, 2)  # (B, A, 4 + nc)
    batch, anchors, nc = x.shape[0], x.shape[1], x.shape[2] - 4
    boxes, cls_scores = xywh_to_xyxy(x[..., :4]), x[..., 4:]
    if multi_label:  # a candidate per (anchor, class), flattened anchor-major as nonzero() orders them
        scores = cls_scores.reshape(batch, anchors * nc)
        per_anchor = nc
    else:
        scores, best_class = cls_scores.max(2)
        per_anchor = 1
    passed = scores > conf_thres
    # One host sync per batch: how many candidates the fullest image has (at most max_nms go on).
    width = min(int(passed.sum(1).max()), max_nms) if batch else 0
    # topk of the masked scores picks each image's best candidates (padding: non-candidates)...
    masked = torch.where(passed, scores, torch.full_like(scores, -1.0))
    top = masked.topk(width, dim=1, sorted=False).indices
    # ...and sorting them by input position first makes the stable sort in greedy_nms keep input order.
    top = top.sort(dim=1).values
    valid = passed.gather(1, top)
    scores = scores.gather(1, top)
    anchor = top // per_anchor
    classes = top % nc if multi_label else best_class.gather(1, anchor)
    boxes = boxes.gather(1, anchor[..., None].expand(-1, -1, 4))
    # Offsets up to nc * MAX_WH overflow float16, so NMS runs in at least float32.
    nms_boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    if not class_agnostic:
        nms_boxes = nms_boxes + classes[..., None].to(nms_boxes.dtype) * MAX_WH
    keep = greedy_nms(nms_boxes, scores, valid, iou_thres, min(max_det, width))
    counts = (keep >= 0).sum(1).tolist()
    index = keep.clamp(min=0)[..., None]
    rows = torch.cat(
        (
            boxes.gather(1, index.expand(-1, -1, 4)),
            scores.gather(1, index[..., 0])[..., None],
            classes.gather(1, index[..., 0])[..., None].to(x.dtype),
        ),
        2,
    )
    return [rows[b, :count] for b, count in enumerate(counts)]
