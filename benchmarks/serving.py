"""The detection endpoint (``python -m jobs.serve``, Ray Serve) against ``mlflow models serve`` on the same
registered model, images and machine: requests/s and p50/p99 latency of a bounded number of requests sent
by ``--concurrency`` clients, one JSON line per server.

The model is a reference-format file registered in a fresh sqlite store (default: the suite's fixture
``gelan-t-nc3.pt``, random weights, 3 classes; ``--weights`` takes a published name or any reference
file of 3 classes) at ``--imgsz``; the images are the val JPEGs of a generated shard set. Each request is
one image in the pyfunc model's JSON (what both servers take). Servers run one after the other, on
127.0.0.1, each started as a user types it; their start is not timed.

    python benchmarks/serving.py [--requests 200] [--concurrency 8] [--imgsz 320] [--max-replicas 1]
                                 [--cpus-per-replica 1] [--max-batch-size 8]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "reference-checkpoints" / "gelan-t-nc3.pt"
NAME = "bench"


def emit(**fields: object) -> None:
    print(json.dumps({"benchmark": "serving", **fields}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(folder: Path, weights: str, imgsz: int, images: int) -> tuple[str, list[bytes]]:
    """A sqlite store in ``folder`` with ``weights`` registered as ``bench`` (alias champion), and the
    request bodies: one val JPEG each, as the pyfunc model's JSON."""
    import dataclasses

    from mlflow.tracking import MlflowClient

    from pipeline.data.synthetic import SYNTHETIC_CLASSES, synthetic_records
    from pipeline.data.writer import write_shards
    from pipeline.registry.register import register_reference
    from pipeline.weights.published import published_weights

    shards = folder / "shards"
    records = []
    for r in synthetic_records(images, imgsz, seed=0):
        keep = r.classes < 3
        records.append(dataclasses.replace(r, boxes=r.boxes[keep], classes=r.classes[keep]))
    write_shards(records, list(SYNTHETIC_CLASSES[:3]), shards, "val", shard_size=images)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    version = register_reference(published_weights(weights), NAME, uri, shards, imgsz=imgsz).version
    MlflowClient(uri).set_registered_model_alias(NAME, "champion", str(version))
    bodies = []
    for jpeg in sorted((shards).glob("val-*.tar")):
        import tarfile

        with tarfile.open(jpeg) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    image = base64.b64encode(tar.extractfile(member).read()).decode()
                    split = {"columns": ["image"], "data": [[image]]}
                    bodies.append(json.dumps({"dataframe_split": split}).encode())
    return uri, bodies


def serve(
    command: list[str], folder: Path, env: dict[str, str], url: str, timeout_s: float
) -> subprocess.Popen:
    """Start a server as typed and wait until ``url`` answers."""
    log_path = folder / "server.log"
    log = log_path.open("wb")
    server = subprocess.Popen(
        command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                raise SystemExit(
                    f"error: {command[:4]} did not come up:\n{log_path.read_text()[-3000:]}"
                ) from None
            time.sleep(1)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict[str, float]:
    """``requests`` POSTs from ``concurrency`` threads (after 2 warm-up ones); latency percentiles in ms."""

    def one(i: int) -> tuple[float, bool]:
        request = urllib.request.Request(url, data=bodies[i % len(bodies)], method="POST")
        request.add_header("Content-Type", "application/json")
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                ok = response.status == 200 and bool(json.loads(response.read()))
        except (urllib.error.URLError, OSError):
            ok = False
        return (time.perf_counter() - start) * 1000, ok

    for i in range(2):
        one(i)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(ms for ms, _ in results)
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests_per_s": round(requests / wall, 2),
        "p50_ms": round(q[49], 1),
        "p99_ms": round(q[98], 1),
        "errors": sum(not ok for _, ok in results),
        "seconds": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights", default=str(FIXTURE), help="a reference file or published name, 3 classes"
    )
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--images", type=int, default=16, help="distinct images the requests cycle through")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-replicas", type=int, default=1)
    parser.add_argument(
        "--cpus-per-replica", type=float, default=1, help="Ray sets a replica's torch threads"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        folder = Path(tmp)
        uri, bodies = prepare(folder, args.weights, args.imgsz, args.images)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        # mlflow models serve starts uvicorn by name: this interpreter's scripts first on the PATH
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        common = {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "imgsz": args.imgsz,
            "cpus": os.cpu_count(),
        }
        port = free_port()
        mlflow_bin = str(Path(sys.executable).parent / "mlflow")
        command = [mlflow_bin, "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                   "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
        server = serve(command, folder, env, f"http://127.0.0.1:{port}/ping", 300)
        try:
            figures = load(f"http://127.0.0.1:{port}/invocations", bodies, args.requests, args.concurrency)
        finally:
            stop(server)
        emit(server="mlflow_models_serve", **common, **figures)
        port = free_port()
        command = [sys.executable, "-m", "jobs.serve", "--model", f"models:/{NAME}@champion",
                   "--port", str(port), "--max-batch-size", str(args.max_batch_size),
                   "--max-replicas", str(args.max_replicas),
                   "--cpus-per-replica", str(args.cpus_per_replica)]  # fmt: skip
        server = serve(command, folder, env, f"http://127.0.0.1:{port}/healthz", 300)
        try:
            figures = load(f"http://127.0.0.1:{port}/", bodies, args.requests, args.concurrency)
        finally:
            stop(server)
        emit(
            server="ray_serve",
            max_batch_size=args.max_batch_size,
            max_replicas=args.max_replicas,
            **common,
            **figures,
        )


if __name__ == "__main__":
    main()
