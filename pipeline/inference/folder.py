"""Images of a local file or folder run through a model in this process: drawn copies and detections by
file name (``jobs.predict`` without ``--batch``; the Ray Data path is ``batch.py``)."""

from __future__ import annotations

from pathlib import Path

import cv2
import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipeline.data import DataError
from pipeline.plots import draw_boxes, write_rgb
from pipeline.registry.file_detector import FileDetector
from pipeline.storage import StorageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BATCH = 8


def list_images(source: str | Path) -> list[Path]:
    """The image files of ``source`` (one file, or a directory's images sorted by name)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"--source {source} is neither an image file nor a directory")
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{source} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return images


def predict_files(
    model: mlflow.pyfunc.PyFuncModel | FileDetector,
    images: list[Path],
    out: Path,
    conf: float,
    iou: float,
    max_det: int,
) -> tuple[dict[str, dict], list[str]]:
    """Run ``model`` on the image files in batches; write drawn copies into ``out``. Returns the detections
    by file name and the names of the files skipped because they do not decode as images."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    bad: list[str] = []
    for start in range(0, len(images), BATCH):
        decoded = {}
        for path in images[start : start + BATCH]:
            data = path.read_bytes()
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # EXIF orientation applied
            if bgr is None:
                bad.append(path.name)
            else:
                decoded[path] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if not decoded:
            continue
        # the decoded arrays, not the bytes: the model takes HxWx3 RGB arrays as they are (one decode)
        frame = pd.DataFrame({"image": list(decoded.values())})
        predictions = model.predict(frame, params={"conf": conf, "iou": iou, "max_det": max_det})
        for (path, rgb), row in zip(decoded.items(), predictions.to_dict("records"), strict=True):
            det = {k: list(row[k]) for k in ("boxes", "scores", "classes", "class_names")}
            results[path.name] = det
            boxes = np.asarray(det["boxes"], dtype=np.float32).reshape(-1, 4)
            labels = [f"{n} {s:.2f}" for n, s in zip(det["class_names"], det["scores"], strict=True)]
            try:
                write_rgb(draw_boxes(rgb, boxes, labels, (220, 0, 0)), out / path.name)
            except OSError as e:
                raise StorageError(str(e)) from e
    if bad and not results:
        raise DataError(f"none of the {len(bad)} files decodes as an image (first: {bad[0]})")
    return results, bad
