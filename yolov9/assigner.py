"""Task-Aligned Assigner (TOOD, Feng et al. 2021) as YOLOv9 uses it for each PGI branch.

For every ground-truth box (GT) the candidates are the anchors whose centre lies inside it; their
alignment metric is ``t = s**alpha * CIoU**beta`` with ``s`` the predicted score of the GT's class.
Each GT takes its ``topk`` best candidates; an anchor taken by several GTs goes to the one it
overlaps most (CIoU). The class target of a positive anchor is soft: ``t`` rescaled per GT so that
the GT's best anchor gets the GT's best CIoU.

The work is done on the sparse list of (GT, anchor-inside-GT) pairs rather than on dense
``(batch, max GTs, anchors)`` tensors: CIoU, the top-k and the conflict resolution only touch pairs
that can be positive, which is what keeps the step cheap when images hold many boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from yolov9.boxes import box_ciou


@dataclass
class Assignment:
    """Targets for one branch. ``B`` images, ``A`` anchors, ``C`` classes.

    fg_mask: ``(B, A)`` bool, positive anchors.
    target_gt: ``(B, A)`` long, index into the flat GT list of each positive anchor (0 elsewhere).
    target_boxes: ``(B, A, 4)`` xyxy in input pixels (zeros on background anchors).
    target_scores: ``(B, A, C)`` soft class targets (zeros on background anchors).
    """

    fg_mask: torch.Tensor
    target_gt: torch.Tensor
    target_boxes: torch.Tensor
    target_scores: torch.Tensor


def _rank_within_groups(group: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order that sorts pairs by ``group`` ascending then ``score`` descending, and each pair's rank
    (0 = best) inside its group, in that order."""
    by_score = torch.argsort(score, descending=True, stable=True)
    order = by_score[torch.argsort(group[by_score], stable=True)]
    g = group[order]
    is_start = torch.ones_like(g, dtype=torch.bool)
    is_start[1:] = g[1:] != g[:-1]
    positions = torch.arange(len(g), device=g.device)
    start_of = torch.cummax(torch.where(is_start, positions, 0), 0).values
    return order, positions - start_of


def _topk_per_group(group: torch.Tensor, score: torch.Tensor, num_groups: int, k: int) -> torch.Tensor:
    """Indices of the ``k`` best-scoring pairs of every group; ``group`` must be sorted ascending.

    Scores go into a padded ``(groups, largest group)`` matrix, so one ``topk`` replaces a sort of
    all pairs (there are often hundreds of candidate anchors per GT)."""
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(group), device=group.device) - starts[group]
    width = int(counts.max())
    padded = score.new_full((num_groups, width), -1.0)
    padded[group, position] = score
    best = padded.topk(min(k, width), dim=1).indices
    valid = best < counts[:, None]
    return (starts[:, None] + best)[valid]


class TaskAlignedAssigner:
    """Assign GTs to anchors for one detection branch (see the module docstring).

    Args:
        topk: anchors kept per GT.
        num_classes: number of classes ``C``.
        alpha, beta: exponents of the score and CIoU in the alignment metric.
        eps: guards the per-GT normalisation.
    """

    def __init__(
        self, topk: int = 10, num_classes: int = 80, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9
    ) -> None:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk, self.num_classes, self.alpha, self.beta, self.eps = topk, num_classes, alpha, beta, eps

    @torch.no_grad()
    def assign(
        self,
        pd_scores: torch.Tensor,
        pd_boxes: torch.Tensor,
        anchors: torch.Tensor,
        gt_image: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        logits: bool = False,
    ) -> Assignment:
        """Assign a flat list of GTs.

        Args:
            pd_scores: ``(B, A, C)`` predicted class probabilities, or logits when ``logits`` is set
                (the sigmoid is then taken only where a GT needs it). May be a strided view.
            pd_boxes: ``(B, A, 4)`` predicted boxes, xyxy input pixels.
            anchors: ``(A, 2)`` anchor centres, input pixels.
            gt_image: ``(M,)`` image index of each GT; gt_labels ``(M,)`` class ids;
            gt_boxes: ``(M, 4)`` xyxy input pixels.
        """
        b, a, c = pd_scores.shape
        dev = pd_scores.device
        fg = torch.zeros(b, a, dtype=torch.bool, device=dev)
        target_gt = torch.zeros(b, a, dtype=torch.long, device=dev)
        target_boxes = torch.zeros(b, a, 4, dtype=pd_boxes.dtype, device=dev)
        # Class-major storage, so that the loss can compare it with class-major logits without a copy.
        target_scores = torch.zeros(b, c, a, dtype=pd_scores.dtype, device=dev)
        pair_gt, pair_anchor = self._inside_pairs(anchors, gt_boxes)
        if len(pair_gt):
            gt_image, gt_labels = gt_image.long(), gt_labels.long()
            pair_image, pair_cls = gt_image[pair_gt], gt_labels[pair_gt]
            iou = box_ciou(gt_boxes[pair_gt], pd_boxes[pair_image, pair_anchor]).clamp_(0)
            score = pd_scores[pair_image, pair_anchor, pair_cls].float()
            if logits:
                score = score.sigmoid()
            metric = score.pow(self.alpha) * iou.pow(self.beta)

            keep = _topk_per_group(pair_gt, metric, len(gt_boxes), self.topk)
            pair_gt, iou, metric = pair_gt[keep], iou[keep], metric[keep]
            flat = gt_image[pair_gt] * a + pair_anchor[keep]

            order, rank = _rank_within_groups(flat, iou)
            won = order[rank == 0]
            pair_gt, flat, iou, metric = pair_gt[won], flat[won], iou[won], metric[won]

            m = len(gt_boxes)
            best_metric = metric.new_zeros(m).scatter_reduce_(0, pair_gt, metric, "amax")
            best_iou = iou.new_zeros(m).scatter_reduce_(0, pair_gt, iou, "amax")
            soft = metric * best_iou[pair_gt] / (best_metric[pair_gt] + self.eps)

            image, anchor = flat // a, flat % a
            fg[image, anchor] = True
            target_gt[image, anchor] = pair_gt
            target_boxes[image, anchor] = gt_boxes[pair_gt].to(target_boxes.dtype)
            target_scores[image, gt_labels[pair_gt], anchor] = soft.to(target_scores.dtype)
        return Assignment(fg, target_gt, target_boxes, target_scores.transpose(1, 2))

    def _inside_pairs(
        self, anchors: torch.Tensor, gt_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(GT index, anchor index) of every anchor centre strictly inside a GT box."""
        x, y = anchors[:, 0], anchors[:, 1]
        inside = (
            (x > gt_boxes[:, 0:1] + self.eps)
            & (y > gt_boxes[:, 1:2] + self.eps)
            & (x < gt_boxes[:, 2:3] - self.eps)
            & (y < gt_boxes[:, 3:4] - self.eps)
        )
        return inside.nonzero(as_tuple=True)

    def __call__(
        self,
        pd_scores: torch.Tensor,
        pd_boxes: torch.Tensor,
        anchors: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        mask_gt: torch.Tensor,
    ) -> Assignment:
        """Padded form: ``gt_labels (B, G)``, ``gt_boxes (B, G, 4)``, ``mask_gt (B, G)`` bool marks real
        GTs (padding slots are ignored). ``target_gt`` then indexes the real GTs in row-major order."""
        mask = mask_gt.bool()
        gt_image = torch.arange(gt_labels.shape[0], device=gt_labels.device)[:, None].expand_as(mask)[mask]
        return self.assign(pd_scores, pd_boxes, anchors, gt_image, gt_labels[mask], gt_boxes[mask])
