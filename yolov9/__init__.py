"""YOLOv9 in pure PyTorch: GELAN blocks, dual-branch (PGI) models, pruning to the deployable model."""

from yolov9.model import MODEL_NAMES, DetectionModel, build_model
from yolov9.prune import fuse, prune
from yolov9.reference import ReferenceInfo, load_reference_checkpoint

__all__ = [
    "MODEL_NAMES",
    "DetectionModel",
    "ReferenceInfo",
    "build_model",
    "fuse",
    "load_reference_checkpoint",
    "prune",
]
