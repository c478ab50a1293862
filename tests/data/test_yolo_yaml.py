"""YOLO datasets read through their data YAML, on a small dataset laid out as the reference documents it.

Layout built by the ``dataset`` fixture (sizes in pixels, boxes per label file):

    cfg/data.yaml                   path: ../ds, train: images/train, val: images/val, names {0: cat, 1: dog}
    ds/images/train/t1.jpg 100x50   ds/labels/train/t1.txt       2 boxes
    ds/images/train/sub/t2.png 40x20  ds/labels/train/sub/t2.txt 1 box
    ds/images/train/t3.jpg 64x64    (no label file: background)
    ds/images/val/v1.jpg 100x50     ds/labels/val/v1.txt         1 polygon + 1 box
    ds/images/val/v2.jpg 80x80      ds/labels/val/v2.txt         1 box of class 5 (outside names) + 1 box
    ds/images/extra/e1.jpg 60x60    ds/labels/extra/e1.txt       1 box
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data.make import make_shards
from pipeline.data.manifest import DataError, read_manifest
from pipeline.data.yolo_reader import read_yolo_split, yolo_label_path

YAML = "path: ../ds\ntrain: images/train\nval: images/val\ntest:\nnc: 2\nnames: {0: cat, 1: dog}\n"


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 120, np.uint8))


def write_label(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """The layout in the module docstring; returns the data YAML's path."""
    ds = tmp_path / "ds"
    write_image(ds / "images/train/t1.jpg", 100, 50)
    write_label(ds / "labels/train/t1.txt", "0 0.5 0.5 0.2 0.4\n1 0.25 0.5 0.1 0.2\n")
    write_image(ds / "images/train/sub/t2.png", 40, 20)
    write_label(ds / "labels/train/sub/t2.txt", "1 0.5 0.5 0.5 0.5\n")
    write_image(ds / "images/train/t3.jpg", 64, 64)
    write_image(ds / "images/val/v1.jpg", 100, 50)
    write_label(ds / "labels/val/v1.txt", "0 0.1 0.2 0.5 0.1 0.3 0.6\n1 0.5 0.5 0.2 0.2\n")
    write_image(ds / "images/val/v2.jpg", 80, 80)
    write_label(ds / "labels/val/v2.txt", "5 0.5 0.5 0.25 0.25\n0 0.5 0.5 0.5 0.5\n")
    write_image(ds / "images/extra/e1.jpg", 60, 60)
    write_label(ds / "labels/extra/e1.txt", "1 0.5 0.5 0.5 0.5\n")
    data_yaml = tmp_path / "cfg" / "data.yaml"
    data_yaml.parent.mkdir()
    data_yaml.write_text(YAML)
    return data_yaml


def set_split(data_yaml: Path, split: str, value: str) -> None:
    """Replace the line ``split: ...`` of the fixture's YAML by ``split: value``."""
    lines = [
        f"{split}: {value}" if ln.startswith(f"{split}:") else ln for ln in data_yaml.read_text().splitlines()
    ]
    data_yaml.write_text("\n".join(lines) + "\n")


def box_counts(data_yaml: Path, split: str) -> dict[str, int]:
    return {r.file_name: len(r.boxes) for r in read_yolo_split(data_yaml, split).records}


def test_split_directory_is_searched_recursively_relative_to_path(dataset: Path) -> None:
    assert box_counts(dataset, "train") == {
        "images/train/sub/t2.png": 1,
        "images/train/t1.jpg": 2,
        "images/train/t3.jpg": 0,
    }


def test_records_point_at_the_images_under_path(dataset: Path) -> None:
    records = read_yolo_split(dataset, "train").records
    assert records[1].image_path == dataset.parent.parent / "ds" / "images" / "train" / "t1.jpg"
    # t1: xc=50 yc=25 w=20 h=20 -> [40, 15, 60, 35]; xc=25 yc=25 w=10 h=10 -> [20, 20, 30, 30]
    np.testing.assert_allclose(records[1].boxes, [[40, 15, 60, 35], [20, 20, 30, 30]], atol=1e-4)
    np.testing.assert_array_equal(records[1].classes, [0, 1])


def test_absolute_path_in_a_yaml_elsewhere(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "data.yaml"
    other.parent.mkdir()
    other.write_text(YAML.replace("path: ../ds", f"path: {tmp_path / 'ds'}"))
    assert box_counts(other, "val") == {"images/val/v1.jpg": 2, "images/val/v2.jpg": 2}


def test_yaml_without_path_uses_its_own_folder(dataset: Path, tmp_path: Path) -> None:
    beside = tmp_path / "ds" / "data.yaml"
    beside.write_text(YAML.replace("path: ../ds\n", ""))
    assert sum(box_counts(beside, "train").values()) == 3


def test_txt_list_relative_to_path_or_absolute_in_listed_order(dataset: Path, tmp_path: Path) -> None:
    absolute = tmp_path / "ds" / "images" / "val" / "v1.jpg"
    (tmp_path / "ds" / "train.txt").write_text(f"./images/train/t1.jpg\nimages/extra/e1.jpg\n\n{absolute}\n")
    set_split(dataset, "train", "train.txt")
    assert list(box_counts(dataset, "train").items()) == [
        ("images/train/t1.jpg", 2),
        ("images/extra/e1.jpg", 1),
        ("images/val/v1.jpg", 2),
    ]


def test_list_of_two_directories(dataset: Path) -> None:
    set_split(dataset, "train", "[images/train, images/extra]")
    counts = box_counts(dataset, "train")
    assert (len(counts), sum(counts.values())) == (4, 4)


def test_label_path_replaces_the_last_images_folder() -> None:
    assert yolo_label_path(Path("/d/images/set/images/train/a.b.jpg")) == Path(
        "/d/images/set/labels/train/a.b.txt"
    )
    assert yolo_label_path(Path("/d/train/images/a.png")) == Path("/d/train/labels/a.txt")
    assert yolo_label_path(Path("/d/pics/a.jpg")) == Path("/d/pics/a.txt")


def test_polygon_line_becomes_its_bounding_box_and_is_counted(dataset: Path) -> None:
    source = read_yolo_split(dataset, "val")
    # v1 is 100x50. Polygon x in {0.1, 0.5, 0.3} -> 10..50 px, y in {0.2, 0.1, 0.6} -> 5..30 px;
    # the box line xc=50 yc=25 w=20 h=10 -> [40, 20, 60, 30].
    np.testing.assert_allclose(source.records[0].boxes, [[10, 5, 50, 30], [40, 20, 60, 30]], atol=1e-4)
    assert source.report.counts == {"polygon_to_box": 1}
    assert source.report.examples["polygon_to_box"] == ["v1.txt:1: '0 0.1 0.2 0.5 0.1 0.3 0.6'"]
    assert source.info["polygons"] == "bounding_box"


def test_line_of_six_values_is_neither_box_nor_polygon(dataset: Path) -> None:
    write_label(
        dataset.parent.parent / "ds/labels/extra/e1.txt", "1 0.5 0.5 0.5 0.5 0.9\n1 0.5 0.5 0.2 0.2\n"
    )
    set_split(dataset, "train", "images/extra")
    source = read_yolo_split(dataset, "train")
    assert source.report.counts == {"malformed_label_line": 1}
    assert len(source.records[0].boxes) == 1


def test_class_outside_names_is_counted_and_skipped_in_the_shards(dataset: Path, tmp_path: Path) -> None:
    manifest = make_shards("yolo", tmp_path / "out", "val", data_yaml=dataset)
    # v1: polygon + box; v2: the class-5 box dropped, one left
    assert (manifest.num_samples, manifest.num_boxes) == (2, 3)
    report = json.loads(manifest.path.read_text())["report"]["counts"]
    assert report == {"class_out_of_range": 1, "polygon_to_box": 1}


def test_names_may_be_a_list(dataset: Path) -> None:
    dataset.write_text(YAML.replace("names: {0: cat, 1: dog}", "names: [cat, dog]"))
    assert read_yolo_split(dataset, "val").class_names == ["cat", "dog"]


def test_nc_that_disagrees_with_names_is_rejected(dataset: Path) -> None:
    dataset.write_text(YAML.replace("nc: 2", "nc: 3"))
    with pytest.raises(DataError, match="nc is 3 but 'names' has 2 entries"):
        read_yolo_split(dataset, "val")


def test_split_without_images_names_the_splits_given(dataset: Path) -> None:
    with pytest.raises(DataError, match=r"split 'test'; the YAML gives splits \['train', 'val'\]"):
        read_yolo_split(dataset, "test")


def test_missing_split_directory_is_rejected_with_its_path(dataset: Path, tmp_path: Path) -> None:
    set_split(dataset, "val", "images/valid")
    with pytest.raises(DataError, match=f"{tmp_path / 'ds' / 'images' / 'valid'} is neither a directory"):
        read_yolo_split(dataset, "val")


def test_listed_image_that_does_not_exist_is_counted(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "ds" / "val.txt").write_text("images/val/v1.jpg\nimages/val/gone.jpg\n")
    set_split(dataset, "val", "val.txt")
    source = read_yolo_split(dataset, "val")
    assert [r.file_name for r in source.records] == ["images/val/v1.jpg"]
    assert source.report.counts == {"missing_image": 1, "polygon_to_box": 1}


def test_duplicates_and_unsupported_formats_are_counted_once_each(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "ds" / "images" / "extra" / "e2.bmp").write_bytes(b"BM")
    (tmp_path / "ds" / "images" / "extra" / "notes.md").write_text("not an image\n")
    (tmp_path / "ds" / "extra.txt").write_text("images/extra/e1.jpg\n")
    set_split(dataset, "train", "[images/extra, extra.txt]")
    source = read_yolo_split(dataset, "train")
    assert [r.file_name for r in source.records] == ["images/extra/e1.jpg"]
    assert source.report.counts == {"duplicate_image": 1, "unsupported_image_format": 1}


def test_split_where_no_image_has_a_label_file_is_rejected(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "ds" / "labels" / "extra" / "e1.txt").unlink()
    set_split(dataset, "train", "images/extra")
    with pytest.raises(DataError, match="none of the 1 images has a label file"):
        read_yolo_split(dataset, "train")


def test_source_at_a_split_folder_root_points_to_the_data_yaml(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="leave out --source and give --split"):
        make_shards("yolo", tmp_path / "out", "train", source=tmp_path / "ds", data_yaml=dataset)


def test_cli_shards_a_split_from_a_relative_data_yaml(dataset: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    data_yaml = Path("..") / dataset.relative_to(tmp_path)
    command = [sys.executable, "-m", "jobs.make_shards", "--format", "yolo", "--data-yaml", str(data_yaml),
               "--split", "val", "--out", "shards"]  # fmt: skip
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(cwd / "shards" / "val-manifest.json")
    assert (manifest.split, manifest.num_samples, manifest.num_boxes) == ("val", 2, 3)
    assert manifest.class_names == ["cat", "dog"]
    assert (cwd / "shards" / "val-coco.json").is_file()
