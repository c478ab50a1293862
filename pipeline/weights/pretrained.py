"""Starting weights of a training run (``model.weights``) and frozen layers (``model.freeze``).

A source is a reference checkpoint file (``yolov9-c.pt``, ``gelan-c.pt``, read by
:func:`yolov9.load_reference_checkpoint`, never executed) or one of this project's training checkpoints
(a ``checkpoint.pt`` or its directory; its EMA weights). :func:`transfer` copies into a freshly built
model every tensor whose counterpart has the same shape:

* same kind of model (both dual, or both single-branch): the counterpart is the tensor of the same name;
* a dual model from a single-branch source (or the reverse): the single-branch model is the dual one's
  main branch, matched layer by layer through the layer graph (the main branch is what the main half of
  the head depends on, as in :func:`yolov9.prune`), so differing layer numbers (the dual models' leading
  ``Silence``) do not matter; the auxiliary branch is left as built.

When the class count differs, the class-prediction layers (the last conv of each class tower) keep the
fresh initialisation, whose bias is the prior-probability one (``DDetect.init_biases``). A source that
fills almost nothing (another model size, an unrelated layout) is a :class:`PretrainedError`.

URIs (``runs:/``, ``models:/``) are resolved to local paths on the driver by
:mod:`pipeline.weights.sources`; this module only reads local files (no MLflow import: it runs in every
Ray Train worker).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline import storage
from pipeline.checkpoint import CheckpointError, ema_model, load_checkpoint
from pipeline.config import MLFLOW_URI_SCHEMES
from pipeline.errors import PipelineError
from pipeline.storage import StorageError
from yolov9 import DetectionModel, load_reference_checkpoint
from yolov9.blocks import Silence
from yolov9.prune import main_branch_layers

# Below this fraction of the target's weights (elements of tensors that have a counterpart) loaded, the
# source is another model: a size mismatch fills only the shape-free scalars and the DFL bins.
MIN_LOADED_FRACTION = 0.5
INPUT = -1  # a graph source that is the input image


class PretrainedError(PipelineError, ValueError):
    """The starting weights cannot be read, or do not fit the model being trained."""


@dataclass(frozen=True)
class SourceWeights:
    """A starting-weights file, loaded: the model it holds (eval mode) and what identifies it.

    ``kind`` is ``reference`` or ``checkpoint``; ``imgsz`` the training image side of a project checkpoint
    (None for a reference file); ``class_names`` as the file lists them (may be empty).
    """

    path: str
    kind: str
    sha256: str
    model: DetectionModel
    class_names: tuple[str, ...]
    imgsz: int | None

    @property
    def layout(self) -> str:
        return self.model.name

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


@dataclass(frozen=True)
class TransferReport:
    """What :func:`transfer` did, counted in state-dict tensors of the target (parameters and buffers).

    loaded: copied from the source; reinitialised: class-prediction tensors whose source counterpart is
    for another class count; fresh: the rest (no counterpart, or another shape), left as built.
    ``loaded_fraction``: loaded elements / elements of the target tensors that have a counterpart.
    """

    source: str
    sha256: str
    source_layout: str
    source_classes: int
    target_layout: str
    target_classes: int
    loaded: int
    reinitialised: int
    fresh: int
    loaded_fraction: float

    @property
    def total(self) -> int:
        return self.loaded + self.reinitialised + self.fresh

    def summary(self) -> str:
        return (
            f"starting weights {self.source} ({self.source_layout}, {self.source_classes} classes, "
            f"sha256 {self.sha256[:12]}) -> {self.target_layout} with {self.target_classes} classes: "
            f"{self.loaded} of {self.total} tensors loaded, {self.reinitialised} re-initialised "
            f"(class prediction), {self.fresh} left fresh"
        )


def sha256_of(location: str | Path) -> str:
    """The sha256 of the file at ``location``, a local path or an object-store URL, read as a stream (an
    object is hashed as it arrives, never written to disk)."""
    digest = hashlib.sha256()
    with storage.open_input(location) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_source(location: str | Path) -> SourceWeights:
    """Read a starting-weights file: a project checkpoint (file or directory: its EMA weights) or a
    reference checkpoint file, at a local path or a URL (s3://...). Raises PretrainedError naming the file
    when it is neither."""
    text = str(location)
    if text.startswith(MLFLOW_URI_SCHEMES):
        raise PretrainedError(
            f"model.weights {text} is an MLflow URI: it is resolved to a file on the driver "
            "(pipeline.weights.sources.resolve_weights) before the workers start"
        )
    if storage.is_url(text):
        # each worker reads the file itself: downloaded to a temporary folder, named by its URL
        try:
            with storage.local_copy(text) as local:
                return dataclasses.replace(load_source(local), path=text)
        except StorageError as e:
            raise PretrainedError(f"model.weights: {e}") from e
    path = Path(text)
    if not path.exists():
        raise PretrainedError(f"model.weights: no file or checkpoint directory at {path}")
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as not_ours:
        if path.is_dir():
            raise PretrainedError(f"model.weights: {not_ours}") from not_ours
        return _reference_source(path, not_ours)
    file = path / "checkpoint.pt" if path.is_dir() else path
    try:
        model = ema_model(checkpoint)
    except CheckpointError as e:
        raise PretrainedError(f"model.weights {path}: {e}") from e
    return SourceWeights(
        path=str(path),
        kind="checkpoint",
        sha256=sha256_of(file),
        model=model,
        class_names=tuple(checkpoint.class_names),
        imgsz=checkpoint.train_image_size(),
    )


def _reference_source(path: Path, not_ours: CheckpointError) -> SourceWeights:
    try:
        model = load_reference_checkpoint(path)
    except (ValueError, OSError) as e:  # refused global, corrupt file, unknown layout
        raise PretrainedError(
            f"model.weights {path} is neither a checkpoint of this project ({not_ours}) nor a readable "
            f"reference checkpoint ({e})"
        ) from e
    info = model.reference_info
    return SourceWeights(
        path=str(path),
        kind="reference",
        sha256=info.sha256,
        model=model,
        class_names=tuple(info.class_names),
        imgsz=None,
    )


def transfer(source: SourceWeights, target: DetectionModel) -> TransferReport:
    """Copy ``source``'s weights into ``target`` (freshly built, so that what is not loaded keeps its
    initialisation) where name (or graph place) and shape agree; see the module docstring.

    Raises PretrainedError, leaving ``target`` untouched, when less than ``MIN_LOADED_FRACTION`` of the
    weights that have a counterpart would load.
    """
    theirs = source.model.state_dict()
    ours = target.state_dict()
    counterpart = counterparts(source.model, target)
    class_prediction = set(class_prediction_keys(target))
    loaded: dict[str, torch.Tensor] = {}
    reinitialised = 0
    for key, other in counterpart.items():
        if theirs[other].shape == ours[key].shape:
            loaded[key] = theirs[other]
        elif key in class_prediction:
            reinitialised += 1
    paired = sum(ours[k].numel() for k in counterpart)
    fraction = sum(ours[k].numel() for k in loaded) / paired if paired else 0.0
    report = TransferReport(
        source=source.path,
        sha256=source.sha256,
        source_layout=source.layout,
        source_classes=source.num_classes,
        target_layout=target.name,
        target_classes=target.num_classes,
        loaded=len(loaded),
        reinitialised=reinitialised,
        fresh=len(ours) - len(loaded) - reinitialised,
        loaded_fraction=fraction,
    )
    if fraction < MIN_LOADED_FRACTION:
        raise PretrainedError(
            f"model.weights {source.path} ({source.layout}) does not fit {target.name}: only "
            f"{report.loaded} of {len(ours)} tensors ({fraction:.1%} of the weights with a counterpart) "
            "would "
            "load; is it another model size or layout? (set model.name to the file's layout)"
        )
    with torch.no_grad():
        for key, value in loaded.items():
            ours[key].copy_(value)
    return report


def load_initial_weights(target: DetectionModel, location: str | Path) -> TransferReport:
    """:func:`transfer` from the file or checkpoint directory at ``location``."""
    return transfer(load_source(location), target)


def class_prediction_keys(model: DetectionModel) -> list[str]:
    """State-dict names of the class-prediction layers: the last conv of every class tower, both branches."""
    head, index = model.head, len(model.layers) - 1
    towers = ("cv3", "cv5") if head.dual else ("cv3",)
    keys = []
    for tower in towers:
        for level, sequence in enumerate(getattr(head, tower)):
            last = f"layers.{index}.{tower}.{level}.{len(sequence) - 1}"
            keys += [f"{last}.{name}" for name, _ in sequence[-1].named_parameters()]
    return keys


def counterparts(source: DetectionModel, target: DetectionModel) -> dict[str, str]:
    """Target state-dict name -> the source name of the tensor in the same place (shapes not compared)."""
    ours, theirs = target.state_dict(), source.state_dict()
    if source.head.dual == target.head.dual:
        return {k: k for k in ours if k in theirs}
    dual, single = (target, source) if target.head.dual else (source, target)
    layers = main_branch_map(dual, single)
    if layers is None:
        return {}
    prefixes = {f"layers.{d}.": f"layers.{s}." for d, s in layers.items()}
    d_head, s_head = len(dual.layers) - 1, len(single.layers) - 1
    # DualDDetect's main half (cv4, cv5, dfl2) is a DDetect's (cv2, cv3, dfl)
    for d_part, s_part in (("cv4", "cv2"), ("cv5", "cv3"), ("dfl2", "dfl")):
        prefixes[f"layers.{d_head}.{d_part}."] = f"layers.{s_head}.{s_part}."
    pairs = {}  # dual name -> single name
    dual_keys = dual.state_dict()
    single_keys = single.state_dict()
    for key in dual_keys:
        for d_prefix, s_prefix in prefixes.items():
            if key.startswith(d_prefix) and (other := s_prefix + key[len(d_prefix) :]) in single_keys:
                pairs[key] = other
    if target is dual:
        return pairs
    return {s: d for d, s in pairs.items()}


def main_branch_map(dual: DetectionModel, single: DetectionModel) -> dict[int, int] | None:
    """Dual layer index -> single-branch layer index for the dual model's main branch (head excluded),
    when the two graphs agree block for block and edge for edge; None when they do not."""
    d_nodes, d_rows, d_node_of = _graph(dual, main_branch_layers(dual))
    s_nodes, s_rows, s_node_of = _graph(single, range(len(single.layers) - 1))
    d_head = _sources(dual, len(dual.layers) - 1)[dual.head.nl :]
    s_head = _sources(single, len(single.layers) - 1)
    same_head = [d_node_of[i] for i in d_head] == [s_node_of[i] for i in s_head]
    if d_nodes != s_nodes or not same_head:
        return None
    return dict(zip(d_rows, s_rows, strict=True))


def _sources(model: DetectionModel, i: int) -> list[int]:
    """Layer indices that layer ``i`` reads (INPUT for the image)."""
    f = model.sources[i]
    return [i - 1 if j == -1 else j for j in ([f] if isinstance(f, int) else f)]


def _graph(
    model: DetectionModel, layers: Sequence[int]
) -> tuple[list[tuple[str, tuple[int, ...]]], list[int], dict[int, int]]:
    """The layers as graph nodes (block class, source nodes) without identity layers; the layer index of
    each node; and the node each layer stands for (an identity layer: its input's)."""
    node_of: dict[int, int] = {INPUT: INPUT}
    nodes: list[tuple[str, tuple[int, ...]]] = []
    rows: list[int] = []
    for i in layers:
        sources = tuple(node_of.get(j, -2) for j in _sources(model, i))  # -2: outside the branch
        if isinstance(model.layers[i], Silence):
            node_of[i] = sources[0]
            continue
        node_of[i] = len(nodes)
        nodes.append((type(model.layers[i]).__name__, sources))
        rows.append(i)
    return nodes, rows, node_of


def freeze_layers(model: DetectionModel, count: int) -> int:
    """Freeze ``model.layers[:count]`` (the reference's ``--freeze N``): their parameters get no gradient
    and their BatchNorm layers normalise with, and keep, their running statistics even when the model is
    in training mode. Returns the number of frozen parameter tensors."""
    if count == 0:
        return 0
    if not 0 < count < len(model.layers):
        raise PretrainedError(
            f"model.freeze is {count} but {model.name} has {len(model.layers)} layers (the head is the last)"
        )
    frozen = 0
    for layer in model.layers[:count]:
        for p in layer.parameters():
            p.requires_grad_(False)
            frozen += 1
        for module in layer.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(_keep_eval_mode)
    return frozen


def _keep_eval_mode(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a frozen BatchNorm: ``model.train()`` at each epoch sets it training again, and
    in training mode it would normalise with batch statistics and overwrite its running ones."""
    module.training = False
