"""Tests for pipeline.evaluation.coco: mapping to original pixels, the results format, pycocotools scores."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluation.coco import (
    STATS,
    coco_evaluate,
    coco_map,
    detections_array,
    detections_from_predictions,
    load_ground_truth,
    results_json,
)


def coco_gt(annotations: list[tuple[int, int, list[float]]]) -> dict:
    """COCO GT with images 1 (400x200) and 2 (300x300); annotations are (image_id, category_id, xywh).
    Category ids deliberately not 1..nc, as in COCO: model class 0 is category 1, class 1 is category 3."""
    return {
        "images": [{"id": 1, "width": 400, "height": 200}, {"id": 2, "width": 300, "height": 300}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": img,
                "category_id": cat,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for i, (img, cat, box) in enumerate(annotations)
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
    }


GT_BOXES = [
    (1, 1, [100.0, 50.0, 200.0, 100.0]),
    (1, 3, [10.0, 10.0, 40.0, 30.0]),
    (2, 1, [50.0, 60.0, 120.0, 90.0]),
]


@pytest.fixture
def gt_path(tmp_path: Path) -> Path:
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(coco_gt(GT_BOXES)))
    return path


def detection(image_id: int, category_id: int, bbox: list[float], score: float = 1.0) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_perfect_detections_score_one(gt_path):
    scores = coco_map(gt_path, [detection(img, cat, box) for img, cat, box in GT_BOXES])
    # areas 20000 and 10800 are "large" (> 96^2), 1200 "medium"; nothing is small (< 32^2): -1 there
    assert list(scores) == list(STATS)
    assert scores["map_small"] == scores["ar_small"] == -1.0
    others = {k: v for k, v in scores.items() if k not in ("map_small", "ar_small")}
    assert others == pytest.approx(dict.fromkeys(others, 1.0))


def test_no_detections_score_zero(gt_path):
    scores = coco_map(gt_path, [])
    assert scores["map50_95"] == scores["map50"] == scores["ar100"] == 0.0


def test_detection_at_iou_0_6_passes_three_of_ten_thresholds(tmp_path):
    # GT 10x10 at the origin, detection its top 10x6: IoU = 60 / 100 = 0.6 in double precision.
    # COCOeval matches when IoU >= threshold; its thresholds 0.5, 0.55, 0.6 (np.linspace gives exactly
    # the double 0.6) pass, 0.65..0.95 fail, and one matched detection has AP 1 per passed threshold.
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco_gt([(2, 3, [0.0, 0.0, 10.0, 10.0])])))
    scores = coco_map(path, [detection(2, 3, [0.0, 0.0, 10.0, 6.0], score=0.9)])
    assert [scores[k] for k in ("map50_95", "map50", "map75")] == pytest.approx([0.3, 1.0, 0.0])


def test_parsed_gt_dict_is_accepted():
    dets = [detection(img, cat, box) for img, cat, box in GT_BOXES]
    assert coco_map(coco_gt(GT_BOXES), dets)["map50_95"] == 1.0


def test_caller_detections_are_not_modified(gt_path):
    dets = [detection(1, 1, [100.0, 50.0, 200.0, 100.0])]
    coco_map(gt_path, dets)
    assert dets == [detection(1, 1, [100.0, 50.0, 200.0, 100.0])]


def test_pycocotools_printing_is_suppressed(gt_path, capsys):
    coco_map(gt_path, [detection(1, 1, [100.0, 50.0, 200.0, 100.0])])
    assert capsys.readouterr().out == ""


def test_pycocotools_printing_is_suppressed_when_print_is_rerouted(gt_path, monkeypatch):
    # Ray Train workers replace builtins.print with a function that logs, past any redirect_stdout.
    printed = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: printed.append(args))
    coco_map(gt_path, [detection(1, 1, [100.0, 50.0, 200.0, 100.0])])
    assert printed == []


def test_missing_gt_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="ground-truth file not found"):
        coco_map(tmp_path / "absent.json", [])


def test_detection_on_unknown_image_is_rejected(gt_path):
    with pytest.raises(ValueError, match=r"image ids absent .*\[7\]"):
        coco_map(gt_path, [detection(7, 1, [0.0, 0.0, 5.0, 5.0])])


def test_detection_with_unknown_category_is_rejected(gt_path):
    with pytest.raises(ValueError, match=r"category ids absent .*\[2\]"):
        coco_map(gt_path, [detection(1, 2, [0.0, 0.0, 5.0, 5.0])])


def test_gt_annotation_without_area_is_rejected(tmp_path):
    gt = coco_gt(GT_BOXES)
    del gt["annotations"][0]["area"]
    with pytest.raises(ValueError, match="lacks \\['area'\\]"):
        coco_map(gt, [])


def letterbox_meta(image_id: int = 1) -> dict:
    # 400x200 (w x h) image letterboxed to 640x640: scale 1.6 -> 640x320, padded 160 px top and bottom.
    return {"image_id": image_id, "orig_shape": (200, 400), "ratio": 1.6, "pad": (0.0, 160.0)}


@pytest.fixture
def truth():
    return load_ground_truth(coco_gt(GT_BOXES))


def test_letterboxed_box_maps_back_to_original_pixels(truth):
    # Original xyxy (100, 50, 300, 150) -> letterboxed (160, 240, 480, 400).
    pred = torch.tensor([[160.0, 240.0, 480.0, 400.0, 0.87654321, 1.0]])
    dets = detections_from_predictions([pred], [letterbox_meta()], truth)
    assert results_json(dets) == [
        {"image_id": 1, "category_id": 3, "bbox": [100.0, 50.0, 200.0, 100.0], "score": 0.87654}
    ]


def test_box_of_a_shrunk_stored_image_maps_back_to_the_original_size(truth):
    # Image 1 (400x200 in the ground truth) stored at 200x100 (--max-side 200), letterboxed to 320x320:
    # ratio 1.6, padded 80 px top. Stored xyxy (50, 25, 150, 75) -> letterboxed (80, 120, 240, 200);
    # in original pixels (100, 50, 300, 150).
    meta = {"image_id": 1, "orig_shape": (100, 200), "ratio": 1.6, "pad": (0.0, 80.0)}
    pred = torch.tensor([[80.0, 120.0, 240.0, 200.0, 0.5, 0.0]])
    (det,) = results_json(detections_from_predictions([pred], [meta], truth))
    assert det["bbox"] == [100.0, 50.0, 200.0, 100.0]


def test_box_reaching_into_padding_is_clipped_to_the_image(truth):
    # y from 100 (in the top padding) to 600 (in the bottom padding); x from -16 to 656.
    pred = torch.tensor([[-16.0, 100.0, 656.0, 600.0, 0.5, 0.0]])
    (det,) = results_json(detections_from_predictions([pred], [letterbox_meta()], truth))
    assert det["bbox"] == [0.0, 0.0, 400.0, 200.0]


def test_mapped_detections_are_scored_in_original_pixels(gt_path, truth):
    pred = torch.tensor([[160.0, 240.0, 480.0, 400.0, 0.9, 0.0], [16.0, 176.0, 80.0, 224.0, 0.8, 1.0]])
    dets = detections_from_predictions(
        [pred, torch.zeros(0, 6)], [letterbox_meta(1), letterbox_meta(2)], truth
    )
    # Both image-1 boxes map exactly onto their GT; image 2's cat box is missed. Category 3: AP 1.
    # Category 1: precision 1 up to recall 1/2, so 51 of COCO's 101 recall points (0, 0.01 .. 0.5) score 1.
    scores = coco_map(gt_path, dets)
    assert scores["map50_95"] == pytest.approx((51 / 101 + 1.0) / 2)


def test_per_class_ap_follows_model_class_order(truth):
    # only class 1 (category 3) is found: its AP is 1, class 0's 0
    dets = detections_array([detection(1, 3, [10.0, 10.0, 40.0, 30.0])])
    scores = coco_evaluate(truth, dets)
    np.testing.assert_allclose(scores.ap50_95, [0.0, 1.0])
    np.testing.assert_allclose(scores.ap50, [0.0, 1.0])


def test_class_without_ground_truth_has_ap_minus_one():
    gt = coco_gt([(1, 1, [100.0, 50.0, 200.0, 100.0])])
    scores = coco_evaluate(
        load_ground_truth(gt), detections_array([detection(1, 1, [100.0, 50.0, 200.0, 100.0])])
    )
    np.testing.assert_allclose(scores.ap50_95, [1.0, -1.0])


def test_detection_on_a_crowd_region_is_ignored():
    # one object and one crowd region of the same category; the best detection lies inside the crowd
    # region (intersection over its own area 1), which COCO ignores, so AP is 1. Were the region an
    # ordinary object, it would be missed and that detection a false positive: AP below 1.
    gt = coco_gt([(1, 1, [10.0, 10.0, 50.0, 50.0])])
    gt["annotations"].append(
        {
            "id": 9,
            "image_id": 1,
            "category_id": 1,
            "bbox": [200.0, 0.0, 200.0, 200.0],
            "area": 4e4,
            "iscrowd": 1,
        }
    )
    dets = [detection(1, 1, [250.0, 50.0, 50.0, 50.0], 0.9), detection(1, 1, [10.0, 10.0, 50.0, 50.0], 0.8)]
    assert coco_map(gt, dets)["map50_95"] == pytest.approx(1.0)
    gt["annotations"][-1]["iscrowd"] = 0
    assert coco_map(gt, dets)["map50_95"] < 0.9


def test_results_json_round_trips_through_the_array(truth):
    dets = [detection(1, 3, [10.5, 10.25, 30.0, 20.125], 0.75), detection(2, 1, [0.0, 1.0, 2.0, 3.0], 0.5)]
    assert results_json(detections_array(dets)) == dets


def test_class_index_outside_category_ids_is_rejected(truth):
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.5, 2.0]])
    with pytest.raises(ValueError, match=r"class indices must be integers in \[0, 2\)"):
        detections_from_predictions([pred], [letterbox_meta()], truth)


def test_image_absent_from_the_ground_truth_is_rejected(truth):
    with pytest.raises(ValueError, match="image id 7 is not in the ground truth"):
        detections_from_predictions([torch.zeros(1, 6)], [letterbox_meta(7)], truth)


def test_prediction_and_meta_counts_must_match(truth):
    with pytest.raises(ValueError, match="2 predictions but 1 image metas"):
        detections_from_predictions([torch.zeros(0, 6)] * 2, [letterbox_meta()], truth)


def test_meta_without_pad_is_rejected(truth):
    meta = letterbox_meta()
    del meta["pad"]
    with pytest.raises(ValueError, match="lacks \\['pad'\\]"):
        detections_from_predictions([torch.zeros(1, 6)], [meta], truth)
