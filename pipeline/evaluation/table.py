"""An evaluation shown to people: the readable table ``jobs.evaluate`` prints, its JSON, and the files a
training run logs (per-class CSV, precision-recall curves, confusion matrix)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline import names
from pipeline.evaluation.confusion import CONF_THRES, IOU_THRES
from pipeline.evaluation.evaluate import Evaluation
from pipeline.plots import drawn, plot_confusion_matrix, plot_pr_curves

# pycocotools' own wording of its 12 numbers, in its order (pipeline.evaluation.coco.STATS)
STAT_LABELS = {
    "map50_95": "AP    IoU=0.50:0.95 area=all    maxDets=100",
    "map50": "AP    IoU=0.50      area=all    maxDets=100",
    "map75": "AP    IoU=0.75      area=all    maxDets=100",
    "map_small": "AP    IoU=0.50:0.95 area=small  maxDets=100",
    "map_medium": "AP    IoU=0.50:0.95 area=medium maxDets=100",
    "map_large": "AP    IoU=0.50:0.95 area=large  maxDets=100",
    "ar1": "AR    IoU=0.50:0.95 area=all    maxDets=  1",
    "ar10": "AR    IoU=0.50:0.95 area=all    maxDets= 10",
    "ar100": "AR    IoU=0.50:0.95 area=all    maxDets=100",
    "ar_small": "AR    IoU=0.50:0.95 area=small  maxDets=100",
    "ar_medium": "AR    IoU=0.50:0.95 area=medium maxDets=100",
    "ar_large": "AR    IoU=0.50:0.95 area=large  maxDets=100",
}


def per_class_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One row per class: name, objects (non-crowd ground-truth boxes), AP50-95 and AP50 (-1: no
    ground truth), in model class order."""
    objects = evaluation.confusion.sum(1)
    scores = evaluation.scores
    return [
        {
            "class": name,
            "objects": int(objects[k]),
            "ap50_95": float(scores.ap50_95[k]),
            "ap50": float(scores.ap50[k]),
        }
        for k, name in enumerate(evaluation.class_names)
    ]


def format_table(evaluation: Evaluation) -> str:
    """The 12 COCO numbers, then per-class AP, then the confusion counts summed, as aligned text."""
    lines = ["COCO bbox (pycocotools; -: nothing of that size in the ground truth)"]
    lines += [f"  {STAT_LABELS[k]}  {_figure(v)}" for k, v in evaluation.scores.stats.items()]
    rows = per_class_rows(evaluation)
    width = max(len("class"), *(len(r["class"]) for r in rows))
    lines += ["", f"  {'class':<{width}}  {'objects':>7}  {'AP50-95':>7}  {'AP50':>7}"]
    for r in rows:
        lines.append(
            f"  {r['class']:<{width}}  {r['objects']:>7}  {_figure(r['ap50_95'])}  {_figure(r['ap50'])}"
        )
    matrix, k = evaluation.confusion, len(evaluation.class_names)
    right = int(matrix[:k, :k].trace())
    lines += [
        "",
        f"  at score >= {CONF_THRES}, IoU >= {IOU_THRES}: {right} objects found with the right class, "
        f"{int(matrix[:k, :k].sum()) - right} with a wrong one, {int(matrix[:k, k].sum())} missed, "
        f"{int(matrix[k, :k].sum())} false positives",
    ]
    return "\n".join(lines)


def _figure(value: float) -> str:
    """A score in 7 characters; COCO's -1 (undefined) as a dash."""
    return f"{value:7.3f}" if value > -1 else f"{'-':>7}"


def report_dict(evaluation: Evaluation) -> dict[str, Any]:
    """The same as JSON-ready data: ``stats``, ``per_class`` rows and the ``confusion_matrix``."""
    return {
        "stats": dict(evaluation.scores.stats),
        "per_class": per_class_rows(evaluation),
        "confusion_matrix": {
            "conf_thres": CONF_THRES,
            "iou_thres": IOU_THRES,
            "labels": [*evaluation.class_names, "background"],
            "rows_true_columns_detected": evaluation.confusion.tolist(),
        },
        "detections": len(evaluation.detections),
    }


def write_per_class_csv(evaluation: Evaluation, path: str | Path) -> Path:
    rows = per_class_rows(evaluation)
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["class", "objects", "ap50_95", "ap50"])
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def write_artifacts(evaluation: Evaluation, directory: str | Path) -> list[Path]:
    """The per-class CSV, the precision-recall curves and the confusion matrix, in ``directory`` under
    the names in ``pipeline.names``; a picture that fails to draw is left out with a warning."""
    directory = Path(directory)
    scores = evaluation.scores
    pr_curves = directory / names.PR_CURVES_PNG
    confusion = directory / names.CONFUSION_PNG
    return [
        write_per_class_csv(evaluation, directory / names.PER_CLASS_CSV),
        *drawn(
            "the precision-recall curves",
            lambda: plot_pr_curves(
                scores.precision[0], scores.recall_thresholds, evaluation.class_names, scores.ap50, pr_curves
            ),
        ),
        *drawn(
            "the confusion matrix",
            lambda: plot_confusion_matrix(
                evaluation.confusion, evaluation.class_names, CONF_THRES, IOU_THRES, confusion
            ),
        ),
    ]
