"""Tests for yolov9.postprocess: greedy NMS and per-image post-processing of head output."""

from __future__ import annotations

import pytest
import torch

from yolov9.postprocess import ROUNDS_PER_CHECK, nms, non_max_suppression


def head_output(rows: list[tuple[list[float], list[float]]]) -> torch.Tensor:
    """One image of eval-head output (1, 4 + nc, A) from (xywh box, class scores) rows."""
    return torch.tensor([box + scores for box, scores in rows]).T.unsqueeze(0)


def reference_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_nms(boxes: list[list[float]], scores: list[float], iou_thres: float) -> list[int]:
    """Textbook greedy NMS: visit by score, keep a box unless a kept box overlaps it by > iou_thres."""
    kept: list[int] = []
    for i in sorted(range(len(scores)), key=lambda k: (-scores[k], k)):
        if all(reference_iou(boxes[i], boxes[k]) <= iou_thres for k in kept):
            kept.append(i)
    return kept


def assert_rows(out: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(out, torch.tensor(expected, dtype=out.dtype).reshape(-1, 6))


def random_boxes(n: int, seed: int, size: float = 200.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4) float64 xyxy boxes clustered enough to overlap often, and (n,) scores."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 60 + 5
    return torch.cat((xy, xy + wh), 1), torch.rand(n, generator=g, dtype=torch.float64)


def test_overlapping_boxes_of_one_class_keep_the_higher_score():
    # IoU of 20x20 boxes shifted by 2 px: 18*20 / (800 - 360) = 0.818 > 0.45
    pred = head_output([([50, 50, 20, 20], [0.9]), ([52, 50, 20, 20], [0.8])])
    (out,) = non_max_suppression(pred)
    assert_rows(out, [[40, 40, 60, 60, 0.9, 0]])


def test_output_converts_centre_size_to_corners():
    (out,) = non_max_suppression(head_output([([50, 40, 20, 10], [0.0, 0.7])]))
    assert_rows(out, [[40, 35, 60, 45, 0.7, 1]])


def test_same_boxes_of_different_classes_are_both_kept():
    pred = head_output([([50, 50, 20, 20], [0.9, 0.0]), ([52, 50, 20, 20], [0.0, 0.8])])
    (out,) = non_max_suppression(pred)
    torch.testing.assert_close(out[:, 4:], torch.tensor([[0.9, 0], [0.8, 1]]))


def test_class_agnostic_suppresses_across_classes():
    pred = head_output([([50, 50, 20, 20], [0.9, 0.0]), ([52, 50, 20, 20], [0.0, 0.8])])
    (out,) = non_max_suppression(pred, class_agnostic=True)
    torch.testing.assert_close(out[:, 4:], torch.tensor([[0.9, 0]]))


def test_half_precision_keeps_classes_apart():
    # Class 20 * 7680 px is past float16's range; the class offset must not overflow into one box.
    pred = head_output([([50, 50, 20, 20], [0.9] + [0.0] * 20), ([52, 50, 20, 20], [0.0] * 20 + [0.8])])
    (out,) = non_max_suppression(pred.half())
    assert out[:, 5].tolist() == [0, 20]


def test_conf_threshold_is_strict():
    pred = head_output([([10, 10, 4, 4], [0.3]), ([100, 100, 4, 4], [0.25]), ([200, 200, 4, 4], [0.2])])
    (out,) = non_max_suppression(pred, conf_thres=0.25)
    assert out[:, 4].tolist() == pytest.approx([0.3])


def test_max_det_keeps_the_highest_scores():
    rows = [([i * 50.0, 10, 4, 4], [s]) for i, s in enumerate([0.5, 0.9, 0.7, 0.6])]
    (out,) = non_max_suppression(head_output(rows), max_det=2)
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.7])


def test_multi_label_emits_a_row_per_class_above_threshold():
    pred = head_output([([50, 50, 20, 20], [0.6, 0.1, 0.4])])
    (out,) = non_max_suppression(pred, conf_thres=0.3, multi_label=True)
    torch.testing.assert_close(out[:, 4:], torch.tensor([[0.6, 0], [0.4, 2]]))


def test_empty_input_gives_empty_rows_per_image():
    out = non_max_suppression(torch.zeros(2, 4 + 3, 0))
    assert [tuple(o.shape) for o in out] == [(0, 6), (0, 6)]


def test_no_candidate_above_threshold_gives_empty_rows():
    (out,) = non_max_suppression(head_output([([50, 50, 20, 20], [0.1])]), conf_thres=0.5)
    assert out.shape == (0, 6)


def test_sequence_input_uses_its_first_element():
    pred = head_output([([50, 40, 20, 10], [0.7])])
    assert torch.equal(non_max_suppression((pred, "aux"))[0], non_max_suppression(pred)[0])


def test_greedy_nms_keeps_a_box_whose_only_suppressor_was_itself_suppressed():
    # A-B and B-C overlap by 7/13 = 0.54, A-C by 4/16 = 0.25: greedy keeps A and C.
    boxes = torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_python_reference_on_random_boxes(seed):
    boxes, scores = random_boxes(300, seed)
    expected = reference_nms(boxes.tolist(), scores.tolist(), 0.45)
    assert nms(boxes, scores, 0.45).tolist() == expected


def test_nms_matches_python_reference_on_many_boxes():
    boxes, scores = random_boxes(1300, seed=3, size=400.0)
    expected = reference_nms(boxes.tolist(), scores.tolist(), 0.5)
    assert nms(boxes, scores, 0.5).tolist() == expected


def test_nms_keeps_equal_scores_in_input_order():
    # three disjoint boxes with one score, then a fourth overlapping the second by IoU 0.82
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [21, 0, 31, 10]])
    assert nms(boxes, torch.tensor([0.5, 0.5, 0.5, 0.5]), 0.5).tolist() == [0, 1, 2]


def test_nms_max_keep_is_a_prefix_of_the_full_result():
    boxes, scores = random_boxes(1500, seed=4, size=600.0)
    full = nms(boxes, scores, 0.5)
    assert nms(boxes, scores, 0.5, max_keep=50).tolist() == full[:50].tolist()


def test_non_max_suppression_matches_per_class_reference():
    boxes, _ = random_boxes(200, seed=5)
    g = torch.Generator().manual_seed(5)
    cls_scores = torch.rand(200, 3, generator=g, dtype=torch.float64)
    xywh = torch.cat(((boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]), 1)
    (out,) = non_max_suppression(
        torch.cat((xywh, cls_scores), 1).T.unsqueeze(0), conf_thres=0.3, iou_thres=0.5
    )

    best, label = cls_scores.max(1)
    expected = []
    for c in range(3):
        idx = [i for i in range(200) if label[i] == c and best[i] > 0.3]
        kept = reference_nms([boxes[i].tolist() for i in idx], [best[i].item() for i in idx], 0.5)
        expected += [boxes[idx[k]].tolist() + [best[idx[k]].item(), float(c)] for k in kept]
    expected.sort(key=lambda row: -row[4])
    assert_rows(out, expected)


def test_a_batch_gives_each_image_what_it_gives_alone():
    # images with 40, 0 and 120 candidates above the threshold: padding must not leak between them
    g = torch.Generator().manual_seed(6)
    pred = torch.rand(3, 4 + 2, 150, generator=g, dtype=torch.float64) * 100
    pred[:, 4:] = torch.rand(3, 2, 150, generator=g, dtype=torch.float64)
    pred[0, 4:, 20:] = 0.0
    pred[1, 4:] = 0.0
    pred[2, 4:, 60:] = 0.0
    batch = non_max_suppression(pred, conf_thres=0.05, iou_thres=0.3, multi_label=True)
    alone = [
        non_max_suppression(pred[i : i + 1], conf_thres=0.05, iou_thres=0.3, multi_label=True)[0]
        for i in range(3)
    ]
    assert [len(b) for b in batch] == [len(a) for a in alone] and len(batch[1]) == 0
    for b, a in zip(batch, alone, strict=True):
        assert torch.equal(b, a)


def test_nms_runs_past_the_done_checks_until_max_keep():
    # 3 * ROUNDS_PER_CHECK + 5 disjoint boxes: every one is kept, across several done-checks
    n = 3 * ROUNDS_PER_CHECK + 5
    boxes = torch.tensor([[20.0 * i, 0, 20 * i + 10, 10] for i in range(n)])
    assert nms(boxes, torch.linspace(1, 0.1, n), 0.5).tolist() == list(range(n))


def test_max_nms_keeps_only_the_highest_candidates():
    # four disjoint boxes; with max_nms 2 only the two best scores can survive
    pred = head_output([([10.0 + 30 * i, 10, 10, 10], [s]) for i, s in enumerate([0.3, 0.9, 0.5, 0.7])])
    (out,) = non_max_suppression(pred, max_nms=2)
    torch.testing.assert_close(out[:, 4], torch.tensor([0.9, 0.7]))


@pytest.mark.parametrize("shape", [(7, 100), (1, 4, 100), (1, 7, 100, 1)])
def test_wrong_prediction_shape_is_rejected(shape):
    with pytest.raises(ValueError, match=r"\(B, 4 \+ nc, A\)"):
        non_max_suppression(torch.zeros(shape))


@pytest.mark.parametrize("kwargs", [{"conf_thres": 1.5}, {"conf_thres": -0.1}, {"iou_thres": 1.01}])
def test_threshold_outside_unit_interval_is_rejected(kwargs):
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        non_max_suppression(torch.zeros(1, 5, 3), **kwargs)


def test_non_finite_prediction_is_rejected():
    pred = head_output([([50, 50, 20, 20], [float("nan")])])
    with pytest.raises(ValueError, match="NaN"):
        non_max_suppression(pred)


def test_max_det_below_one_is_rejected():
    with pytest.raises(ValueError, match="max_det and max_nms must be >= 1"):
        non_max_suppression(torch.zeros(1, 5, 3), max_det=0)


def test_nms_rejects_mismatched_boxes_and_scores():
    with pytest.raises(ValueError, match=r"expected boxes \(N, 4\) and scores \(N,\)"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
