"""The YOLO dataset reader: a data YAML's split (folders, image lists) or one images/ + labels/ folder;
normalised ``cls xc yc w h`` lines (or segment polygons) in, ``Record`` objects with pixel boxes out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.data.image_header import header_size
from pipeline.data.manifest import DataError
from pipeline.data.readers import (
    IMAGE_SUFFIXES,
    OTHER_IMAGE_SUFFIXES,
    Record,
    Report,
    Source,
)

# Data YAML keys that are not splits.
YOLO_YAML_KEYS = ("path", "names", "nc", "download")


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
        size = header_size(image_path)
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
