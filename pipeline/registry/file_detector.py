"""A detector read straight from a weights file, with the registered model's ``predict`` interface.

``python -m jobs.predict --model yolov9-c.pt`` runs a reference checkpoint file (read without executing
it) or a checkpoint of this project (its EMA weights) without registering it first: the model is pruned
and fused as registration would, and requests and answers are those of
:class:`pipeline.registry.serving.YoloDetector`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.registry.serving import check_params, detect, request_images
from pipeline.weights.pretrained import load_source
from yolov9 import prune

DEFAULT_IMGSZ = 640  # a reference file's training size; a project checkpoint brings its own


class FileDetector:
    """The pruned model of a weights file, its class names and input size (pixels)."""

    def __init__(self, path: str | Path, imgsz: int | None = None) -> None:
        source = load_source(path)
        self.imgsz = imgsz or source.imgsz or DEFAULT_IMGSZ
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError(f"imgsz must be a positive multiple of 32, got {self.imgsz}")
        names = list(source.class_names)
        if len(names) != source.num_classes:  # a file without names: the class indices stand in
            names = [str(i) for i in range(source.num_classes)]
        self.class_names = names
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = prune(source.model).to(device)

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Detections per image of ``model_input`` (an ``image`` column), as the registered model answers."""
        p = check_params(params)
        results = detect(
            self.model,
            request_images(model_input),
            self.imgsz,
            self.class_names,
            conf=p["conf"],
            iou=p["iou"],
            max_det=p["max_det"],
        )
        return pd.DataFrame(results, columns=["boxes", "scores", "classes", "class_names"])
