"""Detect objects with a registered model or a weights file: images with boxes drawn, a JSON of detections;
or, at scale, Parquet files of detections computed on the Ray cluster with Ray Data.

    python -m jobs.predict --model models:/yolov9-det@champion --source IMAGE_OR_DIR --out DIR
    python -m jobs.predict --model yolov9-c.pt --source IMAGE_OR_DIR --out DIR --imgsz 640
    python -m jobs.predict --model models:/yolov9-det@champion --source s3://bucket/photos/ \
        --out s3://bucket/detections/ [--gpu] [--max-actors 8] [--coco-json]

``--model`` is a model URI, or a local file: a reference checkpoint (``yolov9-c.pt``, read without
executing it) or a checkpoint of this project (its EMA weights), pruned as registration would.

Writes ``DIR/<image name>`` (boxes drawn) for every image and ``DIR/detections.json``:
``{"<image name>": {"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "classes": [...],
"class_names": [...]}}`` with boxes in the pixels of the source image. A file that does not decode as an
image is skipped, named and counted in the summary line; none decoding is an error.

With ``--batch`` (implied when the source or the output is a URL, or the source is a list file or a shard
manifest) the job runs on the attached Ray cluster (``--address`` or ``RAY_ADDRESS``, else a local
instance): ``pipeline/inference/batch.py`` says what it writes; rerunning it skips what is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow.pyfunc
from mlflow.exceptions import MlflowException

from jobs.cli import run
from pipeline import storage
from pipeline.data import DataError
from pipeline.inference.folder import list_images, predict_files
from pipeline.inference.inputs import LIST_SUFFIX, MANIFEST_SUFFIX
from pipeline.registry.file_detector import FileDetector
from pipeline.tracking import TrackingError, check_model_store, resolve_tracking_uri
from pipeline.weights.published import published_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model URI (models:/yolov9-det@champion), a weights file (.pt) or a published name (yolov9-c)",
    )
    parser.add_argument("--source", required=True, help="an image file or a directory of images")
    parser.add_argument("--out", required=True, help="output directory (or, with --batch, a URL)")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--iou", type=float, default=0.45)
    parser.add_argument("--max-det", type=int, default=300)
    parser.add_argument(
        "--imgsz", type=int, default=None, help="input side for a weights file (default: its own, else 640)"
    )
    batch = parser.add_argument_group("at scale, on the Ray cluster (Ray Data)")
    batch.add_argument("--batch", action="store_true", help="write Parquet detections with Ray Data")
    batch.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else local)")
    batch.add_argument("--batch-size", type=int, default=16, help="images per model call")
    batch.add_argument("--min-actors", type=int, default=1, help="model actors to start with")
    batch.add_argument("--max-actors", type=int, default=2, help="model actors the pool may grow to")
    batch.add_argument("--gpu", action="store_true", help="one GPU per model actor")
    batch.add_argument("--max-pixels", type=int, default=64_000_000, help="larger images are bad files")
    batch.add_argument("--coco-json", action="store_true", help="also write detections-coco.json")
    args = parser.parse_args(argv)
    if args.imgsz is not None and (args.imgsz < 32 or args.imgsz % 32):
        parser.error(f"--imgsz must be a positive multiple of 32, got {args.imgsz}")
    args.model = published_weights(args.model)
    if args.batch or at_scale(args.source, str(args.out)):
        return predict_at_scale(args)
    images = list_images(args.source)
    if Path(args.model).is_file():
        model = FileDetector(args.model, args.imgsz)
    else:
        uri = resolve_tracking_uri(args.tracking_uri)
        if args.model.startswith(("models:/", "runs:/")):
            check_model_store(uri, args.model)
        mlflow.set_tracking_uri(uri)
        try:
            model = mlflow.pyfunc.load_model(args.model)
        except MlflowException as e:
            raise TrackingError(f"cannot load --model {args.model}: {e.message}") from e
    out = Path(args.out)
    results, bad = predict_files(model, images, out, args.conf, args.iou, args.max_det)
    (out / "detections.json").write_text(json.dumps(results, indent=1))
    total = sum(len(r["boxes"]) for r in results.values())
    skipped = f", {len(bad)} bad files skipped ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})"
    print(f"{total} detections in {len(results)} images{skipped if bad else ''} -> {out}")
    return 0


def at_scale(source: str, out: str) -> bool:
    """Whether a source or an output is one only the Ray Data path serves."""
    listed = source.endswith(LIST_SUFFIX) or source.endswith(MANIFEST_SUFFIX)
    return listed or storage.is_url(source) or storage.is_url(out)


def predict_at_scale(args: argparse.Namespace) -> int:
    """``--batch``: the Ray Data job over ``--source`` into ``--out``; prints its summary line."""
    import ray

    from pipeline.inference.batch import BatchOptions, run_batch_inference
    from pipeline.inference.model import resolve_model
    from pipeline.training.ray_train import ensure_ray

    if args.batch_size < 1 or not 1 <= args.min_actors <= args.max_actors:
        raise DataError("--batch-size must be >= 1 and 1 <= --min-actors <= --max-actors")
    model = resolve_model(args.model, resolve_tracking_uri(args.tracking_uri), args.imgsz)
    options = BatchOptions(
        batch_size=args.batch_size,
        min_actors=args.min_actors,
        max_actors=args.max_actors,
        gpu=args.gpu,
        conf=args.conf,
        iou=args.iou,
        max_det=args.max_det,
        max_pixels=args.max_pixels,
    )
    started = not ray.is_initialized()
    ensure_ray(args.address)
    try:
        summary = run_batch_inference(args.source, args.out, model, options, coco_json=args.coco_json)
    finally:
        if started:
            ray.shutdown()
    reasons = ", ".join(f"{n} {k}" for k, n in sorted(summary.bad_reasons.items()))
    print(f"{summary.line()}{f' (bad: {reasons})' if reasons else ''} -> {args.out}")
    return 0


if __name__ == "__main__":
    run(main)
