"""PGI pruning: dual-branch training model -> single-branch deployable model.

The auxiliary branch is whatever the main half of the DualDDetect head does not depend on, so the
kept layers are the closure of the main half's ``from`` indices; no per-model index map is needed.
The same rule drops the auxiliary neck of T/S, the reversible backbone of M/C, and keeps E's
CBLinear/CBFuse, which its main branch reads.
"""

from __future__ import annotations

import copy

from torch import nn

from yolov9.blocks import Conv, RepConvN
from yolov9.head import DualDDetect
from yolov9.model import DetectionModel, From, layer_inputs


def main_branch_layers(model: DetectionModel) -> list[int]:
    """Sorted indices of the layers the main half of the head depends on (the head excluded)."""
    head_index = len(model.layers) - 1
    sources = layer_inputs(head_index, model.sources[head_index])
    if isinstance(model.head, DualDDetect):
        sources = sources[model.head.nl :]
    keep: set[int] = set()
    stack = list(sources)
    while stack:
        i = stack.pop()
        if i not in keep:
            keep.add(i)
            stack.extend(layer_inputs(i, model.sources[i]))
    return sorted(keep)


def fuse(model: nn.Module) -> nn.Module:
    """Fold every RepConvN into one 3x3 conv and every BatchNorm into its conv, in place."""
    for m in list(model.modules()):
        if isinstance(m, RepConvN):
            m.fuse()
    for m in list(model.modules()):
        if isinstance(m, Conv):
            m.fuse()
    return model


def prune(model: DetectionModel) -> DetectionModel:
    """A new eval-mode model: main branch only, fused. Its output equals ``model.eval()(x)``.

    The input model is left untouched. A single-branch model is only copied and fused.
    """
    src = copy.deepcopy(model).eval()
    head_index = len(src.layers) - 1
    kept = main_branch_layers(src)
    new_index = {old: new for new, old in enumerate(kept)}

    def remap(new_i: int, old_i: int, f: From) -> From:
        refs = [f] if isinstance(f, int) else f
        out = []
        for j in refs:
            if j == -1 and old_i == 0:
                out.append(-1)
                continue
            target = new_index[old_i - 1 if j == -1 else j]
            out.append(-1 if target == new_i - 1 else target)
        return out[0] if isinstance(f, int) else out

    layers = [src.layers[i] for i in kept]
    sources = [remap(n, i, src.sources[i]) for n, i in enumerate(kept)]
    head = src.head
    head_sources = layer_inputs(head_index, src.sources[head_index])
    if isinstance(head, DualDDetect):
        head_sources = head_sources[head.nl :]
        head = head.main_half()
    layers.append(head)
    sources.append([new_index[j] for j in head_sources])
    pruned = DetectionModel(layers, sources, name=f"{src.name}-pruned" if src.name else "pruned")
    return fuse(pruned).eval()
