"""Inference speed of the three deployable forms: dual model (eval path), pruned PyTorch model, ONNX.

One JSON line per (form, device, batch): median latency per forward and images/s. The network only
(no letterbox/NMS), random weights unless ``--checkpoint`` is given. CPU always; CUDA too when
available (ONNX on CUDA needs onnxruntime-gpu, skipped otherwise).

Then the whole job on ``--batch-images`` generated JPEG files (decode, letterbox, network, NMS, boxes
back to pixels): one line for the one-process path (``jobs.predict`` on a folder, without the drawings)
and one for Ray Data (``jobs.predict --batch``: CPU decode tasks and a pool of model actors, one GPU each
when there is one), images/s end to end, Ray's start apart.

    python benchmarks/inference.py [--model yolov9-t] [--checkpoint CKPT_DIR] [--imgsz 640]
                                   [--batches 1,8] [--repeats 10] [--threads N]
                                   [--batch-images 256] [--actors 2]
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
    parser.add_argument("--batch-images", type=int, default=256, help="images of the job figures (0: none)")
    parser.add_argument("--actors", type=int, default=2, help="model actors of the Ray Data path")
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
        if args.batch_images:
            job_figures(dual, args, Path(d))


def job_figures(dual: torch.nn.Module, args: argparse.Namespace, folder: Path) -> None:
    """images/s of the one-process path and of the Ray Data path over the same generated JPEG files."""
    import io

    import pandas as pd
    import ray

    from pipeline.inference.batch import BatchOptions, run_batch_inference
    from pipeline.inference.model import BatchModel
    from pipeline.registry.serving import ModelSpec, detect, encode_jpeg, request_images

    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.batch_images):
        h, w = (int(v) for v in rng.integers(args.imgsz // 2, args.imgsz * 3 // 2, 2))
        (images / f"{i:06d}.jpg").write_bytes(encode_jpeg(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    pruned = prune(dual)
    names = [str(i) for i in range(pruned.num_classes)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    files = sorted(images.iterdir())
    start = time.perf_counter()
    model = pruned.to(device)
    for i in range(0, len(files), 8):
        frame = pd.DataFrame({"image": [p.read_bytes() for p in files[i : i + 8]]})
        detect(model, request_images(frame), args.imgsz, names)
    print(job_record("one_process", device, args, time.perf_counter() - start, 1), flush=True)

    buffer = io.BytesIO()
    torch.save(pruned.cpu().state_dict(), buffer)
    spec = ModelSpec(args.model, pruned.num_classes, names, args.imgsz)
    batch_model = BatchModel(spec, buffer.getvalue(), args.model, "")
    options = BatchOptions(
        batch_size=16, min_actors=args.actors, max_actors=args.actors, gpu=device == "cuda"
    )
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        summary = run_batch_inference(str(images), str(folder / "out"), batch_model, options)
    finally:
        ray.shutdown()
    print(job_record("ray_data", device, args, summary.seconds, summary.max_actors), flush=True)


def job_record(form: str, device: str, args: argparse.Namespace, seconds: float, actors: int) -> str:
    return json.dumps(
        {
            "benchmark": "inference_job",
            "model": args.model,
            "form": form,
            "device": device,
            "imgsz": args.imgsz,
            "images": args.batch_images,
            "model_actors": actors,
            "seconds": round(seconds, 2),
            "images_per_s": round(args.batch_images / seconds, 2),
        }
    )


if __name__ == "__main__":
    main()
