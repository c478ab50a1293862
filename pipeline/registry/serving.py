"""The registered model: a pruned YOLOv9 wrapped with its pre- and post-processing as an MLflow pyfunc.

A caller sends images and gets detections in the pixels of the images it sent:

* input: a pandas DataFrame with an ``image`` column, each cell an HxWx3 uint8 RGB array, encoded
  image bytes (JPEG, PNG), or those bytes base64-encoded (what a JSON client of ``mlflow models
  serve`` sends: ``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}``);
* params: ``conf`` (class-score threshold), ``iou`` (NMS IoU threshold), ``max_det`` (boxes per image);
* output: a DataFrame, one row per image: ``boxes`` (n lists ``[x1, y1, x2, y2]``, original-image
  pixels), ``scores`` (n floats), ``classes`` (n class indices), ``class_names`` (n strings).

The model directory holds no pickled torch module: the pruned network's ``state_dict`` (loaded with
``weights_only=True`` into a freshly built and pruned architecture) and a JSON spec naming that
architecture.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema

from pipeline.data.letterbox import letterbox, unletterbox_boxes
from yolov9 import DetectionModel, build_model, prune
from yolov9.postprocess import non_max_suppression

SPEC_ARTIFACT = "spec"
WEIGHTS_ARTIFACT = "weights"
IMAGE_COLUMN = "image"
DEFAULT_PARAMS = {"conf": 0.25, "iou": 0.45, "max_det": 300}


class ServingInputError(ValueError):
    """A request the model cannot serve; the message names the offending image or parameter."""


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild the pruned network: architecture name, classes, square input size (pixels)."""

    model_name: str
    num_classes: int
    class_names: list[str]
    imgsz: int

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.num_classes} classes but {len(self.class_names)} class names")
        if self.imgsz < 32 or self.imgsz % 32:
            raise ValueError(f"imgsz must be a positive multiple of 32, got {self.imgsz}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            raw = json.loads(text)
            return cls(
                model_name=str(raw["model_name"]),
                num_classes=int(raw["num_classes"]),
                class_names=[str(c) for c in raw["class_names"]],
                imgsz=int(raw["imgsz"]),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"not a model spec JSON: {type(e).__name__}: {e}") from e


def pruned_architecture(spec: ModelSpec) -> DetectionModel:
    """An untrained pruned (main-branch, fused) network of ``spec``, whose state_dict keys match a
    pruned trained model's."""
    return prune(build_model(spec.model_name, num_classes=spec.num_classes))


def load_pruned(spec: ModelSpec, weights: str | Path, device: str | torch.device = "cpu") -> DetectionModel:
    """The pruned network of ``spec`` with the state_dict saved at ``weights`` (weights_only), eval mode."""
    model = pruned_architecture(spec)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not hold weights of a pruned {spec.model_name}: {e}") from e
    return model.to(device).eval()


def decode_image(item: Any, index: int = 0) -> np.ndarray:
    """One request image -> HxWx3 uint8 RGB array.

    ``item``: an HxWx3 uint8 RGB array, encoded image bytes, or their base64 text. ``index`` names the
    image in errors.
    """
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3 or min(item.shape[:2]) < 1:
            raise ServingInputError(
                f"image {index}: arrays must be HxWx3 uint8 RGB, got {item.dtype} of shape {item.shape}"
            )
        return item
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ServingInputError(
                f"image {index}: a string must be base64 of encoded image bytes ({e})"
            ) from e
    if isinstance(item, (bytes, bytearray, memoryview)):
        decoded = cv2.imdecode(np.frombuffer(item, dtype=np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ServingInputError(f"image {index}: {len(item)} bytes that do not decode as an image")
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    raise ServingInputError(
        f"image {index}: expected an HxWx3 uint8 array, image bytes or base64 text, got {type(item).__name__}"
    )


def request_images(model_input: pd.DataFrame) -> list[np.ndarray]:
    """The images of a pyfunc request (a DataFrame with an ``image`` column; MLflow turns JSON requests into
    one) as HxWx3 uint8 RGB arrays."""
    if not isinstance(model_input, pd.DataFrame):
        raise ServingInputError(
            f"expected a DataFrame with an '{IMAGE_COLUMN}' column, got {type(model_input).__name__}"
        )
    if IMAGE_COLUMN not in model_input.columns:
        raise ServingInputError(
            f"the input needs an '{IMAGE_COLUMN}' column, has {list(model_input.columns)}"
        )
    if model_input.empty:
        raise ServingInputError("the request holds no images")
    return [decode_image(item, i) for i, item in enumerate(model_input[IMAGE_COLUMN])]


@dataclass(frozen=True)
class Letterboxed:
    """A batch ready for the network and how to map its boxes back.

    images: float32 (B, 3, S, S) RGB in [0, 1]; ratios[i], pads[i] (left, top) as returned by ``letterbox``;
    shapes[i] the original (h, w) in pixels.
    """

    images: torch.Tensor
    ratios: list[float]
    pads: list[tuple[int, int]]
    shapes: list[tuple[int, int]]


def preprocess(images: Sequence[np.ndarray], imgsz: int) -> Letterboxed:
    """Letterbox HxWx3 uint8 RGB images to ``imgsz`` squares, exactly as the val loader does."""
    boxed = [letterbox(image, imgsz) for image in images]
    batch = np.stack([b[0] for b in boxed]).transpose(0, 3, 1, 2)
    return Letterboxed(
        images=torch.from_numpy(np.ascontiguousarray(batch)).float() / 255,
        ratios=[b[1] for b in boxed],
        pads=[b[2] for b in boxed],
        shapes=[image.shape[:2] for image in images],
    )


def check_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` merged over the defaults, validated: conf and iou in [0, 1], max_det >= 1."""
    unknown = sorted(set(params or {}) - set(DEFAULT_PARAMS))
    if unknown:
        raise ServingInputError(f"unknown params {unknown}; the model takes {sorted(DEFAULT_PARAMS)}")
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    conf, iou, max_det = float(merged["conf"]), float(merged["iou"]), int(merged["max_det"])
    if not (0 <= conf <= 1 and 0 <= iou <= 1):
        raise ServingInputError(f"conf and iou must be in [0, 1], got conf={conf}, iou={iou}")
    if max_det < 1:
        raise ServingInputError(f"max_det must be >= 1, got {max_det}")
    return {"conf": conf, "iou": iou, "max_det": max_det}


def postprocess(
    detections: Sequence[torch.Tensor], batch: Letterboxed, class_names: Sequence[str]
) -> list[dict]:
    """NMS output ((n, 6) [x1, y1, x2, y2, score, class], letterboxed pixels) -> per-image dicts with boxes
    in original-image pixels, clipped to the image."""
    out = []
    for det, ratio, pad, (h, w) in zip(detections, batch.ratios, batch.pads, batch.shapes, strict=True):
        det = det.detach().float().cpu().numpy()
        boxes = unletterbox_boxes(det[:, :4], ratio, pad)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        classes = det[:, 5].astype(int)
        out.append(
            {
                "boxes": boxes.astype(float).round(2).tolist(),
                "scores": det[:, 4].astype(float).round(5).tolist(),
                "classes": classes.tolist(),
                "class_names": [class_names[c] for c in classes],
            }
        )
    return out


@torch.no_grad()
def detect(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    imgsz: int,
    class_names: Sequence[str],
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
) -> list[dict]:
    """Detections of ``model`` on HxWx3 uint8 RGB ``images``: one dict per image (see :func:`postprocess`)."""
    batch = preprocess(images, imgsz)
    device = next(model.parameters()).device
    preds = model(batch.images.to(device))
    detections = non_max_suppression(preds.float(), conf_thres=conf, iou_thres=iou, max_det=max_det)
    return postprocess(detections, batch, class_names)


class YoloDetector(mlflow.pyfunc.PythonModel):
    """The pyfunc model. Stateless when logged; ``load_context`` builds the network from the artifacts."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec = ModelSpec.from_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_pruned(self.spec, context.artifacts[WEIGHTS_ARTIFACT], device)

    # model_input is left unannotated: MLflow turns a type hint there into input validation of its own,
    # which would override the signature that registry.signature() declares.
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input, params: dict[str, Any] | None = None
    ):
        """Detections per request image, see the module docstring; returns a DataFrame, one row per image."""
        p = check_params(params)
        results = detect(
            self.model,
            request_images(model_input),
            self.spec.imgsz,
            self.spec.class_names,
            conf=p["conf"],
            iou=p["iou"],
            max_det=p["max_det"],
        )
        return pd.DataFrame(results, columns=["boxes", "scores", "classes", "class_names"])


def signature() -> ModelSignature:
    """Input: an ``image`` column (base64 or raw encoded bytes, or HxWx3 uint8 arrays from Python);
    params conf/iou/max_det; output: per-image boxes (xyxy pixels), scores, classes, class names."""
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(Array(Array("double")), "boxes"),
                ColSpec(Array("double"), "scores"),
                ColSpec(Array("long"), "classes"),
                ColSpec(Array("string"), "class_names"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("conf", "double", DEFAULT_PARAMS["conf"]),
                ParamSpec("iou", "double", DEFAULT_PARAMS["iou"]),
                ParamSpec("max_det", "long", DEFAULT_PARAMS["max_det"]),
            ]
        ),
    )


def encode_jpeg(image_rgb: np.ndarray, quality: int = 95) -> bytes:
    """HxWx3 uint8 RGB -> JPEG bytes."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError(f"could not JPEG-encode an image of shape {image_rgb.shape}")
    return buf.tobytes()


# Models from code: MLflow logs this file and runs it when loading, so no Python object is pickled.
mlflow.models.set_model(YoloDetector())
