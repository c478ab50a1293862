"""An HTTP request to the detection endpoint read into images and NMS parameters, or refused with a 4xx
status and a message that says what is wrong with it.

Two ways to send images:

* the JSON the registered pyfunc model takes under ``mlflow models serve`` (``Content-Type:
  application/json``): ``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}`` or
  ``{"dataframe_records": [{"image": "<base64>"}, ...]}`` or ``{"inputs": ["<base64>", ...]}``, with
  ``"params": {"conf": ..., "iou": ..., "max_det": ...}`` beside it;
* one image's raw bytes (``Content-Type: image/jpeg``, ``image/png``, ...), parameters in the query string
  (``POST /?conf=0.4``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.image_header import image_size
from pipeline.registry.serving import ServingInputError, check_params, decode_image

JSON_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances")


class RequestError(ValueError):
    """A request the endpoint refuses: ``status`` is the HTTP status to answer (400, 413, 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may carry: ``max_body_bytes`` of body, ``max_images`` images, ``max_pixels`` per
    image (width x height, read from its header before it is decoded)."""

    max_body_bytes: int = 32 * 2**20
    max_images: int = 64
    max_pixels: int = 64_000_000


@dataclass(frozen=True)
class Detection:
    """What a request asks: HxWx3 uint8 RGB images and the checked NMS parameters (conf, iou, max_det)."""

    images: list[np.ndarray]
    params: dict[str, Any]

    def params_key(self) -> tuple[float, float, int]:
        """Requests with equal keys can share one forward pass and one NMS call."""
        return self.params["conf"], self.params["iou"], self.params["max_det"]


def read_request(body: bytes, content_type: str, query: dict[str, str], limits: Limits) -> Detection:
    """``body`` (its ``content_type``) and the query string -> the images and parameters it asks for.
    RequestError (400 bad request, 413 too large, 415 unsupported type) otherwise."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"the body is {len(body)} bytes, over the limit of {limits.max_body_bytes}")
    if not body:
        raise RequestError(400, "the body is empty: send JSON with base64 images, or an image's bytes")
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json":
        encoded, params = _json_images(body)
        if query:
            raise RequestError(
                400, f"parameters go in the JSON's 'params' with JSON input, not the query: {sorted(query)}"
            )
    elif kind.startswith("image/") or kind == "application/octet-stream":
        encoded, params = [body], _query_params(query)
    else:
        raise RequestError(415, f"Content-Type {kind or '(none)'}: send application/json or image/*")
    if len(encoded) > limits.max_images:
        raise RequestError(
            413, f"{len(encoded)} images in one request, over the limit of {limits.max_images}"
        )
    try:
        checked = check_params(params)
    except ServingInputError as e:
        raise RequestError(400, str(e)) from e
    return Detection([_image(data, i, limits) for i, data in enumerate(encoded)], checked)


def _json_images(body: bytes) -> tuple[list[bytes], dict[str, Any]]:
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from e
    if not isinstance(request, dict):
        raise RequestError(400, f"the JSON must be an object with one of {list(JSON_KEYS)}")
    unknown = sorted(set(request) - {*JSON_KEYS, "params"})
    given = [k for k in JSON_KEYS if k in request]
    if unknown or len(given) != 1:
        raise RequestError(
            400, f"the JSON must hold one of {list(JSON_KEYS)} and 'params'; it has {sorted(request)}"
        )
    params = request.get("params") or {}
    if not isinstance(params, dict):
        raise RequestError(400, '\'params\' must be an object: {"conf": 0.25, "iou": 0.45, "max_det": 300}')
    texts = _image_cells(given[0], request[given[0]])
    if not texts:
        raise RequestError(400, "the request holds no images")
    return [_base64(text, i) for i, text in enumerate(texts)], params


def _image_cells(key: str, value: Any) -> list[Any]:
    """The image cells of each accepted JSON layout (MLflow's scoring-server layouts, image column only)."""
    if key == "dataframe_split":
        if (
            not isinstance(value, dict)
            or value.get("columns") != ["image"]
            or not isinstance(value.get("data"), list)
        ):
            raise RequestError(
                400, 'dataframe_split must be {"columns": ["image"], "data": [["<base64>"], ...]}'
            )
        return [row[0] if isinstance(row, list) and len(row) == 1 else row for row in value["data"]]
    if not isinstance(value, list):
        raise RequestError(400, f"{key} must be a list of images")
    return [row.get("image") if isinstance(row, dict) else row for row in value]


def _base64(text: Any, index: int) -> bytes:
    if not isinstance(text, str):
        raise RequestError(400, f"image {index}: expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image {index}: not base64 ({e})") from e


def _query_params(query: dict[str, str]) -> dict[str, Any]:
    try:
        return {k: (int(v) if k == "max_det" else float(v)) for k, v in query.items()}
    except ValueError as e:
        raise RequestError(400, f"query parameters must be numbers: {dict(query)} ({e})") from e


def _image(data: bytes, index: int, limits: Limits) -> np.ndarray:
    """One encoded image decoded as the pyfunc model decodes it; too many pixels is refused unread."""
    if not data:
        raise RequestError(400, f"image {index}: empty")
    size = image_size(data)
    if size is not None and size[0] * size[1] > limits.max_pixels:
        raise RequestError(
            413, f"image {index}: {size[0]}x{size[1]} pixels, over the limit of {limits.max_pixels}"
        )
    try:
        return decode_image(data, index)
    except ServingInputError as e:
        raise RequestError(400, str(e)) from e
