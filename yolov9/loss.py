"""The YOLOv9 training loss: per branch Task-Aligned assignment, then CIoU + DFL + BCE; PGI combines
the auxiliary and the main (lead) branch with weights that are plain arguments.

Scale. For a batch of ``B`` images (over all workers) the returned total is

    B * sum over branches w_branch * (box * L_box + cls * L_cls + dfl * L_dfl)

where each ``L`` is a sum over anchors divided by ``max(sum of soft class targets, 1)`` of the whole
batch. This is the reference's ``loss * batch_size``: with gradients accumulated to a nominal batch
the step follows the summed gradient of the nominal batch, and weight decay is scaled to match.

Workers. Under ``torch.distributed`` the normaliser and ``B`` are summed over all ranks and each
rank's term is multiplied by the world size, so that DistributedDataParallel's gradient *average*
equals the gradient one process would get from the whole batch: the step does not depend on how
the batch is split over workers. The logged ``parts`` are likewise scaled so that their mean over
ranks is the whole-batch value. ``across_ranks=False`` computes each call as one process would (its
own normaliser and ``B``, no collective): for workers that run different numbers of micro-batches per
step (an elastic run), whose caller scales the backward by the world size itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from yolov9.assigner import Assignment, TaskAlignedAssigner
from yolov9.boxes import bbox2dist, box_ciou, dist2bbox
from yolov9.head import anchor_grid

ASSIGN_MODES = ("independent", "lead_guided")


@dataclass(frozen=True)
class HeadInfo:
    """What the loss needs to know about a detection head."""

    num_classes: int
    strides: tuple[float, ...]
    reg_max: int = 16
    dual: bool = True

    @classmethod
    def of(cls, model: nn.Module) -> HeadInfo:
        head = getattr(model, "head", model)
        strides = tuple(float(s) for s in head.stride.tolist())
        if not strides or min(strides) <= 0:
            raise ValueError("the model's head has no strides; build it with yolov9.build_model")
        return cls(int(head.nc), strides, int(head.reg_max), bool(head.dual))


@dataclass
class _BranchSums:
    """Unnormalised loss sums of one branch and its normaliser (sum of soft class targets)."""

    box: torch.Tensor
    cls: torch.Tensor
    dfl: torch.Tensor
    norm: torch.Tensor


def _check_targets(targets: torch.Tensor, batch: int, num_classes: int) -> None:
    """Shape always; values when ``targets`` are on the CPU (as a loader gives them, before the copy):
    on a GPU each of these checks would stall the step until the device caught up."""
    if targets.ndim != 2 or targets.shape[1] != 6:
        raise ValueError(f"targets must be (M, 6) [image, class, x1, y1, x2, y2], got {tuple(targets.shape)}")
    if not len(targets) or targets.device.type != "cpu":
        return
    if not torch.isfinite(targets).all():
        raise ValueError("targets hold NaN or inf values")
    image, cls, boxes = targets[:, 0], targets[:, 1], targets[:, 2:]
    if (image < 0).any() or (image >= batch).any() or (image != image.round()).any():
        raise ValueError(f"target image index outside [0, {batch}) or not an integer")
    if (cls < 0).any() or (cls >= num_classes).any() or (cls != cls.round()).any():
        raise ValueError(f"target class id outside [0, {num_classes}) or not an integer")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError("target box with x2 < x1 or y2 < y1 (boxes are xyxy pixels)")


def _dfl(pred_dist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss: ``pred_dist (N, 4, R)`` logits, ``target (N, 4)`` in bins -> ``(N,)``:
    cross-entropy on the two bins around the target, weighted by its distance to each."""
    left = target.long()
    w_left = left + 1 - target
    logits = pred_dist.reshape(-1, pred_dist.shape[-1])
    ce_left = F.cross_entropy(logits, left.view(-1), reduction="none").view_as(target)
    ce_right = F.cross_entropy(logits, (left + 1).view(-1), reduction="none").view_as(target)
    return (ce_left * w_left + ce_right * (1 - w_left)).mean(-1)


class DualDetectionLoss:
    """PGI loss for a dual-branch (yolov9-*) or single-branch (gelan-*) model.

    Call with the model's training output (``[aux_maps, main_maps]`` or ``main_maps``; each map is
    ``(B, 4*reg_max + C, H, W)``) and ``targets (M, 6)`` rows ``[image, class, x1, y1, x2, y2]``
    in input pixels. Returns ``(total, parts)``; see the module docstring for the scale.

    Give the targets on the CPU (pinned, on a GPU run): they are checked there and copied without
    blocking. Nothing in the call then waits for the device: every size follows from the shapes.
    """

    def __init__(
        self,
        model_or_head_info: nn.Module | HeadInfo,
        aux_weight: float = 0.25,
        lead_weight: float = 1.0,
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
        tal_topk: int = 10,
        tal_alpha: float = 0.5,
        tal_beta: float = 6.0,
        assign: str = "independent",
        across_ranks: bool = True,
    ) -> None:
        info = (
            model_or_head_info
            if isinstance(model_or_head_info, HeadInfo)
            else HeadInfo.of(model_or_head_info)
        )
        if assign not in ASSIGN_MODES:
            raise ValueError(f"assign must be one of {ASSIGN_MODES}, got {assign!r}")
        for name, value in (
            ("aux_weight", aux_weight),
            ("lead_weight", lead_weight),
            ("box", box),
            ("cls", cls),
            ("dfl", dfl),
        ):
            if not value >= 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {value}")
        self.info = info
        self.across_ranks = across_ranks
        self.weights = {"aux": aux_weight, "main": lead_weight}
        self.gains = {"box": box, "cls": cls, "dfl": dfl}
        self.assign_mode = assign
        self.assigner = TaskAlignedAssigner(tal_topk, info.num_classes, tal_alpha, tal_beta)

    def __call__(
        self, outputs: Sequence, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        branches = self._branches(outputs)
        batch = branches["main"][0].shape[0]
        _check_targets(targets, batch, self.info.num_classes)
        targets = targets.to(branches["main"][0].device, torch.float32, non_blocking=True)

        decoded = {name: self._decode(maps) for name, maps in branches.items()}
        assignments: dict[str, Assignment] = {}
        for name in ("main", "aux"):
            if name not in decoded:
                continue
            if name == "aux" and self.assign_mode == "lead_guided":
                assignments["aux"] = assignments["main"]
            else:
                assignments[name] = self._assign(decoded[name], targets)
        sums = {name: self._branch_sums(decoded[name], assignments[name], targets[:, 2:]) for name in decoded}

        names = list(sums)
        totals = torch.stack(
            [sums[n].norm for n in names] + [torch.full((), float(batch), device=targets.device)]
        )
        world = 1
        if self.across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(totals)
        global_batch = totals[-1]

        total = torch.zeros((), device=targets.device)
        parts: dict[str, torch.Tensor] = {}
        for i, name in enumerate(names):
            norm = totals[i].clamp(min=1.0)
            s = sums[name]
            for key, value in (("box", s.box), ("cls", s.cls), ("dfl", s.dfl)):
                term = self.gains[key] * value / norm * world
                parts[f"{name}/{key}"] = term.detach()
                total = total + self.weights[name] * term
        return total * global_batch, parts

    def _branches(self, outputs: Sequence) -> dict[str, list[torch.Tensor]]:
        nl = len(self.info.strides)
        if isinstance(outputs, torch.Tensor):
            raise ValueError("the model returned decoded predictions: call the loss on a model in train mode")
        if self.info.dual:
            if len(outputs) != 2 or len(outputs[0]) != nl or len(outputs[1]) != nl:
                raise ValueError(f"a dual head gives [aux_maps, main_maps] with {nl} maps each")
            return {"aux": list(outputs[0]), "main": list(outputs[1])}
        if len(outputs) != nl:
            raise ValueError(f"a single-branch head gives {nl} maps, got {len(outputs)}")
        return {"main": list(outputs)}

    def _decode(self, maps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flatten one branch, anchor dimension last: distance logits ``(B, 4, R, A)``, class logits
        ``(B, C, A)``, anchors ``(A, 2)`` and strides ``(A, 1)``, boxes ``(B, A, 4)`` xyxy grid units."""
        r, c = self.info.reg_max, self.info.num_classes
        b = maps[0].shape[0]
        expected = 4 * r + c
        for m in maps:
            if m.ndim != 4 or m.shape[1] != expected or m.shape[0] != b:
                raise ValueError(f"head map must be (B, {expected}, H, W), got {tuple(m.shape)}")
        flat = torch.cat([m.reshape(b, expected, -1) for m in maps], 2).float()
        dist_logits, cls_logits = flat.split((4 * r, c), 1)
        dist_logits = dist_logits.view(b, 4, r, -1)
        anchors, stride = anchor_grid(maps, self.info.strides)  # floats: nothing to read back
        anchors, stride = anchors.float(), stride.float()
        with torch.no_grad():
            bins = torch.arange(r, dtype=torch.float, device=flat.device)  # made there: no copy
            ltrb = (dist_logits.softmax(2) * bins.view(1, 1, r, 1)).sum(2)
            boxes = dist2bbox(ltrb.transpose(1, 2), anchors)
        return {"dist": dist_logits, "cls": cls_logits, "anchors": anchors, "stride": stride, "boxes": boxes}

    def _assign(self, d: dict[str, torch.Tensor], targets: torch.Tensor) -> Assignment:
        return self.assigner.assign(
            d["cls"].detach().transpose(1, 2),
            d["boxes"] * d["stride"],
            d["anchors"] * d["stride"],
            targets[:, 0],
            targets[:, 1],
            targets[:, 2:],
            logits=True,
        )

    def _branch_sums(self, d: dict[str, torch.Tensor], a: Assignment, gt_boxes: torch.Tensor) -> _BranchSums:
        """Loss sums of one branch; ``gt_boxes (M, 4)`` xyxy input pixels."""
        target_scores = a.target_scores.transpose(1, 2)
        cls = F.binary_cross_entropy_with_logits(d["cls"], target_scores.to(d["cls"].dtype), reduction="sum")
        norm = target_scores.sum().detach()
        # Box and DFL terms over the assigner's fixed-length candidate list: pairs that are not positive
        # weigh 0. Gathering the positive anchors instead (fg_mask.nonzero()) would read their count back
        # from the device every step.
        image, anchor, weight = a.pair_image, a.pair_anchor, a.pair_weight
        stride = d["stride"][anchor]
        points = d["anchors"][anchor]
        dist_logits = d["dist"][image, :, :, anchor]
        bins = torch.arange(self.info.reg_max, dtype=dist_logits.dtype, device=dist_logits.device)
        pred = dist2bbox(dist_logits.softmax(-1) @ bins, points)
        target = gt_boxes[a.pair_gt] / stride
        box = ((1 - box_ciou(pred, target)) * weight).sum()
        dfl = (_dfl(dist_logits, bbox2dist(points, target, self.info.reg_max)) * weight).sum()
        return _BranchSums(box, cls, dfl, norm)
