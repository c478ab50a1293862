"""A verified checkpoint -> a pruned, exported model version in the MLflow model registry.

``register`` resolves the source to a checkpoint (``source.py``), prunes its EMA model and verifies the
pruned network (``verify.py``), exports it to TorchScript and ONNX (the ONNX graph checked with
onnxruntime), logs it as a pyfunc model with pre- and post-processing, registers a version with the
training facts as tags, and moves the ``champion`` alias when the new version beats the current one on the
same val manifest. Any failed check raises RegistrationError before anything is logged. Registering as a
Ray task, and at the end of a training job: ``on_ray.py``.
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

import pipeline
import yolov9
from pipeline import names, storage
from pipeline.checkpoint import CheckpointError, TrainingCheckpoint, ema_model, load_checkpoint
from pipeline.errors import RegistrationError
from pipeline.registry import serving
from pipeline.registry.export import (
    ExportError,
    check_onnx,
    check_torchscript,
    export_onnx,
    export_torchscript,
)
from pipeline.registry.promotion import Promotion, Target, new_version
from pipeline.registry.serving import (
    DEFAULT_PARAMS,
    IMAGE_COLUMN,
    SPEC_ARTIFACT,
    WEIGHTS_ARTIFACT,
    ModelSpec,
    encode_jpeg,
)
from pipeline.registry.source import CheckpointSource, resolve_source
from pipeline.registry.verify import (
    MAP_TOLERANCE,
    Verification,
    check_registrable,
    first_val_images,
    read_val_manifest,
    verify_checkpoint,
    verify_reference,
)
from pipeline.storage import Location
from pipeline.tracking import check_tracking_uri, experiment_id
from pipeline.weights.pretrained import PretrainedError, SourceWeights, load_source
from yolov9 import DetectionModel, prune
from yolov9.profile import count_parameters, gflops

log = logging.getLogger(__name__)
DEFAULT_EXPERIMENT = "yolov9-registry"
REFERENCE_IMGSZ = 640  # the reference's training and validation size


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


def model_tags(
    pruned: DetectionModel,
    verification: Verification,
    imgsz: int,
    model_name: str,
    class_names: list[str],
    val_manifest_hash: str,
) -> dict[str, str]:
    """The tags every registered version carries, whatever it was made from (all strings, as MLflow
    stores tags)."""
    return {
        names.VERSION_MAP_TAG: f"{verification.map50_95:.6f}",
        names.VERSION_MAP50_TAG: f"{verification.map50:.6f}",
        "params": str(count_parameters(pruned)),
        "gflops": f"{gflops(pruned, imgsz, imgsz):.4f}",
        "imgsz": str(imgsz),
        "model_name": model_name,
        "class_names": json.dumps(class_names),
        names.VAL_MANIFEST_HASH_TAG: val_manifest_hash,
    }


def version_tags(
    state: TrainingCheckpoint,
    pruned: DetectionModel,
    verification: Verification,
    source: CheckpointSource,
    imgsz: int,
) -> dict[str, str]:
    """The facts a version registered from a training checkpoint carries."""
    loss = state.config.loss
    class_names = list(state.class_names)
    return {
        **model_tags(pruned, verification, imgsz, state.model_name, class_names, state.val_manifest_hash),
        names.MANIFEST_HASH_TAG: state.manifest_hash,
        "loss.aux_weight": str(loss.aux_weight),
        "loss.lead_weight": str(loss.lead_weight),
        "loss.tal_topk": str(loss.tal_topk),
        "source_run_id": source.run_id or "",
        names.RAY_JOB_TAG: source.ray_job_id or "",
        names.SOURCE_CHECKPOINT_TAG: str(source.checkpoint),
        "epoch": str(state.epoch),
        "verified_on": verification.device,
    }


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
    run on this process's GPU when it has one (a Ray task given one: ``on_ray.register_on_ray``), else its
    CPU."""
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
    target = Target(tracking_uri, name, experiment, promote)
    return export_and_register(target, src, pruned, spec, images, tags, verification)


def register_reference(
    weights: Location,
    name: str,
    tracking_uri: str,
    data_root: Location,
    *,
    imgsz: int = REFERENCE_IMGSZ,
    promote: bool = False,
    experiment: str | None = None,
    num_workers: int = 0,
) -> RegistrationResult:
    """Register a reference checkpoint file (``yolov9-c.pt``, ``gelan-c-converted.pt``, ...; a local path or
    a URL) read without executing it: pruned when dual, outputs checked against the file's model, val mAP
    measured on the shards of ``data_root`` at ``imgsz`` pixels and tagged (nothing to compare it with),
    exported and checked like a trained checkpoint; lineage: the file's sha256. Raises RegistrationError
    before anything is logged when the file cannot be read or does not fit the val split."""
    check_tracking_uri(tracking_uri)
    if imgsz < 32 or imgsz % 32:
        raise RegistrationError(f"imgsz must be a positive multiple of 32, got {imgsz}")
    located = storage.locate(weights)
    located = located.resolve() if isinstance(located, Path) else located
    source = _reference_file(located)
    root = storage.locate(data_root)
    manifest = read_val_manifest(root)
    class_names = _reference_class_names(source, located, manifest.class_names, manifest.path)
    pruned = prune(source.model)
    verification, images = verify_reference(source.model, pruned, manifest, root, imgsz, num_workers)
    info = source.model.reference_info
    spec = ModelSpec(
        model_name=info.layout, num_classes=source.num_classes, class_names=class_names, imgsz=imgsz
    )
    tags = {
        **model_tags(pruned, verification, imgsz, info.layout, class_names, manifest.manifest_hash),
        names.MANIFEST_HASH_TAG: "",  # the reference's own training data is not known here
        names.SOURCE_CHECKPOINT_TAG: str(located),
        names.LINEAGE_SHA256_TAG: info.sha256,
        "epoch": "" if info.epoch is None else str(info.epoch),
        "reference.weights": info.weights,
        "reference.class_names": json.dumps(list(info.class_names)),
    }
    target = Target(tracking_uri, name, experiment, promote)
    return export_and_register(
        target, CheckpointSource(checkpoint=located), pruned, spec, images, tags, verification
    )


def _reference_file(weights: Location) -> SourceWeights:
    """The reference file at ``weights``, loaded without executing it; RegistrationError for anything else."""
    try:
        source = load_source(weights)
    except PretrainedError as e:
        raise RegistrationError(f"cannot register {weights}: {e}") from e
    if source.kind != "reference":
        raise RegistrationError(
            f"{weights} is a checkpoint of this project: register it with --run (its recorded mAP is checked)"
        )
    return source


def _reference_class_names(
    source: SourceWeights, weights: Location, shard_names: list[str], manifest_path: Location
) -> list[str]:
    """The class names a reference file's version is registered with: the shards' (the reference names
    classes 0, 1, ... when its data YAML had none). RegistrationError when the class counts differ."""
    class_names = list(shard_names)
    if source.num_classes != len(class_names):
        raise RegistrationError(
            f"{weights} predicts {source.num_classes} classes, {manifest_path} lists {len(class_names)} "
            f"({', '.join(class_names[:8])}{', ...' if len(class_names) > 8 else ''}): its mAP there "
            "would be meaningless"
        )
    if source.class_names and list(source.class_names) != class_names:
        log.warning(
            "%s names its classes %s, %s %s: the version is registered with the shards' names",
            weights, list(source.class_names)[:8], manifest_path, class_names[:8],
        )  # fmt: skip
    return class_names


def export_and_register(
    target: Target,
    src: CheckpointSource,
    pruned: DetectionModel,
    spec: ModelSpec,
    images: torch.Tensor,
    tags: dict[str, str],
    verification: Verification,
) -> RegistrationResult:
    """Export ``pruned`` to ONNX and TorchScript (each checked against it on ``images``, uint8 val images
    (B, 3, S, S)), then log the pyfunc model and register a version with ``tags``."""
    example = _example_image(images[0])
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        # real val images: the post-NMS comparison needs detections, which noise images do not give
        probe = images.float() / 255
        try:
            onnx_file = export_onnx(pruned, d / "model.onnx", spec.imgsz)
            onnx_check = check_onnx(pruned, onnx_file, probe)
            ts_file = export_torchscript(pruned, d / "model.torchscript.pt", spec.imgsz)
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
        artifacts = {WEIGHTS_ARTIFACT: str(weights), SPEC_ARTIFACT: str(spec_file)}
        return log_and_register(
            target, src, tags, verification, artifacts, exports=[onnx_file, ts_file], example=example
        )


def log_and_register(
    target: Target,
    src: CheckpointSource,
    tags: dict[str, str],
    verification: Verification,
    artifacts: dict[str, str],
    exports: list[Path],
    example: str,
) -> RegistrationResult:
    """A registration run holding the pyfunc model and the export files; a new version; the alias decision."""
    client = MlflowClient(target.tracking_uri)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(target.tracking_uri)
    try:
        if target.experiment is not None or src.experiment_id is None:
            exp_id = experiment_id(client, target.tracking_uri, target.experiment or DEFAULT_EXPERIMENT)
        else:
            exp_id = src.experiment_id
        # nested: the caller (end of a training job) may hold an active fluent run of its own
        with mlflow.start_run(
            experiment_id=exp_id,
            run_name=f"register-{target.name}",
            tags={k: v for k, v in tags.items() if v},
            nested=mlflow.active_run() is not None,
        ) as run:
            info = _log_model(verification, artifacts, exports, example)
            version, decision = new_version(client, target, info, run.info.run_id, tags, verification)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    return RegistrationResult(
        name=target.name,
        version=str(version.version),
        model_uri=f"models:/{target.name}/{version.version}",
        logging_run_id=run.info.run_id,
        source=src,
        verification=verification,
        promotion=decision,
        tags=tags,
    )


def _log_model(
    verification: Verification, artifacts: dict[str, str], exports: list[Path], example: str
) -> Any:
    """Into the active run: the verification figures, the export files and the pyfunc model (this
    project's code with it); returns MLflow's ModelInfo."""
    figures = {k: v for k, v in asdict(verification).items() if isinstance(v, int | float)}
    mlflow.log_metrics({f"verify/{k}": float(v) for k, v in figures.items()})
    for f in exports:
        mlflow.log_artifact(str(f), artifact_path="export")
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=serving.__file__,
        artifacts=artifacts,
        code_paths=[str(Path(yolov9.__file__).parent), str(Path(pipeline.__file__).parent)],
        signature=serving.signature(),
        input_example=(pd.DataFrame({IMAGE_COLUMN: [example]}), dict(DEFAULT_PARAMS)),
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    """The serving environment, pinned to what registered the model (inferring it loads the model again)."""
    from importlib.metadata import version

    packages = ("mlflow", "torch", "numpy", "pandas", "opencv-python-headless", "pyyaml")
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]
