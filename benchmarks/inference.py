"""Inference speed of the three deployable forms: dual model (eval path), pruned PyTorch model, ONNX.

One JSON line per (form, device, batch): median latency per forward and images/s. The network only
(no letterbox/NMS), random weights unless ``--checkpoint`` is given. CPU always; CUDA too when
available (ONNX on CUDA needs onnxruntime-gpu, skipped otherwise).

    python benchmarks/inference.py [--model yolov9-t] [--checkpoint CKPT_DIR] [--imgsz 640]
                                   [--batches 1,8] [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import ema_model, load_checkpoint
from pipeline.registry.export import check_onnx, export_onnx
from yolov9 import build_model, prune


def median_ms(run: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time (ms) of ``run()`` after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        sync()
        start = time.perf_counter()
        run()
        sync()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def torch_runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def onnx_runner(path: Path, x: np.ndarray, provider: str) -> Callable[[], object]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=[provider])
    return lambda: session.run(None, {"images": x})


def record(form: str, device: str, batch: int, ms: float, args: argparse.Namespace) -> str:
    return json.dumps(
        {
            "benchmark": "inference",
            "model": args.model,
            "form": form,
            "device": device,
            "imgsz": args.imgsz,
            "batch": batch,
            "threads": torch.get_num_threads(),
            "latency_ms": round(ms, 2),
            "images_per_s": round(batch * 1000 / ms, 2),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="yolov9-t")
    parser.add_argument("--checkpoint", default=None, help="use a training checkpoint's EMA weights")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        dual, args.model = ema_model(state), state.model_name
    else:
        dual = build_model(args.model, num_classes=80).eval()
    pruned = prune(dual)
    import onnxruntime

    with tempfile.TemporaryDirectory() as d:
        onnx_file = export_onnx(pruned, Path(d) / "model.onnx", args.imgsz)
        check_onnx(pruned, onnx_file, torch.rand(1, 3, args.imgsz, args.imgsz))  # time only a correct graph
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.rand(batch, 3, args.imgsz, args.imgsz)
                for form, model in (("dual", dual), ("pruned", pruned)):
                    ms = median_ms(torch_runner(model.to(device), x.to(device)), args.repeats, sync)
                    print(record(form, device, batch, ms, args), flush=True)
                provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
                if provider in onnxruntime.get_available_providers():
                    ms = median_ms(onnx_runner(onnx_file, x.numpy(), provider), args.repeats)
                    print(record("onnx", device, batch, ms, args), flush=True)


if __name__ == "__main__":
    main()
