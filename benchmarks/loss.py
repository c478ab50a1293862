"""Dual-branch loss forward+backward: batch 16, 640x640, 80 classes, 10 and 100 boxes per image.

Prints one JSON line per case: milliseconds per step (median of ``--repeat``) and the peak memory
the step adds on top of its inputs (resident memory on CPU, allocated memory on CUDA). Head maps
are random leaf tensors, so the figure is the loss alone (assignment, CIoU, DFL, BCE and their
backward), not the network.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from yolov9.loss import DualDetectionLoss, HeadInfo

STRIDES = (8.0, 16.0, 32.0)


def random_targets(batch: int, boxes: int, size: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """``(batch * boxes, 6)`` targets with sides between 2% and 50% of the image."""
    n = batch * boxes
    wh = size * (0.02 + 0.48 * torch.rand(n, 2, generator=gen))
    xy = (size - wh) * torch.rand(n, 2, generator=gen)
    image = torch.arange(batch).repeat_interleave(boxes).float()
    cls = torch.randint(0, num_classes, (n,), generator=gen).float()
    return torch.cat((image[:, None], cls[:, None], xy, xy + wh), 1)


def head_maps(batch: int, size: int, num_classes: int, device: torch.device, gen: torch.Generator) -> list:
    maps = []
    for _ in range(2):
        maps.append(
            [
                (torch.randn(batch, 64 + num_classes, size // int(s), size // int(s), generator=gen) * 2)
                .to(device)
                .requires_grad_(True)
                for s in STRIDES
            ]
        )
    return maps


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (Linux) and return the current RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS:")


def run(batch: int, size: int, boxes: int, num_classes: int, repeat: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    loss_fn = DualDetectionLoss(HeadInfo(num_classes, STRIDES))
    targets = random_targets(batch, boxes, size, num_classes, gen).to(device)
    times, memory = [], 0.0
    for _ in range(repeat + 1):
        maps = head_maps(batch, size, num_classes, device, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            before = reset_peak_rss()
        start = time.perf_counter()
        total, _ = loss_fn(maps, targets)
        total.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _status_mb("VmHWM:")
        memory = max(memory, peak - before)
    return {
        "bench": "dual_loss_fwd_bwd",
        "device": device.type,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "imgsz": size,
        "boxes_per_image": boxes,
        "classes": num_classes,
        "ms": round(1000 * statistics.median(times[1:]), 1),
        "peak_memory_mb": round(memory, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--boxes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for boxes in args.boxes:
        print(
            json.dumps(
                run(args.batch, args.imgsz, boxes, args.classes, args.repeat, torch.device(args.device))
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
