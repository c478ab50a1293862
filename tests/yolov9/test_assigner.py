"""Task-Aligned Assigner: hand-made cases, and the vectorised path against a per-GT loop."""

import pytest
import torch

from yolov9.assigner import TaskAlignedAssigner
from yolov9.boxes import box_ciou


def grid_anchors(size: int, stride: int) -> torch.Tensor:
    """Cell centres of one level, row-major, pixels."""
    c = torch.arange(size // stride, dtype=torch.float) * stride + stride / 2
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((gx, gy), -1).view(-1, 2)


def anchor_index(anchors: torch.Tensor, x: float, y: float) -> int:
    return int(((anchors - torch.tensor([x, y])).abs().sum(1) == 0).nonzero())


ANCHORS = grid_anchors(64, 8)  # 8x8 anchors at 4, 12, ..., 60
A = len(ANCHORS)


def uniform_scores(value: float = 0.5, classes: int = 2) -> torch.Tensor:
    return torch.full((1, A, classes), value)


def test_gt_takes_its_topk_best_aligned_anchors():
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0]])  # 5x5 anchor centres inside
    boxes = torch.tensor([0.0, 0.0, 8.0, 8.0]).repeat(1, A, 1)  # poor predictions everywhere
    chosen = [anchor_index(ANCHORS, x, y) for x, y in ((12, 12), (20, 28), (36, 4))]
    boxes[0, chosen] = gt  # three exact predictions
    out = TaskAlignedAssigner(topk=3, num_classes=2).assign(
        uniform_scores(), boxes, ANCHORS, torch.tensor([0]), torch.tensor([1]), gt
    )
    assert sorted(out.fg_mask[0].nonzero().view(-1).tolist()) == sorted(chosen)
    assert torch.allclose(out.target_boxes[0, chosen], gt.expand(3, 4))
    # all three share the best metric, so each gets the GT's best CIoU (1) for class 1, nothing for 0
    assert torch.allclose(out.target_scores[0, chosen, 1], torch.ones(3), atol=1e-5)
    assert out.target_scores[0, chosen, 0].abs().sum() == 0


def test_only_anchors_inside_the_gt_are_candidates():
    gt = torch.tensor([[0.0, 0.0, 17.0, 9.0]])  # centres inside: (4, 4) and (12, 4)
    out = TaskAlignedAssigner(topk=10, num_classes=2).assign(
        uniform_scores(), gt.repeat(1, A, 1), ANCHORS, torch.tensor([0]), torch.tensor([0]), gt
    )
    inside = {anchor_index(ANCHORS, 4, 4), anchor_index(ANCHORS, 12, 4)}
    assert set(out.fg_mask[0].nonzero().view(-1).tolist()) == inside


def test_contested_anchor_goes_to_the_gt_it_overlaps_most():
    gts = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0]])
    contested = anchor_index(ANCHORS, 20, 20)  # inside both GTs
    boxes = torch.tensor([0.0, 0.0, 8.0, 8.0]).repeat(1, A, 1)
    boxes[0, contested] = gts[1]  # its prediction matches the second GT exactly
    out = TaskAlignedAssigner(topk=20, num_classes=2).assign(
        uniform_scores(), boxes, ANCHORS, torch.tensor([0, 0]), torch.tensor([0, 1]), gts
    )
    assert out.fg_mask[0, contested]
    assert out.target_gt[0, contested] == 1
    assert torch.equal(out.target_boxes[0, contested], gts[1])
    assert out.target_scores[0, contested, 0] == 0 and out.target_scores[0, contested, 1] > 0


def test_soft_targets_peak_at_the_gts_best_ciou():
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    boxes = torch.tensor([2.0, 2.0, 30.0, 36.0]).repeat(1, A, 1)  # the same imperfect box everywhere
    scores = torch.rand(1, A, 2, generator=torch.Generator().manual_seed(0))
    out = TaskAlignedAssigner(topk=4, num_classes=2).assign(
        scores, boxes, ANCHORS, torch.tensor([0]), torch.tensor([0]), gt
    )
    best_ciou = box_ciou(gt[0], boxes[0, 0]).item()
    assert out.fg_mask.sum() == 4
    assert out.target_scores[..., 0].max().item() == pytest.approx(best_ciou, rel=1e-5)
    # the others are scaled by their alignment relative to the best: s**0.5 with equal CIoU
    pos = out.fg_mask[0].nonzero().view(-1)
    s = scores[0, pos, 0].sqrt()
    assert torch.allclose(out.target_scores[0, pos, 0], s / s.max() * best_ciou, rtol=1e-5)


def test_no_gts_gives_background_everywhere():
    out = TaskAlignedAssigner(num_classes=2).assign(
        uniform_scores(), torch.zeros(1, A, 4), ANCHORS, torch.zeros(0), torch.zeros(0), torch.zeros(0, 4)
    )
    assert not out.fg_mask.any() and out.target_scores.sum() == 0


def test_padded_gt_slots_are_ignored():
    gts = torch.tensor(
        [[[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 0.0, 0.0]], [[8.0, 8.0, 60.0, 60.0], [1.0, 1.0, 63.0, 63.0]]]
    )
    mask = torch.tensor([[True, False], [True, True]])
    labels = torch.tensor([[1, 0], [0, 1]])
    scores = torch.rand(2, A, 2, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([4.0, 4.0, 36.0, 36.0]).repeat(2, A, 1)
    assigner = TaskAlignedAssigner(topk=5, num_classes=2)
    padded = assigner(scores, boxes, ANCHORS, labels, gts, mask)
    flat = assigner.assign(
        scores, boxes, ANCHORS, torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]), gts[mask]
    )
    assert torch.equal(padded.fg_mask, flat.fg_mask)
    assert torch.equal(padded.target_scores, flat.target_scores)


def reference_assign(scores, boxes, anchors, gt_image, gt_labels, gt_boxes, topk, alpha=0.5, beta=6.0):
    """Straightforward per-image, per-GT version of the specification, for comparison."""
    b, a, c = scores.shape
    fg = torch.zeros(b, a, dtype=torch.bool)
    target_gt = torch.zeros(b, a, dtype=torch.long)
    target_scores = torch.zeros(b, a, c)
    for image in range(b):
        gts = [g for g in range(len(gt_boxes)) if gt_image[g] == image]
        claims: dict[int, list[tuple[float, int, float]]] = {}
        for g in gts:
            x1, y1, x2, y2 = gt_boxes[g].tolist()
            candidates = []
            for j in range(a):
                x, y = anchors[j].tolist()
                if x1 < x < x2 and y1 < y < y2:
                    iou = max(box_ciou(gt_boxes[g], boxes[image, j]).item(), 0.0)
                    metric = scores[image, j, gt_labels[g]].item() ** alpha * iou**beta
                    candidates.append((metric, j, iou))
            for metric, j, iou in sorted(candidates, reverse=True)[:topk]:
                claims.setdefault(j, []).append((iou, g, metric))
        won: dict[int, list[tuple[int, float, float]]] = {}
        for j, options in claims.items():
            iou, g, metric = max(options)
            won.setdefault(g, []).append((j, metric, iou))
        for g, anchors_of_g in won.items():
            best_metric = max(m for _, m, _ in anchors_of_g)
            best_iou = max(i for _, _, i in anchors_of_g)
            for j, metric, _ in anchors_of_g:
                fg[image, j] = True
                target_gt[image, j] = g
                target_scores[image, j, gt_labels[g]] = metric * best_iou / (best_metric + 1e-9)
    return fg, target_gt, target_scores


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_assignment_matches_the_per_gt_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    anchors = torch.cat([grid_anchors(96, 8), grid_anchors(96, 16)])
    b, a, c, m = 3, len(anchors), 4, 9
    wh = 24 + 24 * torch.rand(m, 2, generator=gen)
    xy = (96 - wh) * torch.rand(m, 2, generator=gen)
    gt_boxes = torch.cat((xy, xy + wh), 1)
    gt_image = torch.randint(0, b - 1, (m,), generator=gen)  # the last image has no GT
    gt_labels = torch.randint(0, c, (m,), generator=gen)
    # predictions: boxes of GT-like size around every anchor, so CIoU is positive inside GTs
    pwh = 24 + 24 * torch.rand(b, a, 2, generator=gen)
    centre = anchors + 4 * torch.randn(b, a, 2, generator=gen)
    boxes = torch.cat((centre - pwh / 2, centre + pwh / 2), -1)
    scores = torch.rand(b, a, c, generator=gen)
    topk = int(torch.randint(3, 13, (1,), generator=gen))

    out = TaskAlignedAssigner(topk=topk, num_classes=c).assign(
        scores, boxes, anchors, gt_image, gt_labels, gt_boxes
    )
    fg, target_gt, target_scores = reference_assign(
        scores, boxes, anchors, gt_image, gt_labels, gt_boxes, topk
    )
    assert fg.any()
    assert torch.equal(out.fg_mask, fg)
    assert torch.equal(out.target_gt[fg], target_gt[fg])
    assert torch.allclose(out.target_scores, target_scores, atol=1e-6)
    assert not out.fg_mask[-1].any()


def test_logit_scores_give_the_same_assignment_as_probabilities():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, A, 2, generator=gen)
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0], [20.0, 10.0, 60.0, 50.0]])
    boxes = torch.tensor([4.0, 4.0, 36.0, 36.0]).repeat(1, A, 1)
    args = (boxes, ANCHORS, torch.tensor([0, 0]), torch.tensor([0, 1]), gt)
    assigner = TaskAlignedAssigner(topk=5, num_classes=2)
    from_logits = assigner.assign(logits, *args, logits=True)
    from_probs = assigner.assign(logits.sigmoid(), *args)
    assert torch.equal(from_logits.fg_mask, from_probs.fg_mask)
    assert torch.allclose(from_logits.target_scores, from_probs.target_scores)


def test_topk_must_be_positive():
    with pytest.raises(ValueError, match="topk"):
        TaskAlignedAssigner(topk=0)
