"""Pictures logged with a run: training curves and validation images with boxes drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np


def plot_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Loss and mAP per epoch, as a PNG. ``history`` holds one metrics dict per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 4))
    loss_keys = sorted(
        {k for h in history for k in h if k.startswith("train/") and k.endswith(("box", "cls", "dfl"))}
    )
    for key in loss_keys:
        ax_loss.plot(epochs, [h.get(key, np.nan) for h in history], label=key.removeprefix("train/"))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=7)
    for key in ("val/map50_95", "val/map50"):
        ax_map.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key.removeprefix("val/"))
    ax_map.set_xlabel("epoch")
    ax_map.set_title("validation mAP (EMA, main branch)")
    ax_map.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def draw_boxes(
    image_rgb: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    color: tuple[int, int, int],
    thickness: int = 2,
) -> np.ndarray:
    """Copy of an HxWx3 uint8 RGB image with xyxy pixel boxes and their labels drawn."""
    out = np.ascontiguousarray(image_rgb.copy())
    for (x1, y1, x2, y2), label in zip(boxes.round().astype(int).tolist(), labels, strict=True):
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        cv2.putText(out, label, (x1, max(y1 - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
    return out


def image_grid(images: Sequence[np.ndarray], columns: int = 4) -> np.ndarray:
    """Tile equally sized HxWx3 images into one picture (row-major, black padding)."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return grid
