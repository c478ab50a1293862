"""Box geometry shared by the assigner, the loss and post-processing.

Boxes are ``xyxy``; the unit is whatever the caller uses (input pixels or grid cells), as long as
both operands share it. Distances are ``ltrb``: left, top, right, bottom from an anchor point.
"""

from __future__ import annotations

import math

import torch


def dist2bbox(distance: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``ltrb`` distances ``(..., 4)`` from anchor points ``(..., 2)`` -> boxes ``(..., 4)`` xyxy."""
    lt, rb = distance.chunk(2, -1)
    return torch.cat((anchors - lt, anchors + rb), -1)


def bbox2dist(anchors: torch.Tensor, boxes: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Boxes ``(..., 4)`` xyxy -> ``ltrb`` distances from ``anchors`` (grid units), clamped to
    ``[0, reg_max - 1 - 0.01]`` so that the right DFL bin always exists."""
    x1y1, x2y2 = boxes.chunk(2, -1)
    return torch.cat((anchors - x1y1, x2y2 - anchors), -1).clamp_(0, reg_max - 1 - 0.01)


def _overlap(b1: torch.Tensor, b2: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """Intersection-over-union of aligned boxes plus the terms GIoU and CIoU reuse."""
    # Coordinate-major copies: every op below then runs on contiguous memory (several times faster).
    (x1a, y1a, x2a, y2a), (x1b, y1b, x2b, y2b) = (
        b1.movedim(-1, 0).contiguous(),
        b2.movedim(-1, 0).contiguous(),
    )
    w1, h1 = x2a - x1a, y2a - y1a + eps
    w2, h2 = x2b - x1b, y2b - y1b + eps
    inter = (torch.minimum(x2a, x2b) - torch.maximum(x1a, x1b)).clamp(0) * (
        torch.minimum(y2a, y2b) - torch.maximum(y1a, y1b)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    cw = torch.maximum(x2a, x2b) - torch.minimum(x1a, x1b)
    ch = torch.maximum(y2a, y2b) - torch.minimum(y1a, y1b)
    return inter / union, union, cw, ch, (w1, h1, w2, h2), (x1a, y1a, x2a, y2a), (x1b, y1b, x2b, y2b)


def aligned_iou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of aligned boxes ``(..., 4)`` and ``(..., 4)`` xyxy -> ``(...)``."""
    return _overlap(b1, b2, eps)[0]


def box_giou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalised IoU: IoU minus the share of the enclosing box not covered by the union."""
    iou, union, cw, ch, *_ = _overlap(b1, b2, eps)
    hull = cw * ch + eps
    return iou - (hull - union) / hull


def box_ciou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU (Zheng et al. 2020): IoU minus the centre distance over the enclosing diagonal,
    minus the aspect-ratio term ``alpha * v``; ``alpha`` is a constant for the gradient, as in the paper."""
    iou, _, cw, ch, (w1, h1, w2, h2), (x1a, y1a, x2a, y2a), (x1b, y1b, x2b, y2b) = _overlap(b1, b2, eps)
    diag2 = cw.square() + ch.square() + eps
    rho2 = ((x1b + x2b - x1a - x2a).square() + (y1b + y2b - y1a - y2a).square()) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).square()
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / diag2 + v * alpha)
