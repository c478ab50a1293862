"""Batch inference with Ray Data: the images of a source (``inputs.py``) streamed through CPU tasks that
decode and letterbox them, then through a pool of actors that each hold the pruned network (``model.py``)
and run it with NMS on their device; the driver writes the answers as Parquet parts while they arrive.

The answers are those of the registered pyfunc model (``pipeline.registry.serving``): the same decoding
(EXIF orientation applied), letterbox, network, NMS and mapping back to original pixels. A file that is
empty, not an image, or larger than ``max_pixels`` is no error: it is written to the bad-files parts with
its reason. Rerunning with the same ``out`` skips every path its parts already hold.

Layout of ``out`` (a folder or an object-store prefix)::

    detections/part-NNNNN.parquet   path, width, height, boxes (xyxy pixels), scores, classes,
                                    class_names, model_uri, model_version
    bad_files/part-NNNNN.parquet    path, reason
    detections-coco.json            with --coco-json: a COCO dataset (images, categories, and the
                                    detections as annotations with their score)
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipeline import storage
from pipeline.data import DataError
from pipeline.data.image_header import image_size
from pipeline.data.letterbox import letterbox
from pipeline.inference.inputs import read_inputs
from pipeline.inference.model import BatchModel
from pipeline.registry.serving import Letterboxed, ServingInputError, check_params, decode_image, postprocess
from pipeline.storage import Location
from yolov9.postprocess import non_max_suppression

log = logging.getLogger(__name__)
DETECTIONS, BAD_FILES, COCO_JSON = "detections", "bad_files", "detections-coco.json"
ROWS_PER_PART = 5000
PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class BatchOptions:
    """How a batch job runs: images per model call, the actor pool's size (it grows from ``min_actors`` to
    ``max_actors`` with the backlog), one GPU per actor, the NMS settings, and the largest image (pixels)
    that is decoded."""

    batch_size: int = 16
    min_actors: int = 1
    max_actors: int = 2
    gpu: bool = False
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 300
    max_pixels: int = 64_000_000


@dataclass
class BatchSummary:
    """What a batch job did in this run (images already answered by an earlier run are not counted)."""

    images: int = 0
    detections: int = 0
    bad_files: int = 0
    skipped: int = 0  # answered by an earlier run with this ``out``
    seconds: float = 0.0
    max_actors: int = 0  # the pool's limit on this cluster (``fit_to_cluster``)
    bad_reasons: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.images} images, {self.detections} detections, {self.bad_files} bad files, "
            f"{self.skipped} answered before; {rate:.1f} images/s"
        )


def fit_to_cluster(options: BatchOptions, resources: dict[str, float]) -> BatchOptions:
    """``options`` with an actor pool the cluster can hold beside its readers: CPU actors leave one CPU
    for reading files (with every CPU held by a model actor, Ray Data's read tasks never start and the job
    waits forever); GPU actors are at most the cluster's GPUs."""
    if options.gpu:
        room = int(resources.get("GPU", 0))
        if room < 1:
            raise DataError("--gpu: the Ray cluster has no GPU")
    else:
        room = max(int(resources.get("CPU", 1)) - 1, 1)
    if options.max_actors <= room:
        return options
    log.info(
        "%d model actors at most: %d leave room for the readers on this cluster", room, options.max_actors
    )
    return replace(options, min_actors=min(options.min_actors, room), max_actors=room)


def decode_batch(
    batch: dict[str, np.ndarray], imgsz: int, max_pixels: int, done: frozenset[str]
) -> dict[str, np.ndarray]:
    """CPU step: each ``{path, bytes}`` row decoded and letterboxed to ``imgsz`` (uint8 (S, S, 3) RGB), or
    marked bad with its reason (the image then is padding only); rows in ``done`` are dropped."""
    keep = [i for i, p in enumerate(batch["path"]) if str(p) not in done]
    n = len(keep)
    out = {
        "path": np.array([str(batch["path"][i]) for i in keep], dtype=object),
        "image": np.full((n, imgsz, imgsz, 3), 114, dtype=np.uint8),
        "ratio": np.ones(n),
        "pad": np.zeros((n, 2), dtype=np.int64),
        "width": np.zeros(n, dtype=np.int64),
        "height": np.zeros(n, dtype=np.int64),
        "bad": np.array([""] * n, dtype=object),
    }
    for row, i in enumerate(keep):
        data = bytes(batch["bytes"][i])
        image, reason = _decoded(data, max_pixels)
        if image is None:
            out["bad"][row] = reason
            continue
        out["image"][row], out["ratio"][row], out["pad"][row] = letterbox(image, imgsz)
        out["height"][row], out["width"][row] = image.shape[:2]
    return out


def _decoded(data: bytes, max_pixels: int) -> tuple[np.ndarray | None, str]:
    """The HxWx3 uint8 RGB image as the pyfunc model decodes it, or None and why not."""
    if not data:
        return None, "empty file"
    size = image_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        return None, f"too large: {size[0]}x{size[1]} pixels (max_pixels {max_pixels})"
    try:
        return decode_image(data), ""
    except ServingInputError:
        return None, "not a decodable image"


class Detector:
    """One actor of the pool: the network on its device (a GPU when it was given one), NMS there too."""

    def __init__(self, model: BatchModel, options: BatchOptions) -> None:
        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        self.spec, self.uri, self.version = model.spec, model.uri, model.version
        self.device = torch.device("cuda" if options.gpu and torch.cuda.is_available() else "cpu")
        self.model = model.build(self.device)
        self.nms = check_params({"conf": options.conf, "iou": options.iou, "max_det": options.max_det})

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        good = np.flatnonzero(batch["bad"] == "")
        answers: list[dict[str, Any]] = [_empty() for _ in batch["path"]]
        if len(good):
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][good])).to(self.device)
            images = images.permute(0, 3, 1, 2).float() / 255
            preds = self.model(images)
            detections = non_max_suppression(
                preds.float(),
                conf_thres=self.nms["conf"],
                iou_thres=self.nms["iou"],
                max_det=self.nms["max_det"],
            )
            boxed = Letterboxed(
                images=images,
                ratios=[float(batch["ratio"][i]) for i in good],
                pads=[(int(batch["pad"][i][0]), int(batch["pad"][i][1])) for i in good],
                shapes=[(int(batch["height"][i]), int(batch["width"][i])) for i in good],
            )
            for i, answer in zip(good, postprocess(detections, boxed, self.spec.class_names), strict=True):
                answers[i] = answer
        return {
            "path": list(batch["path"]),
            "width": list(batch["width"]),
            "height": list(batch["height"]),
            "boxes": [a["boxes"] for a in answers],
            "scores": [a["scores"] for a in answers],
            "classes": [a["classes"] for a in answers],
            "class_names": [a["class_names"] for a in answers],
            "model_uri": [self.uri] * len(answers),
            "model_version": [self.version] * len(answers),
            "bad": list(batch["bad"]),
        }


def _empty() -> dict[str, list]:
    return {"boxes": [], "scores": [], "classes": [], "class_names": []}


class PartWriter:
    """Rows gathered on the driver and written as ``<folder>/part-NNNNN.parquet`` every ``rows_per_part``
    rows (each part whole or absent: ``storage.write_bytes``), numbered on from the parts already there."""

    def __init__(self, folder: Location, rows_per_part: int = ROWS_PER_PART) -> None:
        self.folder, self.rows_per_part = folder, rows_per_part
        self.next = len(_parts(folder))
        self.rows: list[dict[str, Any]] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows += rows
        if len(self.rows) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rows), buffer)
        storage.write_bytes(storage.locate(self.folder, f"part-{self.next:05d}.parquet"), buffer.getvalue())
        self.next, self.rows = self.next + 1, []


def _parts(folder: Location) -> list[Location]:
    return [storage.locate(folder, n) for n in storage.list_names(folder) if n.endswith(".parquet")]


def answered_paths(out: Location) -> frozenset[str]:
    """Every path the detection and bad-file parts in ``out`` already hold."""
    paths: set[str] = set()
    for folder in (storage.locate(out, DETECTIONS), storage.locate(out, BAD_FILES)):
        for part in _parts(folder):
            table = pq.read_table(io.BytesIO(storage.read_bytes(part)), columns=["path"])
            paths.update(table.column("path").to_pylist())
    return frozenset(paths)


def run_batch_inference(
    source: str, out: str, model: BatchModel, options: BatchOptions, coco_json: bool = False
) -> BatchSummary:
    """Answer every image of ``source`` not yet answered in ``out`` on the connected Ray cluster; see the
    module docstring for what is written. Returns the summary of this run."""
    out_location = storage.locate(out)
    storage.make_dirs(out_location)
    done = answered_paths(out_location)
    summary = BatchSummary(skipped=len(done))
    if done:
        log.info("%d images of %s were answered by an earlier run: skipping them", len(done), out)
    options = fit_to_cluster(options, ray.cluster_resources())
    summary.max_actors = options.max_actors
    model_ref = ray.put(model)
    dataset = (
        read_inputs(source)
        .map_batches(
            decode_batch,
            fn_kwargs={"imgsz": model.spec.imgsz, "max_pixels": options.max_pixels, "done": done},
            batch_size=options.batch_size,
            batch_format="numpy",
        )
        .map_batches(
            Detector,
            fn_constructor_args=(model_ref, options),
            batch_size=options.batch_size,
            batch_format="numpy",
            concurrency=(options.min_actors, options.max_actors),
            num_gpus=1 if options.gpu else 0,
        )
    )
    detections = PartWriter(storage.locate(out_location, DETECTIONS))
    bad_files = PartWriter(storage.locate(out_location, BAD_FILES))
    started = last_line = time.monotonic()
    for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
        _record(batch, detections, bad_files, summary)
        if time.monotonic() - last_line > PROGRESS_EVERY_S:
            last_line = time.monotonic()
            summary.seconds = last_line - started
            log.info("so far: %s", summary.line())
    detections.flush()
    bad_files.flush()
    summary.seconds = time.monotonic() - started
    if coco_json:
        write_coco_json(out_location, model.spec.class_names)
    return summary


def _record(batch: Any, detections: PartWriter, bad_files: PartWriter, summary: BatchSummary) -> None:
    rows = batch.to_dict("records")
    bad = [{"path": r["path"], "reason": r["bad"]} for r in rows if r["bad"]]
    good = [{k: _plain(v) for k, v in r.items() if k != "bad"} for r in rows if not r["bad"]]
    detections.add(good)
    bad_files.add(bad)
    summary.images += len(good)
    summary.detections += sum(len(r["boxes"]) for r in good)
    summary.bad_files += len(bad)
    for b in bad:
        kind = b["reason"].split(":")[0]
        summary.bad_reasons[kind] = summary.bad_reasons.get(kind, 0) + 1


def _plain(value: Any) -> Any:
    """numpy values (Ray Data hands lists back as arrays) as plain Python for Parquet."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_coco_json(out: Location, class_names: list[str]) -> Location:
    """``detections-coco.json`` from every detection part in ``out``: images (ids in path order), the
    categories, and each detection as an annotation (bbox xywh pixels) with its score."""
    rows = []
    for part in _parts(storage.locate(out, DETECTIONS)):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(part))).to_pylist()
    rows.sort(key=lambda r: r["path"])
    images, annotations = [], []
    for image_id, row in enumerate(rows, start=1):
        images.append(
            {"id": image_id, "file_name": row["path"], "width": row["width"], "height": row["height"]}
        )
        for box, score, cls in zip(row["boxes"], row["scores"], row["classes"], strict=True):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "score": score,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": n} for i, n in enumerate(class_names)]
    target = storage.locate(out, COCO_JSON)
    storage.write_bytes(
        target, json.dumps({"images": images, "annotations": annotations, "categories": categories}).encode()
    )
    return target
