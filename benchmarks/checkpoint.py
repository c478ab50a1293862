"""How long rank 0 is held per epoch report: a training checkpoint of ``--model`` (weights, EMA weights,
SGD momentum: what ``pipeline.training.ray_train.report_epoch`` writes) reported through Ray Train to
``--storage``, with Ray Train's synchronous upload (before) and its asynchronous one (what ``report_epoch``
uses now).

    python -m benchmarks.checkpoint --storage /tmp/ckpt-bench
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 python -m benchmarks.checkpoint --storage s3://bucket/ckpt-bench

One JSON line per mode: ``blocked_s`` is the median time rank 0 spends per report (writing the file locally
plus, when synchronous, the upload), ``write_s`` the local write alone, ``checkpoint_mb`` its size.
Starts a local Ray instance on 127.0.0.1; object-store credentials come from the AWS_* environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.checkpoint import FILENAME, TrainingCheckpoint, save_checkpoint
from pipeline.config import Config
from pipeline.training.ray_train import ensure_ray
from yolov9 import build_model


def synthetic_checkpoint(model_name: str) -> TrainingCheckpoint:
    """A checkpoint of the size training writes: weights, EMA weights and one momentum buffer per weight."""
    weights = build_model(model_name, num_classes=80).state_dict()
    momentum = {i: {"momentum_buffer": t.float().clone()} for i, t in enumerate(weights.values())}
    return TrainingCheckpoint(
        model=weights,
        ema={"model": {k: v.clone() for k, v in weights.items()}, "updates": 0},
        epoch=1,
        step=1,
        config=Config(),
        best_map=0.0,
        model_name=model_name,
        num_classes=80,
        optimizer={"state": momentum, "param_groups": []},
    )


def reporting_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: ``reports`` epoch reports of one checkpoint; the time each report held it."""
    checkpoint = synthetic_checkpoint(config["model"])
    blocked, written, size = [], [], 0
    for i in range(config["reports"]):
        start = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="ckpt-bench-")
        save_checkpoint(folder, checkpoint)
        written.append(time.perf_counter() - start)
        size = (Path(folder) / FILENAME).stat().st_size
        options = (
            {"checkpoint_upload_mode": ray.train.CheckpointUploadMode.ASYNC}
            if config["mode"] == "async"
            else {"checkpoint_upload_mode": ray.train.CheckpointUploadMode.SYNC}
        )
        ray.train.report(
            {"report": i},
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            delete_local_checkpoint_after_upload=True,
            **options,
        )
        blocked.append(time.perf_counter() - start)
    return {"blocked": blocked, "written": written, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", required=True, help="ray.storage_path: a folder or a URL (s3://...)")
    parser.add_argument("--model", default="yolov9-c")
    parser.add_argument("--reports", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one local node: nothing to watch
    ensure_ray(None)
    for mode in ("sync", "async"):
        trainer = TorchTrainer(
            reporting_worker,
            train_loop_config={"model": args.model, "reports": args.reports, "mode": mode},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name=f"ckpt-bench-{mode}-{uuid.uuid4().hex[:8]}", storage_path=args.storage),
        )
        out = trainer.fit().return_value
        print(
            json.dumps(
                {
                    "bench": "checkpoint_report",
                    "mode": mode,
                    "model": args.model,
                    "storage": args.storage.split("://")[0] if "://" in args.storage else "local",
                    "checkpoint_mb": round(out["bytes"] / 2**20, 1),
                    "blocked_s": round(statistics.median(out["blocked"]), 3),
                    "write_s": round(statistics.median(out["written"]), 3),
                    "reports": args.reports,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
