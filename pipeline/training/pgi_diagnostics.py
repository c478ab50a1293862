"""PGI gradient diagnostics: what each branch's loss alone sends into the backbone and neck stages.

PGI's auxiliary reversible branch exists to give the backbone reliable gradients; these numbers show
whether it does, where, and how much. Once per ``train.pgi_diagnostics_every`` epochs, on one fixed
batch, the dual loss is split into its two weighted halves (``lead_weight * L(main)`` and
``aux_weight * L(aux)``: the two gradients sum to the one training steps on) and each is differentiated
alone. Per stage (the layers the main branch depends on, grouped by section and output stride:
``backbone_p1`` .. ``backbone_p5``, ``neck_p3`` .. ``neck_p5`` for the T/S models) the metrics are::

    pgi/<stage>/main_grad_norm    L2 norm of the main-loss gradient over the stage's parameters
    pgi/<stage>/aux_grad_norm     the same for the aux loss (dual models)
    pgi/<stage>/aux_main_ratio    aux_grad_norm / main_grad_norm (left out when the main norm is 0)
    pgi/<stage>/cosine            cosine similarity of the two gradients (left out when either is 0)
    pgi/<stage>/main_zero_frac    fraction of the stage's parameters whose main-loss gradient is near zero
                                  (|g| <= ZERO_GRAD_RTOL * the largest |g| of the main loss anywhere)

Training is untouched: gradients come from ``torch.autograd.grad`` (no ``.grad`` written), the
BatchNorm running statistics the forward changes are put back, and the torch, NumPy and Python RNG
streams are restored, so a run with diagnostics ends with the same weights as one without.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline import names
from pipeline.data.augment import AugmentConfig
from pipeline.data.loader import make_train_loader
from pipeline.plots import pyplot
from pipeline.training.ema import unwrap
from yolov9.loss import DualDetectionLoss
from yolov9.model import DetectionModel, load_model_spec
from yolov9.prune import main_branch_layers

if TYPE_CHECKING:  # the training loop imports this module
    from pipeline.training.state import TrainState

ZERO_GRAD_RTOL = 1e-6  # "near zero": below this fraction of the largest main-loss gradient magnitude
# the fixed batch: the val split's first images, resized only (no mosaic, flip, colour or affine jitter)
NO_AUGMENT = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=0, mosaic=0, mixup=0)
GRADIENT_STATS = ("main_grad_norm", "aux_grad_norm", "aux_main_ratio", "cosine", "main_zero_frac")


def gradient_stats(
    main_loss: torch.Tensor, aux_loss: torch.Tensor | None, stages: Mapping[str, Sequence[nn.Parameter]]
) -> dict[str, float]:
    """The ``pgi/<stage>/...`` metrics (module docstring) of two scalar losses over ``stages`` (name ->
    parameters). ``aux_loss`` None: a single-branch model (main metrics only). The losses' graph is freed."""
    params = [p for group in stages.values() for p in group]
    main = _grads(main_loss, params, retain=aux_loss is not None)
    aux = _grads(aux_loss, params, retain=False) if aux_loss is not None else None
    largest = max((float(g.abs().max()) for g in main if g.numel()), default=0.0)
    tol = ZERO_GRAD_RTOL * largest
    out: dict[str, float] = {}
    start = 0
    for stage, group in stages.items():
        g_main = torch.cat([g.flatten() for g in main[start : start + len(group)]])
        prefix = f"{names.PGI_PREFIX}{stage}/"
        main_norm = float(g_main.norm())
        out[prefix + "main_grad_norm"] = main_norm
        out[prefix + "main_zero_frac"] = float((g_main.abs() <= tol).double().mean())
        if aux is not None:
            g_aux = torch.cat([g.flatten() for g in aux[start : start + len(group)]])
            aux_norm = float(g_aux.norm())
            out[prefix + "aux_grad_norm"] = aux_norm
            if main_norm > 0:
                out[prefix + "aux_main_ratio"] = aux_norm / main_norm
            if main_norm > 0 and aux_norm > 0:
                out[prefix + "cosine"] = float(g_main.double() @ g_aux.double()) / (main_norm * aux_norm)
        start += len(group)
    return out


def _grads(loss: torch.Tensor, params: list[nn.Parameter], retain: bool) -> list[torch.Tensor]:
    """d loss / d params without touching ``.grad``; zeros where the loss does not reach a parameter."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]


def model_stages(
    model: DetectionModel, backbone_layers: int, images: torch.Tensor
) -> tuple[dict[str, list[nn.Parameter]], object]:
    """The trainable parameters of the layers the main branch depends on (the head excluded), grouped as
    ``<section>_p<level>``: section ``backbone`` for the config's first ``backbone_layers`` layers, else
    ``neck``; level log2 of the layer's output stride, found by running ``model`` on ``images``
    (B, 3, H, W). Returns (stages in backbone-then-neck, shallow-to-deep order, the model's output)."""
    sizes: dict[int, int] = {}

    def record(i: int):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor | list[torch.Tensor]) -> None:
            sizes[i] = (out[0] if isinstance(out, list) else out).shape[-1]  # CBLinear gives a list

        return hook

    hooks = [model.layers[i].register_forward_hook(record(i)) for i in main_branch_layers(model)]
    try:
        outputs = model(images)
    finally:
        for h in hooks:
            h.remove()
    stages: dict[tuple[int, int], list[nn.Parameter]] = {}
    for i, width in sorted(sizes.items()):
        params = [p for p in model.layers[i].parameters() if p.requires_grad]
        if params:
            level = round(math.log2(images.shape[-1] / width))
            stages.setdefault((int(i >= backbone_layers), level), []).extend(params)
    sections = ("backbone", "neck")
    return {f"{sections[s]}_p{level}": ps for (s, level), ps in sorted(stages.items())}, outputs


def fixed_batch(state: TrainState) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagnostics' batch: the first ``max(batch_size // 2, 1)`` val images, resized without
    augmentation (the same every epoch and on every rank): uint8 (B, 3, S, S) and targets (M, 6) pixels.
    Half a training batch keeps one forward and two branch backwards under the cost of a training step."""
    loader = make_train_loader(
        state.data.val,
        batch_size=max(state.cfg.train.batch_size // 2, 1),
        imgsz=state.cfg.train.imgsz,
        rank=0,
        world_size=1,
        num_workers=0,
        epoch=0,
        seed=0,
        augment=NO_AUGMENT,
        mosaic=False,
        steps_per_epoch=1,
        shuffle_buffer=1,
    )
    return next(iter(loader))


@contextmanager
def untouched(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Put back, on exit, the model's buffers (BatchNorm statistics) and training flags and the torch,
    NumPy and Python RNG states, so that what runs inside leaves no trace on training."""
    buffers = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers, strict=True):
                    b.copy_(saved)
            for m, mode in zip(model.modules(), modes, strict=True):
                m.training = mode
            random.setstate(py_state)
            np.random.set_state(np_state)


def pgi_diagnostics(state: TrainState) -> dict[str, float]:
    """The ``pgi/<stage>/...`` metrics of ``state``'s model (unwrapped) on the fixed batch.

    Every rank must call it: the loss sums its normaliser over the process group, so each rank runs the
    same batch (rank 0's numbers are the ones reported); the norms are divided by the world size, which
    that sum multiplies them by."""
    model = unwrap(state.model)
    spec, _ = load_model_spec(state.cfg.model.name)
    with untouched(model, state.device):
        images, targets = fixed_batch(state)
        images = images.to(state.device, memory_format=torch.channels_last).float() / 255
        targets = targets.to(state.device)
        model.train()
        with torch.autocast(state.device.type, dtype=state.amp, enabled=state.amp is not None):
            stages, outputs = model_stages(model, len(spec["backbone"]), images)
            loss = vars(state.cfg.loss)
            main_loss, _ = DualDetectionLoss(model, **{**loss, "aux_weight": 0.0})(outputs, targets)
            aux_loss = None
            if model.head.dual:
                aux_loss, _ = DualDetectionLoss(model, **{**loss, "lead_weight": 0.0})(outputs, targets)
        stats = gradient_stats(main_loss, aux_loss, stages)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for key in stats:
        if key.endswith("_grad_norm"):
            stats[key] /= world
    return stats


def stage_names(history: Sequence[Mapping[str, float]]) -> list[str]:
    """The stages found in ``pgi/`` metrics, backbone first, shallow to deep."""
    found = {k.split("/")[1] for h in history for k in h if k.startswith(names.PGI_PREFIX)}
    return sorted(found, key=lambda s: (not s.startswith("backbone"), s))


def plot_pgi(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """One PNG of a run's diagnostics: a panel per statistic, stages on the x axis, one line per epoch
    that has them (``history``: one metrics dict per epoch, with ``epoch``)."""
    plt = pyplot()
    stages = stage_names(history)
    rows = [h for h in history if any(k.startswith(names.PGI_PREFIX) for k in h)]
    fig, axes = plt.subplots(1, len(GRADIENT_STATS), figsize=(4 * len(GRADIENT_STATS), 3.6), squeeze=False)
    colours = plt.get_cmap("viridis")
    for ax, stat in zip(axes[0], GRADIENT_STATS, strict=True):
        for n, h in enumerate(rows):
            values = [h.get(f"{names.PGI_PREFIX}{s}/{stat}", np.nan) for s in stages]
            ax.plot(range(len(stages)), values, marker="o", color=colours(n / max(len(rows) - 1, 1)),
                    label=f"epoch {int(h.get(names.EPOCH, n + 1))}")  # fmt: skip
        ax.set_xticks(range(len(stages)), stages, rotation=45, ha="right", fontsize=7)
        ax.set_title(stat.replace("_", " "))
        if stat.endswith("norm") or stat == "aux_main_ratio":
            log_scale_if_positive(ax)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title or "PGI: gradient each branch's weighted loss sends into each stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def log_scale_if_positive(ax: object) -> None:
    """A log y axis when the panel has a positive value (an arm without aux loss has only zeros)."""
    values = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=float)]
    if any(np.isfinite(y) and y > 0 for y in values):
        ax.set_yscale("log")
