"""Letterboxing: an image resized to fit a square, aspect ratio kept, centred on grey padding; and its
boxes mapped into and out of it. The geometry that validation, prediction and the served model share with
training (images HxWx3 uint8; boxes (N, 4) xyxy in pixel-edge coordinates, as in ``augment.py``).
"""

from __future__ import annotations

import cv2
import numpy as np

PAD_VALUE = 114


def letterbox(
    image: np.ndarray, new_size: int, pad_value: int = PAD_VALUE
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize ``image`` (HxWx3) to fit a ``new_size`` square keeping its aspect ratio, centred on padding.

    Returns (new_size x new_size x 3 image, ratio, (pad_left, pad_top)) where ratio = min(new/h, new/w) and
    a point (x, y) of the input lands at (x * ratio + pad_left, y * ratio + pad_top).
    """
    check_image(image)
    h, w = image.shape[:2]
    ratio = min(new_size / h, new_size / w)
    nw, nh = min(round(w * ratio), new_size), min(round(h * ratio), new_size)
    pad_left, pad_top = (new_size - nw) // 2, (new_size - nh) // 2
    out = np.full((new_size, new_size, 3), pad_value, dtype=np.uint8)
    # INTER_AREA avoids aliasing when shrinking; it equals bilinear when enlarging.
    interp = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
    resized = image if (nw, nh) == (w, h) else cv2.resize(image, (nw, nh), interpolation=interp)
    out[pad_top : pad_top + nh, pad_left : pad_left + nw] = resized
    return out, ratio, (pad_left, pad_top)


def letterbox_boxes(boxes: np.ndarray, ratio: float, pad: tuple[float, float]) -> np.ndarray:
    """Map (N, 4) xyxy boxes of the original image into the letterboxed image (inverse of unletterbox)."""
    offset = np.array([pad[0], pad[1], pad[0], pad[1]], dtype=np.float64)
    return (np.asarray(boxes, dtype=np.float64) * ratio + offset).astype(np.float32)


def unletterbox_boxes(boxes: np.ndarray, ratio: float, pad: tuple[float, float]) -> np.ndarray:
    """Map (N, 4) xyxy boxes of a letterboxed image back to pixels of the original image."""
    offset = np.array([pad[0], pad[1], pad[0], pad[1]], dtype=np.float64)
    return ((np.asarray(boxes, dtype=np.float64) - offset) / ratio).astype(np.float32)


def check_image(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is a non-empty HxWx3 uint8 array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an HxWx3 uint8 image, got {got}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has an empty side: {image.shape}")
