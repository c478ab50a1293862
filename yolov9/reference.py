"""Import the reference implementation's checkpoint files (``yolov9-c.pt``, ``gelan-c.pt``, ...) safely.

The file is read by :mod:`yolov9.safe_unpickle`, which never executes it. The pickled
``models.yolo.DetectionModel`` carries its own layer list (``yaml``: ``backbone`` + ``head`` rows);
the layout is the shipped config with the same layer graph, compared after dropping ``Silence``
layers (identity layers that only renumber the others: the reference's yolov9-t has none where
ours has one). File layer ``i`` then maps to the config layer at the same place in that graph, and
every tensor must match by name and shape: no per-size index tables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolov9.model import MODEL_NAMES, DetectionModel, LayerSpec, build_model, load_model_spec, parse_layers
from yolov9.safe_unpickle import InertRecord, load_inert

DETECT_BLOCKS = ("DDetect", "DualDDetect")
IDENTITY_BLOCKS = ("Silence",)
INPUT = -1  # a canonical source that is the input image
# Module settings that change the output but not any tensor's shape, checked against the file's.
_SETTINGS = {nn.Conv2d: ("stride", "padding", "dilation", "groups"), nn.BatchNorm2d: ("eps",)}


class ReferenceLayoutError(ValueError):
    """The file's model is not one of the known layouts, or its state does not fit that layout."""


@dataclass(frozen=True)
class ReferenceInfo:
    """What a reference checkpoint says about itself, for lineage.

    ``layout`` is the project's model name (``yolov9-c``, ``gelan-t``); ``source_config`` the
    config file the reference built it from (its ``yaml_file``); ``epoch`` as stored (-1 for a
    finished, stripped file); ``weights`` which pickled model was read (``ema`` or ``model``).
    """

    path: str
    sha256: str
    layout: str
    num_classes: int
    class_names: tuple[str, ...]
    epoch: int | None
    source_config: str | None
    weights: str


@dataclass(frozen=True)
class _Node:
    """One non-identity layer: block name, canonical sources (node indices or INPUT), normalised args."""

    block: str
    sources: tuple[int, ...]
    args: tuple


def load_reference_checkpoint(path: str | Path) -> DetectionModel:
    """The project's model for a reference checkpoint file, with its weights, float32, in eval mode.

    The file's EMA model is read when it has one (as the reference's own loader does), else
    ``model``. The returned model has the file's class count and carries a :class:`ReferenceInfo`
    as ``model.reference_info``. Dual files give a dual model (ready for :func:`yolov9.prune`),
    gelan / converted files a single-branch one. Raises :class:`~yolov9.safe_unpickle.UnsafeCheckpointError`
    for a file that names a refused global, :class:`~yolov9.safe_unpickle.CheckpointFormatError` for
    a truncated or corrupt file, :class:`ReferenceLayoutError` for an unknown layout or a state
    that does not fit it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference checkpoint at {path}")
    content = load_inert(path)
    record, weights = _pickled_model(content, path)
    attributes = record.attributes
    rows = _file_layer_specs(attributes.get("yaml"), path)
    num_classes = _class_count(attributes, path)
    layout, file_to_ours = _identify_layout(rows, path)
    model = build_model(layout, num_classes=num_classes)
    layer_records = _layer_records(attributes, len(rows), path)
    _load_layers(model, layer_records, file_to_ours, layout, path)
    _check_strides(model, layer_records[-1], path)
    model.float().eval()
    model.reference_info = ReferenceInfo(
        path=str(path),
        sha256=_sha256(path),
        layout=layout,
        num_classes=num_classes,
        class_names=_class_names(attributes.get("names")),
        epoch=_epoch(content),
        source_config=_source_config(attributes),
        weights=weights,
    )
    return model


def _pickled_model(content: Any, path: Path) -> tuple[InertRecord, str]:
    """The pickled DetectionModel: the checkpoint dict's ``ema`` if set, else its ``model``."""
    if _is_model_record(content):
        return content, "model"
    if not isinstance(content, dict):
        raise ReferenceLayoutError(
            f"{path}: expected a checkpoint dict or a pickled model, found {type(content).__name__}"
        )
    for key in ("ema", "model"):
        if _is_model_record(content.get(key)):
            return content[key], key
    raise ReferenceLayoutError(
        f"{path}: no pickled reference model under 'ema' or 'model' "
        f"with a 'yaml' layer list (keys: {sorted(map(str, content))}, "
        f"'model' is {type(content.get('model')).__name__})"
    )


def _is_model_record(value: Any) -> bool:
    return isinstance(value, InertRecord) and isinstance(value.attributes.get("yaml"), dict)


def _normalise_row(row: Any) -> Any:
    """A reference row in our config syntax: ``nn.Upsample`` -> ``Upsample``, ``'None'`` -> None."""
    if not (isinstance(row, list | tuple) and len(row) == 4 and isinstance(row[2], str)):
        return row
    source, repeats, block, args = row
    if isinstance(args, list | tuple):
        args = [None if a == "None" else a for a in args]
    return [list(source) if isinstance(source, tuple) else source, repeats, block.rsplit(".", 1)[-1], args]


def _file_layer_specs(spec: Any, path: Path) -> list[LayerSpec]:
    where = f"{path} (its layer list)"
    if not isinstance(spec, dict):
        raise ReferenceLayoutError(f"{where}: the pickled model has no 'yaml' layer list")
    for key in ("depth_multiple", "width_multiple"):
        if spec.get(key, 1.0) != 1.0:
            raise ReferenceLayoutError(f"{where}: {key} {spec[key]!r}; only unscaled layouts (1.0) are known")
    if not all(isinstance(spec.get(part), list) and spec[part] for part in ("backbone", "head")):
        raise ReferenceLayoutError(f"{where}: unrecognised layout: no 'backbone' and 'head' layer lists")
    rows = {part: [_normalise_row(r) for r in spec[part]] for part in ("backbone", "head")}
    try:
        return parse_layers(rows, where)
    except ValueError as e:
        raise ReferenceLayoutError(f"unrecognised layout: {e}") from e


def _canonical(layers: Sequence[LayerSpec]) -> tuple[list[_Node], list[int]]:
    """The layer graph without identity layers, and the row index each node came from."""
    node_of: dict[int, int] = {}
    nodes: list[_Node] = []
    rows: list[int] = []
    for spec in layers:
        refs = [spec.source] if isinstance(spec.source, int) else spec.source
        absolute = [(spec.index - 1 if j == -1 else j) for j in refs]
        sources = tuple(INPUT if j < 0 else node_of[j] for j in absolute)
        if spec.block in IDENTITY_BLOCKS:
            node_of[spec.index] = sources[0]
            continue
        args = () if spec.block in DETECT_BLOCKS else spec.args  # the class count is read separately
        node_of[spec.index] = len(nodes)
        nodes.append(_Node(spec.block, sources, tuple(args)))
        rows.append(spec.index)
    return nodes, rows


def _identify_layout(file_layers: Sequence[LayerSpec], path: Path) -> tuple[str, dict[int, int]]:
    """The shipped model with the same layer graph, and file row -> our row for every non-identity layer."""
    file_nodes, file_rows = _canonical(file_layers)
    differences = []
    for name in MODEL_NAMES:
        spec, where = load_model_spec(name)
        our_nodes, our_rows = _canonical(parse_layers(spec, where))
        if our_nodes == file_nodes:
            return name, dict(zip(file_rows, our_rows, strict=True))
        differences.append((_distance(file_nodes, our_nodes), name, our_nodes))
    _, name, nodes = min(differences, key=lambda d: d[0])
    at = next((i for i, (a, b) in enumerate(zip(file_nodes, nodes, strict=False)) if a != b), None)
    at = min(len(file_nodes), len(nodes)) if at is None else at
    file_row = file_nodes[at] if at < len(file_nodes) else "(none)"
    our_row = nodes[at] if at < len(nodes) else "(none)"
    raise ReferenceLayoutError(
        f"{path}: unrecognised layout: its layer list matches none of {', '.join(MODEL_NAMES)}; "
        f"the closest, {name}, differs first at non-identity layer {at}: file {file_row}, {name} {our_row}"
    )


def _distance(a: Sequence[_Node], b: Sequence[_Node]) -> int:
    """Layers that differ, place by place, plus the difference in length."""
    return sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))


def _class_count(attributes: dict, path: Path) -> int:
    """The head's ``nc`` (the reference rewrites ``yaml['nc']`` too, but the head is what was built)."""
    modules = _children(_child(attributes, "model"))
    head = modules[max(modules, key=_layer_number)] if modules else None
    nc = head.attributes.get("nc") if isinstance(head, InertRecord) else None
    nc = attributes["yaml"].get("nc") if nc is None else nc
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise ReferenceLayoutError(f"{path}: the model's class count {nc!r} is not a positive int")
    return nc


def _layer_number(key: str) -> int:
    return int(key) if str(key).isdigit() else -1


def _child(attributes: dict, name: str) -> Any:
    return (attributes.get("_modules") or {}).get(name)


def _children(record: Any) -> dict[str, Any]:
    return dict(record.attributes.get("_modules") or {}) if isinstance(record, InertRecord) else {}


def _layer_records(attributes: dict, n_rows: int, path: Path) -> list[InertRecord]:
    layers = _children(_child(attributes, "model"))
    held = sorted(layers, key=_layer_number)
    if held != [str(i) for i in range(n_rows)]:
        raise ReferenceLayoutError(
            f"{path}: state does not fit: the layer list has {n_rows} rows but the model holds layers {held}"
        )
    records = [layers[str(i)] for i in range(n_rows)]
    for i, record in enumerate(records):
        if not isinstance(record, InertRecord):
            raise ReferenceLayoutError(f"{path}: state does not fit: layer {i} is {record!r}, not a module")
        try:
            _record_modules(record)
        except ReferenceLayoutError as e:
            raise ReferenceLayoutError(f"{path}: state does not fit: layer {i}: {e}") from None
    return records


def _record_modules(record: InertRecord, prefix: str = "") -> dict[str, InertRecord]:
    """Every module record under ``record`` by its dotted path ('' for itself)."""
    found = {prefix.rstrip("."): record}
    for name, child in _children(record).items():
        if isinstance(child, InertRecord):
            found.update(_record_modules(child, f"{prefix}{name}."))
        elif child is not None:
            raise ReferenceLayoutError(f"submodule {prefix}{name} is {child!r}, not a module")
    return found


def _record_state(record: InertRecord) -> dict[str, Any]:
    """The state dict a module record stands for: persistent parameters and buffers by dotted name."""
    state = {}
    for where, module in _record_modules(record).items():
        attributes = module.attributes
        transient = attributes.get("_non_persistent_buffers_set") or set()
        for kind in ("_parameters", "_buffers"):
            for name, value in (attributes.get(kind) or {}).items():
                if value is None or (kind == "_buffers" and name in transient):
                    continue
                state[f"{where}.{name}" if where else name] = value
    return state


def _settings_differences(ours: nn.Module, record: InertRecord) -> list[str]:
    """Convolution and BatchNorm settings that shapes do not show (stride, padding, groups, eps)."""
    problems = []
    our_modules = dict(ours.named_modules())
    for where, module in _record_modules(record).items():
        mine = our_modules.get(where)
        for kind, names in _SETTINGS.items():
            if isinstance(mine, kind) and module.pickled_class.endswith("." + kind.__name__):
                for key in names:
                    theirs = module.attributes.get(key)
                    theirs = tuple(theirs) if isinstance(theirs, list) else theirs
                    if theirs != getattr(mine, key):
                        problems.append(
                            f"{where or 'itself'}.{key} is {theirs!r}, expected {getattr(mine, key)!r}"
                        )
    return problems


def _load_layers(
    model: DetectionModel,
    records: Sequence[InertRecord],
    file_to_ours: dict[int, int],
    layout: str,
    path: Path,
) -> None:
    """Copy each file layer's tensors into its counterpart; every mismatch is collected, then reported."""
    state: dict[str, torch.Tensor] = {}
    problems = []
    parameter_free = set(range(len(records))) - set(file_to_ours)
    for i in sorted(parameter_free):  # identity layers: nothing to carry over, and nothing may be lost
        if _record_state(records[i]):
            problems.append(
                f"file layer {i} ({records[i].pickled_class}) holds tensors but has no counterpart"
            )
    for i, j in file_to_ours.items():
        ours = model.layers[j]
        expected = ours.state_dict()
        theirs = _record_state(records[i])
        here = f"file layer {i} -> layer {j} ({type(ours).__name__})"
        missing = sorted(set(expected) - set(theirs))
        unexpected = sorted(set(theirs) - set(expected))
        if missing:
            problems.append(f"{here}: missing {', '.join(missing)}")
        if unexpected:
            problems.append(f"{here}: unexpected {', '.join(unexpected)}")
        for key in sorted(set(expected) & set(theirs)):
            value = theirs[key]
            if not isinstance(value, torch.Tensor):
                problems.append(f"{here}: {key} is {type(value).__name__}, not a tensor")
            elif value.shape != expected[key].shape:
                problems.append(
                    f"{here}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
                )
            else:
                state[f"layers.{j}.{key}"] = value.to(expected[key].dtype)
        problems.extend(f"{here}: {p}" for p in _settings_differences(ours, records[i]))
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ReferenceLayoutError(f"{path}: state does not fit {layout}: {shown}")
    model.load_state_dict(state, strict=True)


def _check_strides(model: DetectionModel, head: InertRecord, path: Path) -> None:
    stride = head.attributes.get("stride")
    if (
        isinstance(stride, torch.Tensor)
        and stride.numel()
        and not torch.equal(stride.float(), model.head.stride)
    ):
        raise ReferenceLayoutError(
            f"{path}: state does not fit: the file's head strides {stride.tolist()} are not the model's "
            f"{model.head.stride.tolist()}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _class_names(names: Any) -> tuple[str, ...]:
    if isinstance(names, dict):
        return tuple(str(names[k]) for k in sorted(k for k in names if isinstance(k, int)))
    if isinstance(names, list | tuple):
        return tuple(str(n) for n in names)
    return ()


def _epoch(content: Any) -> int | None:
    epoch = content.get("epoch") if isinstance(content, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def _source_config(attributes: dict) -> str | None:
    name = attributes.get("yaml_file")
    return name if isinstance(name, str) else None
