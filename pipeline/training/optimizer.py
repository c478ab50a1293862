"""The reference optimisation recipe: SGD parameter groups, gradient accumulation to a nominal
batch, warmup and the learning-rate schedule.

Learning-rate rule across cluster sizes: every image moves the weights by the same amount, ``lr0``
times its gradient, however the images are grouped into steps. The global batch is
``batch_size * world_size``; gradients are accumulated over
``accumulate = max(round(nominal_batch / global_batch), 1)`` micro-batches, and the loss is the *sum*
over the step's images (``yolov9.loss``: the reference's ``loss * batch_size``, summed over workers), so a
step of ``images_per_step = global_batch * accumulate`` images moves the weights by ``lr0`` times the sum
of their gradients. Weight decay, which acts once per step, is scaled by
``images_per_step / nominal_batch``, so it too is the same per image.

Up to ``nominal_batch`` images per step this is the reference recipe unchanged. Past it (8 workers x 16 =
128 images for a nominal 64), a step sums twice the images: relative to a nominal-batch step the learning
rate and the weight decay are scaled linearly, x ``images_per_step / nominal_batch`` (the linear scaling
rule of large-batch SGD; warmup, which the schedule keeps, is what makes it hold early on). ``lr0`` needs
no change when the worker count changes; :func:`linear_scale` is the factor, logged by the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def accumulation_steps(nominal_batch: int, global_batch: int) -> int:
    """Micro-batches per optimizer step so that a step sees about ``nominal_batch`` images."""
    return max(round(nominal_batch / global_batch), 1)


def images_per_step(nominal_batch: int, global_batch: int) -> int:
    """Images whose gradients one optimizer step sums: the global batch times the accumulation."""
    return global_batch * accumulation_steps(nominal_batch, global_batch)


def linear_scale(nominal_batch: int, global_batch: int) -> float:
    """How much larger a step's update is than a ``nominal_batch`` step's: the factor by which the
    learning rate and the weight decay are in effect scaled (1 up to a global batch of ``nominal_batch``,
    give or take the rounding of the accumulation)."""
    return images_per_step(nominal_batch, global_batch) / nominal_batch


def build_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """Nesterov SGD with three groups: 0 biases, 1 weights (decayed), 2 norm weights.

    Biases and BatchNorm weights are not decayed. Frozen parameters (the DFL bins) are left out.
    """
    biases, weights, norm_weights = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias":
                biases.append(p)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                norm_weights.append(p)
            else:
                weights.append(p)
    return torch.optim.SGD(
        [
            {"params": biases, "weight_decay": 0.0},
            {"params": weights, "weight_decay": weight_decay},
            {"params": norm_weights, "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=momentum,
        nesterov=True,
    )


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate and momentum of the reference recipe.

    Warmup lasts ``max(round(warmup_epochs * steps_per_epoch), warmup_min_steps)`` micro-batch
    steps: the bias group's lr falls from ``warmup_bias_lr``, the others rise from 0, momentum
    rises from ``warmup_momentum``, all towards the epoch's scheduled values. The epoch factor
    decays linearly (or by a cosine) from 1 to ``lrf`` over ``epochs``.
    """

    lr0: float
    lrf: float
    epochs: int
    steps_per_epoch: int
    momentum: float
    warmup_epochs: float
    warmup_min_steps: int
    warmup_bias_lr: float
    warmup_momentum: float
    cosine: bool = False

    @property
    def warmup_steps(self) -> int:
        return max(round(self.warmup_epochs * self.steps_per_epoch), self.warmup_min_steps)

    def epoch_factor(self, epoch: int) -> float:
        x = epoch / self.epochs
        if self.cosine:
            return ((1 - math.cos(x * math.pi)) / 2) * (self.lrf - 1) + 1
        return (1 - x) * (1.0 - self.lrf) + self.lrf

    def lr(self, group: int, epoch: int, step: int) -> float:
        """Learning rate of ``group`` (0 biases, 1 weights, 2 norm weights) at global ``step``."""
        target = self.lr0 * self.epoch_factor(epoch)
        if step >= self.warmup_steps:
            return target
        start = self.warmup_bias_lr if group == 0 else 0.0
        return float(np.interp(step, [0, self.warmup_steps], [start, target]))

    def momentum_at(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.momentum
        return float(np.interp(step, [0, self.warmup_steps], [self.warmup_momentum, self.momentum]))

    def accumulate_at(self, step: int, nominal_batch: int, global_batch: int) -> int:
        """Accumulation ramps from 1 to its full value during warmup, as in the reference."""
        full = accumulation_steps(nominal_batch, global_batch)
        if step >= self.warmup_steps:
            return full
        return max(
            1, round(float(np.interp(step, [0, self.warmup_steps], [1, nominal_batch / global_batch])))
        )

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
        momentum = self.momentum_at(step)
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = self.lr(i, epoch, step)
            group["momentum"] = momentum
