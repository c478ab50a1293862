"""The model a batch job runs, resolved once on the driver: a registered version (``models:/NAME@alias`` or
``models:/NAME/VERSION``), a checkpoint of this project or a reference ``.pt`` file, as the pruned network's
spec and weights. The weights travel as bytes through Ray's object store, so actors on any node build the
same network without reading the driver's files or the tracking store.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.registry.serving import SPEC_ARTIFACT, WEIGHTS_ARTIFACT, ModelSpec, pruned_architecture
from pipeline.tracking import TrackingError, check_model_store
from pipeline.weights.pretrained import load_source
from yolov9 import DetectionModel, prune

DEFAULT_IMGSZ = 640  # a reference file's training size; a project checkpoint or a version brings its own


@dataclass(frozen=True)
class BatchModel:
    """A pruned network as plain data: ``spec`` to build it, ``weights`` its state_dict saved with
    ``torch.save``, and what names it in the outputs (``uri`` as given, ``version`` when registered)."""

    spec: ModelSpec
    weights: bytes
    uri: str
    version: str

    def build(self, device: torch.device) -> DetectionModel:
        """The network in eval mode on ``device``."""
        model = pruned_architecture(self.spec)
        model.load_state_dict(torch.load(io.BytesIO(self.weights), map_location="cpu", weights_only=True))
        return model.to(device).eval()


def resolve_model(model: str, tracking_uri: str, imgsz: int | None = None) -> BatchModel:
    """``model`` -> BatchModel: a local weights file or checkpoint folder (``imgsz`` overrides its size),
    else a model URI read from the registry at ``tracking_uri``. TrackingError when the URI cannot be
    loaded."""
    if Path(model).exists():
        return _from_file(Path(model), imgsz)
    check_model_store(tracking_uri, model)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        version = _version(model, tracking_uri)
    except MlflowException as e:
        raise TrackingError(f"cannot load --model {model}: {e.message}") from e
    spec = ModelSpec.from_json(_artifact(folder, SPEC_ARTIFACT).read_text())
    if imgsz is not None:
        spec = ModelSpec(spec.model_name, spec.num_classes, spec.class_names, imgsz)
    weights = _artifact(folder, WEIGHTS_ARTIFACT).read_bytes()
    return BatchModel(spec, weights, model, version)


def _from_file(path: Path, imgsz: int | None) -> BatchModel:
    source = load_source(path)
    names = list(source.class_names)
    if len(names) != source.num_classes:  # a file without names: the class indices stand in
        names = [str(i) for i in range(source.num_classes)]
    spec = ModelSpec(source.layout, source.num_classes, names, imgsz or source.imgsz or DEFAULT_IMGSZ)
    buffer = io.BytesIO()
    torch.save(prune(source.model).state_dict(), buffer)
    return BatchModel(spec, buffer.getvalue(), str(path.resolve()), "")


def _artifact(folder: Path, key: str) -> Path:
    """The file of a pyfunc model's artifact ``key``, as the model's MLmodel file places it."""
    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        return folder / mlmodel["flavors"]["python_function"]["artifacts"][key]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise TrackingError(f"the model at {folder} has no '{key}' artifact: not a yolov9-ray model") from e


def _version(model: str, tracking_uri: str) -> str:
    """The registered version a ``models:/NAME@alias`` or ``models:/NAME/VERSION`` URI names now ("" for
    other URIs)."""
    if not model.startswith("models:/"):
        return ""
    name, _, rest = model.removeprefix("models:/").partition("@")
    if rest:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, rest).version)
    return model.rstrip("/").rsplit("/", 1)[-1]
