"""Readers for COCO, YOLO and Pascal VOC datasets: annotations in, ``Record`` objects out.

Readers parse annotations only (images are opened by the writer, which checks them), so a reader over
100k images is quick and light. Every problem a reader or the writer meets is counted in a ``Report``.
"""

from __future__ import annotations

import itertools
import os
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.data.manifest import DataError, load_json_object

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Image formats the reference reads but the header reader here does not: counted, never silently dropped.
OTHER_IMAGE_SUFFIXES = (".bmp", ".dng", ".mpo", ".pfm", ".tif", ".tiff", ".webp")
# Data YAML keys that are not splits.
YOLO_YAML_KEYS = ("path", "names", "nc", "download")
MAX_EXAMPLES = 5
# JPEG frame headers usually sit within the first few kB; EXIF thumbnails can push them to ~64 kB.
HEADER_BYTES = 1 << 17


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
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{annotation_json}: COCO file lacks the lists {missing}")
    try:
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        class_of = {int(c["id"]): i for i, c in enumerate(categories)}
        class_names = [str(c["name"]) for c in categories]
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        file_names = {int(im["id"]): str(im["file_name"]) for im in images}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{annotation_json}: malformed COCO images/categories ({e!r})") from e
    if not class_names:
        raise DataError(f"{annotation_json}: COCO file has no categories")
    if len(file_names) != len(images) or len(class_of) != len(categories):
        raise DataError(f"{annotation_json}: image ids or category ids are not unique")

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


def read_yolo(root: str | Path, data_yaml: str | Path) -> Source:
    """Read a one-folder YOLO dataset: ``root/images/*.jpg|png`` with ``root/labels/<stem>.txt``.

    Class names come from the data YAML's ``names``; labels, label lines and counted problems as in
    ``read_yolo_split``. Image sizes are read from the file header to turn boxes into pixels.
    """
    root, data_yaml = Path(root), Path(data_yaml)
    class_names = _yolo_names(_yolo_yaml(data_yaml), data_yaml)
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DataError(f"{root}: YOLO dataset lacks an images/ directory")
    report = Report()
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    records = _yolo_records([(p, p.stem, p.name) for p in images], report)
    if not records and not report.counts:
        raise DataError(
            f"{image_dir}: no .jpg/.jpeg/.png images found (for split folders such as images/train, "
            "leave out --source and give --split: the data YAML's path and splits say where the images are)"
        )
    info = {"format": "yolo", "root": str(root), "data_yaml": str(data_yaml), "polygons": "bounding_box"}
    return Source(class_names, records, report, info)


def read_yolo_split(data_yaml: str | Path, split: str) -> Source:
    """Read the split ``split`` (a key of the data YAML: train, val or test) of a YOLO dataset.

    The YAML, as the reference implementation and Ultralytics lay it out:

    - ``path``: the dataset root, absolute or relative to the YAML's folder (that folder if absent or empty).
    - ``train`` / ``val`` / ``test``: a directory (searched recursively for images), a ``.txt`` file listing
      one image path per line, or a list of several of those. Relative paths, in the YAML and in the
      lists, are relative to the root.
    - ``names``: a list, or a dict {index: name} with keys 0..n-1; ``nc``, if present, must equal its length.

    An image's labels are at ``yolo_label_path(image)``; a missing label file means an image without boxes,
    but a split in which no image has one is an error (the layout is not what the rule expects). Label
    lines are ``cls xc yc w h`` normalised to [0, 1]; a line ``cls x1 y1 x2 y2 ... xn yn`` (n >= 3, a
    segment polygon) becomes the polygon's bounding box and is counted as ``polygon_to_box``; any other
    line is counted as ``malformed_label_line`` and skipped. Listed images that do not exist, image formats
    other than JPEG/PNG and images listed twice are counted and skipped; a class outside ``names`` is
    counted and dropped by the writer. ``file_name`` of a record is its path relative to the root.
    """
    data_yaml = Path(data_yaml)
    data = _yolo_yaml(data_yaml)
    class_names = _yolo_names(data, data_yaml)
    root_text = data.get("path") or "."
    if not isinstance(root_text, str):
        raise DataError(f"{data_yaml}: 'path' must be a directory path, got {root_text!r}")
    # abspath, not resolve: a symlinked images/ folder keeps the labels/ folder beside the link.
    root = Path(os.path.abspath(data_yaml.parent / root_text))
    if not root.is_dir():
        raise DataError(f"{data_yaml}: dataset root {root} (from 'path') is not a directory")
    entries = data.get(split) if split not in YOLO_YAML_KEYS else None
    if entries is None:
        given = [k for k, v in data.items() if k not in YOLO_YAML_KEYS and v is not None]
        raise DataError(f"{data_yaml}: no images given for split {split!r}; the YAML gives splits {given}")
    entries = [entries] if isinstance(entries, str) else entries
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) and e for e in entries):
        raise DataError(f"{data_yaml}: {split!r} must be a path or a list of paths, got {data[split]!r}")

    report = Report()
    images = _yolo_split_images(entries, root, f"{data_yaml}: {split!r} entry", report)
    if not images and not report.counts:
        raise DataError(f"{data_yaml}: split {split!r} ({entries}) holds no .jpg/.jpeg/.png images")
    names = [_relative_name(p, root) for p in images]
    records = _yolo_records([(p, n, n) for p, n in zip(images, names, strict=True)], report)
    info = {
        "format": "yolo",
        "data_yaml": os.path.abspath(data_yaml),
        "root": str(root),
        "yaml_split": split,
        "entries": entries,
        "polygons": "bounding_box",
    }
    return Source(class_names, records, report, info)


def yolo_label_path(image_path: Path) -> Path:
    """The label file of a YOLO image, by the reference's rule: the last ``images`` folder in the path
    becomes ``labels`` and the suffix ``.txt`` (``d/images/train/a.jpg`` -> ``d/labels/train/a.txt``).
    Without an ``images`` folder the label file sits beside the image."""
    folders = image_path.parts[:-1]
    if "images" in folders:
        i = len(folders) - 1 - folders[::-1].index("images")
        image_path = Path(*folders[:i], "labels", *image_path.parts[i + 1 :])
    return image_path.with_suffix(".txt")


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


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels of the image as displayed, from a JPEG or PNG header, or None if the bytes
    are neither or cut short. A JPEG whose EXIF orientation turns it by 90 degrees (5-8) is displayed, and
    labelled, with width and height swapped; the shard writer stores it turned that way.

    Reads the header only, so it costs microseconds rather than a full decode.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return (width, height) if width and height else None
    frame = jpeg_frame(data)
    if frame is None:
        return None
    width, height, orientation = frame
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return (width, height) if width and height else None


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height) as stored and the EXIF orientation (1-8; 1 when absent) of a JPEG, from its header;
    None when the bytes are not a JPEG or are cut short before the frame header."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, orientation = 2, 1
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length field
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            orientation = exif_orientation(data[pos + 10 : pos + 2 + length])
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height, orientation
        pos += 2 + length
    return None


def exif_orientation(tiff: bytes) -> int:
    """The EXIF orientation tag (1-8; 1: as stored) of a JPEG's APP1 payload after ``Exif\0\0``; 1 when
    absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
        if tag == 0x0112 and kind == 3:  # Orientation, SHORT
            (value,) = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def _header_size(path: Path) -> tuple[int, int] | None:
    """``image_size`` from the file's first bytes, reading the whole file only if the header runs longer."""
    try:
        with path.open("rb") as f:
            head = f.read(HEADER_BYTES)
            return image_size(head) or image_size(head + f.read())
    except OSError:
        return None


def _yolo_yaml(data_yaml: Path) -> dict[str, Any]:
    if not data_yaml.is_file():
        raise DataError(f"{data_yaml}: data YAML not found")
    try:
        data = yaml.safe_load(data_yaml.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{data_yaml}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{data_yaml}: data YAML must be a mapping with 'names', got {type(data).__name__}")
    return data


def _yolo_names(data: dict[str, Any], data_yaml: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{data_yaml}: names dict keys must be 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{data_yaml}: 'names' must be a non-empty list or {{index: name}} dict")
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{data_yaml}: nc is {data['nc']!r} but 'names' has {len(names)} entries")
    return [str(n) for n in names]


def _yolo_split_images(entries: list[str], root: Path, where: str, report: Report) -> list[Path]:
    """The images of a split's entries (directories or .txt lists, relative to ``root``), in order, once."""
    images, seen = [], set()
    for entry in entries:
        path = root / entry
        if path.is_dir():
            listed = False
            files = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file() and path.suffix.lower() == ".txt":
            listed = True
            files = [root / line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            raise DataError(f"{where} {entry!r}: {path} is neither a directory nor a .txt list of images")
        for file in files:
            file = Path(os.path.normpath(file))
            suffix = file.suffix.lower()
            if suffix not in IMAGE_SUFFIXES:
                # Other files in an image directory (caches, notes) are not images; a list names images only.
                if listed or suffix in OTHER_IMAGE_SUFFIXES:
                    report.add("unsupported_image_format", str(file))
            elif file in seen:
                report.add("duplicate_image", str(file))
            else:
                seen.add(file)
                images.append(file)
    return images


def _relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _yolo_records(images: list[tuple[Path, str, str]], report: Report) -> list[Record]:
    """Records of (image path, source id, file name) with the boxes of their ``yolo_label_path`` files."""
    records, labelled = [], 0
    for image_path, source_id, file_name in images:
        if not image_path.is_file():
            report.add("missing_image", str(image_path))
            continue
        size = _header_size(image_path)
        if size is None:
            report.add("unreadable_image", str(image_path))
            continue
        label_path = yolo_label_path(image_path)
        rows = []
        if label_path.is_file():
            labelled += 1
            rows = _yolo_rows(label_path, report)
        width, height = size
        boxes = np.array([r[1:] for r in rows], np.float32).reshape(-1, 4)
        xc, yc, w, h = boxes.T
        xyxy = np.stack(
            [(xc - w / 2) * width, (yc - h / 2) * height, (xc + w / 2) * width, (yc + h / 2) * height], 1
        )
        classes = np.array([r[0] for r in rows], np.int64)
        records.append(Record(source_id, file_name, xyxy, classes, image_path))
    if records and not labelled:
        image = records[0].image_path
        raise DataError(
            f"none of the {len(records)} images has a label file; by the rule (the last images/ folder "
            f"becomes labels/, the suffix .txt) {image} has {yolo_label_path(image)}"
        )
    return records


def _yolo_rows(label_path: Path, report: Report) -> list[tuple[int, float, float, float, float]]:
    """(cls, xc, yc, w, h) per usable line: a box as it is, a polygon as its bounding box (counted)."""
    rows = []
    for lineno, line in enumerate(label_path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_path.name}:{lineno}: {line.strip()!r}"
        try:
            cls = int(fields[0])
            values = [float(v) for v in fields[1:]]
        except ValueError:
            report.add("malformed_label_line", where)
            continue
        if len(values) == 4:
            rows.append((cls, *values))
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = values[0::2], values[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
            rows.append((cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1))
            report.add("polygon_to_box", where)
        else:
            report.add("malformed_label_line", f"{where}: expected 5 values (box) or 7, 9, ... (polygon)")
    return rows


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
