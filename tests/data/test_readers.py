"""COCO, YOLO and VOC readers on small datasets written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data.image_header import image_size
from pipeline.data.manifest import DataError
from pipeline.data.readers import Report, read_coco, read_voc
from pipeline.data.yolo_reader import read_yolo


def write_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 120, np.uint8))
    return path


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """Two images, categories with ids 7 and 3 (listed out of order), one crowd and one foreign annotation."""
    write_image(tmp_path / "images" / "a.jpg", 64, 48)
    write_image(tmp_path / "images" / "b.jpg", 32, 32)
    data = {
        "images": [
            {"id": 5, "file_name": "b.jpg", "width": 32, "height": 32},
            {"id": 2, "file_name": "a.jpg", "width": 64, "height": 48},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 2, "category_id": 7, "bbox": [10, 5, 20, 15], "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 4, 8], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [1, 1, 40, 40], "iscrowd": 1},
            {"id": 4, "image_id": 5, "category_id": 99, "bbox": [1, 1, 2, 2], "iscrowd": 0},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_boxes_become_xyxy_and_categories_contiguous_in_id_order(coco: Path) -> None:
    source = read_coco(coco, coco.parent / "images")
    assert source.class_names == ["cat", "dog"]  # id 3 -> class 0, id 7 -> class 1
    first = source.records[0]  # records in image-id order: id 2 (a.jpg) first
    assert (first.source_id, first.file_name) == ("2", "a.jpg")
    assert first.image_path == coco.parent / "images" / "a.jpg"
    np.testing.assert_array_equal(first.boxes, [[10, 5, 30, 20], [0, 0, 4, 8]])
    np.testing.assert_array_equal(first.classes, [1, 0])


def test_coco_crowd_annotation_is_skipped_and_counted(coco: Path) -> None:
    source = read_coco(coco, coco.parent / "images")
    assert source.report.counts["crowd_skipped"] == 1
    assert len(source.records[0].boxes) == 2


def test_coco_crowd_region_stays_in_the_ground_truth(coco: Path) -> None:
    truth = read_coco(coco, coco.parent / "images").ground_truth
    assert [a["id"] for a in truth.annotations[2]] == [1, 2, 3]
    crowd = truth.annotations[2][2]
    # as in the file, with the area COCO would take for a box (the file gives none): 40 * 40
    assert crowd == {
        "id": 3,
        "image_id": 2,
        "category_id": 3,
        "bbox": [1, 1, 40, 40],
        "iscrowd": 1,
        "area": 1600,
    }


def test_coco_ground_truth_keeps_the_files_ids(coco: Path) -> None:
    source = read_coco(coco, coco.parent / "images")
    assert [r.image_id for r in source.records] == [2, 5]
    assert sorted(source.ground_truth.images) == [2, 5]
    assert [c["id"] for c in source.ground_truth.categories] == [3, 7]  # class order
    assert source.ground_truth.annotations[5] == []  # its one annotation has an unknown category


def test_coco_annotations_without_ids_get_fresh_ones(coco: Path) -> None:
    data = json.loads(coco.read_text())
    del data["annotations"][0]["id"], data["annotations"][2]["id"]
    coco.write_text(json.dumps(data))
    truth = read_coco(coco, coco.parent / "images").ground_truth
    assert [a["id"] for a in truth.annotations[2]] == [3, 2, 4]  # after the largest id kept


def test_coco_unknown_category_is_skipped_and_counted(coco: Path) -> None:
    source = read_coco(coco, coco.parent / "images")
    assert source.report.counts["unknown_category"] == 1
    assert "99" in source.report.examples["unknown_category"][0]
    assert len(source.records[1].boxes) == 0


def test_coco_missing_annotation_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.json"):
        read_coco(tmp_path / "nope.json", tmp_path)


def test_coco_file_without_categories_list_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="categories"):
        read_coco(path, tmp_path)


@pytest.fixture
def yolo(tmp_path: Path) -> Path:
    """a.jpg 100x50 and b.png 40x20, labels for a only."""
    write_image(tmp_path / "images" / "a.jpg", 100, 50)
    write_image(tmp_path / "images" / "b.png", 40, 20)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.2 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    return tmp_path


def test_yolo_boxes_are_denormalised_with_the_image_size(yolo: Path) -> None:
    source = read_yolo(yolo, yolo / "data.yaml")
    assert source.class_names == ["cat", "dog"]
    a = source.records[0]
    # xc=50 yc=25 w=20 h=20 -> [40, 15, 60, 35]; xc=10 yc=10 w=20 h=10 -> [0, 5, 20, 15]
    np.testing.assert_allclose(a.boxes, [[40, 15, 60, 35], [0, 5, 20, 15]], atol=1e-4)
    np.testing.assert_array_equal(a.classes, [1, 0])


def test_yolo_image_without_label_file_has_no_boxes(yolo: Path) -> None:
    b = read_yolo(yolo, yolo / "data.yaml").records[1]
    assert b.file_name == "b.png"
    assert b.boxes.shape == (0, 4)


def test_yolo_names_may_be_an_index_dict(yolo: Path) -> None:
    (yolo / "data.yaml").write_text("names: {1: dog, 0: cat}\n")
    assert read_yolo(yolo, yolo / "data.yaml").class_names == ["cat", "dog"]


def test_yolo_malformed_line_is_counted_with_an_example(yolo: Path) -> None:
    (yolo / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n1 0.5 0.5\nx 0.1 0.1 0.1 0.1\n")
    source = read_yolo(yolo, yolo / "data.yaml")
    assert source.report.counts["malformed_label_line"] == 2
    assert source.report.examples["malformed_label_line"][0].startswith("a.txt:2:")
    assert len(source.records[0].boxes) == 1


def test_yolo_without_names_is_rejected(yolo: Path) -> None:
    (yolo / "data.yaml").write_text("nc: 2\n")
    with pytest.raises(DataError, match="names"):
        read_yolo(yolo, yolo / "data.yaml")


VOC_XML = """<annotation><filename>{name}</filename>
{objects}</annotation>"""
VOC_OBJECT = (
    "<object><name>{}</name>"
    "<bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"
)


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    (tmp_path / "Annotations").mkdir()
    write_image(tmp_path / "JPEGImages" / "x.jpg", 50, 40)
    objects = VOC_OBJECT.format("person", 1, 1, 10, 20) + VOC_OBJECT.format("bird", 11, 5, 50, 40)
    (tmp_path / "Annotations" / "x.xml").write_text(VOC_XML.format(name="x.jpg", objects=objects))
    return tmp_path


def test_voc_one_based_corners_become_pixel_edges_and_names_are_sorted(voc: Path) -> None:
    source = read_voc(voc)
    assert source.class_names == ["bird", "person"]
    record = source.records[0]
    assert record.image_path == voc / "JPEGImages" / "x.jpg"
    np.testing.assert_array_equal(record.boxes, [[0, 0, 10, 20], [10, 4, 50, 40]])
    np.testing.assert_array_equal(record.classes, [1, 0])


def test_voc_name_outside_given_classes_is_counted(voc: Path) -> None:
    source = read_voc(voc, class_names=["person"])
    assert source.report.counts["unknown_category"] == 1
    np.testing.assert_array_equal(source.records[0].classes, [0])


def test_voc_broken_xml_is_counted(voc: Path) -> None:
    (voc / "Annotations" / "y.xml").write_text("<annotation><object>")
    source = read_voc(voc)
    assert source.report.counts["malformed_annotation"] == 1
    assert len(source.records) == 1


def test_image_size_reads_jpeg_and_png_headers(tmp_path: Path) -> None:
    jpg = write_image(tmp_path / "a.jpg", 123, 45).read_bytes()
    png = write_image(tmp_path / "a.png", 7, 300).read_bytes()
    assert image_size(jpg) == (123, 45)
    assert image_size(png) == (7, 300)
    assert image_size(b"not an image") is None
    assert image_size(jpg[:20]) is None


def test_report_counts_all_but_keeps_five_examples() -> None:
    report = Report()
    for i in range(7):
        report.add("box_clipped", f"image {i}")
    assert report.counts == {"box_clipped": 7}
    assert report.examples["box_clipped"] == [f"image {i}" for i in range(5)]


def test_yolo_image_with_unreadable_header_is_counted(yolo: Path) -> None:
    (yolo / "images" / "c.jpg").write_bytes(b"\xff\xd8 truncated")
    source = read_yolo(yolo, yolo / "data.yaml")
    assert source.report.counts == {"unreadable_image": 1}
    assert [r.file_name for r in source.records] == ["a.jpg", "b.png"]


def test_coco_duplicate_image_ids_are_rejected(coco: Path) -> None:
    data = json.loads(coco.read_text())
    data["images"][1]["id"] = 5
    coco.write_text(json.dumps(data))
    with pytest.raises(DataError, match="not unique"):
        read_coco(coco, coco.parent / "images")
