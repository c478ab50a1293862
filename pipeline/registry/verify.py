"""The checks a checkpoint passes before it is registered: it has what registration reads, the pruned
network reproduces the dual model's main branch, and its val mAP is the one training recorded (or, for a
reference file, is measured on the user's val split).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import names, storage
from pipeline.checkpoint import TrainingCheckpoint
from pipeline.config import TrainConfig, nms_settings
from pipeline.data import DataError, Manifest, read_manifest
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.errors import RegistrationError
from pipeline.evaluation.evaluate import evaluate_distributed
from pipeline.storage import Location
from yolov9 import DetectionModel

log = logging.getLogger(__name__)
# Pruning only re-associates float32 sums (BN folding, RepConvN merge); 1e-4 of the output scale is generous
# for that and far below any change a real bug makes.
OUTPUT_RTOL = 1e-4
CPU = torch.device("cpu")
MAP_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Verification:
    """Figures of the pre-registration checks: output differences and the re-measured val mAP."""

    output_max_rel_diff: float
    map50_95: float
    map50: float
    recorded_map50_95: float
    onnx_box_diff_px: float = 0.0
    onnx_score_diff: float = 0.0
    onnx_detections: int = 0
    torchscript_box_diff_px: float = 0.0
    torchscript_score_diff: float = 0.0
    device: str = "cpu"  # where the checks ran ("cuda": under autocast, as training validates on a GPU)
    # mAP@0.5:0.95 of the unpruned EMA model re-measured here when the recorded one was measured on another
    # kind of device (NaN: not needed); the pruned model's is then compared with it
    dual_map50_95: float = float("nan")


def check_registrable(state: TrainingCheckpoint, where: str | Path) -> None:
    """Raise RegistrationError naming what is missing when a loadable checkpoint lacks what registration reads
    (class names, history); its training config was checked when it loaded."""
    missing = [k for k in ("class_names", "history") if not getattr(state, k)]
    if missing:
        raise RegistrationError(f"{where} lacks {missing}: not a checkpoint of this project's training")


def recorded_map(state: TrainingCheckpoint) -> tuple[float, float]:
    """(mAP@0.5:0.95, mAP@0.5) recorded for the checkpoint's own epoch."""
    epoch = int(state.epoch)
    entries = [h for h in state.history if int(h.get(names.EPOCH, -1)) == epoch]
    metrics = entries[-1] if entries else state.metrics
    if names.MAP not in metrics:
        raise RegistrationError(
            f"the checkpoint (epoch {epoch}) records no {names.MAP}: it was never validated"
        )
    return float(metrics[names.MAP]), float(metrics.get(names.MAP50, float("nan")))


def max_relative_difference(expected: torch.Tensor, got: torch.Tensor) -> float:
    """Largest |got - expected| relative to the scale of its kind of output.

    Both are eval outputs ``(B, 4 + nc, A)``: rows 0..3 are pixels (scale: the largest |box value|), the
    rest probabilities (scale 1), so a tiny probability is not held to a relative error of its own size.
    """
    if expected.shape != got.shape:
        raise RegistrationError(
            f"pruned output shape {tuple(got.shape)} differs from the dual model's {tuple(expected.shape)}"
        )
    box_scale = expected[:, :4].abs().max().clamp(min=1.0)
    box_diff = ((got[:, :4] - expected[:, :4]).abs().max() / box_scale).item()
    cls_diff = (got[:, 4:] - expected[:, 4:]).abs().max().item()
    return max(box_diff, cls_diff)


def verify_outputs(
    dual: DetectionModel, pruned: DetectionModel, images: torch.Tensor, rtol: float = OUTPUT_RTOL
) -> float:
    """Raise RegistrationError unless ``pruned`` reproduces ``dual``'s main branch on ``images``
    (float (B, 3, S, S) in [0, 1]) within ``rtol``; returns the largest relative difference."""
    with torch.no_grad():
        diff = max_relative_difference(dual.eval()(images), pruned.eval()(images))
    if not diff <= rtol:  # also catches NaN
        raise RegistrationError(
            f"the pruned model's outputs differ from the dual model's main branch by "
            f"{diff:.3g} (relative), more than {rtol:g}"
        )
    return diff


def verify_map(measured: float, recorded: float, tolerance: float = MAP_TOLERANCE) -> None:
    """Raise RegistrationError naming both numbers unless they agree within ``tolerance``."""
    if not abs(measured - recorded) <= tolerance:
        raise RegistrationError(
            f"the pruned model's val mAP@0.5:0.95 is {measured:.4f} but the checkpoint "
            f"recorded {recorded:.4f} (tolerance {tolerance}): not the model that was trained?"
        )


def val_setup(state: TrainingCheckpoint, data_root: Location | None) -> tuple[Manifest, Location, int]:
    """The val manifest the checkpoint was validated on, its root (a local Path or a URL), and the training
    image size (pixels)."""
    root = storage.locate(data_root or state.config.data.root)
    manifest = read_val_manifest(root)
    expected = state.val_manifest_hash
    if expected and manifest.manifest_hash != expected:
        raise RegistrationError(
            f"{manifest.path} (hash {manifest.manifest_hash}) is not the val split the "
            f"checkpoint was validated on (hash {expected})"
        )
    if list(manifest.class_names) != list(state.class_names):
        raise RegistrationError(
            f"{manifest.path} lists classes {manifest.class_names}, the checkpoint {state.class_names}"
        )
    return manifest, root, state.train_image_size()


def first_val_images(state: TrainingCheckpoint, data_root: str | Path | None, count: int = 8) -> torch.Tensor:
    """The first ``count`` val images, letterboxed to the training size: uint8 ``(B, 3, S, S)``."""
    manifest, _, imgsz = val_setup(state, data_root)
    images, _ = next(
        iter(make_val_loader(manifest, batch_size=count, imgsz=imgsz, rank=0, world_size=1, num_workers=0))
    )
    return images.contiguous()


def validated_on(state: TrainingCheckpoint) -> str:
    """The kind of device the checkpoint's recorded mAP was measured on: its training's (``ray.use_gpu``)."""
    return "cuda" if state.config.ray.use_gpu else "cpu"


def verify_checkpoint(
    state: TrainingCheckpoint,
    dual: DetectionModel,
    pruned: DetectionModel,
    images: torch.Tensor,
    data_root: str | Path | None,
    num_workers: int = 0,
    map_tolerance: float = MAP_TOLERANCE,
    device: torch.device = CPU,
) -> Verification:
    """Both pre-registration checks on the checkpoint's val split (``data_root`` defaults to the training
    config's), run on ``device``: outputs on ``images`` (uint8 (B, 3, S, S) val images) and the val mAP.

    The mAP is compared like with like: with the recorded one when ``device`` is the kind training
    validated on (on a GPU both run under autocast); otherwise the unpruned EMA model is re-measured here
    too and the pruned model's mAP is compared with that. Raises RegistrationError on a mismatch."""
    manifest, root, imgsz = val_setup(state, data_root)
    rel = verify_outputs(dual, pruned, images.float() / 255)
    recorded, _ = recorded_map(state)

    def val_map(model: DetectionModel) -> dict[str, float]:
        loader = make_val_loader(
            manifest, batch_size=16, imgsz=imgsz, rank=0, world_size=1, num_workers=num_workers
        )
        return evaluate_distributed(
            model.to(device),
            loader,
            coco_json_path(root, "val"),
            device,
            **nms_settings(state.config.train),
        )

    scores = val_map(pruned)
    dual_map = float("nan")
    if device.type == validated_on(state):
        verify_map(scores["map50_95"], recorded, map_tolerance)
    else:
        log.info(
            "the recorded mAP was measured on %s, this check runs on %s: re-measuring the unpruned model",
            validated_on(state), device.type,
        )  # fmt: skip
        dual_map = float(val_map(dual)["map50_95"])
        verify_map(scores["map50_95"], dual_map, map_tolerance)
    for model in (dual, pruned):  # export and serving take them from the CPU
        model.to(CPU)
    return Verification(
        output_max_rel_diff=rel,
        map50_95=float(scores["map50_95"]),
        map50=float(scores["map50"]),
        recorded_map50_95=recorded,
        device=device.type,
        dual_map50_95=dual_map,
    )


def read_val_manifest(root: Location) -> Manifest:
    """The val manifest of the shards at ``root``; RegistrationError when it cannot be read."""
    try:
        return read_manifest(manifest_path(root, "val"))
    except (DataError, OSError) as e:
        raise RegistrationError(f"cannot read the val shards of {root} for verification: {e}") from e


def verify_reference(
    model: DetectionModel,
    pruned: DetectionModel,
    manifest: Manifest,
    root: Location,
    imgsz: int,
    num_workers: int = 0,
) -> tuple[Verification, torch.Tensor]:
    """The checks of a reference file's model: ``pruned`` reproduces ``model`` on the first val images,
    and its val mAP at ``imgsz`` pixels (measured with the config's default NMS settings: a reference file
    records none, so there is nothing to compare it with). Returns the figures and the first 8 val images
    (uint8 (B, 3, S, S))."""
    loader = make_val_loader(
        manifest, batch_size=16, imgsz=imgsz, rank=0, world_size=1, num_workers=num_workers
    )
    images = next(iter(loader))[0][:8].contiguous()
    relative = verify_outputs(model, pruned, images.float() / 255)
    defaults = nms_settings(TrainConfig())
    scores = evaluate_distributed(pruned, loader, coco_json_path(root, "val"), CPU, **defaults)
    verification = Verification(
        output_max_rel_diff=relative,
        map50_95=float(scores["map50_95"]),
        map50=float(scores["map50"]),
        recorded_map50_95=float("nan"),
    )
    return verification, images
