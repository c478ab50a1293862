"""Training-step throughput: forward + dual loss + backward + SGD step, in images/s.

    python -m benchmarks.train_step                 # yolov9-t 320/b8 and yolov9-c 320/b4 (CPU or GPU)
    python -m benchmarks.train_step --ray           # also: 1-worker Ray Train epoch vs the same plain loop

On a GPU it also runs bf16 at 640 and reports MFU against ``--peak-tflops`` (default: H100 SXM
dense bf16, 989). Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pipeline.optimizer import build_sgd
from yolov9 import build_model
from yolov9.loss import DualDetectionLoss
from yolov9.profile import gflops


def synthetic_batch(batch: int, imgsz: int, num_classes: int, boxes: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, imgsz, imgsz, generator=gen)
    wh = imgsz * (0.05 + 0.3 * torch.rand(batch * boxes, 2, generator=gen))
    xy = (imgsz - wh) * torch.rand(batch * boxes, 2, generator=gen)
    image = torch.arange(batch).repeat_interleave(boxes).float()[:, None]
    cls = torch.randint(0, num_classes, (batch * boxes, 1), generator=gen).float()
    return images.to(device), torch.cat((image, cls, xy, xy + wh), 1).to(device)


def step_loop(model, loss_fn, optimizer, images, targets, steps: int, dtype) -> list[float]:
    """Seconds per step of ``steps`` training steps."""
    times = []
    for _ in range(steps):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = loss_fn(model(images), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure(
    name: str, imgsz: int, batch: int, steps: int, device: torch.device, dtype, peak_tflops: float
) -> dict:
    model = build_model(name, num_classes=80)
    forward_gflops = gflops(model, imgsz, imgsz)
    model = model.to(device, memory_format=torch.channels_last).train()  # as the training loop runs it
    loss_fn = DualDetectionLoss(model)
    optimizer = build_sgd(model, 0.01, 0.937, 5e-4)
    images, targets = synthetic_batch(batch, imgsz, 80, 8, device)
    images = images.contiguous(memory_format=torch.channels_last)
    times = step_loop(model, loss_fn, optimizer, images, targets, steps + 2, dtype)[2:]
    seconds = statistics.median(times)
    out = {
        "bench": "train_step",
        "model": name,
        "device": device.type,
        "dtype": str(dtype or torch.float32),
        "imgsz": imgsz,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "images_per_s": round(batch / seconds, 2),
        "ms_per_step": round(1000 * seconds, 1),
    }
    if device.type == "cuda":
        flops = 3 * forward_gflops * 1e9 * batch  # training ~ 3x the forward: forward + two backward GEMMs
        out["mfu"] = round(flops / seconds / (peak_tflops * 1e12), 4)
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def ray_overhead(imgsz: int, batch: int, steps: int) -> list[dict]:
    """The same fixed number of steps in a plain process and in a 1-worker Ray Train run."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        model = build_model("yolov9-t", num_classes=80).train()
        if config["ray"]:
            model = ray.train.torch.prepare_model(model, move_to_device=False)
        loss_fn = DualDetectionLoss(getattr(model, "module", model))
        optimizer = build_sgd(model, 0.01, 0.937, 5e-4)
        images, targets = synthetic_batch(config["batch"], config["imgsz"], 80, 8, torch.device("cpu"))
        start = time.perf_counter()
        step_loop(model, loss_fn, optimizer, images, targets, config["steps"], None)
        elapsed = time.perf_counter() - start
        if config["ray"]:
            ray.train.report({"seconds": elapsed})
        else:
            config["seconds"] = elapsed

    plain = {"ray": False, "batch": batch, "imgsz": imgsz, "steps": steps}
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
    cases = [("yolov9-t", 320, 8, None), ("yolov9-c", 320, 4, None)]
    if device.type == "cuda":
        cases += [("yolov9-t", 640, 128, torch.bfloat16), ("yolov9-c", 640, 64, torch.bfloat16)]
    for name, imgsz, batch, dtype in cases:
        print(
            json.dumps(measure(name, imgsz, batch, args.steps, device, dtype, args.peak_tflops)), flush=True
        )
    if args.ray:
        for line in ray_overhead(320, 8, args.steps * 4):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
