"""One source record checked and turned into the sample a shard stores: its image as JPEG bytes (kept as
given where that is safe, re-encoded where it must be), its boxes checked and clipped, and the problems
found, each a (kind, where) pair the writer's report counts."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.data.image_header import jpeg_frame
from pipeline.data.readers import Record

JPEG_QUALITY = 95

Problem = tuple[str, str]


@dataclass(frozen=True, eq=False)
class EncodedSample:
    """A checked record ready to store: JPEG bytes of the stored image, float32 (N, 4) xyxy boxes in
    pixels of the stored image (``width`` x ``height``), int64 (N,) classes. ``original_boxes``: the same
    boxes in pixels of the source image (``original_width`` x ``original_height``), which the val ground
    truth keeps. ``image_id``: the record's."""

    file_name: str
    jpeg: bytes
    width: int
    height: int
    boxes: np.ndarray
    classes: np.ndarray
    original_width: int
    original_height: int
    original_boxes: np.ndarray
    image_id: int | None = None


def encode_record(
    record: Record, num_classes: int, max_side: int | None
) -> tuple[EncodedSample | None, list[Problem]]:
    """Check one record and produce the sample to store (None if the image is unusable) plus problems found.

    Keeps the original JPEG bytes unless the image must shrink to ``max_side`` pixels (longest side), is not
    a JPEG, or must be turned; those are re-encoded. The image is decoded as displayed, its EXIF
    orientation applied (labels of every format refer to the image a person saw when drawing them), and a
    JPEG whose EXIF orientation turns or mirrors it (2-8) is stored re-encoded as displayed, without EXIF,
    so no decoder can turn it again. A JPEG with EXIF that needs no turn (orientation absent or 1, most
    photos of most cameras) keeps its bytes: a second lossy compression would cost quality for nothing.
    """
    where = f"{record.file_name} (source id {record.source_id})"
    data, problem = _image_bytes(record, where)
    if data is None:
        return None, [problem]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # EXIF orientation applied
    if image is None:
        return None, [("unreadable_image", where)]
    height, width = image.shape[:2]
    boxes, classes, problems = check_boxes(record.boxes, record.classes, width, height, num_classes, where)
    original_width, original_height, original_boxes = width, height, boxes

    reasons = []
    if max_side is not None and max(width, height) > max_side:
        scale = max_side / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        boxes = boxes * np.array([new_w / width, new_h / height] * 2, np.float32)
        width, height = new_w, new_h
        reasons.append("resized")
    reasons += _reencode_reasons(data)
    if not reasons and data.find(b"Exif\x00\x00", 0, 65536) != -1:
        problems.append(("kept_exif_not_turned", where))
    if reasons:
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            return None, [*problems, ("unreadable_image", f"{where}: JPEG encoding failed")]
        data = buf.tobytes()
        problems.extend((r, where) for r in reasons)
    sample = EncodedSample(
        record.file_name,
        data,
        width,
        height,
        boxes,
        classes,
        original_width,
        original_height,
        original_boxes,
        record.image_id,
    )
    return sample, problems


def _image_bytes(record: Record, where: str) -> tuple[bytes | None, Problem | None]:
    """The record's encoded image (in memory or read from its file), or None and the problem."""
    if record.image_bytes is not None:
        return record.image_bytes, None
    if not record.image_path.is_file():
        return None, ("missing_image", f"{where}: {record.image_path}")
    try:
        return record.image_path.read_bytes(), None
    except OSError as e:
        return None, ("unreadable_image", f"{where}: {e}")


def _reencode_reasons(data: bytes) -> list[str]:
    """Why the encoded image ``data`` cannot be stored as it is: not a JPEG, or an EXIF orientation that
    turns or mirrors it."""
    if data[:3] != b"\xff\xd8\xff":
        return ["reencoded_non_jpeg"]
    frame = jpeg_frame(data)
    return ["reencoded_exif_turned"] if frame is not None and frame[2] != 1 else []


def check_boxes(
    boxes: np.ndarray, classes: np.ndarray, width: int, height: int, num_classes: int, where: str
) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
    """Drop invalid boxes and clip partly-outside ones to the ``width`` x ``height`` image.

    ``boxes``: (N, 4) xyxy pixels; returns float32 (M, 4) boxes, int64 (M,) classes and the problems.
    Dropped: non-finite coordinates, class outside [0, num_classes), x2 <= x1 or y2 <= y1, no overlap
    with the image. Clipped (and counted): boxes that stick out of the image.
    """
    problems: list[Problem] = []
    keep_boxes, keep_classes = [], []
    for box, cls in zip(np.asarray(boxes, np.float64), np.asarray(classes, np.int64), strict=True):
        x1, y1, x2, y2 = box
        text = f"{where}: class {cls} box [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}] in {width}x{height}"
        if not np.isfinite(box).all():
            problems.append(("nonfinite_box", text))
        elif not 0 <= cls < num_classes:
            problems.append(("class_out_of_range", f"{text}, {num_classes} classes"))
        elif x2 <= x1 or y2 <= y1:
            problems.append(("degenerate_box", text))
        elif x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            problems.append(("box_outside_image", text))
        else:
            clipped = np.clip(box, 0, [width, height, width, height])
            if (clipped != box).any():
                problems.append(("box_clipped", text))
            keep_boxes.append(clipped)
            keep_classes.append(cls)
    return np.array(keep_boxes, np.float32).reshape(-1, 4), np.array(keep_classes, np.int64), problems
