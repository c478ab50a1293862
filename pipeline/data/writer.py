"""Check records and write them as WebDataset tar shards plus a manifest (and COCO ground truth for val).

Each sample is ``<key>.jpg`` + ``<key>.json``, key = 9-digit index of the sample within the split. Tars are
byte-for-byte deterministic (sorted members, mtime 0, no owner), so the manifest's sha256 identify content.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import storage
from pipeline.data.encode import JPEG_QUALITY, EncodedSample, Problem, encode_record
from pipeline.data.manifest import (
    DataError,
    Manifest,
    ShardInfo,
    coco_json_path,
    manifest_path,
    shard_name,
    write_json_atomic,
    write_manifest,
)
from pipeline.data.readers import Record, Report, SourceGroundTruth
from pipeline.storage import Location

log = logging.getLogger(__name__)

KEY_DIGITS = 9
SPLIT_PATTERN = re.compile(r"[A-Za-z0-9_]+")
# Records handed to the worker pool per round: bounds memory when records carry their image bytes.
RECORDS_PER_WORKER_ROUND = 64


def write_tar(path: Location, members: list[tuple[str, bytes]]) -> str:
    """Write ``members`` (name, bytes) sorted by name into a deterministic tar at a local path or a URL;
    returns its sha256 hex. The tar is built in memory (one shard: ``shard_size`` samples) so that an
    object store receives it in one upload."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))
    data = buffer.getvalue()
    storage.write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_shards(
    records: Iterable[Record],
    class_names: list[str],
    out_dir: Location,
    split: str,
    shard_size: int = 1000,
    max_side: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
    report: Report | None = None,
    ground_truth: SourceGroundTruth | None = None,
) -> Manifest:
    """Check ``records``, write ``out_dir/<split>-NNNNNN.tar`` shards of ``shard_size`` samples (``out_dir``:
    a local folder or a URL such as ``s3://bucket/prefix``), then the
    manifest (atomically, last) and, for split "val", ``val-coco.json``: the ground truth the split is
    scored on, at the ORIGINAL resolution whatever ``max_side`` does (``val_ground_truth``).

    A sample's ``image_id`` is its record's (unique, else DataError) or, without one, its index + 1.

    ``max_side``: downscale images whose longest side exceeds it (pixels), scaling boxes alike.
    ``workers``: processes that decode/encode images (started with "spawn", so a calling script needs the
    usual ``if __name__ == "__main__":`` guard). ``report`` (e.g. the reader's) is extended with the
    writer's problems, printed to stderr and stored in the manifest. Raises DataError for an output that
    already holds this split (unless ``overwrite``), bad settings, or when no valid sample remains.
    """
    _check_settings(class_names, split, shard_size, max_side, workers)
    out_dir = storage.locate(out_dir)
    storage.make_dirs(out_dir)
    _clear_output(out_dir, split, overwrite)
    report = report if report is not None else Report()
    total = len(records) if hasattr(records, "__len__") else None
    encode = partial(encode_record, num_classes=len(class_names), max_side=max_side)

    packer = _ShardPacker(out_dir, split, shard_size)
    truth = _ValGroundTruth(ground_truth, class_names, report)
    seen = 0
    progress = tqdm(total=total, desc=f"{split} shards", unit="img", file=sys.stderr, disable=None)
    with progress:
        for sample, problems in _map_in_order(encode, records, workers):
            progress.update()
            seen += 1
            report.extend(problems)
            if sample is None:
                continue
            image_id = packer.add(sample)
            if split == "val":
                truth.add(sample, image_id)
    packer.flush()
    shards = packer.shards
    log.info("%s: %d samples in %d shards; report:\n%s", split, packer.count, len(shards), report.summary())
    if not shards:
        raise DataError(f"no valid sample for split {split!r} out of {seen} records: {dict(report.counts)}")
    if split == "val":
        write_json_atomic(coco_json_path(out_dir, split), truth.to_dict())
    settings = {"shard_size": shard_size, "max_side": max_side, "jpeg_quality": JPEG_QUALITY}
    return _finish(out_dir, split, class_names, shards, source, settings, report)


def _finish(
    out_dir: Location,
    split: str,
    class_names: list[str],
    shards: list[ShardInfo],
    source: dict[str, Any] | None,
    settings: dict[str, Any],
    report: Report,
) -> Manifest:
    """Write the split's manifest, last and atomically: it is what marks the split complete."""
    manifest = Manifest(
        path=_resolved(manifest_path(out_dir, split)),
        split=split,
        class_names=list(class_names),
        shards=shards,
        source=dict(source or {}),
        settings={**settings, "key_digits": KEY_DIGITS},
    )
    write_manifest(manifest, report.to_dict())
    return manifest


@dataclass
class _ShardPacker:
    """Samples packed into ``<split>-NNNNNN.tar`` shards of ``shard_size`` as they come, each written as
    soon as it is full; ``count`` samples so far, keyed by their index."""

    out_dir: Location
    split: str
    shard_size: int
    shards: list[ShardInfo] = field(default_factory=list)
    members: list[tuple[str, bytes]] = field(default_factory=list)
    boxes: int = 0
    ids: dict[int, str] = field(default_factory=dict)
    count: int = 0

    def add(self, sample: EncodedSample) -> int:
        """Pack ``sample``; returns its image id (its own, unique, else DataError; without one index + 1)."""
        key = f"{self.count:0{KEY_DIGITS}d}"
        image_id = sample.image_id if sample.image_id is not None else self.count + 1
        if image_id in self.ids:
            raise DataError(f"image id {image_id} of {sample.file_name} is already {self.ids[image_id]}'s")
        self.ids[image_id] = sample.file_name
        meta = _sample_json(sample, image_id)
        self.members += [(f"{key}.jpg", sample.jpeg), (f"{key}.json", json.dumps(meta).encode())]
        self.boxes += len(sample.boxes)
        self.count += 1
        if self.count % self.shard_size == 0:
            self.flush()
        return image_id

    def flush(self) -> None:
        """Write the shard being packed, if it holds any sample."""
        if self.members:
            self.shards.append(_flush(self.out_dir, self.split, len(self.shards), self.members, self.boxes))
            self.members, self.boxes = [], 0


def _check_settings(
    class_names: list[str], split: str, shard_size: int, max_side: int | None, workers: int
) -> None:
    if not class_names or not all(isinstance(n, str) and n for n in class_names):
        raise DataError(f"class_names must be a non-empty list of non-empty strings, got {class_names!r}")
    if not SPLIT_PATTERN.fullmatch(split):
        raise DataError(f"split name {split!r} must be letters, digits or underscores")
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise DataError(f"max_side must be >= 1 pixel, got {max_side}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")


def _resolved(location: Location) -> Location:
    return location.resolve() if isinstance(location, Path) else location


def _clear_output(out_dir: Location, split: str, overwrite: bool) -> None:
    """Refuse to mix with an earlier write of ``split``; with ``overwrite``, remove it (manifest first, so
    an interrupted rewrite never leaves a manifest that lists stale shards)."""
    shard_re = re.compile(rf"{split}-\d{{6}}\.tar")
    present = storage.list_names(out_dir)
    meta = [n for n in (f"{split}-manifest.json", f"{split}-coco.json") if n in present]
    existing = meta + [n for n in present if shard_re.fullmatch(n)]
    if not existing:
        return
    if not overwrite:
        names = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise DataError(
            f"{out_dir} already holds split {split!r} ({names}); pass overwrite=True (--overwrite)"
        )
    for name in existing:
        storage.delete(storage.locate(out_dir, name))


def _map_in_order(
    fn: Any, records: Iterable[Record], workers: int
) -> Iterator[tuple[EncodedSample | None, list[Problem]]]:
    """``map(fn, records)`` in order, over ``workers`` processes, a bounded batch of records at a time."""
    if workers == 1:
        yield from map(fn, records)
        return
    # spawn: forking a process that already runs threads (Ray, tqdm) can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        it = iter(records)
        while batch := list(itertools.islice(it, workers * RECORDS_PER_WORKER_ROUND)):
            yield from pool.map(fn, batch, chunksize=max(1, math.ceil(len(batch) / (4 * workers))))


def _sample_json(sample: EncodedSample, image_id: int) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "file_name": sample.file_name,
        "width": sample.width,
        "height": sample.height,
        # Millipixel precision: exact enough, and keeps float32 noise out of the JSON.
        "boxes": [[round(float(v), 3) for v in box] for box in sample.boxes],
        "classes": [int(c) for c in sample.classes],
    }


class _ValGroundTruth:
    """The val split's COCO ground truth, built one stored sample at a time: the source's own annotations
    (``SourceGroundTruth``) where it has them, else the checked boxes (category id = class + 1, area
    w * h, iscrowd 0); either way at the original resolution, under the samples' image ids."""

    def __init__(self, source: SourceGroundTruth | None, class_names: list[str], report: Report) -> None:
        self.source, self.report = source, report
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = (
            source.categories if source else [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
        )

    def add(self, sample: EncodedSample, image_id: int) -> None:
        width, height = sample.original_width, sample.original_height
        if self.source is not None and image_id in self.source.images:
            entry = self.source.images[image_id]
            if (entry.get("width"), entry.get("height")) != (width, height):
                given = f"{entry.get('width')}x{entry.get('height')}"
                self.report.add(
                    "image_size_mismatch", f"{sample.file_name}: {given} in the file, {width}x{height}"
                )
            self.images.append(entry | {"width": width, "height": height})
            self.annotations += self.source.annotations[image_id]
            return
        self.images.append({"id": image_id, "file_name": sample.file_name, "width": width, "height": height})
        for box, cls in zip(sample.original_boxes.tolist(), sample.classes.tolist(), strict=True):
            x1, y1, x2, y2 = (round(v, 3) for v in box)
            w, h = round(x2 - x1, 3), round(y2 - y1, 3)
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}


def _flush(
    out_dir: Location, split: str, index: int, members: list[tuple[str, bytes]], boxes: int
) -> ShardInfo:
    name = shard_name(split, index)
    sha256 = write_tar(storage.locate(out_dir, name), members)
    return ShardInfo(name=name, samples=len(members) // 2, boxes=boxes, sha256=sha256)
