"""Pictures logged with a run: training curves, precision-recall curves, the confusion matrix and
validation images with boxes drawn."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)


def drawn(what: str, draw: Callable[[], Path]) -> list[Path]:
    """``[draw()]``, or ``[]`` and one warning naming ``what`` when drawing or writing it fails: a picture
    is a view of a run, and a plotting library's failure (a font, a backend, a full disk) must never cost
    the run, its checkpoint or its metrics."""
    try:
        return [draw()]
    except Exception as e:  # noqa: BLE001 -- whatever the plotting stack raises
        log.warning("%s not drawn (%s: %s); going on without it", what, type(e).__name__, e)
        return []


def write_rgb(image: np.ndarray, path: str | Path) -> Path:
    """An RGB uint8 HxWx3 image as a picture file (PNG/JPEG by the suffix); OSError when none was written
    (OpenCV reports a failed write only by its return value)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return Path(path)


def plot_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Loss and mAP per epoch, as a PNG. ``history`` holds one metrics dict per epoch."""
    plt = pyplot()
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


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only backend, loaded when a picture is first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(
    precision: np.ndarray, recall: np.ndarray, class_names: Sequence[str], ap50: np.ndarray, path: str | Path
) -> Path:
    """Precision against recall at IoU 0.5, one curve per class with its AP50 in the legend, as a PNG.

    ``precision``: (R, K) COCO's interpolated precision at ``recall`` (R,); -1 (undefined: a class
    without ground truth) is not drawn."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for k, name in enumerate(class_names):
        if ap50[k] > -1:
            ax.plot(recall, precision[:, k], linewidth=1, label=f"{name} {ap50[k]:.3f}")
    defined = ap50[ap50 > -1]
    if defined.size:
        mean = np.where(precision > -1, precision, np.nan)[:, ap50 > -1]
        ax.plot(recall, np.nanmean(mean, 1), "k", linewidth=2.5, label=f"all classes {defined.mean():.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("precision-recall at IoU 0.5 (COCO interpolation; legend: AP50)")
    ax.legend(fontsize=7, loc="lower left", ncol=1 + len(class_names) // 20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], conf: float, iou: float, path: str | Path
) -> Path:
    """The ``(K + 1, K + 1)`` counts (row: true class, column: detected class, last: background) as a PNG,
    each row coloured by its share of the row total, counts written in the cells up to 30 classes."""
    plt = pyplot()
    labels = [*class_names, "background"]
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = min(4 + 0.45 * len(labels), 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="detected", ylabel="true")
    ax.set_title(f"confusion matrix (counts; score >= {conf}, IoU >= {iou})")
    if len(labels) <= 31:
        for (r, c), n in np.ndenumerate(matrix):
            if n:
                ax.text(
                    c,
                    r,
                    str(n),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w" if shares[r, c] > 0.5 else "k",
                )
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class's row")
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
