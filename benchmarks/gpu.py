"""GPU efficiency in one run: the figures to take the first time a GPU is available (issue 19).

    python -m benchmarks.gpu                  # on one H100/H200: about 8 minutes
    python -m benchmarks.gpu --quick          # tiny sizes, a few steps: any machine, CPU included (CI)

Prints one JSON line per figure (``"bench"`` names it):

- ``gpu_train_step``: the engine's real step (``pipeline.training.train_one_epoch``: AMP, dual loss,
  accumulation of two micro-batches, clipping, SGD, EMA) for yolov9-t and yolov9-c at 640, bf16
  autocast, channels-last, the largest batch of {64, 32, 16} that fits, eager and ``torch.compile``d
  (``compile_s``: the first steps' extra time). ``mfu`` against ``--peak-tflops`` (default 989, dense
  bf16 H100/H200) with the model's own forward FLOP count times 3 for forward + backward;
  ``peak_memory_gb`` from ``torch.cuda.max_memory_allocated``.
- ``gpu_host_syncs``: host synchronisations per train step. On CUDA counted by
  ``torch.cuda.set_sync_debug_mode("warn")`` (``syncs_per_step``); on every device the host-reading
  calls on device tensors by :class:`pipeline.training.host_sync.HostSyncCounter`, with their call sites
  (on a CPU every tensor counts, CPU-side target checks included).
- ``gpu_loader``: training-loader samples/s at 640 with mosaic for 4, 8 and 16 workers.
- ``gpu_train_run``: a 1-worker Ray Train run of ``--run-steps`` steps on synthetic shards through the
  real loader (images/s, loader-wait fraction). ``--quick`` runs the same epoch in this process
  (``"runner": "local"``) rather than start Ray.
- ``gpu_validate``: validation images/s, forward + NMS at conf 0.001 (IoU 0.7, 300 per image).

With ``--quick`` on a CPU the compiled step uses torch.compile's ``eager`` backend (graph capture only:
Inductor's C++ compilation of yolov9 takes about 10 minutes on 2 cores); ``--compile-backend`` overrides it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.loader import write_benchmark_shards
from benchmarks.train_step import bench_config, synthetic_batches
from pipeline import names
from pipeline.config import load_config
from pipeline.data import read_manifest
from pipeline.data.augment import AugmentConfig
from pipeline.data.loader import make_train_loader
from pipeline.data.synthetic import write_synthetic_dataset
from pipeline.training import TrainingData, build_train_state, run_epoch, train_one_epoch
from pipeline.training.host_sync import HostSyncCounter
from pipeline.training.state import compile_for_training
from yolov9 import build_model
from yolov9.postprocess import non_max_suppression
from yolov9.profile import gflops

NUM_CLASSES = 80
BOXES_PER_IMAGE = 8


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def device_batches(steps: int, batch: int, imgsz: int, device: torch.device) -> list:
    """Synthetic loader batches; pinned on CUDA, as the DataLoader gives them there."""
    out = synthetic_batches(steps, batch, imgsz, NUM_CLASSES, BOXES_PER_IMAGE)
    if device.type == "cuda":
        images, targets = out[0]
        out = [(images.pin_memory(), targets.pin_memory())] * steps
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(state, steps: int) -> list[float]:
    """Seconds of each engine step (the device synchronised after each)."""
    cfg = state.cfg.train
    times: list[float] = []
    last = [time.perf_counter()]

    def clock(*_: Any) -> None:
        synchronize(state.device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    train_one_epoch(state, device_batches(steps, cfg.batch_size, cfg.imgsz, state.device), [clock])
    return times


def host_syncs(state, steps: int) -> dict[str, Any]:
    """Host syncs per step over ``steps`` engine steps (the epoch's closing read of its loss sums removed)."""
    cfg = state.cfg.train
    batches = device_batches(steps, cfg.batch_size, cfg.imgsz, state.device)
    out: dict[str, Any] = {}
    state.epoch += 1  # a fresh epoch for each count (the state's last one is complete)
    if state.device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(state, batches)
                synchronize(state.device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        out["syncs_per_step"] = round((syncs - 1) / steps, 2)
    state.epoch += 1
    with HostSyncCounter(state.device) as counter:
        train_one_epoch(state, batches)
    out["host_reads_per_step"] = round((counter.total - 1) / steps, 2)
    out["host_read_sites"] = {f"{op} {site}": n for (op, site), n in sorted(counter.sites.items())}
    return out


def train_step_lines(data: TrainingData, args: argparse.Namespace, device: torch.device) -> None:
    for name in args.models:
        forward_gflops = gflops(build_model(name, num_classes=NUM_CLASSES), args.imgsz, args.imgsz)
        for mode in ("eager", "compiled"):
            for batch in args.batches:
                try:
                    line = train_step(data, name, batch, mode, forward_gflops, args, device)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    emit(bench="gpu_train_step", model=name, mode=mode, batch=batch, out_of_memory=True)
                    continue
                emit(**line)
                break


def train_step(
    data: TrainingData,
    name: str,
    batch: int,
    mode: str,
    forward_gflops: float,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    root = Path(data.val_coco_json).parent
    steps, warm = args.steps, 2 if mode == "eager" else 3  # compiled: both accumulation step kinds + one
    cfg = bench_config(
        root, name, args.imgsz, batch, steps + warm, "bf16" if device.type == "cuda" else "off"
    )
    state = build_train_state(cfg, data, device)
    backend = args.compile_backend or ("eager" if args.quick and device.type == "cpu" else "inductor")
    if mode == "compiled":
        compile_for_training(state, backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = step_seconds(state, steps + warm)
    seconds = statistics.median(times[warm:])
    line: dict[str, Any] = {
        "bench": "gpu_train_step",
        "model": name,
        "mode": mode,
        "device": device.type,
        "dtype": str(state.amp or torch.float32),
        "channels_last": True,
        "imgsz": args.imgsz,
        "batch": batch,
        "images_per_s": round(batch / seconds, 2),
        "ms_per_step": round(1000 * seconds, 2),
        "mfu": None,
        "peak_memory_gb": None,
    }
    if mode == "compiled":
        line["backend"] = backend
        line["compile_s"] = round(sum(times[:warm]) - warm * seconds, 2)
    if device.type == "cuda":
        flops = 3 * forward_gflops * 1e9 * batch  # training ~ 3x the forward: forward + two backward GEMMs
        line["mfu"] = round(flops / seconds / (args.peak_tflops * 1e12), 4)
        line["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    syncs = host_syncs(state, args.sync_steps)
    emit(bench="gpu_host_syncs", model=name, mode=mode, device=device.type, batch=batch, **syncs)
    return line


def loader_lines(root: Path, args: argparse.Namespace) -> None:
    """Training-loader samples per wall second, timed after each worker's first batch (start-up excluded)."""
    manifest = read_manifest(write_benchmark_shards(root, args.loader_images))
    for workers in args.loader_workers:
        warm = max(workers, 1)
        loader = make_train_loader(
            manifest, batch_size=args.loader_batch, imgsz=args.imgsz, rank=0, world_size=1,
            num_workers=workers, epoch=0, seed=0, augment=AugmentConfig(), mosaic=True,
            steps_per_epoch=args.loader_steps + warm,
        )  # fmt: skip
        start, seen = time.perf_counter(), 0
        for i, (images, _) in enumerate(loader):
            if i == warm - 1:
                start = time.perf_counter()
            elif i >= warm:
                seen += images.shape[0]
        rate = seen / (time.perf_counter() - start)
        emit(bench="gpu_loader", workers=workers, imgsz=args.imgsz, mosaic=True, samples_per_s=round(rate, 1))


def run_config(root: str, args: argparse.Namespace, amp: str) -> dict[str, Any]:
    """An epoch of ``--run-steps`` steps that neither validates nor closes mosaic."""
    return load_config(
        None,
        [
            "model.name=yolov9-t",
            f"data.root={root}",
            f"data.num_workers={args.run_workers}",
            f"train.imgsz={args.imgsz}",
            f"train.batch_size={args.run_batch}",
            f"train.nominal_batch={args.run_batch}",
            f"train.steps_per_epoch={args.run_steps}",
            "train.epochs=1000",
            "train.val_every=1000",
            "train.close_mosaic=0",
            f"train.amp='{amp}'",
        ],
    ).to_dict()


def one_epoch(config: dict[str, Any]) -> dict[str, float]:
    """Train one epoch of ``config`` (a config dict) on this process's device; images/s and loader wait."""
    from pipeline.config import config_from_dict

    cfg = config_from_dict(config["config"])
    wrap = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config["ray"]:
        import ray.train.torch

        device = ray.train.torch.get_device()
        wrap = lambda m: ray.train.torch.prepare_model(m, move_to_device=False)  # noqa: E731
    state = build_train_state(cfg, TrainingData.read(cfg.data.root), device, wrap=wrap)
    metrics = run_epoch(state)
    out = {"images_per_s": metrics[names.IMAGES_PER_S], "loader_wait": metrics[names.LOADER_WAIT]}
    if config["ray"]:
        import ray.train

        ray.train.report(out)
    return out


def train_run_line(root: Path, args: argparse.Namespace, device: torch.device) -> None:
    write_synthetic_dataset(
        str(root), num_train=args.run_steps * args.run_batch, num_val=4, image_size=args.imgsz, seed=0,
        shard_size=max(args.run_batch, 8),
    )  # fmt: skip
    config = {"config": run_config(str(root), args, "bf16" if device.type == "cuda" else "off")}
    if args.quick:
        result, runner = one_epoch({**config, "ray": False}), "local"
    else:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        if not ray.is_initialized():
            # a new local instance: never one named by a stale /tmp/ray/ray_current_cluster
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        trainer = TorchTrainer(
            one_epoch,
            train_loop_config={**config, "ray": True},
            scaling_config=ScalingConfig(
                num_workers=1, use_gpu=device.type == "cuda",
                resources_per_worker={"CPU": args.run_workers + 1},
            ),
            run_config=RunConfig(name=f"bench-gpu-{time.time_ns()}", storage_path=str(root / "ray")),
        )  # fmt: skip
        result, runner = trainer.fit().metrics, "ray_train"
    emit(bench="gpu_train_run", runner=runner, model="yolov9-t", device=device.type, imgsz=args.imgsz,
         batch=args.run_batch, steps=args.run_steps, loader_workers=args.run_workers,
         images_per_s=round(result["images_per_s"], 2),
         loader_wait_fraction=round(result["loader_wait"], 4))  # fmt: skip


@torch.no_grad()
def validate_line(args: argparse.Namespace, device: torch.device) -> None:
    """Forward + NMS images/s of a fresh model whose class biases are raised so that, like a model early
    in training, it sends thousands of candidates per image through NMS."""
    torch.manual_seed(0)
    name = args.models[-1]
    model = build_model(name, num_classes=NUM_CLASSES)
    for tower in (*model.head.cv3, *getattr(model.head, "cv5", ())):
        tower[-1].bias.data += 4.0
    model = model.to(device, memory_format=torch.channels_last).eval()
    images = torch.rand(args.val_batch, 3, args.imgsz, args.imgsz, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    amp = device.type == "cuda"
    times = []
    for _ in range(args.val_repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(images)
        non_max_suppression(out.float(), conf_thres=0.001, iou_thres=0.7, max_det=300, multi_label=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    dtype = "torch.bfloat16" if amp else "torch.float32"
    emit(bench="gpu_validate", model=name, device=device.type, dtype=dtype,
         imgsz=args.imgsz, batch=args.val_batch, conf=0.001,
         images_per_s=round(args.val_batch / seconds, 2))  # fmt: skip


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (CI, any device)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument(
        "--compile-backend", default=None, help="default: inductor (eager for --quick on CPU)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    args = parser.parse_args()
    full = not args.quick
    args.models = ["yolov9-t", "yolov9-c"] if full else ["yolov9-t"]
    args.imgsz = 640 if full else 64
    args.batches = [64, 32, 16] if full else [2]
    args.steps = args.steps or (10 if full else 2)
    args.sync_steps = 4 if full else 2
    args.loader_workers = [4, 8, 16] if full else [0, 1]
    args.loader_images, args.loader_batch, args.loader_steps = (512, 16, 16) if full else (16, 2, 2)
    args.run_steps, args.run_batch, args.run_workers = (50, 32, 15) if full else (2, 2, 0)
    args.val_batch, args.val_repeats = (32, 5) if full else (2, 1)
    return args


def main() -> None:
    args = arguments()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # the engine reads its class count and epoch length from real manifests: a tiny shard set
        (tmp_path / "step").mkdir()
        write_synthetic_dataset(
            str(tmp_path / "step"), num_train=8, num_val=4, image_size=64, seed=0, shard_size=8
        )
        data = TrainingData.read(str(tmp_path / "step"))
        train_step_lines(data, args, device)
        (tmp_path / "loader").mkdir()
        loader_lines(tmp_path / "loader", args)
        (tmp_path / "run").mkdir()
        train_run_line(tmp_path / "run", args, device)
        validate_line(args, device)


if __name__ == "__main__":
    main()
