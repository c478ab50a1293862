"""A synthetic detection set: distinct filled shapes on cluttered backgrounds, with exact boxes.

Made to be learnable in minutes by a small detector on CPU (large objects, strong contrast, four shapes that
differ in outline) while still needing real features (textures, clutter lines, colour variety, overlap).
Every image is a pure function of (seed, index), so a seed always gives the same JPEG bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.manifest import DataError, Manifest
from pipeline.data.readers import Record
from pipeline.data.writer import write_shards

SYNTHETIC_CLASSES = ("circle", "square", "triangle", "cross")
OBJECT_SIDE = (0.16, 0.35)  # object size as a fraction of the shorter image side
MAX_IOU = 0.25  # overlap allowed between two objects' boxes
MIN_CONTRAST = 90  # grey-level gap between an object's colour and the background level
JPEG_QUALITY = 92


def synthetic_records(
    num: int, image_size: int | tuple[int, int] = 256, seed: int = 0, max_objects: int = 6
) -> Iterator[Record]:
    """Records with in-memory JPEG bytes of ``image_size`` pixels (an int, or (width, height)), lazily.

    Each image holds 1..``max_objects`` shapes; boxes are the tight xyxy pixel boxes of the drawn shapes
    and classes index SYNTHETIC_CLASSES. Raises DataError at once (not on first use) for bad arguments.
    """
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    if num < 0 or min(width, height) < 32 or max_objects < 1:
        raise DataError(
            f"synthetic set needs num >= 0, image sides >= 32 px and max_objects >= 1; "
            f"got num={num}, image_size={image_size}, max_objects={max_objects}"
        )
    return _generate(num, width, height, seed, max_objects)


def _generate(num: int, width: int, height: int, seed: int, max_objects: int) -> Iterator[Record]:
    for index in range(num):
        image, boxes, classes = render_image(np.random.default_rng([seed, index]), width, height, max_objects)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"OpenCV failed to encode synthetic image {index} as JPEG")
        yield Record(
            f"{seed}-{index}", f"synthetic_{index:06d}.jpg", boxes, classes, image_bytes=jpeg.tobytes()
        )


def render_image(
    rng: np.random.Generator, width: int, height: int, max_objects: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image. Returns uint8 (height, width, 3) BGR, float32 (N, 4) xyxy pixel boxes, int64 (N,)."""
    level = int(rng.integers(30, 226))
    image = _background(rng, width, height, level)
    boxes: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(30):
            cls = int(rng.integers(len(SYNTHETIC_CLASSES)))
            mask = _shape_mask(rng, SYNTHETIC_CLASSES[cls], width, height)
            x, y, w, h = cv2.boundingRect(mask)  # tight box of the non-zero pixels
            box = np.array([x, y, x + w, y + h], np.float32)
            if all(_iou(box, other) <= MAX_IOU for other in boxes):
                _paint(rng, image, mask, (x, y, w, h), level)
                boxes.append(box)
                classes.append(cls)
                break
    return image, np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int64)


def write_synthetic_dataset(
    root: str | Path,
    num_train: int = 512,
    num_val: int = 64,
    image_size: int | tuple[int, int] = 256,
    seed: int = 0,
    shard_size: int = 128,
    workers: int = 1,
    overwrite: bool = False,
) -> tuple[Manifest, Manifest]:
    """Write the train split (``seed``) and val split (``seed + 1``, with val-coco.json) into ``root``."""
    manifests = []
    for split, num, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
        source = {"format": "synthetic", "num": num, "image_size": image_size, "seed": split_seed}
        records = synthetic_records(num, image_size, split_seed)
        manifests.append(
            write_shards(
                records, list(SYNTHETIC_CLASSES), root, split, shard_size, None, workers, overwrite, source
            )
        )
    return manifests[0], manifests[1]


def _background(rng: np.random.Generator, width: int, height: int, level: int) -> np.ndarray:
    """A gradient around grey ``level`` with a colour tint, noise and thin clutter lines."""
    tint = rng.uniform(-25, 25, size=3).astype(np.float32)
    horizontal = rng.random() < 0.5
    ramp = np.linspace(-30, 30, width if horizontal else height, dtype=np.float32) * rng.choice([-1, 1])
    base = (ramp[None, :] if horizontal else ramp[:, None])[..., None] + (level + tint)
    # Uniform noise of spread ``amp`` grey levels, from raw random bytes: several times cheaper than normal
    # samples, and rendering time is dominated by the noise.
    amp = np.float32(rng.uniform(10, 40))
    noise = np.frombuffer(rng.bytes(height * width * 3), np.uint8).reshape(height, width, 3)
    image = (base - amp / 2) + noise * (amp / 255)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 12))):
        p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
        p2 = tuple(int(v) for v in rng.integers(0, [width, height]))
        shade = np.clip(level + rng.uniform(-50, 50, size=3), 0, 255)
        cv2.line(image, p1, p2, [float(c) for c in shade], int(rng.integers(1, 3)))
    return image


def _shape_mask(rng: np.random.Generator, shape: str, width: int, height: int) -> np.ndarray:
    """uint8 (height, width) mask of one shape placed wholly inside the image."""
    side = rng.uniform(*OBJECT_SIDE) * min(width, height)
    r = side / 2
    # Every outline point lies within 1.06 r of the centre (the cross's arm corners are the farthest).
    margin = 1.06 * r + 1
    cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
    mask = np.zeros((height, width), np.uint8)
    if shape == "circle":
        cv2.circle(mask, (round(cx), round(cy)), round(r), 1, -1)
        return mask
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        points, max_turn = [(x * r / math.sqrt(2), y * r / math.sqrt(2)) for x, y in corners], 15
    elif shape == "triangle":
        points, max_turn = [(r * math.cos(a), r * math.sin(a)) for a in np.radians([-90, 30, 150])], 20
    else:  # cross: a plus sign with arms a third of its span thick
        a, t = r, r / 3
        quarter = [(-t, a), (t, a), (t, t)]  # one arm's end and the inner corner after it
        points = [
            (x * c90 - y * s90, x * s90 + y * c90)
            for c90, s90 in ((1, 0), (0, -1), (-1, 0), (0, 1))
            for x, y in quarter
        ]
        max_turn = 15
    turn = math.radians(rng.uniform(-max_turn, max_turn))
    c, s = math.cos(turn), math.sin(turn)
    polygon = np.array([(cx + x * c - y * s, cy + x * s + y * c) for x, y in points])
    cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
    return mask


def _paint(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, rect: tuple[int, int, int, int], level: int
) -> None:
    """Fill ``mask`` (non-zero within ``rect`` = x, y, w, h) in ``image`` with a colour far from the
    background ``level``: solid, striped or noisy."""
    grey = rng.uniform(level + MIN_CONTRAST, 255) if level < 128 else rng.uniform(0, level - MIN_CONTRAST)
    colour = np.clip(grey + rng.uniform(-60, 60, size=3), 0, 255).astype(np.float32)
    x, y, w, h = rect
    ys, xs = np.nonzero(mask[y : y + h, x : x + w])
    ys, xs = ys + y, xs + x
    texture = int(rng.integers(3))
    if texture == 1:
        period, angle = rng.uniform(4, 10), rng.uniform(0, math.pi)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi / period)
        shade = 20 * np.sin(phase)[:, None]
    elif texture == 2:
        shade = rng.normal(0, 12, size=(len(ys), 1))
    else:
        shade = np.zeros((len(ys), 1))
    image[ys, xs] = np.clip(colour + shade, 0, 255).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))
