"""BatchNorm whose training statistics cover every worker's micro-batch (``model.sync_bn``).

With the batch split over workers, each worker's BatchNorm normalises by the statistics of its own share:
2 workers x 8 images normalise over 8, where one process with the whole batch of 16 (as the reference's
one process holds it) normalises over 16. torch's ``SyncBatchNorm`` runs on GPUs only; on other devices
(the gloo backend: CPU workers) ``CrossWorkerBatchNorm2d`` does the same with one differentiable
all-gather of each worker's per-channel mean, variance and count per layer and forward. On the 2-core
demo that is about 2.7x slower per epoch (a gather per layer, each waiting for the other worker's
process): README "Against the reference" has the figures.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


class CrossWorkerBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in training with a process group of several workers, normalises by the
    mean and (biased) variance of the union of the workers' batches and keeps running statistics of it
    (unbiased variance, as BatchNorm does). Every worker must run the same number of forwards (the
    statistics are gathered in each). Outside training, or alone, it is ``nn.BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(x)
        channels = x.shape[1]
        stats_input = x.float()  # statistics in float32 also under autocast, as BatchNorm keeps them
        count = x.numel() // channels
        local = torch.cat(
            [
                stats_input.mean((0, 2, 3)),
                stats_input.var((0, 2, 3), unbiased=False),
                stats_input.new_full((1,), float(count)),
            ]
        )
        gathered = torch.stack(dist_nn.all_gather(local))  # (workers, 2 * channels + 1)
        means, variances, counts = gathered[:, :channels], gathered[:, channels:-1], gathered[:, -1:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            shift = self.bias - mean * scale * self.weight
            scale = scale * self.weight
        else:
            shift = -mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm2d computing its training statistics over all workers: torch's
    SyncBatchNorm on CUDA, ``CrossWorkerBatchNorm2d`` (same parameters and buffers, same state-dict keys)
    elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, _cross_worker(child))
    return model


def _cross_worker(bn: nn.BatchNorm2d) -> CrossWorkerBatchNorm2d:
    out = CrossWorkerBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    out.weight, out.bias = bn.weight, bn.bias  # the same Parameters: whatever holds them still does
    out.running_mean, out.running_var, out.num_batches_tracked = (
        bn.running_mean,
        bn.running_var,
        bn.num_batches_tracked,
    )
    out.train(bn.training)
    return out
