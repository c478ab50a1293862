"""Detections matched to the ground truth at a working threshold: the confusion matrix, the report
built on it (table, JSON, CSV, pictures) and the prediction grid's colours."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from pipeline.evaluation.coco import coco_evaluate, detections_array, load_ground_truth
from pipeline.evaluation.confusion import confusion_matrix, match_image
from pipeline.evaluation.evaluate import Evaluation
from pipeline.evaluation.table import format_table, report_dict, write_artifacts


def annotation(ann_id: int, image_id: int, category_id: int, bbox: list[float], crowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": crowd,
    }


@pytest.fixture
def truth():
    """Image 1: a cat (category 4 = class 0) and a dog (category 8 = class 1), a crowd region of dogs;
    image 2: a dog."""
    return load_ground_truth(
        {
            "images": [{"id": 1, "width": 200, "height": 100}, {"id": 2, "width": 100, "height": 100}],
            "annotations": [
                annotation(1, 1, 4, [0, 0, 40, 40]),
                annotation(2, 1, 8, [50, 0, 40, 40]),
                annotation(3, 1, 8, [100, 0, 100, 100], crowd=1),
                annotation(4, 2, 8, [10, 10, 50, 50]),
            ],
            "categories": [{"id": 4, "name": "cat"}, {"id": 8, "name": "dog"}],
        }
    )


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


DETECTIONS = [
    det(1, 4, [1, 1, 40, 40], 0.9),  # the cat, found: IoU 39*39/(1600+1600-1521) = 0.91
    det(1, 4, [50, 0, 40, 40], 0.8),  # the dog, called a cat
    det(1, 8, [150, 50, 20, 20], 0.7),  # inside the crowd region: ignored
    det(1, 8, [0, 60, 30, 30], 0.6),  # on nothing: a false positive dog
    det(2, 8, [10, 10, 50, 50], 0.1),  # image 2's dog, but under the 0.25 threshold: the dog is missed
]


def test_confusion_matrix_counts_hits_confusions_misses_and_false_positives(truth):
    matrix = confusion_matrix(truth, detections_array(DETECTIONS))
    # rows: true cat, dog, background; columns: detected cat, dog, background
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [1, 0, 1], [0, 1, 0]])


def test_one_detection_matches_one_object_by_highest_iou(truth):
    # two detections on the cat: the closer one matches, the other is a false positive
    dets = detections_array([det(1, 4, [0, 0, 40, 36], 0.9), det(1, 4, [0, 0, 40, 40], 0.5)])
    match = match_image(truth, 1, dets)
    assert match.det_correct.tolist() == [False, True]
    assert match.gt_found.tolist() == [True, False]  # the dog was not found


def test_table_shows_the_12_numbers_and_each_class(truth):
    evaluation = evaluation_of(truth)
    table = format_table(evaluation)
    assert table.count("IoU=") == 12
    assert "  cat " in table and "  dog " in table
    assert "1 objects found with the right class, 1 with a wrong one, 1 missed, 1 false positives" in table


def test_report_dict_holds_stats_per_class_rows_and_the_matrix(truth):
    figures = report_dict(evaluation_of(truth))
    assert [r["class"] for r in figures["per_class"]] == ["cat", "dog"]
    assert [r["objects"] for r in figures["per_class"]] == [1, 2]  # the crowd region is no object
    assert figures["confusion_matrix"]["labels"] == ["cat", "dog", "background"]


def test_artifacts_are_a_csv_and_two_pictures(truth, tmp_path):
    csv_path, pr_png, confusion_png = write_artifacts(evaluation_of(truth), tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["class"], r["objects"]) for r in rows] == [("cat", "1"), ("dog", "2")]
    assert float(rows[0]["ap50"]) == pytest.approx(1.0)  # the cat: found first, nothing else
    for picture in (pr_png, confusion_png):
        assert cv2.imread(str(picture)) is not None


def evaluation_of(truth) -> Evaluation:
    detections = detections_array(DETECTIONS)
    return Evaluation(
        scores=coco_evaluate(truth, detections),
        detections=detections,
        confusion=confusion_matrix(truth, detections),
        class_names=truth.class_names,
    )
