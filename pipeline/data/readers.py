"""Readers for COCO and Pascal VOC datasets (YOLO: ``yolo_reader.py``): annotations in, ``Record`` objects
out.

Readers parse annotations only (images are opened by the writer, which checks them), so a reader over
100k images is quick and light. Every problem a reader or the writer meets is counted in a ``Report``.
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.manifest import DataError, load_json_object

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Image formats the reference reads but the header reader here does not: counted, never silently dropped.
OTHER_IMAGE_SUFFIXES = (".bmp", ".dng", ".mpo", ".pfm", ".tif", ".tiff", ".webp")
MAX_EXAMPLES = 5


@dataclass(frozen=True, eq=False)
class Record:
    """One source image and its boxes, before checking.

    ``boxes``: float32 (N, 4) xyxy in pixels of the ORIGINAL image (pixel-edge coordinates: a box covering
    pixel columns 0..9 is x1=0, x2=10). ``classes``: int64 (N,) 0-based. Exactly one of ``image_path`` /
    ``image_bytes`` (encoded JPEG or PNG) is set. ``image_id``: the source's own id of the image (COCO), kept
    as the stored sample's id so that results files match the source's annotations; None: numbered in order.
    """

    source_id: str
    file_name: str
    boxes: np.ndarray
    classes: np.ndarray
    image_path: Path | None = None
    image_bytes: bytes | None = None
    image_id: int | None = None

    def __post_init__(self) -> None:
        if (self.image_path is None) == (self.image_bytes is None):
            raise ValueError(f"record {self.source_id}: set exactly one of image_path and image_bytes")
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        if len(boxes) != len(classes):
            raise ValueError(f"record {self.source_id}: {len(boxes)} boxes but {len(classes)} classes")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "classes", classes)


@dataclass
class Report:
    """Counts per problem kind (e.g. "box_clipped") and the first few examples of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, example: str, count: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + count
        shown = self.examples.setdefault(kind, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    def extend(self, problems: Iterable[tuple[str, str]]) -> None:
        for kind, example in problems:
            self.add(kind, example)

    def to_dict(self) -> dict[str, Any]:
        kinds = sorted(self.counts)
        return {
            "counts": {k: self.counts[k] for k in kinds},
            "examples": {k: self.examples[k] for k in kinds},
        }

    def summary(self) -> str:
        if not self.counts:
            return "no problems found"
        lines = []
        for kind in sorted(self.counts):
            lines.append(f"{kind}: {self.counts[kind]}")
            lines.extend(f"    e.g. {example}" for example in self.examples[kind])
        return "\n".join(lines)


@dataclass(frozen=True)
class SourceGroundTruth:
    """A source's own COCO ground truth, which the val split is scored on (the official protocol).

    ``images``: the image entries by image id, as in the file. ``annotations``: the well-formed annotations
    of known categories by image id, as in the file (crowd regions included, ``segmentation`` left out:
    bbox scoring never reads it). ``categories``: the category entries sorted by id (class c = entry c).
    """

    images: dict[int, dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]
    categories: list[dict[str, Any]]


@dataclass(frozen=True)
class Source:
    """What a reader found: class names (index = class id), records, and a description for the manifest.

    ``ground_truth``: the source's own annotations to score the val split on (COCO only); other formats
    are scored on their boxes at the original resolution."""

    class_names: list[str]
    records: list[Record]
    report: Report
    info: dict[str, Any]
    ground_truth: SourceGroundTruth | None = None


def read_coco(annotation_json: str | Path, image_dir: str | Path) -> Source:
    """Read a COCO instances JSON; images are ``image_dir / file_name``.

    Category ids map to contiguous 0-based classes in sorted id order. ``bbox`` [x, y, w, h] becomes xyxy.
    Records keep the file's image ids. Crowd regions are no boxes to train on (counted as
    ``crowd_skipped``) but stay in ``Source.ground_truth`` with ``iscrowd: 1``, where scoring ignores
    detections on them. Unknown category or image ids and malformed annotations are skipped and counted.
    """
    annotation_json, image_dir = Path(annotation_json), Path(image_dir)
    data = load_json_object(Path(annotation_json), "annotation file")
    categories, class_names, images, file_names = _coco_lists(data, annotation_json)
    class_of = {int(c["id"]): i for i, c in enumerate(categories)}
    report = Report()
    boxes: dict[int, list[list[float]]] = {i: [] for i in file_names}
    classes: dict[int, list[int]] = {i: [] for i in file_names}
    truth: dict[int, list[dict[str, Any]]] = {i: [] for i in file_names}
    for ann in data["annotations"]:
        where = f"{annotation_json.name} annotation {ann.get('id') if isinstance(ann, dict) else ann!r}"
        try:
            image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            report.add("malformed_annotation", where)
            continue
        if category_id not in class_of:
            report.add("unknown_category", f"{where}: category_id {category_id}")
            continue
        if image_id not in file_names:
            report.add("unknown_image_id", f"{where}: image_id {image_id}")
            continue
        truth[image_id].append(_ground_truth_annotation(ann, w, h))
        if ann.get("iscrowd", 0):
            report.add("crowd_skipped", where)
        else:
            boxes[image_id].append([x, y, x + w, y + h])
            classes[image_id].append(class_of[category_id])
    records = [
        Record(
            str(i),
            name,
            np.array(boxes[i], np.float32),
            np.array(classes[i], np.int64),
            image_dir / name,
            image_id=i,
        )
        for i, name in file_names.items()
    ]
    _number_annotations([a for anns in truth.values() for a in anns])
    info = {"format": "coco", "annotations": str(annotation_json), "images": str(image_dir)}
    ground_truth = SourceGroundTruth({int(im["id"]): im for im in images}, truth, categories)
    return Source(class_names, records, report, info, ground_truth)


def _coco_lists(
    data: dict[str, Any], where: Path
) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]], dict[int, str]]:
    """A COCO file's categories sorted by id with their names, and its images sorted by id with their file
    names by id; DataError unless both are well formed, the ids unique and there is a category."""
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{where}: COCO file lacks the lists {missing}")
    try:
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        class_names = [str(c["name"]) for c in categories]
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        file_names = {int(im["id"]): str(im["file_name"]) for im in images}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: malformed COCO images/categories ({e!r})") from e
    if not class_names:
        raise DataError(f"{where}: COCO file has no categories")
    if len(file_names) != len(images) or len({int(c["id"]) for c in categories}) != len(categories):
        raise DataError(f"{where}: image ids or category ids are not unique")
    return categories, class_names, images, file_names


def _number_annotations(annotations: list[dict[str, Any]]) -> None:
    """Give annotations without an integer ``id`` (which pycocotools indexes them by) fresh ones."""
    ids = [a["id"] for a in annotations if isinstance(a.get("id"), int)]
    fresh = itertools.count(max(ids, default=0) + 1)
    for ann in annotations:
        if not isinstance(ann.get("id"), int):
            ann["id"] = next(fresh)


def _ground_truth_annotation(ann: dict[str, Any], w: float, h: float) -> dict[str, Any]:
    """A COCO annotation as scoring reads it: as in the file, without ``segmentation``; ``area`` (the
    object's area, which decides its size range) w * h where the file gives none, ``iscrowd`` 0 likewise."""
    kept = {k: v for k, v in ann.items() if k != "segmentation"}
    kept.setdefault("area", w * h)
    kept.setdefault("iscrowd", 0)
    return kept


def read_voc(root: str | Path, class_names: list[str] | None = None) -> Source:
    """Read Pascal VOC: ``root/Annotations/*.xml`` with images in ``root/JPEGImages/``.

    VOC corners are 1-based inclusive pixel indices, so xyxy = (xmin - 1, ymin - 1, xmax, ymax).
    Class names are ``class_names`` if given (other names are counted as unknown and skipped), else the
    sorted union of the names found. ``difficult`` objects are kept.
    """
    root = Path(root)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise DataError(f"{root}: VOC dataset lacks an Annotations/ directory")
    report = Report()
    parsed = []
    for xml_path in sorted(ann_dir.glob("*.xml")):
        try:
            parsed.append(_voc_objects(xml_path))
        except (ET.ParseError, KeyError, TypeError, ValueError) as e:
            report.add("malformed_annotation", f"{xml_path.name}: {e}")
    if not parsed and not report.counts:
        raise DataError(f"{ann_dir}: no .xml annotation files found")
    names = (
        list(class_names) if class_names is not None else sorted({n for _, objs in parsed for n, _ in objs})
    )
    if not names:
        raise DataError(f"{ann_dir}: no object names found and no class names given")
    class_of = {n: i for i, n in enumerate(names)}
    records = []
    for file_name, objects in parsed:
        boxes, classes = [], []
        for name, box in objects:
            if name in class_of:
                boxes.append(box)
                classes.append(class_of[name])
            else:
                report.add("unknown_category", f"{file_name}: {name!r}")
        image_path = root / "JPEGImages" / file_name
        records.append(
            Record(
                Path(file_name).stem, file_name, np.array(boxes, np.float32), np.array(classes), image_path
            )
        )
    return Source(names, records, report, {"format": "voc", "root": str(root)})


def _voc_objects(xml_path: Path) -> tuple[str, list[tuple[str, list[float]]]]:
    tree = ET.parse(xml_path).getroot()
    file_name = tree.findtext("filename") or f"{xml_path.stem}.jpg"
    objects = []
    for obj in tree.iter("object"):
        name = obj.findtext("name")
        box = obj.find("bndbox")
        if name is None or box is None:
            raise ValueError("object without name or bndbox")
        x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((name.strip(), [x1 - 1, y1 - 1, x2, y2]))
    return file_name, objects
