"""Per model: parameters, GFLOPs and CPU latency of the dual eval path versus the pruned model.

Prints one JSON line per model. Usage: python benchmarks/model.py [--models yolov9-t,yolov9-c]
[--size 640] [--repeats 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from yolov9 import build_model, prune
from yolov9.profile import count_parameters, gflops


def latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward, after two warm-up runs."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="yolov9-t,yolov9-s,yolov9-m,yolov9-c,yolov9-e")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.rand(1, 3, args.size, args.size, device=args.device)
    for name in args.models.split(","):
        dual = build_model(name).to(args.device).eval()
        pruned = prune(dual)
        dual_ms = latency_ms(dual, x, args.repeats)
        pruned_ms = latency_ms(pruned, x, args.repeats)
        print(
            json.dumps(
                {
                    "benchmark": "model",
                    "model": name,
                    "device": args.device,
                    "size": args.size,
                    "batch": 1,
                    "threads": torch.get_num_threads(),
                    "params_dual": count_parameters(dual),
                    "params_pruned": count_parameters(pruned),
                    "gflops_dual_eval": round(gflops(dual, args.size, args.size), 2),
                    "gflops_pruned": round(gflops(pruned, args.size, args.size), 2),
                    "latency_ms_dual_eval": round(dual_ms, 1),
                    "latency_ms_pruned": round(pruned_ms, 1),
                    "speedup": round(dual_ms / pruned_ms, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
