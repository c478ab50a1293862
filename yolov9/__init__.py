"""YOLOv9 in pure PyTorch: GELAN blocks, dual-branch (PGI) models, pruning to the deployable model."""

from yolov9.model import MODEL_NAMES, DetectionModel, build_model
from yolov9.prune import fuse, prune

__all__ = ["MODEL_NAMES", "DetectionModel", "build_model", "fuse", "prune"]
