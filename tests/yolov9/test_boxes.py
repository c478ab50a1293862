"""Box geometry: values worked out by hand."""

import math

import pytest
import torch

from yolov9.boxes import aligned_iou, bbox2dist, box_ciou, box_giou, dist2bbox

A = torch.tensor([0.0, 0.0, 2.0, 2.0])
SHIFTED = torch.tensor([1.0, 0.0, 3.0, 2.0])  # same shape, moved right by 1
WIDER = torch.tensor([0.0, 0.0, 4.0, 2.0])  # same left edge, twice as wide


def test_iou_of_half_overlapping_squares_is_one_third():
    # intersection 1x2 = 2, union 4 + 4 - 2 = 6
    assert aligned_iou(A, SHIFTED).item() == pytest.approx(1 / 3, abs=1e-6)


def test_identical_boxes_have_iou_giou_ciou_one():
    for fn in (aligned_iou, box_giou, box_ciou):
        assert fn(A, A).item() == pytest.approx(1.0, abs=1e-6)


def test_giou_penalises_the_empty_part_of_the_hull():
    far = torch.tensor([4.0, 0.0, 6.0, 2.0])  # no overlap; hull 6x2 = 12, union 8
    assert box_giou(A, far).item() == pytest.approx(0 - (12 - 8) / 12, abs=1e-6)


def test_ciou_same_aspect_is_iou_minus_centre_term():
    # centres 1 apart, enclosing box 3x2 so diagonal^2 = 13; equal aspect ratios: v = 0
    assert box_ciou(A, SHIFTED).item() == pytest.approx(1 / 3 - 1 / 13, abs=1e-6)


def test_ciou_with_aspect_term():
    iou = 0.5  # 4 / 8
    rho2_over_c2 = 1 / 20  # centres (1,1) and (2,1); hull 4x2
    v = 4 / math.pi**2 * (math.atan(2) - math.atan(1)) ** 2
    alpha = v / (v - iou + 1)
    assert box_ciou(A, WIDER).item() == pytest.approx(iou - rho2_over_c2 - alpha * v, abs=1e-6)


def test_ciou_broadcasts_over_leading_dimensions():
    out = box_ciou(A.expand(3, 5, 4), SHIFTED.expand(3, 5, 4))
    assert out.shape == (3, 5)


def test_dist2bbox_and_bbox2dist_round_trip():
    anchors = torch.tensor([[5.0, 5.0], [1.5, 2.5]])
    boxes = torch.tensor([[2.0, 3.0, 9.0, 6.0], [0.5, 0.5, 4.0, 8.0]])
    assert torch.allclose(dist2bbox(bbox2dist(anchors, boxes, reg_max=16), anchors), boxes)


def test_bbox2dist_clamps_to_last_full_bin():
    ltrb = bbox2dist(torch.tensor([[5.0, 5.0]]), torch.tensor([[2.0, 3.0, 30.0, 7.0]]), reg_max=16)
    assert ltrb[0].tolist() == pytest.approx([3.0, 2.0, 14.99, 2.0])
