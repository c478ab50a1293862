"""benchmarks/tree_crowns.py: photos cut into tiles, crowns cut by a tile's edge kept when half is inside."""

import zipfile
from pathlib import Path

import pytest

from benchmarks.tree_crowns import main, read_boxes, tile_boxes, tile_origins
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]

VOC = b"""<annotation><filename>site.png</filename>
<object><name>Tree</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>30</xmax><ymax>60</ymax></bndbox></object>
<object><name>Tree</name><bndbox><xmin>250</xmin><ymin>5</ymin><xmax>270</xmax><ymax>15</ymax></bndbox></object>
</annotation>"""


def test_tiles_cover_the_photo_and_the_last_one_ends_at_its_edge():
    assert tile_origins(600, 256) == [0, 256, 344]
    assert tile_origins(512, 256) == [0, 256]
    assert tile_origins(256, 256) == [0]


def test_a_photo_smaller_than_a_tile_is_one_tile():
    assert tile_origins(200, 256) == [0]


def test_pascal_voc_boxes_are_read_as_pixels_xyxy():
    assert read_boxes(VOC) == ("site.png", [(10.0, 20.0, 30.0, 60.0), (250.0, 5.0, 270.0, 15.0)])


def test_a_crown_cut_by_the_edge_belongs_to_the_tile_holding_most_of_it():
    _, boxes = read_boxes(VOC)
    # the second crown: 6 of its 20 px width in the first tile (30%), 14 in the next one (70%)
    assert tile_boxes(boxes, 0, 0, 256) == [(10.0, 20.0, 30.0, 60.0)]
    assert tile_boxes(boxes, 256, 0, 256) == [(0.0, 5.0, 14.0, 15.0)]


def test_a_crown_with_exactly_half_inside_is_kept():
    assert tile_boxes([(246.0, 0.0, 266.0, 10.0)], 0, 0, 256) == [(246.0, 0.0, 256.0, 10.0)]


def test_its_config_is_a_training_config_for_the_built_set():
    cfg = load_config(REPO / "benchmarks" / "tree-crowns.yaml", [])
    assert Path(cfg.data.root).parts[-2:] == ("data", "tree-crowns") and cfg.train.nominal_batch == 8


def test_a_file_that_is_not_the_wheel_is_refused_by_name(tmp_path):
    foreign = tmp_path / "other.whl"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("other/__init__.py", "")
    with pytest.raises(SystemExit, match="other.whl is not a readable deepforest"):
        main(["--wheel", str(foreign), "--out", str(tmp_path / "shards")])
