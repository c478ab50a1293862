"""Best checkpoint -> verified, pruned, exported model version in the MLflow model registry.

``register`` resolves the source to a checkpoint, prunes its EMA model, verifies the pruned network
(same outputs as the dual model's main branch; same val mAP as recorded in training), exports it to
TorchScript and ONNX (the ONNX graph checked with onnxruntime), logs it as a pyfunc model with pre-
and post-processing, registers a version with the training facts as tags, and moves the ``champion``
alias when the new version beats the current one on the same val manifest. Any failed check raises
RegistrationError before anything is logged.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import pipeline
import yolov9
from pipeline import names, storage
from pipeline.checkpoint import CheckpointError, TrainingCheckpoint, ema_model, load_checkpoint
from pipeline.data import DataError, Manifest, read_manifest
from pipeline.data.loader import make_val_loader
from pipeline.data.manifest import coco_json_path, manifest_path
from pipeline.errors import PipelineError
from pipeline.evaluation.evaluate import evaluate_distributed
from pipeline.registry import serving
from pipeline.registry.export import (
    ExportError,
    check_onnx,
    check_torchscript,
    export_onnx,
    export_torchscript,
)
from pipeline.registry.serving import (
    DEFAULT_PARAMS,
    IMAGE_COLUMN,
    SPEC_ARTIFACT,
    WEIGHTS_ARTIFACT,
    ModelSpec,
    encode_jpeg,
)
from pipeline.storage import Location
from pipeline.tracking import check_tracking_uri, experiment_id
from pipeline.weights.pretrained import PretrainedError, load_source
from yolov9 import DetectionModel, prune
from yolov9.profile import count_parameters, gflops

log = logging.getLogger(__name__)
CHAMPION = "champion"
DEFAULT_EXPERIMENT = "yolov9-registry"
# Pruning only re-associates float32 sums (BN folding, RepConvN merge); 1e-4 of the output scale is generous
# for that and far below any change a real bug makes.
OUTPUT_RTOL = 1e-4
CPU = torch.device("cpu")
MAP_TOLERANCE = 1e-3
REFERENCE_IMGSZ = 640  # the reference's training and validation size
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class RegistrationError(PipelineError, RuntimeError):
    """The source cannot be registered: no checkpoint, or a failed verification. Nothing was registered."""


@dataclass(frozen=True)
class CheckpointSource:
    """Where a checkpoint came from: its directory (a local Path or a URL) and, when known, the MLflow run
    that produced it."""

    checkpoint: Location
    run_id: str | None = None
    experiment_id: str | None = None
    ray_job_id: str | None = None


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


@dataclass(frozen=True)
class Promotion:
    """Whether the alias moves to the new version, and why (printed and stored as a version tag)."""

    promote: bool
    reason: str


@dataclass(frozen=True)
class RegistrationResult:
    """The registered version and the figures it was registered with."""

    name: str
    version: str
    model_uri: str
    logging_run_id: str
    source: CheckpointSource
    verification: Verification
    promotion: Promotion
    tags: dict[str, str]


def resolve_source(source: str | Path, client: MlflowClient) -> CheckpointSource:
    """A checkpoint path, an MLflow run id (its ``best_checkpoint`` tag) or an experiment name (its
    most recent run carrying a ``best_checkpoint`` tag, parent runs first: a tune experiment's parent
    run points at the best trial's checkpoint) -> CheckpointSource. RegistrationError when it is none of
    these."""
    text = str(source)
    if storage.is_url(text) or Path(text).exists():
        return CheckpointSource(checkpoint=storage.locate(text))
    if _RUN_ID.match(text):
        try:
            run = client.get_run(text)
        except MlflowException as e:
            raise RegistrationError(
                f"{text} is no checkpoint path and no run of the tracking store: {e}"
            ) from e
        return _source_of_run(run)
    experiment = client.get_experiment_by_name(text)
    if experiment is None:
        raise RegistrationError(
            f"{text!r} is neither a checkpoint path, an MLflow run id, nor an experiment name"
        )
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{names.BEST_CHECKPOINT_TAG} LIKE '%'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise RegistrationError(
            f"experiment {text!r} has no run with a '{names.BEST_CHECKPOINT_TAG}' tag (unfinished?)"
        )
    parents = [r for r in runs if names.PARENT_RUN_TAG not in r.data.tags]
    return _source_of_run((parents or runs)[0])


def _source_of_run(run: Any) -> CheckpointSource:
    path = run.data.tags.get(names.BEST_CHECKPOINT_TAG)
    if not path:
        raise RegistrationError(
            f"run {run.info.run_id} has no '{names.BEST_CHECKPOINT_TAG}' tag: did its training finish?"
        )
    return CheckpointSource(
        checkpoint=storage.locate(path),
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        ray_job_id=run.data.tags.get(names.RAY_JOB_TAG),
    )


def check_registrable(state: TrainingCheckpoint, where: str | Path) -> None:
    """Raise RegistrationError naming what is missing when a loadable checkpoint lacks what registration reads
    (class names, history, the training config's image size, data root and loss settings)."""
    missing = [k for k in ("class_names", "history") if not getattr(state, k)]
    missing += [
        f"config.{s}.{k}"
        for s, k in (("train", "imgsz"), ("data", "root"), ("loss", "tal_topk"))
        if k not in (state.config.get(s) or {})
    ]
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


def decide_promotion(
    current_map: float | None,
    current_val_hash: str | None,
    new_map: float,
    new_val_hash: str,
    force: bool = False,
) -> Promotion:
    """Whether the new version takes the alias from the current champion (``current_map`` None: none yet).

    Scores are comparable only on the same val manifest: a different one never promotes unless forced.
    """
    if force:
        return Promotion(True, "promotion forced (--promote)")
    if current_map is None:
        return Promotion(True, "no champion yet")
    if current_val_hash != new_val_hash:
        return Promotion(
            False,
            f"not promoted: the champion was measured on val manifest {current_val_hash}, "
            f"this version on {new_val_hash}; mAPs are not comparable (use --promote)",
        )
    if new_map > current_map:
        return Promotion(True, f"mAP@0.5:0.95 {new_map:.4f} beats the champion's {current_map:.4f}")
    return Promotion(
        False, f"not promoted: mAP@0.5:0.95 {new_map:.4f} does not beat the champion's {current_map:.4f}"
    )


def _val_setup(state: TrainingCheckpoint, data_root: Location | None) -> tuple[Manifest, Location, int]:
    """The val manifest the checkpoint was validated on, its root (a local Path or a URL), and the training
    image size (pixels)."""
    root = storage.locate(data_root or state.config["data"]["root"])
    try:
        manifest = read_manifest(manifest_path(root, "val"))
    except (DataError, OSError) as e:
        raise RegistrationError(f"cannot read the val shards of {root} for verification: {e}") from e
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
    manifest, _, imgsz = _val_setup(state, data_root)
    images, _ = next(
        iter(make_val_loader(manifest, batch_size=count, imgsz=imgsz, rank=0, world_size=1, num_workers=0))
    )
    return images.contiguous()


def validated_on(state: TrainingCheckpoint) -> str:
    """The kind of device the checkpoint's recorded mAP was measured on: its training's (``ray.use_gpu``)."""
    return "cuda" if (state.config.get("ray") or {}).get("use_gpu") else "cpu"


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
    manifest, root, imgsz = _val_setup(state, data_root)
    train_cfg = state.config["train"]
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
            conf_thres=float(train_cfg.get("val_conf", 0.001)),
            iou_thres=float(train_cfg.get("val_iou", 0.7)),
            max_det=int(train_cfg.get("val_max_det", 300)),
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


def version_tags(
    state: TrainingCheckpoint,
    pruned: DetectionModel,
    verification: Verification,
    source: CheckpointSource,
    imgsz: int,
) -> dict[str, str]:
    """The facts a registered version carries (all strings, as MLflow stores tags)."""
    loss = state.config.get("loss", {})
    return {
        "map50_95": f"{verification.map50_95:.6f}",
        "map50": f"{verification.map50:.6f}",
        "params": str(count_parameters(pruned)),
        "gflops": f"{gflops(pruned, imgsz, imgsz):.4f}",
        "imgsz": str(imgsz),
        "model_name": state.model_name,
        "class_names": json.dumps(list(state.class_names)),
        names.MANIFEST_HASH_TAG: state.manifest_hash,
        names.VAL_MANIFEST_HASH_TAG: state.val_manifest_hash,
        "loss.aux_weight": str(loss.get("aux_weight", "")),
        "loss.lead_weight": str(loss.get("lead_weight", "")),
        "loss.tal_topk": str(loss.get("tal_topk", "")),
        "source_run_id": source.run_id or "",
        names.RAY_JOB_TAG: source.ray_job_id or "",
        names.SOURCE_CHECKPOINT_TAG: str(source.checkpoint),
        "epoch": str(state.epoch),
        "verified_on": verification.device,
    }


def _champion(client: MlflowClient, name: str) -> tuple[float | None, str | None]:
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None  # no registered model yet, or no version holds the alias
    return float(current.tags.get("map50_95", "-1")), current.tags.get(names.VAL_MANIFEST_HASH_TAG)


def _example_image(image: torch.Tensor) -> str:
    """A uint8 (3, H, W) image as JPEG then base64 (the JSON form a serving client sends)."""
    return base64.b64encode(encode_jpeg(image.permute(1, 2, 0).numpy(), quality=80)).decode()


def register(
    source: str | Path,
    name: str,
    tracking_uri: str,
    *,
    promote: bool = False,
    data_root: str | Path | None = None,
    experiment: str | None = None,
    num_workers: int = 0,
    map_tolerance: float = MAP_TOLERANCE,
) -> RegistrationResult:
    """Verify, export, log and register the checkpoint that ``source`` names (see :func:`resolve_source`).

    ``data_root``: val shards for verification (default: the training config's ``data.root``);
    ``experiment``: where the registration run is logged (default: the source run's experiment, else
    ``yolov9-registry``); ``promote``: move the ``champion`` alias regardless of mAP; ``num_workers``:
    val loader processes; ``map_tolerance``: allowed |re-measured - recorded| mAP@0.5:0.95.
    Raises RegistrationError before anything is logged when a check fails.
    """
    check_tracking_uri(tracking_uri)
    src = resolve_source(source, MlflowClient(tracking_uri))
    return register_source(
        src,
        name,
        tracking_uri,
        promote=promote,
        data_root=data_root,
        experiment=experiment,
        num_workers=num_workers,
        map_tolerance=map_tolerance,
    )


def register_source(
    src: CheckpointSource,
    name: str,
    tracking_uri: str,
    *,
    promote: bool = False,
    data_root: str | Path | None = None,
    experiment: str | None = None,
    num_workers: int = 0,
    map_tolerance: float = MAP_TOLERANCE,
) -> RegistrationResult:
    """:func:`register` for an already resolved source (the caller has checked ``tracking_uri``). The checks
    run on this process's GPU when it has one (a Ray task given one: :func:`register_on_ray`), else its CPU.
    """
    client = MlflowClient(tracking_uri)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        state = load_checkpoint(src.checkpoint)
        dual = ema_model(state)
    except CheckpointError as e:
        raise RegistrationError(f"cannot register {src.checkpoint}: {e}") from e
    check_registrable(state, src.checkpoint)
    pruned = prune(dual)
    images = first_val_images(state, data_root)
    verification = verify_checkpoint(
        state, dual, pruned, images, data_root, num_workers, map_tolerance, device
    )
    imgsz = state.train_image_size()
    spec = ModelSpec(
        model_name=state.model_name,
        num_classes=int(state.num_classes),
        class_names=[str(c) for c in state.class_names],
        imgsz=imgsz,
    )
    tags = version_tags(state, pruned, verification, src, imgsz)
    return _export_and_register(
        client, tracking_uri, name, src, experiment, pruned, spec, images, tags, verification, promote
    )


def register_reference(
    weights: str | Path,
    name: str,
    tracking_uri: str,
    data_root: str | Path,
    *,
    imgsz: int = REFERENCE_IMGSZ,
    promote: bool = False,
    experiment: str | None = None,
    num_workers: int = 0,
) -> RegistrationResult:
    """Register a reference checkpoint file (``yolov9-c.pt``, ``gelan-c-converted.pt``, ...) read without
    executing it: pruned when dual, outputs checked against the file's model, val mAP measured on the
    shards of ``data_root`` at ``imgsz`` pixels and tagged (nothing to compare it with), exported and
    checked like a trained checkpoint; lineage: the file's sha256. Raises RegistrationError before
    anything is logged when the file cannot be read or does not fit the val split."""
    check_tracking_uri(tracking_uri)
    try:
        source = load_source(weights)
    except PretrainedError as e:
        raise RegistrationError(f"cannot register {weights}: {e}") from e
    if source.kind != "reference":
        raise RegistrationError(
            f"{weights} is a checkpoint of this project: register it with --run (its recorded mAP is checked)"
        )
    if imgsz < 32 or imgsz % 32:
        raise RegistrationError(f"imgsz must be a positive multiple of 32, got {imgsz}")
    root = storage.locate(data_root)
    try:
        manifest = read_manifest(manifest_path(root, "val"))
    except (DataError, OSError) as e:
        raise RegistrationError(f"cannot read the val shards of {root} for verification: {e}") from e
    class_names = list(manifest.class_names)
    if source.num_classes != manifest.num_classes:
        raise RegistrationError(
            f"{weights} predicts {source.num_classes} classes, {manifest.path} lists {manifest.num_classes} "
            f"({', '.join(class_names[:8])}{', ...' if len(class_names) > 8 else ''}): its mAP there "
            "would be meaningless"
        )
    if source.class_names and list(source.class_names) != class_names:
        # the reference names classes 0, 1, ... when its data YAML had no names: the shards' names serve
        log.warning(
            "%s names its classes %s, %s %s: the version is registered with the shards' names",
            weights,
            list(source.class_names)[:8],
            manifest.path,
            class_names[:8],
        )
    model = source.model
    pruned = prune(model)
    loader = make_val_loader(
        manifest, batch_size=16, imgsz=imgsz, rank=0, world_size=1, num_workers=num_workers
    )
    images = next(iter(loader))[0][:8].contiguous()
    relative = verify_outputs(model, pruned, images.float() / 255)
    scores = evaluate_distributed(
        pruned,
        loader,
        coco_json_path(root, "val"),
        torch.device("cpu"),
    )
    verification = Verification(
        output_max_rel_diff=relative,
        map50_95=float(scores["map50_95"]),
        map50=float(scores["map50"]),
        recorded_map50_95=float("nan"),  # a reference file records none
    )
    info = model.reference_info
    spec = ModelSpec(
        model_name=info.layout, num_classes=source.num_classes, class_names=class_names, imgsz=imgsz
    )
    tags = {
        "map50_95": f"{verification.map50_95:.6f}",
        "map50": f"{verification.map50:.6f}",
        "params": str(count_parameters(pruned)),
        "gflops": f"{gflops(pruned, imgsz, imgsz):.4f}",
        "imgsz": str(imgsz),
        "model_name": info.layout,
        "class_names": json.dumps(class_names),
        names.MANIFEST_HASH_TAG: "",  # the reference's own training data is not known here
        names.VAL_MANIFEST_HASH_TAG: manifest.manifest_hash,
        names.SOURCE_CHECKPOINT_TAG: str(Path(weights).resolve()),
        names.LINEAGE_SHA256_TAG: info.sha256,
        "epoch": "" if info.epoch is None else str(info.epoch),
        "reference.weights": info.weights,
        "reference.class_names": json.dumps(list(info.class_names)),
    }
    src = CheckpointSource(checkpoint=Path(weights).resolve())
    client = MlflowClient(tracking_uri)
    return _export_and_register(
        client, tracking_uri, name, src, experiment, pruned, spec, images, tags, verification, promote
    )


def _export_and_register(
    client: MlflowClient,
    tracking_uri: str,
    name: str,
    src: CheckpointSource,
    experiment: str | None,
    pruned: DetectionModel,
    spec: ModelSpec,
    images: torch.Tensor,
    tags: dict[str, str],
    verification: Verification,
    promote: bool,
) -> RegistrationResult:
    """Export ``pruned`` to ONNX and TorchScript (each checked against it on ``images``, uint8 val images
    (B, 3, S, S)), then log the pyfunc model and register a version with ``tags``."""
    imgsz = spec.imgsz
    example = _example_image(images[0])
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        # real val images: the post-NMS comparison needs detections, which noise images do not give
        probe = images.float() / 255
        try:
            onnx_file = export_onnx(pruned, d / "model.onnx", imgsz)
            onnx_check = check_onnx(pruned, onnx_file, probe)
            ts_file = export_torchscript(pruned, d / "model.torchscript.pt", imgsz)
            ts_check = check_torchscript(pruned, ts_file, probe)
        except ExportError as e:
            raise RegistrationError(f"export check failed, nothing registered: {e}") from e
        verification = replace(
            verification,
            onnx_box_diff_px=onnx_check.box_diff_px,
            onnx_score_diff=onnx_check.score_diff,
            onnx_detections=onnx_check.detections,
            torchscript_box_diff_px=ts_check.box_diff_px,
            torchscript_score_diff=ts_check.score_diff,
        )
        weights = d / "pruned_state_dict.pt"
        torch.save(pruned.state_dict(), weights)
        spec_file = d / "model_spec.json"
        spec_file.write_text(spec.to_json())
        return _log_and_register(
            client,
            tracking_uri,
            name,
            src,
            experiment,
            tags,
            verification,
            promote,
            artifacts={WEIGHTS_ARTIFACT: str(weights), SPEC_ARTIFACT: str(spec_file)},
            exports=[onnx_file, ts_file],
            example=example,
        )


def _log_and_register(
    client: MlflowClient,
    tracking_uri: str,
    name: str,
    src: CheckpointSource,
    experiment: str | None,
    tags: dict[str, str],
    verification: Verification,
    force: bool,
    artifacts: dict[str, str],
    exports: list[Path],
    example: str,
) -> RegistrationResult:
    """A registration run holding the pyfunc model and the export files; a new version; the alias decision."""
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        if experiment is not None or src.experiment_id is None:
            exp_id = experiment_id(client, tracking_uri, experiment or DEFAULT_EXPERIMENT)
        else:
            exp_id = src.experiment_id
        run_tags = {k: v for k, v in tags.items() if v}
        # nested: the caller (end of a training job) may hold an active fluent run of its own
        with mlflow.start_run(
            experiment_id=exp_id,
            run_name=f"register-{name}",
            tags=run_tags,
            nested=mlflow.active_run() is not None,
        ) as run:
            figures = {k: v for k, v in asdict(verification).items() if isinstance(v, int | float)}
            mlflow.log_metrics({f"verify/{k}": float(v) for k, v in figures.items()})
            for f in exports:
                mlflow.log_artifact(str(f), artifact_path="export")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=serving.__file__,
                artifacts=artifacts,
                code_paths=[str(Path(yolov9.__file__).parent), str(Path(pipeline.__file__).parent)],
                signature=serving.signature(),
                input_example=(pd.DataFrame({IMAGE_COLUMN: [example]}), dict(DEFAULT_PARAMS)),
                pip_requirements=_requirements(),
            )
            current_map, current_hash = _champion(client, name)
            try:
                client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            decision = decide_promotion(
                current_map, current_hash, verification.map50_95, tags[names.VAL_MANIFEST_HASH_TAG], force
            )
            # model_id: an HTTP tracking server only accepts a logged-model source with its id
            version = client.create_model_version(
                name,
                info.model_uri,
                run_id=run.info.run_id,
                tags={**tags, "promotion": decision.reason},
                model_id=info.model_id,
            )
            if decision.promote:
                client.set_registered_model_alias(name, CHAMPION, version.version)
            log.info("%s version %s: %s", name, version.version, decision.reason)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    return RegistrationResult(
        name=name,
        version=str(version.version),
        model_uri=f"models:/{name}/{version.version}",
        logging_run_id=run.info.run_id,
        source=src,
        verification=verification,
        promotion=decision,
        tags=tags,
    )


def _requirements() -> list[str]:
    """The serving environment, pinned to what registered the model (inferring it loads the model again)."""
    from importlib.metadata import version

    packages = ("mlflow", "torch", "numpy", "pandas", "opencv-python-headless", "pyyaml")
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def task_resources(ray_config: dict[str, Any]) -> dict[str, float]:
    """Ray task options that give registration what one worker of the training had: its CPUs, and one GPU
    when it trained on GPUs (``ray_config``: a Config's ``ray`` section, as a dict or as run params)."""
    use_gpu = str(ray_config.get("use_gpu", False)).lower() == "true"
    return {"num_cpus": float(ray_config.get("cpus_per_worker", 1.0)), "num_gpus": 1.0 if use_gpu else 0.0}


def register_on_ray(
    src: CheckpointSource, name: str, tracking_uri: str, resources: dict[str, float], **options: Any
) -> RegistrationResult:
    """:func:`register_source` as a Ray task with ``resources`` (:func:`task_resources`), on the connected
    Ray cluster: loading, pruning, the mAP check and the export run on a worker node, a GPU one when the
    training had GPUs, while the driver on the head only waits. Not retried: a failed check is final."""
    import ray

    task = ray.remote(max_retries=0, **resources)(register_source)
    log.info("registering %s as a Ray task (%s)", src.checkpoint, resources)
    return ray.get(task.remote(src, name, tracking_uri, **options))


def source_run_resources(src: CheckpointSource, tracking_uri: str) -> dict[str, float]:
    """:func:`task_resources` of the training run that produced ``src`` (its ``ray.*`` params); one CPU
    when the source has no run (a bare checkpoint path)."""
    if src.run_id is None:
        return task_resources({})
    params = MlflowClient(tracking_uri).get_run(src.run_id).data.params
    return task_resources({k.removeprefix("ray."): v for k, v in params.items() if k.startswith("ray.")})


def register_after_training(
    checkpoint_dir: Location,
    run_id: str,
    tracking_uri: str,
    model_name: str,
    *,
    promote: bool = False,
    on_ray: bool = False,
) -> RegistrationResult:
    """The end-of-training hook (``mlflow.register: true``): register ``checkpoint_dir``, which training run
    ``run_id`` produced, logging the registration run into that run's experiment. ``on_ray``: as a Ray task
    with one training worker's resources (:func:`register_on_ray`), else in this process."""
    check_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    src = CheckpointSource(
        checkpoint=storage.locate(checkpoint_dir),
        run_id=run_id,
        experiment_id=run.info.experiment_id,
        ray_job_id=run.data.tags.get(names.RAY_JOB_TAG),
    )
    if on_ray:
        resources = source_run_resources(src, tracking_uri)
        return register_on_ray(src, model_name, tracking_uri, resources, promote=promote)
    return register_source(src, model_name, tracking_uri, promote=promote)
