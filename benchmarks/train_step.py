"""Training-step throughput of the engine's real step (``pipeline.training.train_one_epoch``: AMP, the dual
loss, gradient accumulation to the nominal batch, clipping, SGD, EMA, channels-last), in images/s.

    python -m benchmarks.train_step                 # yolov9-t 320/b8 and yolov9-c 320/b4 (CPU or GPU)
    python -m benchmarks.train_step --ray           # also: 1-worker Ray Train epoch vs the same plain loop

Accumulation is set to two micro-batches per optimizer step, so half the steps pay the optimizer and the
EMA. On a GPU it also runs bf16 at 640 and reports MFU against ``--peak-tflops`` (default: H100 SXM dense
bf16, 989). Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import Config, load_config
from pipeline.data.synthetic import write_synthetic_dataset
from pipeline.training import StepEvent, TrainingData, TrainState, build_train_state, train_one_epoch
from yolov9 import build_model
from yolov9.profile import gflops


def synthetic_batches(steps: int, batch: int, imgsz: int, num_classes: int, boxes: int) -> list:
    """``steps`` copies of one batch as the loader gives it: uint8 (B, 3, S, S) images, (M, 6) targets."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, imgsz, imgsz), dtype=torch.uint8, generator=gen)
    wh = imgsz * (0.05 + 0.3 * torch.rand(batch * boxes, 2, generator=gen))
    xy = (imgsz - wh) * torch.rand(batch * boxes, 2, generator=gen)
    image = torch.arange(batch).repeat_interleave(boxes).float()[:, None]
    cls = torch.randint(0, num_classes, (batch * boxes, 1), generator=gen).float()
    return [(images, torch.cat((image, cls, xy, xy + wh), 1))] * steps


def bench_config(root: Path, name: str, imgsz: int, batch: int, steps: int, amp: str) -> Config:
    return load_config(
        None,
        [
            f"model.name={name}",
            "model.num_classes=80",
            f"data.root={root}",
            f"train.imgsz={imgsz}",
            f"train.batch_size={batch}",
            f"train.nominal_batch={2 * batch}",
            f"train.steps_per_epoch={steps}",
            "train.warmup_epochs=0",
            "train.warmup_min_steps=0",
            f"train.amp='{amp}'",  # quoted: YAML reads a bare off as false
        ],
    )


def step_seconds(state: TrainState, steps: int) -> list[float]:
    """Seconds of each of ``steps`` engine steps on synthetic batches (the device synchronised per step)."""
    cfg = state.cfg.train
    times: list[float] = []
    last = [time.perf_counter()]

    def clock(_: TrainState, event: StepEvent) -> None:
        if state.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    train_one_epoch(state, synthetic_batches(steps, cfg.batch_size, cfg.imgsz, 80, 8), [clock])
    return times


def measure(
    data: TrainingData,
    name: str,
    imgsz: int,
    batch: int,
    steps: int,
    device,
    amp: str,
    peak: float,
) -> dict:
    cfg = bench_config(Path(data.val_coco_json).parent, name, imgsz, batch, steps + 2, amp)
    state = build_train_state(cfg, data, device)
    forward_gflops = gflops(build_model(name, num_classes=80), imgsz, imgsz)
    seconds = statistics.median(step_seconds(state, steps + 2)[2:])
    out = {
        "bench": "train_step",
        "model": name,
        "device": device.type,
        "dtype": str(state.amp or torch.float32),
        "imgsz": imgsz,
        "batch": batch,
        "accumulate": 2,
        "threads": torch.get_num_threads(),
        "images_per_s": round(batch / seconds, 2),
        "ms_per_step": round(1000 * seconds, 1),
    }
    if device.type == "cuda":
        flops = 3 * forward_gflops * 1e9 * batch  # training ~ 3x the forward: forward + two backward GEMMs
        out["mfu"] = round(flops / seconds / (peak * 1e12), 4)
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def ray_overhead(root: Path, imgsz: int, batch: int, steps: int) -> list[dict]:
    """The same fixed number of engine steps in a plain process and in a 1-worker Ray Train run."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        cfg = bench_config(Path(config["root"]), "yolov9-t", imgsz, batch, steps, "off")
        wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if config["ray"] else None
        state = build_train_state(cfg, TrainingData.read(config["root"]), torch.device("cpu"), wrap=wrap)
        start = time.perf_counter()
        train_one_epoch(state, synthetic_batches(steps, batch, imgsz, 80, 8))
        elapsed = time.perf_counter() - start
        if config["ray"]:
            ray.train.report({"seconds": elapsed})
        else:
            config["seconds"] = elapsed

    plain = {"ray": False, "root": str(root)}
    start = time.perf_counter()
    loop(plain)
    plain_wall = time.perf_counter() - start
    if not ray.is_initialized():
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**plain, "ray": True},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
        run_config=RunConfig(name=f"bench-overhead-{time.time_ns()}", storage_path="/tmp/bench-ray"),
    )
    start = time.perf_counter()
    trainer.fit()
    ray_wall = time.perf_counter() - start
    return [
        {
            "bench": "ray_overhead",
            "what": "plain process",
            "steps": steps,
            "wall_s": round(plain_wall, 1),
            "loop_s": round(plain["seconds"], 1),
        },
        {
            "bench": "ray_overhead",
            "what": "ray train 1 worker",
            "steps": steps,
            "wall_s": round(ray_wall, 1),
            "startup_and_teardown_s": round(ray_wall - plain_wall, 1),
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ray", action="store_true", help="also measure the Ray Train overhead")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [("yolov9-t", 320, 8, "off"), ("yolov9-c", 320, 4, "off")]
    if device.type == "cuda":
        cases += [("yolov9-t", 640, 128, "bf16"), ("yolov9-c", 640, 64, "bf16")]
    with tempfile.TemporaryDirectory() as d:
        # the engine reads its class count and epoch length from real manifests: a tiny shard set
        write_synthetic_dataset(d, num_train=8, num_val=4, image_size=64, seed=0, shard_size=8)
        data = TrainingData.read(d)
        for name, imgsz, batch, amp in cases:
            line = measure(data, name, imgsz, batch, args.steps, device, amp, args.peak_tflops)
            print(json.dumps(line), flush=True)
        if args.ray:
            for line in ray_overhead(Path(d), 320, 8, args.steps * 4):
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
