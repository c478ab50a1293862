"""Config-driven YOLOv9 / GELAN detection model.

A config is a YAML file with ``nc`` and two layer lists, ``backbone`` and ``head``; each layer is
``[from, repeats, block, args]``. ``from`` is -1 (previous layer; the input image for layer 0), a
layer index, or a list of them. Blocks are looked up by name in :data:`BLOCKS`; the only symbol
allowed in ``args`` is ``nc`` (the number of classes). Nothing is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from yolov9.blocks import (
    ELAN1,
    SPPELAN,
    AConv,
    ADown,
    CBFuse,
    CBLinear,
    Concat,
    Conv,
    RepNCSPELAN4,
    Silence,
    Upsample,
)
from yolov9.head import DDetect, DualDDetect, make_divisible

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_NAMES = tuple(f"{kind}-{size}" for kind in ("yolov9", "gelan") for size in "tsmce")
WIDTH_DIVISOR = 8

From = int | list[int]


@dataclass(frozen=True)
class LayerSpec:
    """One parsed config row: where its input comes from, the block name and its raw args."""

    index: int
    source: From
    block: str
    args: tuple


Builder = Callable[[dict, From, list[Any]], tuple[nn.Module, Any]]


def _conv_like(cls: type[nn.Module]) -> Builder:
    """Builder for blocks taking (c1, c2, *rest), with c2 rounded up to a multiple of 8."""

    def build(ch: dict, source: From, args: list[Any]) -> tuple[nn.Module, int]:
        c2 = make_divisible(args[0], WIDTH_DIVISOR)
        return cls(ch[source], c2, *args[1:]), c2

    return build


def _concat(ch: dict, source: From, args: list[Any]) -> tuple[nn.Module, int]:
    return Concat(*args), sum(ch[j] for j in source)


def _upsample(ch: dict, source: From, args: list[Any]) -> tuple[nn.Module, int]:
    size, scale, mode = args
    return Upsample(size=size, scale_factor=scale, mode=mode), ch[source]


def _silence(ch: dict, source: From, args: list[Any]) -> tuple[nn.Module, int]:
    return Silence(), ch[source]


def _cblinear(ch: dict, source: From, args: list[Any]) -> tuple[nn.Module, list[int]]:
    c2s = list(args[0])
    return CBLinear(ch[source], c2s), c2s


def _cbfuse(ch: dict, source: From, args: list[Any]) -> tuple[nn.Module, int]:
    return CBFuse(args[0]), ch[source[-1]]


def _detect(cls: type[nn.Module]) -> Builder:
    def build(ch: dict, source: From, args: list[Any]) -> tuple[nn.Module, None]:
        return cls(args[0], [ch[j] for j in source]), None

    return build


BLOCKS: dict[str, Builder] = {
    "Conv": _conv_like(Conv),
    "AConv": _conv_like(AConv),
    "ADown": _conv_like(ADown),
    "RepNCSPELAN4": _conv_like(RepNCSPELAN4),
    "ELAN1": _conv_like(ELAN1),
    "SPPELAN": _conv_like(SPPELAN),
    "Concat": _concat,
    "Upsample": _upsample,
    "Silence": _silence,
    "CBLinear": _cblinear,
    "CBFuse": _cbfuse,
    "DDetect": _detect(DDetect),
    "DualDDetect": _detect(DualDDetect),
}


class DetectionModel(nn.Module):
    """A layer graph ending in a DDetect or DualDDetect head.

    Input: ``(B, 3, H, W)`` float images scaled to [0, 1], H and W multiples of the largest stride.
    Train mode: the head's raw maps (dual: ``[aux_maps, main_maps]``, each 3 x ``(B, 64+nc, h, w)``).
    Eval mode: the main branch's decoded predictions ``(B, 4+nc, A)``, boxes xywh in input pixels.
    """

    def __init__(self, layers: Sequence[nn.Module], sources: Sequence[From], name: str = "") -> None:
        super().__init__()
        if len(layers) != len(sources):
            raise ValueError("one source per layer is required")
        self.layers = nn.ModuleList(layers)
        self.sources: list[From] = list(sources)
        self.name = name
        self._max_stride: int | None = None  # set on the first forward, when the strides are measured
        self.save = {j for i, f in enumerate(self.sources) for j in layer_inputs(i, f)}

    @property
    def head(self) -> DDetect | DualDDetect:
        return self.layers[-1]

    @property
    def num_classes(self) -> int:
        return self.head.nc

    def forward(self, x: torch.Tensor) -> Any:
        self.check_input(x)
        return self.head(self._run(x, len(self.layers) - 1))

    def head_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps the head consumes, for input ``x``."""
        return self._run(x, len(self.layers) - 1)

    def _run(self, x: torch.Tensor, stop: int) -> Any:
        outputs: list[Any] = []
        y: Any = x
        for i in range(stop):
            y = self.layers[i](self._gather(i, y, outputs))
            outputs.append(y if i in self.save else None)
        return self._gather(stop, y, outputs)

    def _gather(self, i: int, previous: Any, outputs: list[Any]) -> Any:
        f = self.sources[i]
        if isinstance(f, int):
            return previous if f == -1 else outputs[f]
        return [previous if j == -1 else outputs[j] for j in f]

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if torch.compiler.is_compiling():
            return  # reading the stride would split the graph; a bad size fails in the layers there
        if self._max_stride is None:
            # read once: the strides are a buffer, on the GPU in training, and each read would wait for it
            self._max_stride = int(self.head.stride.max().item())
        stride = self._max_stride
        h, w = x.shape[2:]
        if h % stride or w % stride:
            raise ValueError(f"input size {h}x{w} is not a multiple of the model stride {stride}")


def layer_inputs(i: int, f: From) -> list[int]:
    """Layer indices that layer ``i`` reads, excluding the input image."""
    refs = [f] if isinstance(f, int) else f
    return [i - 1 if j == -1 else j for j in refs if not (j == -1 and i == 0)]


def _check_source(i: int, f: Any, where: str) -> From:
    refs = [f] if isinstance(f, int) else f
    if (
        not isinstance(refs, list)
        or not refs
        or not all(isinstance(j, int) and not isinstance(j, bool) for j in refs)
    ):
        raise ValueError(f"{where}: 'from' must be an int or a list of ints, got {f!r}")
    for j in refs:
        if j < -1 or j >= i or (j == -1 and i == 0 and isinstance(f, list)):
            raise ValueError(f"{where}: 'from' index {j} does not name an earlier layer")
    return f


def parse_layers(spec: dict, where: str = "config") -> list[LayerSpec]:
    """Validate the ``backbone`` + ``head`` rows of a config and return them as LayerSpecs."""
    if not isinstance(spec, dict) or "backbone" not in spec or "head" not in spec:
        raise ValueError(f"{where}: a model config needs 'backbone' and 'head' layer lists")
    rows = list(spec["backbone"]) + list(spec["head"])
    layers = []
    for i, row in enumerate(rows):
        here = f"{where}, layer {i}"
        if not isinstance(row, list) or len(row) != 4:
            raise ValueError(f"{here}: expected [from, repeats, block, args], got {row!r}")
        source, repeats, block, args = row
        if block not in BLOCKS:
            raise ValueError(f"{here}: unknown block {block!r}; known blocks: {sorted(BLOCKS)}")
        if repeats != 1:
            raise ValueError(f"{here}: repeats must be 1 (depth is a block argument), got {repeats!r}")
        if not isinstance(args, list):
            raise ValueError(f"{here}: args must be a list, got {args!r}")
        layers.append(LayerSpec(i, _check_source(i, source, here), block, tuple(args)))
    if layers[-1].block not in ("DDetect", "DualDDetect"):
        raise ValueError(f"{where}: the last layer must be DDetect or DualDDetect")
    return layers


def _resolve_args(args: tuple, num_classes: int) -> list[Any]:
    return [num_classes if a == "nc" else a for a in args]


def build_from_spec(
    layers: Sequence[LayerSpec], num_classes: int, name: str = "", where: str = "config"
) -> DetectionModel:
    """Instantiate a model from parsed layer specs (``where`` names the config in errors)."""
    in_channels = 3
    ch: list[Any] = []
    modules = []
    for spec in layers:
        absolute = _absolute_source(spec.index, spec.source, len(ch))
        widths = {**dict(enumerate(ch)), -1: in_channels}
        try:
            module, c_out = BLOCKS[spec.block](widths, absolute, _resolve_args(spec.args, num_classes))
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise ValueError(
                f"{where}, layer {spec.index}: bad arguments for {spec.block}: {list(spec.args)!r} ({e})"
            ) from e
        modules.append(module)
        ch.append(c_out)
    model = DetectionModel(modules, [spec.source for spec in layers], name=name)
    _init_strides(model)
    return model


def _absolute_source(i: int, f: From, n: int) -> From:
    """``from`` with -1 replaced by the previous layer's index (or -1, the input, for layer 0)."""
    if isinstance(f, int):
        return n - 1 if f == -1 and i > 0 else f
    return [n - 1 if j == -1 else j for j in f]


def _init_strides(model: DetectionModel, probe: int = 64) -> None:
    """Measure each level's stride from a probe forward (eval mode: BN statistics stay untouched)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        maps = model.head_inputs(torch.zeros(1, 3, probe, probe))
    model.train(was_training)
    nl = model.head.nl
    strides = torch.tensor([probe / m.shape[-1] for m in maps[-nl:]])
    model.head.stride = strides
    model.head.init_biases()


def load_model_spec(name_or_path: str | Path) -> tuple[dict, str]:
    """Read a model YAML by shipped name (``yolov9-c``) or path; returns (spec, where)."""
    path = Path(name_or_path)
    if str(name_or_path) in MODEL_NAMES:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    elif path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise ValueError(
            f"unknown model {str(name_or_path)!r}: use one of {', '.join(MODEL_NAMES)} "
            "or the path of an existing model .yaml"
        )
    with open(path) as f:
        try:
            spec = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
    return spec, str(path)


def build_model(name_or_path: str | Path, num_classes: int = 80) -> DetectionModel:
    """Build ``yolov9-{t,s,m,c,e}`` (dual branch), ``gelan-{t,s,m,c,e}`` or a model YAML path."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    spec, where = load_model_spec(name_or_path)
    name = Path(where).stem
    return build_from_spec(parse_layers(spec, where), num_classes, name=name, where=where)
