"""Training-loader throughput: augmented imgsz x imgsz samples per second, with and without mosaic.

Prints one JSON line per figure: a decode-only baseline (cv2.imdecode in one thread), a one-thread
re-implementation of the reference pipeline's per-sample work (decode 4 images, resize, paste into a
2*imgsz canvas, warp that canvas, split/merge HSV), and this project's loader for each worker count.
samples_per_s is wall-clock; samples_per_s_per_core is per CPU second of the loader's processes (the main
one and its workers), so it holds on a shared host.

With ``--shards`` a URL (``s3://bucket/shards/train-manifest.json``; endpoint and credentials from the
AWS_* environment), the split is first copied to a local temporary folder and every loader figure is
printed twice, ``"storage": "local"`` (from that copy) and ``"storage": "remote"`` (streamed from the URL),
so the two rates come from one run on the same host.
For each worker count it also prints ``first_batch_s``: how long an epoch waits for its first batch when
the workers start (epoch 0), persist (epoch 1, this loader) or are started again (epoch 1, a new loader).
Usage: python benchmarks/loader.py [--shards MANIFEST] [--images 256] [--workers 0,1,2] [--imgsz 640]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline import storage
from pipeline.data import read_manifest
from pipeline.data.augment import AugmentConfig
from pipeline.data.loader import make_train_loader


def synthetic_jpeg(rng: np.random.Generator, h: int, w: int) -> tuple[bytes, list[list[float]]]:
    """A smooth random background with 1-4 filled rectangles (their xyxy boxes), JPEG quality 90."""
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    boxes = []
    for _ in range(int(rng.integers(1, 5))):
        x1, y1 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x2, y2 = x1 + int(rng.integers(20, min(200, w - x1))), y1 + int(rng.integers(20, min(200, h - y1)))
        cv2.rectangle(image, (x1, y1), (x2 - 1, y2 - 1), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
        boxes.append([float(x1), float(y1), float(x2), float(y2)])
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes(), boxes


def write_benchmark_shards(root: Path, images: int, per_shard: int = 64, seed: int = 0) -> Path:
    """Shards of ``images`` synthetic ~470x370 samples in the project's format; returns the manifest path."""
    rng = np.random.default_rng(seed)
    shards = []
    for s, start in enumerate(range(0, images, per_shard)):
        path = root / f"train-{s:06d}.tar"
        count = boxes_total = 0
        with tarfile.open(path, "w") as tar:
            for index in range(start, min(start + per_shard, images)):
                h, w = 370 + int(rng.integers(-20, 21)), 470 + int(rng.integers(-20, 21))
                jpg, boxes = synthetic_jpeg(rng, h, w)
                key = f"{index:09d}"
                meta = {
                    "image_id": index, "file_name": f"{key}.jpg", "width": w, "height": h,
                    "boxes": boxes, "classes": [i % 80 for i in range(len(boxes))],
                }  # fmt: skip
                for name, data in ((f"{key}.jpg", jpg), (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                count += 1
                boxes_total += len(boxes)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shards.append({"name": path.name, "samples": count, "boxes": boxes_total, "sha256": digest})
    manifest = {
        "format": "yolov9-ray-shards/1", "split": "train", "class_names": [f"c{i}" for i in range(80)],
        "shards": shards, "source": {"kind": "benchmark"}, "settings": {},
    }  # fmt: skip
    path = root / "train-manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def copy_split(manifest_url: str, folder: Path) -> Path:
    """Copy a remote manifest and its shards into ``folder``; returns the local manifest path."""
    manifest = read_manifest(manifest_url)
    for shard, url in zip(manifest.shards, manifest.shard_urls, strict=True):
        storage.write_bytes(folder / shard.name, storage.read_bytes(url))
    local = folder / manifest_url.rsplit("/", 1)[-1]
    storage.write_bytes(local, storage.read_bytes(manifest_url))
    return local


def jpeg_payloads(manifest_path: Path) -> list[bytes]:
    manifest = read_manifest(manifest_path)
    payloads = []
    for url in manifest.shard_urls:
        with tarfile.open(url) as tar:
            payloads += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return payloads


def decode_rate(payloads: list[bytes], seconds: float) -> float:
    """cv2.imdecode calls per CPU second (one thread)."""
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        cv2.imdecode(np.frombuffer(payloads[done % len(payloads)], np.uint8), cv2.IMREAD_COLOR)
        done += 1
    return done / (time.process_time() - start)


def reference_style_rate(payloads: list[bytes], imgsz: int, seconds: float) -> float:
    """Samples per CPU second of the reference's mosaic path re-done in one thread: 4 decodes and resizes, a
    paste into a 2*imgsz canvas, one warp of that canvas, split/merge HSV jitter and a flip (no mixup)."""
    rng = np.random.default_rng(0)
    s = imgsz
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        canvas = np.full((2 * s, 2 * s, 3), 114, np.uint8)
        xc, yc = (int(rng.uniform(0.5 * s, 1.5 * s)) for _ in range(2))
        for i in range(4):
            image = cv2.imdecode(np.frombuffer(payloads[(4 * done + i) % len(payloads)], np.uint8), 1)
            r = s / max(image.shape[:2])
            image = cv2.resize(image, (int(image.shape[1] * r), int(image.shape[0] * r)))
            h, w = image.shape[:2]
            x0, y0 = (xc - w if i in (0, 2) else xc), (yc - h if i in (0, 1) else yc)
            xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, 2 * s), min(y0 + h, 2 * s)
            canvas[ya:yb, xa:xb] = image[ya - y0 : yb - y0, xa - x0 : xb - x0]
        zoom = rng.uniform(0.1, 1.9)
        m = np.array([[zoom, 0, s / 2 - zoom * s], [0, zoom, s / 2 - zoom * s]])
        out = cv2.warpAffine(canvas, m, (s, s), borderValue=(114, 114, 114))
        gains = rng.uniform(-1, 1, 3) * (0.015, 0.7, 0.4) + 1
        hue, sat, val = cv2.split(cv2.cvtColor(out, cv2.COLOR_BGR2HSV))
        x = np.arange(256, dtype=np.float64)
        luts = [((x * gains[0]) % 180), np.clip(x * gains[1], 0, 255), np.clip(x * gains[2], 0, 255)]
        merged = cv2.merge(
            [cv2.LUT(c, lut.astype(np.uint8)) for c, lut in zip((hue, sat, val), luts, strict=True)]
        )
        out = cv2.cvtColor(merged, cv2.COLOR_HSV2BGR)
        out = cv2.flip(out, 1)
        np.ascontiguousarray(out[:, :, ::-1].transpose(2, 0, 1))
        done += 1
    return done / (time.process_time() - start)


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live children (loader workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        pid = int(stat.parent.name)
        if pid == me or int(fields[1]) == me:  # fields[1] is the parent pid
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / tick


def loader_rate(
    manifest_path: storage.Location, workers: int, mosaic: bool, imgsz: int, batch: int, steps: int
) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process and its loader workers) of
    make_train_loader over ``steps`` batches, timed after each worker's first batch (process start and
    shuffle-buffer fill excluded). The CPU figure is the per-core rate, and holds on a busy host."""
    warm = max(workers, 1)
    loader = make_train_loader(
        read_manifest(manifest_path), batch_size=batch, imgsz=imgsz, rank=0, world_size=1,
        num_workers=workers, epoch=0, seed=0, augment=AugmentConfig(), mosaic=mosaic,
        steps_per_epoch=steps + warm,
    )  # fmt: skip
    start, cpu_start, seen, cpu_end = 0.0, 0.0, 0, 0.0
    for i, (images, _) in enumerate(loader):
        if i == warm - 1:
            start, cpu_start = time.perf_counter(), tree_cpu_seconds()
        elif i >= warm:
            seen += images.shape[0]
        if i == steps + warm - 1:  # read the workers' CPU time before they exit
            cpu_end = tree_cpu_seconds()
    return seen / (time.perf_counter() - start), seen / (cpu_end - cpu_start)


def first_batch_seconds(
    manifest_path: storage.Location, workers: int, imgsz: int, batch: int
) -> dict[str, float]:
    """Seconds from the start of an epoch's iteration to its first batch: epoch 0 (the workers start),
    epoch 1 on the same loader (its workers persist) and epoch 1 on a new loader (workers started again).
    Each includes the shuffle-buffer fill, which every epoch pays."""
    manifest = read_manifest(manifest_path)

    def loader(epoch: int):
        return make_train_loader(
            manifest, batch_size=batch, imgsz=imgsz, rank=0, world_size=1, num_workers=workers,
            epoch=epoch, seed=0, augment=AugmentConfig(), mosaic=True, steps_per_epoch=workers,
        )  # fmt: skip

    def first_batch(epoch_batches) -> float:
        start = time.perf_counter()
        batches = iter(epoch_batches)
        next(batches)
        elapsed = time.perf_counter() - start
        for _ in batches:  # the epoch ends as in training
            pass
        return elapsed

    kept = loader(0)
    figures = {"epoch0": first_batch(kept)}
    kept.set_epoch(1, mosaic=True)
    figures["epoch1_persistent"] = first_batch(kept)
    figures["epoch1_restarted"] = first_batch(loader(1))
    return {k: round(v, 3) for k, v in figures.items()}


def emit(**fields: object) -> None:
    print(json.dumps({"bench": "loader", **fields}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--shards", help="a train manifest (path or URL, e.g. s3://...) to read instead of synthetic shards"
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", default="0,1,2", help="0: in-process, per-core rate from CPU time")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--steps",
        type=int,
        default=40,
        help="timed batches per figure (a worker's batch in flight at the start "
        "of the timing is counted, so the rates read high by up to workers/steps)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of the single-core baselines")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            sources: list[tuple[str, storage.Location]] = [
                ("local", write_benchmark_shards(Path(tmp), args.images))
            ]
        elif storage.is_url(args.shards):
            sources = [("local", copy_split(args.shards, Path(tmp))), ("remote", args.shards)]
        else:
            sources = [("local", Path(args.shards))]
        payloads = jpeg_payloads(sources[0][1])
        rate = decode_rate(payloads, args.seconds)
        emit(
            variant="decode-only",
            workers=0,
            samples_per_s=round(rate, 1),
            samples_per_s_per_core=round(rate, 1),
        )
        rate = reference_style_rate(payloads, args.imgsz, args.seconds)
        emit(
            variant="reference-style", workers=0, mosaic=True, samples_per_s=round(rate, 1),
            samples_per_s_per_core=round(rate, 1),
        )  # fmt: skip
        for workers in (int(w) for w in args.workers.split(",")):
            for mosaic in (True, False):
                for kind, manifest in sources:
                    wall, cpu = loader_rate(manifest, workers, mosaic, args.imgsz, args.batch, args.steps)
                    emit(
                        storage=kind, workers=workers, mosaic=mosaic, samples_per_s=round(wall, 1),
                        samples_per_s_per_core=round(cpu, 1), cores=cores,
                    )  # fmt: skip
            if workers > 0:
                seconds = first_batch_seconds(sources[0][1], workers, args.imgsz, args.batch)
                emit(figure="first_batch_s", workers=workers, **seconds)


if __name__ == "__main__":
    main()
