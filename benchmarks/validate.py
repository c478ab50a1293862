"""Where validation time goes, per val image: loading (decode + letterbox), forward, NMS, mapping the
detections back to original pixels, and scoring with pycocotools. One JSON line per phase, then a
total line with the mAP (to check that a faster path scores the same).

Validation settings as in training: conf 0.001, IoU 0.7, at most 300 detections per image, all class
labels above the threshold. A last line times NMS alone on COCO-sized input (640 px: 8400 anchors,
80 classes, a quarter-million candidates per image, capped at 30000) of random boxes and scores.

Without ``--checkpoint`` the model is a randomly initialised one whose class biases are raised by
``--cls-bias-shift`` so that, like a model early in training, it puts thousands of low-score
candidates through NMS (its mAP is meaningless; the timings are not).

    python benchmarks/validate.py [--checkpoint CKPT_DIR] [--data SHARD_ROOT] [--imgsz 160]
                                  [--batch 16] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import ema_model, load_checkpoint
from pipeline.data import read_manifest
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.data.synthetic import SYNTHETIC_CLASSES, synthetic_records
from pipeline.data.writer import write_shards
from pipeline.evaluation.coco import coco_evaluate, detections_from_predictions, load_ground_truth
from yolov9 import build_model
from yolov9.postprocess import non_max_suppression

PHASES = ("load", "forward", "nms", "to_original", "score")


def model_for(args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    """The model to validate and its image size."""
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        model = ema_model(state)
        imgsz = args.imgsz or state.train_image_size()
    else:
        torch.manual_seed(0)
        model = build_model("yolov9-t", num_classes=len(SYNTHETIC_CLASSES))
        for tower in (*model.head.cv3, *getattr(model.head, "cv5", ())):
            tower[-1].bias.data += args.cls_bias_shift
        imgsz = args.imgsz or 160
    # the layout training gives the model (pipeline.training.state), which validation keeps
    return model.to(memory_format=torch.channels_last).eval(), imgsz


@torch.no_grad()
def one_pass(model: torch.nn.Module, root: Path, imgsz: int, batch: int) -> tuple[dict[str, float], dict]:
    """Seconds per phase over the whole val split, and what came out."""
    seconds = dict.fromkeys(PHASES, 0.0)
    manifest = read_manifest(manifest_path(root, "val"))
    loader = make_val_loader(manifest, batch_size=batch, imgsz=imgsz, rank=0, world_size=1, num_workers=0)
    start = time.perf_counter()
    ground_truth = load_ground_truth(coco_json_path(root, "val"))
    seconds["score"] += time.perf_counter() - start
    parts, images_seen, candidates = [], 0, 0
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        item = next(batches, None)
        seconds["load"] += time.perf_counter() - start
        if item is None:
            break
        images, metas = item
        start = time.perf_counter()
        out = model(images.contiguous(memory_format=torch.channels_last).float() / 255)
        seconds["forward"] += time.perf_counter() - start
        candidates += int((out[:, 4:] > 0.001).sum())
        start = time.perf_counter()
        preds = non_max_suppression(out, conf_thres=0.001, iou_thres=0.7, max_det=300, multi_label=True)
        seconds["nms"] += time.perf_counter() - start
        start = time.perf_counter()
        parts.append(detections_from_predictions(preds, metas, ground_truth))
        seconds["to_original"] += time.perf_counter() - start
        images_seen += len(images)
    detections = np.concatenate(parts)
    start = time.perf_counter()
    stats = coco_evaluate(ground_truth, detections).stats
    seconds["score"] += time.perf_counter() - start
    result = {
        "images": images_seen,
        "candidates_per_image": round(candidates / images_seen, 1),
        "detections_per_image": round(len(detections) / images_seen, 1),
        "map50_95": stats["map50_95"],
        "map50": stats["map50"],
    }
    return seconds, result


def coco_scale_nms(batch: int, repeats: int) -> float:
    """Milliseconds per image of NMS on random (B, 84, 8400) head output, the fastest of ``repeats``."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(batch, 2, 8400, generator=g) * 640
    wh = torch.rand(batch, 2, 8400, generator=g) * 150 + 10
    scores = torch.rand(batch, 80, 8400, generator=g) ** 6 * 0.02  # ~40% above conf 0.001
    prediction = torch.cat((xy, wh, scores), 1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        non_max_suppression(prediction, conf_thres=0.001, iou_thres=0.7, max_det=300, multi_label=True)
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--data", type=Path, default=None, help="shard root; default: 64 synthetic images")
    parser.add_argument("--imgsz", type=int, default=None, help="default: the checkpoint's, else 160")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="passes; the fastest of each phase is kept")
    parser.add_argument("--cls-bias-shift", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, imgsz = model_for(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = Path(tmp)  # the demo's val split
            write_shards(synthetic_records(64, 256, seed=1), list(SYNTHETIC_CLASSES), root, "val", 64)
        passes = [one_pass(model, root, imgsz, args.batch) for _ in range(args.repeats)]
    result = passes[-1][1]
    best = {phase: min(p[0][phase] for p in passes) for phase in PHASES}
    total = sum(best.values())
    common = {"benchmark": "validate", "imgsz": imgsz, "batch": args.batch, "threads": args.threads}
    for phase in PHASES:
        ms = 1000 * best[phase] / result["images"]
        print(
            json.dumps(
                common
                | {"phase": phase, "ms_per_image": round(ms, 3), "share": round(best[phase] / total, 3)}
            )
        )
    print(
        json.dumps(
            common | {"phase": "total", "ms_per_image": round(1000 * total / result["images"], 3)} | result
        )
    )
    ms = coco_scale_nms(8, args.repeats)
    print(
        json.dumps(
            common | {"phase": "nms_coco_scale", "imgsz": 640, "batch": 8, "ms_per_image": round(ms, 3)}
        )
    )


if __name__ == "__main__":
    main()
