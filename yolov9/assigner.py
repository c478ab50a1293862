"""Task-Aligned Assigner (TOOD, Feng et al. 2021) as YOLOv9 uses it for each PGI branch.

For every ground-truth box (GT) the candidates are the anchors whose centre lies inside it; their
alignment metric is ``t = s**alpha * CIoU**beta`` with ``s`` the predicted score of the GT's class.
Each GT takes its ``topk`` best candidates; an anchor taken by several GTs goes to the one it
overlaps most (CIoU). The class target of a positive anchor is soft: ``t`` rescaled per GT so that
the GT's best anchor gets the GT's best CIoU.

The work is done on ``(GTs, anchors)`` tensors (the flat GT list of the batch, each GT against the
anchors of its own image) and on the ``(GTs, topk)`` candidates: every size follows from the input
shapes, so the assignment never reads a data-dependent size back from the device (no ``nonzero``,
no boolean-mask indexing, no ``.item()``); on a GPU the step keeps queueing work while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from yolov9.boxes import box_ciou


@dataclass
class Assignment:
    """Targets for one branch. ``B`` images, ``A`` anchors, ``C`` classes, ``M`` GTs, ``K`` top-k.

    fg_mask: ``(B, A)`` bool, positive anchors.
    target_gt: ``(B, A)`` long, index into the flat GT list of each positive anchor (0 elsewhere).
    target_boxes: ``(B, A, 4)`` xyxy in input pixels (zeros on background anchors).
    target_scores: ``(B, A, C)`` soft class targets (zeros on background anchors).
    pair_image, pair_anchor, pair_gt: ``(M * K,)`` long, every GT's top-k candidate anchors: a list whose
        length is known from the shapes alone, so the loss gathers positives without a host sync.
    pair_weight: ``(M * K,)`` the soft class target of each pair that won its anchor, 0 for the others
        (candidates outside the GT, or that lost the anchor to another GT): every positive anchor appears
        exactly once with a weight > 0 or as a won pair of weight 0 (its alignment metric was 0).
    """

    fg_mask: torch.Tensor
    target_gt: torch.Tensor
    target_boxes: torch.Tensor
    target_scores: torch.Tensor
    pair_image: torch.Tensor
    pair_anchor: torch.Tensor
    pair_gt: torch.Tensor
    pair_weight: torch.Tensor


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
        m, k = len(gt_boxes), min(self.topk, a)
        dev = pd_scores.device
        gt_image, gt_labels = gt_image.long(), gt_labels.long()
        # Every tensor below has a size known from the shapes: no nonzero(), no masked indexing, so
        # nothing waits for the device. Writes of pairs that are not positive go to one extra slot past
        # the end of each flat target buffer, which is cut off at the end.
        iou = box_ciou(gt_boxes[:, None, :], pd_boxes[gt_image]).clamp_(0)  # (M, A)
        score = pd_scores[gt_image, :, gt_labels].float()  # (M, A)
        if logits:
            score = score.sigmoid()
        inside = self._inside(anchors, gt_boxes)
        metric = torch.where(inside, score.pow(self.alpha) * iou.pow(self.beta), -1.0)

        pair_metric, pair_anchor = metric.topk(k, dim=1)  # (M, K): candidates outside the GT score -1
        valid = inside.gather(1, pair_anchor)
        pair_iou = iou.gather(1, pair_anchor)
        pair_gt = torch.arange(m, device=dev)[:, None].expand(m, k)
        pair_image = gt_image[:, None].expand(m, k)
        dropped = b * a
        flat = torch.where(valid, pair_image * a + pair_anchor, dropped)

        # an anchor taken by several GTs goes to the highest CIoU, a tie to the lowest GT index
        best_iou_at = torch.full((b * a + 1,), -1.0, device=dev)
        best_iou_at.scatter_reduce_(
            0, flat.reshape(-1), torch.where(valid, pair_iou, -1.0).reshape(-1), "amax"
        )
        contender = valid & (pair_iou == best_iou_at[flat])
        first_gt_at = torch.full((b * a + 1,), m, dtype=torch.long, device=dev)
        first_gt_at.scatter_reduce_(
            0, flat.reshape(-1), torch.where(contender, pair_gt, m).reshape(-1), "amin"
        )
        won = contender & (pair_gt == first_gt_at[flat])

        best_metric = torch.where(won, pair_metric, 0.0).amax(1, keepdim=True)
        best_iou = torch.where(won, pair_iou, 0.0).amax(1, keepdim=True)
        soft = torch.where(won, pair_metric * best_iou / (best_metric + self.eps), 0.0)

        slot = torch.where(won, flat, dropped).reshape(-1)
        fg = torch.zeros(b * a + 1, dtype=torch.bool, device=dev)
        fg[slot] = True
        target_gt = torch.zeros(b * a + 1, dtype=torch.long, device=dev)
        target_gt[slot] = pair_gt.reshape(-1)
        target_boxes = torch.zeros(b * a + 1, 4, dtype=pd_boxes.dtype, device=dev)
        target_boxes[slot] = gt_boxes[pair_gt.reshape(-1)].to(target_boxes.dtype)
        # Class-major storage, so that the loss can compare it with class-major logits without a copy.
        target_scores = torch.zeros(b * c * a + 1, dtype=pd_scores.dtype, device=dev)
        class_slot = torch.where(won, (pair_image * c + gt_labels[:, None]) * a + pair_anchor, b * c * a)
        target_scores[class_slot.reshape(-1)] = soft.reshape(-1).to(target_scores.dtype)
        return Assignment(
            fg[:-1].view(b, a),
            target_gt[:-1].view(b, a),
            target_boxes[:-1].view(b, a, 4),
            target_scores[:-1].view(b, c, a).transpose(1, 2),
            pair_image.reshape(-1),
            pair_anchor.reshape(-1),
            pair_gt.reshape(-1),
            soft.reshape(-1),
        )

    def _inside(self, anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """``(M, A)`` bool: anchor centre strictly inside the GT box."""
        x, y = anchors[:, 0], anchors[:, 1]
        return (
            (x > gt_boxes[:, 0:1] + self.eps)
            & (y > gt_boxes[:, 1:2] + self.eps)
            & (x < gt_boxes[:, 2:3] - self.eps)
            & (y < gt_boxes[:, 3:4] - self.eps)
        )

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
