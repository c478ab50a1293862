"""Serve a registered model over HTTP on the Ray cluster (Ray Serve): requests batched onto the replicas'
model, replicas scaled with load, an alias followed as it moves.

    python -m jobs.serve --model models:/yolov9-det@champion
    curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/?conf=0.3'

Runs on the attached cluster (``--address`` or ``RAY_ADDRESS``), else a local instance, until Ctrl-C
or SIGTERM; listens on 127.0.0.1 unless ``--host`` says otherwise. ``pipeline/endpoint/`` says what a
request holds and what the answer is.
"""

from __future__ import annotations

import argparse

from jobs.cli import run
from pipeline.endpoint.deployment import EndpointOptions, run_endpoint
from pipeline.endpoint.request import Limits
from pipeline.tracking import resolve_tracking_uri
from pipeline.weights.published import published_weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help="models:/NAME@alias (followed), models:/NAME/V, a .pt or a published name (yolov9-c)",
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    parser.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else local)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000)
    d = EndpointOptions()
    parser.add_argument(
        "--max-batch-size", type=int, default=d.max_batch_size, help="requests per forward pass"
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=d.batch_wait_s * 1000, help="wait for a batch to fill"
    )
    parser.add_argument("--min-replicas", type=int, default=d.min_replicas)
    parser.add_argument("--max-replicas", type=int, default=d.max_replicas)
    parser.add_argument(
        "--target-ongoing",
        type=float,
        default=d.target_ongoing_requests,
        help="requests per replica the autoscaler aims at",
    )
    parser.add_argument(
        "--upscale-delay-s", type=float, default=d.upscale_delay_s, help="over the target this long: one more"
    )
    parser.add_argument(
        "--downscale-delay-s", type=float, default=d.downscale_delay_s, help="under it this long: one fewer"
    )
    parser.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica)
    parser.add_argument("--gpu", action="store_true", help="one GPU per replica")
    parser.add_argument(
        "--poll-s",
        type=float,
        default=d.poll_s,
        help="how often an alias is asked for its version (0: never)",
    )
    parser.add_argument("--max-body-mb", type=float, default=Limits().max_body_bytes / 2**20)
    parser.add_argument("--max-images", type=int, default=Limits().max_images, help="images per request")
    args = parser.parse_args(argv)
    options = EndpointOptions(
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing,
        upscale_delay_s=args.upscale_delay_s,
        downscale_delay_s=args.downscale_delay_s,
        cpus_per_replica=args.cpus_per_replica,
        gpu=args.gpu,
        poll_s=args.poll_s,
        limits=Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images),
    )
    model = published_weights(args.model)
    run_endpoint(model, resolve_tracking_uri(args.tracking_uri), options, args.host, args.port, args.address)


if __name__ == "__main__":
    run(main)
