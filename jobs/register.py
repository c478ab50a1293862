"""Register the best checkpoint of a training run, or a reference checkpoint file, in the MLflow registry.

    python -m jobs.register --run RUN_ID --name yolov9-det
    python -m jobs.register --run runs/ray/demo/checkpoint_... --name yolov9-det --data data/synthetic
    python -m jobs.register --run yolov9-tune --name yolov9-det --promote
    python -m jobs.register --weights yolov9-c-converted.pt --data /mnt/shared/coco --name yolov9-c-coco
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.register --run RUN_ID

``--run`` is an MLflow run id (its ``best_checkpoint`` tag), a checkpoint directory or file, or an
experiment name (its latest run with a ``best_checkpoint`` tag). Exits 2 with the reason when the
checkpoint fails verification; nothing is registered then. ``--weights`` is a reference checkpoint
file (read without executing it): its mAP on the val shards of ``--data`` is measured and tagged, its
lineage is the file's sha256.

Where the work runs: with a Ray cluster to attach to (``--address``, or ``RAY_ADDRESS``, which ``ray job
submit`` sets) a ``--run`` registration is a Ray task with the resources of one worker of the training
(its CPUs, a GPU when it trained on GPUs), so the head only orchestrates; otherwise it runs here.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

from mlflow.tracking import MlflowClient

from jobs.cli import run
from pipeline.registry.on_ray import register_on_ray, source_run_resources
from pipeline.registry.register import REFERENCE_IMGSZ, register, register_reference
from pipeline.registry.source import resolve_source
from pipeline.registry.verify import MAP_TOLERANCE
from pipeline.tracking import check_tracking_uri, resolve_tracking_uri
from pipeline.weights.published import published_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="MLflow run id, checkpoint path, or experiment name")
    source.add_argument(
        "--weights", help="a reference checkpoint file or a published name (yolov9-c, gelan-c, ...)"
    )
    parser.add_argument("--name", default="yolov9-det", help="registered model name")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    parser.add_argument(
        "--data", default=None, help="val shard root (default: the training config's data.root)"
    )
    parser.add_argument("--experiment", default=None, help="experiment of the registration run")
    parser.add_argument(
        "--map-tolerance",
        type=float,
        default=MAP_TOLERANCE,
        help="allowed difference between re-measured and recorded val mAP@0.5:0.95",
    )
    parser.add_argument(
        "--imgsz", type=int, default=REFERENCE_IMGSZ, help="input side for --weights (pixels)"
    )
    parser.add_argument("--promote", action="store_true", help="move the champion alias whatever the mAP")
    parser.add_argument(
        "--address", default=None, help="Ray cluster to run the --run checks on (default: RAY_ADDRESS)"
    )
    args = parser.parse_args(argv)
    if args.weights is not None and args.data is None:
        parser.error("--weights needs --data (the val shards its mAP is measured on)")
    uri = resolve_tracking_uri(args.tracking_uri)
    if args.weights is not None:
        result = register_reference(
            published_weights(args.weights),
            args.name,
            uri,
            args.data,
            imgsz=args.imgsz,
            promote=args.promote,
            experiment=args.experiment,
        )
    elif args.address or os.environ.get("RAY_ADDRESS"):
        from pipeline.training.ray_train import ensure_ray  # Ray loads only for a cluster registration

        check_tracking_uri(uri)
        src = resolve_source(args.run, MlflowClient(uri))
        ensure_ray(args.address)
        result = register_on_ray(
            src,
            args.name,
            uri,
            source_run_resources(src, uri),
            promote=args.promote,
            data_root=args.data,
            experiment=args.experiment,
            map_tolerance=args.map_tolerance,
        )
    else:
        result = register(
            args.run,
            args.name,
            uri,
            promote=args.promote,
            data_root=args.data,
            experiment=args.experiment,
            map_tolerance=args.map_tolerance,
        )
    print(f"registered {result.model_uri} (run {result.logging_run_id})")
    print(json.dumps({"verification": asdict(result.verification), "tags": result.tags}, indent=2))
    return 0


if __name__ == "__main__":
    run(main)
