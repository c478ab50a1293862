"""The official COCO protocol end to end: a COCO set with crowd regions and images larger than --max-side
goes through make_shards, the val loader and the project's scoring, and the numbers equal pycocotools run
directly on the original annotation file with the project's detections (as jobs.evaluate saves them)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs.evaluate import main as evaluate_main
from pipeline.checkpoint import TrainingCheckpoint, save_checkpoint
from pipeline.config import Config
from pipeline.data import read_manifest
from pipeline.data.loader import make_val_loader
from pipeline.data.make import make_shards
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.evaluation.coco import (
    STATS,
    coco_evaluate,
    detections_from_predictions,
    load_ground_truth,
    results_json,
)
from yolov9 import build_model

MAX_SIDE = 96
IMGSZ = 64
# (image id, width, height): ids neither 1..n nor in file order; three of four images exceed MAX_SIDE
IMAGES = [(42, 300, 200), (7, 150, 240), (100, 90, 60), (13, 200, 200)]
CATEGORIES = [{"id": 11, "name": "cup"}, {"id": 5, "name": "bike"}, {"id": 9, "name": "dog"}]


@pytest.fixture
def coco_source(tmp_path: Path) -> Path:
    """The instances file: 2-4 objects per image (areas as a segment's: 0.8 of the box), a crowd region on
    two images, annotation ids from 1001; images of noise written as JPEGs."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, width, height in IMAGES:
        name = f"{image_id:012d}.jpg"
        pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        (tmp_path / "images").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "images" / name), pixels)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for _ in range(int(rng.integers(2, 5))):
            w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.05, 0.6) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = CATEGORIES[int(rng.integers(3))]["id"]
            annotations.append(
                {"image_id": image_id, "category_id": category, "bbox": [x, y, w, h], "iscrowd": 0}
            )
        if image_id in (42, 13):
            crowd = [0.0, 0.0, width / 2, height / 2]
            annotations.append({"image_id": image_id, "category_id": 5, "bbox": crowd, "iscrowd": 1})
    for i, ann in enumerate(annotations):
        ann["id"] = 1001 + i
        ann["area"] = 0.8 * ann["bbox"][2] * ann["bbox"][3]
        ann["segmentation"] = [[0, 0, 1, 0, 1, 1]]
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


@pytest.fixture
def shards(coco_source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    make_shards(
        "coco", out, "val", source=coco_source.parent / "images", annotations=coco_source, max_side=MAX_SIDE
    )
    return out


def pycocotools_on_original(annotation_file: Path, results_file: Path) -> dict[str, float]:
    gt = COCO(str(annotation_file))
    evaluator = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return dict(zip(STATS, (float(v) for v in evaluator.stats), strict=True))


def predictions_from_annotations(
    original: dict, metas: list[dict], rng: np.random.Generator
) -> list[torch.Tensor]:
    """Per-image NMS-style rows [x1, y1, x2, y2, score, class] in letterboxed input pixels: each object's box
    moved a little (or, for one in four, a lot), a detection inside every crowd region, one stray box.
    Original pixels -> stored image (the shards' --max-side scale) -> letterbox (ratio, pad)."""
    sizes = {im["id"]: (im["width"], im["height"]) for im in original["images"]}
    ordered = sorted(c["id"] for c in original["categories"])
    preds = []
    for meta in metas:
        width, height = sizes[meta["image_id"]]
        stored_h, stored_w = meta["orig_shape"]
        scale = np.array([stored_w / width, stored_h / height] * 2) * meta["ratio"]
        pad = np.array(list(meta["pad"]) * 2)
        rows = []
        for ann in (a for a in original["annotations"] if a["image_id"] == meta["image_id"]):
            x, y, w, h = ann["bbox"]
            box = np.array([x, y, x + w, y + h])
            if ann["iscrowd"]:
                box = np.array([x + w / 4, y + h / 4, x + w / 2, y + h / 2])  # inside the region
            else:
                box = box + rng.normal(0, 0.25 if rng.random() < 0.25 else 0.03, 4) * [w, h, w, h]
            rows.append([*(box * scale + pad), rng.uniform(0.05, 1), ordered.index(ann["category_id"])])
        rows.append(
            [*(np.array([0.7, 0.7, 0.9, 0.9]) * [width, height, width, height] * scale + pad), 0.5, 2]
        )
        preds.append(torch.tensor(rows, dtype=torch.float32))
    return preds


def test_reported_map_equals_pycocotools_on_the_original_file(
    coco_source: Path, shards: Path, tmp_path: Path
):
    manifest = read_manifest(manifest_path(shards, "val"))
    loader = make_val_loader(manifest, batch_size=3, imgsz=IMGSZ, rank=0, world_size=1, num_workers=0)
    original = json.loads(coco_source.read_text())
    truth = load_ground_truth(coco_json_path(shards, "val"))
    rng = np.random.default_rng(1)
    parts = [
        detections_from_predictions(predictions_from_annotations(original, m, rng), m, truth)
        for _, m in loader
    ]
    detections = np.concatenate(parts)
    reported = coco_evaluate(truth, detections).stats

    results = tmp_path / "dets.json"
    results.write_text(json.dumps(results_json(detections)))
    assert reported == pycocotools_on_original(coco_source, results)
    assert 0.2 < reported["map50_95"] < 0.95  # a real mix of hits, near misses and false positives


def write_checkpoint(directory: Path, class_names: list[str]) -> Path:
    """A yolov9-t checkpoint trained on nothing whose class biases are raised so that it makes low-score
    detections everywhere (an untrained model's stay under conf 0.001)."""
    torch.manual_seed(0)
    model = build_model("yolov9-t", num_classes=len(class_names))
    for tower in (*model.head.cv3, *model.head.cv5):
        tower[-1].bias.data += 4.0
    cfg = Config()
    cfg.train.imgsz = IMGSZ
    state = TrainingCheckpoint(
        model=model.state_dict(),
        ema={"model": model.state_dict(), "updates": 1},
        epoch=1,
        step=1,
        config=cfg,
        best_map=0.0,
        model_name="yolov9-t",
        num_classes=len(class_names),
        class_names=class_names,
    )
    directory.mkdir()
    save_checkpoint(directory, state)
    return directory


def test_evaluate_job_saves_results_that_pycocotools_scores_alike(
    coco_source: Path, shards: Path, tmp_path: Path, capsys
):
    names = list(read_manifest(manifest_path(shards, "val")).class_names)
    checkpoint = write_checkpoint(tmp_path / "checkpoint_000001", names)
    dets, report = tmp_path / "dets.json", tmp_path / "report.json"
    args = ["--checkpoint", str(checkpoint), "--data", str(shards), "--workers", "0"]
    evaluate_main([*args, "--save-json", str(dets), "--json", str(report)])

    printed = capsys.readouterr().out
    assert "AP    IoU=0.50:0.95 area=all    maxDets=100" in printed
    assert all(f"  {name} " in printed for name in names)  # the per-class table
    results = json.loads(dets.read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {r["image_id"] for r in results} == {image_id for image_id, _, _ in IMAGES}
    assert {r["category_id"] for r in results} <= {c["id"] for c in CATEGORIES}
    figures = json.loads(report.read_text())
    assert figures["stats"] == pycocotools_on_original(coco_source, dets)
    assert [row["class"] for row in figures["per_class"]] == names
