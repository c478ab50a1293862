"""The reference implementation as an anchor: its own ``train_dual.py`` trained on one of this project's
shard sets for K seeds, each best and last checkpoint scored by this project's evaluator, so both sides
are measured by the same code on the same val images.

    python -m benchmarks.reference_anchor --reference ~/yolov9 --python ~/yolov9-venv/bin/python \
        --data data/synthetic --epochs 8 --batch 16 --imgsz 160 --close-mosaic 2 --seeds 3 \
        scale=0.5 mixup=0.0 warmup_epochs=1

``--reference`` is a checkout of WongKinYiu/yolov9 and ``--python`` an interpreter with its requirements
(``../shared/ANCHORS.md``; also ipython; with numpy 2.4 a ``sitecustomize.py`` in that environment
setting ``numpy.trapz = numpy.trapezoid``, which its mAP code calls). Nothing of it is imported here: it runs
as its own process, its checkpoints are read by ``yolov9.load_reference_checkpoint`` (an allow-list
unpickler that runs nothing). The shards' train and val splits are exported once to its folder layout
(``images/`` and ``labels/`` with normalised cx cy w h rows). Trailing ``key=value`` arguments override
its ``hyp.scratch-high.yaml``.

What its code fixes and this project's config takes as settings, so that a like-with-like run of this
project sets them the same way (``benchmarks/quality.py`` with ``train.nominal_batch=64
train.warmup_min_steps=100 train.ema_tau=2000``): a nominal batch of 64 (accumulation and weight-decay
scaling), warmup for at least 100 iterations, an EMA time constant of 2000 updates; one process holds the
whole batch (this project's workers each hold a share, with their own BatchNorm statistics).
``--nominal-batch N`` runs a copy of the checkout, made in the temporary folder, whose ``train_dual.py`` has
that one constant (``nbs = 64``) set to N, for a comparison with ``train.nominal_batch=N``: on a small set a
nominal batch of 64 leaves too few optimizer steps to learn anything in a short budget.

Prints one JSON line per seed (best and last checkpoint's mAP@0.5:0.95 and mAP@0.5, wall time) and a
summary line (mean and standard deviation), as ``benchmarks/quality.py`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.quality import emit, summary
from pipeline.data import read_manifest
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.evaluation.evaluate import evaluate_model
from yolov9 import load_reference_checkpoint

NBS_LINE = "nbs = 64  "  # train_dual.py's nominal batch, followed by its comment
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # it fetches Arial.ttf otherwise


def export_split(data_root: str, split: str, folder: Path) -> list[str]:
    """Write ``split``'s samples as ``folder/images/split/ID.jpg`` (the shards' JPEG bytes) and
    ``folder/labels/split/ID.txt`` (class cx cy w h, normalised); returns the class names."""
    manifest = read_manifest(manifest_path(data_root, split))
    images, labels = folder / "images" / split, folder / "labels" / split
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    metas: dict[str, dict] = {}
    for url in manifest.shard_urls:
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.rpartition(".")
                data = tar.extractfile(member).read()
                if ext == "jpg":
                    (images / f"{Path(key).name}.jpg").write_bytes(data)
                elif ext == "json":
                    metas[Path(key).name] = json.loads(data)
    for key, meta in metas.items():
        w, h = float(meta["width"]), float(meta["height"])
        rows = [
            f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            for c, (x1, y1, x2, y2) in zip(meta["classes"], meta["boxes"], strict=True)
        ]
        (labels / f"{key}.txt").write_text("".join(f"{row}\n" for row in rows))
    return list(manifest.class_names)


def score(weights: Path, data_root: str, imgsz: int) -> tuple[float, float]:
    """(mAP@0.5:0.95, mAP@0.5) of a reference checkpoint on the val shards, with this project's
    validation settings (conf 0.001, IoU 0.7, 300 detections)."""
    model = load_reference_checkpoint(weights).eval()
    loader = make_val_loader(read_manifest(manifest_path(data_root, "val")), 16, imgsz, 0, 1, 0)
    stats = evaluate_model(
        model, loader, coco_json_path(data_root, "val"), torch.device("cpu"),
        conf_thres=0.001, iou_thres=0.7, max_det=300,
    ).scores.stats  # fmt: skip
    return stats["map50_95"], stats["map50"]


def with_nominal_batch(reference: Path, copy: Path, nominal_batch: int) -> Path:
    """A copy of the ``reference`` checkout (without .git) whose train_dual.py has ``nbs = nominal_batch``."""
    shutil.copytree(reference, copy, ignore=shutil.ignore_patterns(".git"))
    script = copy / "train_dual.py"
    text = script.read_text()
    if text.count(NBS_LINE) != 1:
        raise SystemExit(f"error: {script} does not set its nominal batch as {NBS_LINE!r} once")
    script.write_text(text.replace(NBS_LINE, f"nbs = {nominal_batch}  "))
    return copy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, required=True, help="a WongKinYiu/yolov9 checkout")
    parser.add_argument("--python", required=True, help="an interpreter with its requirements")
    parser.add_argument("--data", required=True, help="shard root (train/val manifests, val-coco.json)")
    parser.add_argument("--model", default="yolov9-t", help="its models/detect/NAME.yaml")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="its --batch-size (one process)")
    parser.add_argument("--imgsz", type=int, required=True)
    parser.add_argument("--close-mosaic", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nominal-batch", type=int, help="its nbs constant (default: as written, 64)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("hyp", nargs="*", help="key=value overrides of hyp.scratch-high.yaml")
    args = parser.parse_intermixed_args(argv)  # options after overrides too
    with tempfile.TemporaryDirectory(prefix="reference-anchor-") as tmp:
        folder = Path(tmp)
        ref = args.reference.resolve()
        if args.nominal_batch is not None:
            ref = with_nominal_batch(ref, folder / "reference", args.nominal_batch)
        names = export_split(args.data, "train", folder)
        export_split(args.data, "val", folder)
        (folder / "data.yaml").write_text(yaml.safe_dump({
            "path": str(folder), "train": "images/train", "val": "images/val",
            "names": dict(enumerate(names)),
        }))  # fmt: skip
        hyp = yaml.safe_load((ref / "data/hyps/hyp.scratch-high.yaml").read_text())
        for item in args.hyp:
            key, _, value = item.partition("=")
            if key not in hyp:
                raise SystemExit(f"error: {key} is not a setting of hyp.scratch-high.yaml")
            hyp[key] = yaml.safe_load(value)
        (folder / "hyp.yaml").write_text(yaml.safe_dump(hyp))
        (folder / "config").mkdir()
        shutil.copy(FONT, folder / "config" / "Arial.ttf")
        # torch >= 2.6 loads weights-only by default, which its own end-of-run strip_optimizer predates: the
        # flag applies to its process only, reading the files it just wrote; this one reads them allow-listed
        env = {
            **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # its own modules only
            "YOLOV5_CONFIG_DIR": str(folder / "config"),
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
        }
        seeds = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            command = [
                args.python, str(ref / "train_dual.py"), "--data", str(folder / "data.yaml"),
                "--cfg", str(ref / "models/detect" / f"{args.model}.yaml"), "--weights", "",
                "--hyp", str(folder / "hyp.yaml"), "--epochs", str(args.epochs),
                "--batch-size", str(args.batch), "--img", str(args.imgsz), "--device", "cpu",
                "--workers", str(args.workers), "--close-mosaic", str(args.close_mosaic),
                "--seed", str(seed), "--min-items", "0", "--project", str(folder / "runs"),
                "--name", f"seed-{seed}", "--exist-ok",
            ]  # fmt: skip
            started = time.monotonic()
            run = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
            wall_s = time.monotonic() - started
            weights = folder / "runs" / f"seed-{seed}" / "weights"
            if run.returncode != 0 or not (weights / "best.pt").is_file():
                tail = (run.stdout + run.stderr)[-3000:]
                raise SystemExit(
                    f"error: the reference's seed {seed} failed (exit {run.returncode}):\n{tail}"
                )
            best, last = (
                score(weights / "best.pt", args.data, args.imgsz),
                score(weights / "last.pt", args.data, args.imgsz),
            )
            seeds.append({
                "seed": seed, "best_map50_95": round(best[0], 4), "best_map50": round(best[1], 4),
                "final_map50_95": round(last[0], 4), "final_map50": round(last[1], 4),
                "epochs": args.epochs, "wall_s": round(wall_s, 1), "run_s": round(wall_s, 1),
            })  # fmt: skip
            emit(figure="seed", revision="reference", data=args.data, **seeds[-1])
        emit(figure="summary", revision="reference", data=args.data, hyp=args.hyp, **summary(seeds))


if __name__ == "__main__":
    main()
