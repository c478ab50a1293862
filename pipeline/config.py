"""Experiment configuration: one YAML per experiment, typed sections, ``key=value`` overrides.

Sections: ``model``, ``data``, ``train``, ``loss``, ``ray``, ``mlflow`` and ``tune``. Every key is
checked against the dataclass field types below, so a typo or a wrong type is reported with the
file and the dotted key before any worker starts. Values are parsed by PyYAML (``safe_load``);
nothing is evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.augment import AugmentConfig
from pipeline.errors import PipelineError
from yolov9.loss import ASSIGN_MODES
from yolov9.model import MODEL_NAMES

MLFLOW_URI_SCHEMES = ("runs:/", "models:/")  # model URIs that MLflow resolves, kept as given


log = logging.getLogger(__name__)


class ConfigError(PipelineError, ValueError):
    """A configuration problem, with the file and the dotted key it concerns."""


@dataclass
class ModelConfig:
    name: str = "yolov9-c"
    num_classes: int | None = None  # None: the number of class names in the train manifest
    sync_bn: bool = False
    # starting weights of a fresh run (a resumed run ignores them): a reference .pt file, a checkpoint of
    # this project (file or directory), runs:/<run id> (its best checkpoint) or models:/<name>@<alias>
    weights: str | None = None
    freeze: int = 0  # freeze model.layers[:freeze] (weights and BatchNorm statistics)


@dataclass
class SyntheticConfig:
    """Generate the embedded synthetic set into ``data.root`` when its manifests are missing."""

    num_train: int = 512
    num_val: int = 64
    image_size: int = 256
    seed: int = 0
    shard_size: int = 128


@dataclass
class DataConfig:
    root: str = "data/coco-shards"  # holds train-manifest.json, val-manifest.json, val-coco.json; or a URL
    allow_pipe: bool = False  # accept pipe: shard names in manifests (each one runs a shell command)
    synthetic: SyntheticConfig | None = None
    num_workers: int = 4  # DataLoader processes per Ray Train worker
    shuffle_buffer: int = 256
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # mosaic, affine, colour, flip, mixup


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 16  # per Ray Train worker
    nominal_batch: int = 64  # gradients are accumulated to this many images over all workers
    imgsz: int = 640
    lr0: float = 0.01
    lrf: float = 0.01
    cosine: bool = False
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 3.0
    warmup_min_steps: int = 100
    warmup_bias_lr: float = 0.1
    warmup_momentum: float = 0.8
    clip_grad_norm: float = 10.0
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    close_mosaic: int = 15
    amp: str = "auto"  # auto | bf16 | fp16 | off (always off on CPU)
    compile: bool = False  # torch.compile the model (the first steps pay the compilation)
    seed: int = 0
    val_every: int = 1
    keep_checkpoints: int = 3
    steps_per_epoch: int | None = None  # None: train samples // global batch
    val_conf: float = 0.001
    val_iou: float = 0.7
    val_max_det: int = 300
    progress_every_s: float = 30.0  # a progress line every N seconds within an epoch (0: none)
    max_bad_steps: int = 20  # this many skipped (non-finite) steps in a row stop the run
    tracking_patience_s: float = 300.0  # how long the end of a run waits for an unreachable MLflow server
    # PGI gradient diagnostics (training/pgi_diagnostics.py) every N-th epoch, one fixed batch; 0: off
    pgi_diagnostics_every: int = 0


def nms_settings(train: TrainConfig) -> dict[str, Any]:
    """The validation NMS settings of a ``train`` section as the evaluators' keywords (``conf_thres``,
    ``iou_thres``, ``max_det``)."""
    return {"conf_thres": train.val_conf, "iou_thres": train.val_iou, "max_det": train.val_max_det}


@dataclass
class LossConfig:
    aux_weight: float = 0.25
    lead_weight: float = 1.0
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    tal_topk: int = 10
    tal_alpha: float = 0.5
    tal_beta: float = 6.0
    assign: str = "independent"


@dataclass
class RayConfig:
    address: str | None = None  # None: the RAY_ADDRESS cluster, or a new local instance
    # an integer: a fixed worker group; [MIN, MAX]: an elastic one (README "Elastic training")
    num_workers: int | list[int] = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # PACK fills nodes in turn; SPREAD puts workers on different nodes
    run_name: str = "yolov9"
    storage_path: str = "runs/ray"
    max_failures: int = 2
    resize_check_s: float = 60.0  # elastic: how often a running group looks for room to grow

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The largest worker group; an elastic run's data and schedule are laid out for this many."""
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "yolov9"
    register: bool = False
    model_name: str = "yolov9-det"


@dataclass
class TuneConfig:
    """Ray Tune search: ``space`` maps dotted config keys to ``{type: ..., ...}`` domains."""

    name: str = "yolov9-tune"
    metric: str = "val/map50_95"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent_trials: int = 2
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 2
    reduction_factor: int = 2
    search_alg: str = "random"  # random | grid | optuna
    space: dict[str, Any] = field(default_factory=dict)
    # a training config (path relative to this config's file) whose best checkpoint starts every trial;
    # trained first when it has no finished run yet. None: trials start from model.weights, or from scratch
    warm_start: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, key, where)
            except ConfigError as e:
                errors.append(str(e))
        # a list given for an `int | list[int]` key: the list's own error (its bad item) says more
        raise ConfigError(errors[-1] if isinstance(value, list) else errors[0])
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return _build(annotation, value, key, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, key, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if annotation is str and isinstance(value, bool):
        raise ConfigError(
            f"{where}: {key} must be a str, got {value!r} (YAML reads on/off/yes/no unquoted as true/false: "
            f"write it in quotes, e.g. {key}='off')"
        )
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: {key} must be a {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ConfigError(f"{where}: unknown key {dotted} (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k, where) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # sections that check themselves (data.augment)
        raise ConfigError(f"{where}: {prefix}: {e}") from e


def _check_values(cfg: Config, where: str) -> None:
    """Reject values no run could use."""
    t, d, r, loss = cfg.train, cfg.data, cfg.ray, cfg.loss
    rules = [
        (
            cfg.model.name in MODEL_NAMES or cfg.model.name.endswith((".yaml", ".yml")),
            "model.name",
            f"must be one of {', '.join(MODEL_NAMES)} or a model .yaml path",
        ),
        (cfg.model.num_classes is None or cfg.model.num_classes >= 1, "model.num_classes", "must be >= 1"),
        (cfg.model.freeze >= 0, "model.freeze", "must be >= 0"),
        (cfg.model.weights is None or cfg.model.weights.strip() != "", "model.weights", "must not be empty"),
        (t.epochs >= 1, "train.epochs", "must be >= 1"),
        (t.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (t.nominal_batch >= 1, "train.nominal_batch", "must be >= 1"),
        (t.imgsz >= 32 and t.imgsz % 32 == 0, "train.imgsz", "must be a positive multiple of 32"),
        (t.lr0 > 0, "train.lr0", "must be > 0"),
        (0 < t.lrf <= 1, "train.lrf", "must be in (0, 1]"),
        (0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)"),
        (t.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
        (t.warmup_epochs >= 0 and t.warmup_min_steps >= 0, "train.warmup_epochs", "must be >= 0"),
        (t.clip_grad_norm > 0, "train.clip_grad_norm", "must be > 0"),
        (0 < t.ema_decay < 1, "train.ema_decay", "must be in (0, 1)"),
        (t.close_mosaic >= 0, "train.close_mosaic", "must be >= 0"),
        (t.amp in ("auto", "bf16", "fp16", "off"), "train.amp", "must be auto, bf16, fp16 or off"),
        (t.val_every >= 1, "train.val_every", "must be >= 1"),
        (t.progress_every_s >= 0, "train.progress_every_s", "must be >= 0"),
        (t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1"),
        (t.tracking_patience_s >= 0, "train.tracking_patience_s", "must be >= 0"),
        (t.pgi_diagnostics_every >= 0, "train.pgi_diagnostics_every", "must be >= 0 (0: off)"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1"),
        (t.steps_per_epoch is None or t.steps_per_epoch >= 1, "train.steps_per_epoch", "must be >= 1"),
        (d.num_workers >= 0, "data.num_workers", "must be >= 0"),
        (d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1"),
        (loss.assign in ASSIGN_MODES, "loss.assign", f"must be one of {', '.join(ASSIGN_MODES)}"),
        (loss.tal_topk >= 1, "loss.tal_topk", "must be >= 1"),
        (
            all(getattr(loss, k) >= 0 for k in ("aux_weight", "lead_weight", "box", "cls", "dfl")),
            "loss weights",
            "must be >= 0",
        ),
        (
            isinstance(r.num_workers, int) or _is_range(r.num_workers),
            "ray.num_workers",
            f"must be an integer or a range [MIN, MAX] of two integers, got {r.num_workers!r}",
        ),
        (r.min_workers >= 1, "ray.num_workers", "must be >= 1"),
        (r.min_workers <= r.max_workers, "ray.num_workers", f"[MIN, MAX] needs MIN <= MAX: {r.num_workers}"),
        (r.resize_check_s > 0, "ray.resize_check_s", "must be > 0"),
        (
            not (cfg.model.sync_bn and r.elastic),
            "model.sync_bn",
            "needs a fixed number of workers (ray.num_workers an integer): in an elastic run a worker may "
            "play several data ranks, and its batch statistics would not pair with the others'",
        ),
        (r.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0"),
        (r.max_failures >= -1, "ray.max_failures", "must be >= -1 (-1: retry forever)"),
        (
            r.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
            "ray.placement_strategy",
            "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD",
        ),
        (cfg.tune.mode in ("max", "min"), "tune.mode", "must be max or min"),
    ]
    for ok, key, rule in rules:
        if not ok:
            raise ConfigError(f"{where}: {key} {rule}")


def _is_range(value: list) -> bool:
    return len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``values`` with each ``a.b.c=value`` set (sections created where missing). Under
    ``tune.space`` the rest of the key is one searched config key: ``tune.space.train.lr0=...``."""
    out = yaml.safe_load(yaml.safe_dump(values))
    for text in overrides:
        path, value = parse_override(text)
        if path[:2] == ["tune", "space"] and len(path) > 3:
            # a searched key is one key of tune.space, dots and all: tune.space.train.lr0={uniform: [...]}
            path = ["tune", "space", ".".join(path[2:])]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return out


def config_from_dict(values: dict[str, Any], where: str = "config") -> Config:
    """Typed, checked :class:`Config` from plain data (sections may be left out: defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    cfg = _build(Config, values, "", where)
    _check_values(cfg, where)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (``None``: defaults only), apply overrides, check it, resolve local paths."""
    where = str(path) if path is not None else "defaults"
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML ({e})") from e
    values = apply_overrides(values, overrides or [])
    cfg = config_from_dict(values, where)
    cfg.data.root = _absolute("data.root", cfg.data.root)
    cfg.ray.storage_path = _absolute("ray.storage_path", cfg.ray.storage_path)
    if cfg.tune.warm_start is not None:
        folder = Path(path).parent if path is not None else Path.cwd()
        cfg.tune.warm_start = _absolute("tune.warm_start", cfg.tune.warm_start, folder)
    weights = cfg.model.weights
    # a bare name that is no file here stays a name: the reference's published weights go by name
    # (pipeline.weights.published), and anything else is refused naming it when the weights are resolved
    bare_name = weights is not None and "/" not in weights and not Path(weights).exists()
    if weights is not None and not weights.startswith(MLFLOW_URI_SCHEMES) and not bare_name:
        cfg.model.weights = _absolute("model.weights", weights)
    return cfg


def _absolute(key: str, location: str, folder: Path | None = None) -> str:
    """Local paths become absolute (against ``folder``, default the current one) so that every Ray worker
    and Tune trial resolves them alike; URLs stay as given. A relative path is logged with what it became:
    under ``ray job submit`` the current folder is the job's working directory on the head node."""
    if "://" in location:
        return location
    given = Path(location).expanduser()
    resolved = str(((folder or Path.cwd()) / given).resolve())
    if not given.is_absolute():
        log.info("%s %s is a relative path: using %s", key, location, resolved)
    return resolved
