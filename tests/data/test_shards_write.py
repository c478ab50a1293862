"""Writing shards: round trip, checks and fixes of bad input, manifest, val COCO file, synthetic set, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from pipeline.data.make import make_shards
from pipeline.data.manifest import DataError, coco_json_path, manifest_path, read_manifest
from pipeline.data.readers import Record, read_coco
from pipeline.data.synthetic import SYNTHETIC_CLASSES, synthetic_records, write_synthetic_dataset
from pipeline.data.writer import write_shards

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["cat", "dog"]


def write_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    cv2.imwrite(str(path), image)
    return path


def record(path: Path, boxes: list[list[float]], classes: list[int], name: str = "") -> Record:
    return Record(
        name or path.stem, path.name, np.array(boxes, np.float32), np.array(classes), image_path=path
    )


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def samples(out: Path, split: str = "train") -> list[dict]:
    """The JSON of every stored sample, in shard then key order."""
    metas = []
    for shard in sorted(out.glob(f"{split}-*.tar")):
        members = read_tar(shard)
        metas += [json.loads(members[n]) for n in sorted(members) if n.endswith(".json")]
    return metas


@pytest.fixture
def coco_set(tmp_path: Path) -> tuple[Path, Path]:
    """Five 80x60 images with two boxes each, COCO ids 10 (cat) and 20 (dog)."""
    images, annotations = [], []
    for i in range(5):
        write_image(tmp_path / "img" / f"{i}.jpg", 80, 60)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 80, "height": 60})
        for j, (cat, bbox) in enumerate([(10, [1.5 + i, 2.25, 30, 20]), (20, [40, 30.5, 39.5, 29.5 - i])]):
            annotations.append({"id": 2 * i + j + 1, "image_id": i + 1, "category_id": cat, "bbox": bbox})
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 10, "name": "cat"}, {"id": 20, "name": "dog"}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, tmp_path / "img"


def test_coco_round_trip_reproduces_every_box(coco_set: tuple[Path, Path], tmp_path: Path) -> None:
    ann, img = coco_set
    source = read_coco(ann, img)
    write_shards(source.records, source.class_names, tmp_path / "out", "train", shard_size=2)
    stored = samples(tmp_path / "out")
    original = json.loads(ann.read_text())["annotations"]
    assert [s["image_id"] for s in stored] == [1, 2, 3, 4, 5]
    assert [s["file_name"] for s in stored] == [f"{i}.jpg" for i in range(5)]
    got = [(box, cls) for s in stored for box, cls in zip(s["boxes"], s["classes"], strict=True)]
    assert len(got) == len(original) == 10
    for (box, cls), a in zip(got, original, strict=True):
        x, y, w, h = a["bbox"]
        np.testing.assert_allclose(box, [x, y, x + w, y + h], atol=1.0)
        assert cls == {10: 0, 20: 1}[a["category_id"]]


def test_shards_hold_sorted_nine_digit_keys_split_by_shard_size(
    coco_set: tuple[Path, Path], tmp_path: Path
) -> None:
    source = read_coco(*coco_set)
    manifest = write_shards(source.records, source.class_names, tmp_path / "out", "train", shard_size=2)
    assert [s.name for s in manifest.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s.samples for s in manifest.shards] == [2, 2, 1]
    assert [s.boxes for s in manifest.shards] == [4, 4, 2]
    with tarfile.open(tmp_path / "out" / "train-000001.tar") as tar:
        assert tar.getnames() == ["000000002.jpg", "000000002.json", "000000003.jpg", "000000003.json"]
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_original_jpeg_bytes_are_kept_without_max_side(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.jpg", 40, 30)
    write_shards([record(path, [[1, 1, 9, 9]], [0])], CLASSES, tmp_path / "out", "train")
    assert read_tar(tmp_path / "out" / "train-000000.tar")["000000000.jpg"] == path.read_bytes()


def test_png_is_reencoded_as_jpeg(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", 40, 30)
    manifest = write_shards([record(path, [[1, 1, 9, 9]], [0])], CLASSES, tmp_path / "out", "train")
    jpeg = read_tar(tmp_path / "out" / "train-000000.tar")["000000000.jpg"]
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (30, 40, 3)
    assert read_manifest(manifest.path).settings["jpeg_quality"] == 95


def test_max_side_downscales_image_and_boxes(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.jpg", 200, 100)
    write_shards([record(path, [[20, 10, 120, 60]], [1])], CLASSES, tmp_path / "out", "train", max_side=100)
    meta = samples(tmp_path / "out")[0]
    assert (meta["width"], meta["height"]) == (100, 50)
    assert meta["boxes"] == [[10, 5, 60, 30]]
    jpeg = read_tar(tmp_path / "out" / "train-000000.tar")["000000000.jpg"]
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (50, 100, 3)


def test_missing_image_is_skipped_and_counted(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.jpg", 20, 20)
    records = [record(tmp_path / "gone.jpg", [[1, 1, 5, 5]], [0]), record(good, [[1, 1, 5, 5]], [0])]
    manifest = write_shards(records, CLASSES, tmp_path / "out", "train")
    assert manifest.num_samples == 1
    report = json.loads(manifest.path.read_text())["report"]
    assert report["counts"] == {"missing_image": 1}
    assert "gone.jpg" in report["examples"]["missing_image"][0]


def test_corrupt_image_bytes_are_skipped_and_counted(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.jpg", 20, 20)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:2] + b"garbage" * 20)
    manifest = write_shards([record(bad, [], []), record(good, [], [])], CLASSES, tmp_path / "out", "train")
    assert manifest.num_samples == 1
    assert json.loads(manifest.path.read_text())["report"]["counts"] == {"unreadable_image": 1}
    assert samples(tmp_path / "out")[0]["file_name"] == "good.jpg"


def test_invalid_boxes_are_dropped_partly_outside_clipped(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.jpg", 50, 40)
    boxes = [
        [-5, 10, 20, 45],  # partly outside: clipped to [0, 10, 20, 40]
        [60, 0, 70, 10],  # right of the image: dropped
        [10, 10, 10, 20],  # zero width: dropped
        [float("nan"), 1, 5, 5],  # dropped
        [1, 1, 5, 5],  # class 2 of 2 classes: dropped
        [5, 6, 7, 8],  # kept as is
    ]
    manifest = write_shards([record(path, boxes, [1, 0, 0, 0, 2, 0])], CLASSES, tmp_path / "out", "train")
    meta = samples(tmp_path / "out")[0]
    assert meta["boxes"] == [[0, 10, 20, 40], [5, 6, 7, 8]]
    assert meta["classes"] == [1, 0]
    counts = json.loads(manifest.path.read_text())["report"]["counts"]
    assert counts == {
        "box_clipped": 1,
        "box_outside_image": 1,
        "degenerate_box": 1,
        "nonfinite_box": 1,
        "class_out_of_range": 1,
    }


def test_reader_report_is_carried_into_the_manifest(coco_set: tuple[Path, Path], tmp_path: Path) -> None:
    ann, img = coco_set
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 99, "image_id": 1, "category_id": 30, "bbox": [1, 1, 2, 2]})
    ann.write_text(json.dumps(data))
    source = read_coco(ann, img)
    manifest = write_shards(
        source.records, source.class_names, tmp_path / "out", "train", report=source.report
    )
    assert json.loads(manifest.path.read_text())["report"]["counts"] == {"unknown_category": 1}


def test_no_valid_sample_raises_and_writes_nothing(tmp_path: Path) -> None:
    records = [record(tmp_path / "gone.jpg", [[1, 1, 5, 5]], [0])]
    with pytest.raises(DataError, match="no valid sample"):
        write_shards(records, CLASSES, tmp_path / "out", "train")
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_split_is_refused_unless_overwrite(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.jpg", 20, 20) for i in range(3)]
    out = tmp_path / "out"
    write_shards([record(p, [], []) for p in paths], CLASSES, out, "train", shard_size=1)
    with pytest.raises(DataError, match="already holds split 'train'"):
        write_shards([record(paths[0], [], [])], CLASSES, out, "train")
    write_shards([record(paths[0], [], [])], CLASSES, out, "val")  # another split may share the directory
    manifest = write_shards([record(paths[0], [], [])], CLASSES, out, "train", overwrite=True)
    assert manifest.num_samples == 1
    assert sorted(p.name for p in out.glob("train-*")) == ["train-000000.tar", "train-manifest.json"]


def test_manifest_sha256_matches_the_shard_files(coco_set: tuple[Path, Path], tmp_path: Path) -> None:
    source = read_coco(*coco_set)
    write_shards(source.records, source.class_names, tmp_path / "out", "train", shard_size=2)
    manifest = read_manifest(manifest_path(tmp_path / "out", "train"))
    assert (manifest.num_samples, manifest.num_boxes, manifest.num_classes) == (5, 10, 2)
    for shard, url in zip(manifest.shards, manifest.shard_urls, strict=True):
        assert Path(url).is_absolute()
        assert hashlib.sha256(Path(url).read_bytes()).hexdigest() == shard.sha256


def test_same_input_gives_identical_shards_and_content_hash(
    coco_set: tuple[Path, Path], tmp_path: Path
) -> None:
    source = read_coco(*coco_set)
    a = write_shards(source.records, source.class_names, tmp_path / "a", "train", shard_size=2)
    b = write_shards(source.records, source.class_names, tmp_path / "b", "train", shard_size=2)
    assert a.shards == b.shards
    assert a.manifest_hash == b.manifest_hash
    c = write_shards(source.records, source.class_names, tmp_path / "c", "train", shard_size=3)
    assert c.manifest_hash != a.manifest_hash


def test_val_ground_truth_is_the_coco_source_at_original_resolution(
    coco_set: tuple[Path, Path], tmp_path: Path
) -> None:
    ann, img = coco_set
    source = read_coco(ann, img)
    write_shards(
        source.records,
        source.class_names,
        tmp_path / "out",
        "val",
        max_side=40,
        ground_truth=source.ground_truth,
    )
    gt = COCO(str(coco_json_path(tmp_path / "out", "val")))
    original = json.loads(ann.read_text())
    assert sorted(gt.getImgIds()) == [1, 2, 3, 4, 5]
    assert gt.getCatIds() == [10, 20]  # the file's category ids, not 1..K
    image = gt.loadImgs(1)[0]
    assert (image["width"], image["height"]) == (80, 60)  # not the stored 40x30
    assert sorted(gt.getAnnIds()) == [a["id"] for a in original["annotations"]]
    for a in gt.loadAnns(gt.getAnnIds()):
        (given,) = [o for o in original["annotations"] if o["id"] == a["id"]]
        assert (a["image_id"], a["category_id"], a["bbox"]) == (
            given["image_id"],
            given["category_id"],
            given["bbox"],
        )
        assert a["area"] == pytest.approx(given["bbox"][2] * given["bbox"][3])  # the file gives none
        assert a["iscrowd"] == 0
    assert [s["image_id"] for s in samples(tmp_path / "out", "val")] == [1, 2, 3, 4, 5]


def test_val_ground_truth_keeps_crowd_regions_and_the_files_areas(
    coco_set: tuple[Path, Path], tmp_path: Path
) -> None:
    ann, img = coco_set
    data = json.loads(ann.read_text())
    data["annotations"][0]["area"] = 123.5  # a segment's area, smaller than its box
    crowd = {"id": 77, "image_id": 3, "category_id": 20, "bbox": [0, 0, 50, 40], "area": 900, "iscrowd": 1}
    data["annotations"].append(crowd | {"segmentation": {"counts": "abc", "size": [60, 80]}})
    ann.write_text(json.dumps(data))
    source = read_coco(ann, img)
    write_shards(
        source.records, source.class_names, tmp_path / "out", "val", ground_truth=source.ground_truth
    )
    gt = COCO(str(coco_json_path(tmp_path / "out", "val")))
    assert gt.anns[77] == crowd  # kept, without its segmentation
    assert gt.anns[1]["area"] == 123.5
    stored = samples(tmp_path / "out", "val")[2]
    assert stored["image_id"] == 3 and len(stored["boxes"]) == 2  # no box to train on for the crowd


def test_val_ground_truth_of_other_formats_is_at_original_resolution(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.jpg", 200, 100)
    write_shards([record(path, [[20, 10, 120, 60]], [1])], CLASSES, tmp_path / "out", "val", max_side=100)
    gt = json.loads(coco_json_path(tmp_path / "out", "val").read_text())
    assert gt["images"] == [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}]
    assert gt["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [20, 10, 100, 50], "area": 5000, "iscrowd": 0}
    ]
    assert gt["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert samples(tmp_path / "out", "val")[0]["boxes"] == [[10, 5, 60, 30]]  # the stored image's


def test_image_size_in_the_annotation_file_that_differs_is_counted(
    coco_set: tuple[Path, Path], tmp_path: Path
) -> None:
    ann, img = coco_set
    data = json.loads(ann.read_text())
    data["images"][0]["width"] = 640
    ann.write_text(json.dumps(data))
    source = read_coco(ann, img)
    manifest = write_shards(
        source.records, source.class_names, tmp_path / "out", "val", ground_truth=source.ground_truth
    )
    assert json.loads(manifest.path.read_text())["report"]["counts"] == {"image_size_mismatch": 1}
    assert COCO(str(coco_json_path(tmp_path / "out", "val"))).imgs[1]["width"] == 80  # the real size


def test_two_records_with_one_image_id_are_refused(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.jpg", 20, 20) for i in range(2)]
    records = [Record(p.stem, p.name, np.zeros((0, 4)), np.zeros(0), image_path=p, image_id=7) for p in paths]
    with pytest.raises(DataError, match="image id 7 of 1.jpg is already 0.jpg's"):
        write_shards(records, CLASSES, tmp_path / "out", "val")


def test_read_manifest_rejects_bad_files(coco_set: tuple[Path, Path], tmp_path: Path) -> None:
    source = read_coco(*coco_set)
    path = write_shards(source.records, source.class_names, tmp_path / "out", "train", shard_size=2).path
    good = json.loads(path.read_text())
    with pytest.raises(DataError, match="not found"):
        read_manifest(tmp_path / "none.json")
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({**good, "format": "other/1"}), "format marker"),
        (json.dumps({k: v for k, v in good.items() if k != "class_names"}), "lacks keys"),
        (json.dumps({**good, "num_samples": 99}), "add up"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_manifest(path)
    path.write_text(json.dumps(good))
    (tmp_path / "out" / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="train-000001.tar does not exist"):
        read_manifest(path)


def test_url_shard_names_pass_through_and_hash_ignores_location(
    coco_set: tuple[Path, Path], tmp_path: Path
) -> None:
    source = read_coco(*coco_set)
    local = write_shards(source.records, source.class_names, tmp_path / "out", "train", shard_size=5)
    shutil.copytree(tmp_path / "out", tmp_path / "moved")
    moved = read_manifest(tmp_path / "moved" / "train-manifest.json")
    assert moved.shard_urls == [str((tmp_path / "moved" / "train-000000.tar").resolve())]
    assert moved.manifest_hash == local.manifest_hash
    data = json.loads(moved.path.read_text())
    data["shards"][0]["name"] = "s3://bucket/train-000000.tar"
    moved.path.write_text(json.dumps(data))
    assert read_manifest(moved.path).shard_urls == ["s3://bucket/train-000000.tar"]


@pytest.mark.slow  # spawns two worker processes: seconds on a busy machine
def test_parallel_workers_write_the_same_shards(coco_set: tuple[Path, Path], tmp_path: Path) -> None:
    source = read_coco(*coco_set)
    one = write_shards(source.records, source.class_names, tmp_path / "a", "train", shard_size=2, max_side=50)
    two = write_shards(source.records, source.class_names, tmp_path / "b", "train", 2, 50, workers=2)
    assert one.shards == two.shards


def test_synthetic_records_are_deterministic_per_seed() -> None:
    a = list(synthetic_records(3, 96, seed=7))
    b = list(synthetic_records(3, 96, seed=7))
    c = list(synthetic_records(3, 96, seed=8))
    assert [r.image_bytes for r in a] == [r.image_bytes for r in b]
    assert [r.image_bytes for r in a] != [r.image_bytes for r in c]
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra.boxes, rb.boxes)


def test_synthetic_boxes_fit_the_image_and_objects_are_large() -> None:
    for r in synthetic_records(20, (128, 96), seed=0):
        assert 1 <= len(r.boxes) <= 6
        assert set(r.classes.tolist()) <= set(range(len(SYNTHETIC_CLASSES)))
        assert (r.boxes[:, :2] >= 0).all() and (r.boxes[:, 2] <= 128).all() and (r.boxes[:, 3] <= 96).all()
        # the smallest shape (a square at 16% of 96 px, corners on its circle) still spans > 10 px
        assert (r.boxes[:, 2:] - r.boxes[:, :2] > 10).all()
        image = cv2.imdecode(np.frombuffer(r.image_bytes, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (96, 128, 3)


def test_write_synthetic_dataset_writes_train_and_val(tmp_path: Path) -> None:
    train, val = write_synthetic_dataset(
        tmp_path, num_train=6, num_val=3, image_size=64, seed=3, shard_size=4
    )
    assert (train.num_samples, len(train.shards), val.num_samples) == (6, 2, 3)
    assert train.class_names == list(SYNTHETIC_CLASSES)
    assert (train.source["seed"], val.source["seed"]) == (3, 4)
    assert coco_json_path(tmp_path, "val").is_file() and not coco_json_path(tmp_path, "train").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "jobs.make_shards", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_writes_synthetic_shards(tmp_path: Path) -> None:
    result = run_cli("--format", "synthetic", "--out", str(tmp_path), "--split", "val", "--num", "4",
                     "--image-size", "64", "--shard-size", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "val-manifest.json")
    assert (manifest.num_samples, len(manifest.shards)) == (4, 2)


def test_cli_data_error_exits_nonzero_with_one_line(coco_set: tuple[Path, Path], tmp_path: Path) -> None:
    result = run_cli("--format", "coco", "--source", str(coco_set[1]), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: format 'coco' needs the instances JSON (--annotations)"


def test_make_shards_from_yolo_with_max_side(tmp_path: Path) -> None:
    write_image(tmp_path / "yolo" / "images" / "a.jpg", 120, 60)
    (tmp_path / "yolo" / "labels").mkdir()
    (tmp_path / "yolo" / "labels" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    manifest = make_shards("yolo", tmp_path / "out", "train", source=tmp_path / "yolo", max_side=60,
                           data_yaml=tmp_path / "data.yaml")  # fmt: skip
    assert manifest.source["format"] == "yolo"
    meta = samples(tmp_path / "out")[0]
    # box [30, 15, 90, 45] in 120x60, halved to 60x30
    assert (meta["width"], meta["height"], meta["boxes"], meta["classes"]) == (
        60,
        30,
        [[15, 7.5, 45, 22.5]],
        [1],
    )


def test_bad_synthetic_arguments_fail_before_touching_the_output(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path, num_train=2, num_val=1, image_size=64)
    with pytest.raises(DataError, match="image sides >= 32"):
        make_shards("synthetic", tmp_path, "train", image_size=8, overwrite=True)
    assert read_manifest(tmp_path / "train-manifest.json").num_samples == 2
