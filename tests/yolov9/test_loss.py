"""The dual-branch PGI loss: weights, assignment modes, empty targets, bad input, worker-count invariance."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import free_port
from yolov9 import build_model
from yolov9.loss import DualDetectionLoss, HeadInfo, _dfl

NC = 3
STRIDES = (8.0, 16.0, 32.0)
INFO = HeadInfo(NC, STRIDES)
SIZE = 64
TARGETS = torch.tensor(
    [[0, 1, 4.0, 6.0, 40.0, 30.0], [1, 0, 20.0, 20.0, 60.0, 62.0], [1, 2, 0.0, 0.0, 16.0, 16.0]]
)


def random_maps(batch: int = 2, seed: int = 0, dual: bool = True) -> list:
    gen = torch.Generator().manual_seed(seed)

    def branch():
        return [
            torch.randn(batch, 64 + NC, SIZE // int(s), SIZE // int(s), generator=gen).requires_grad_(True)
            for s in STRIDES
        ]

    return [branch(), branch()] if dual else branch()


def test_dfl_of_an_exact_bin_is_the_cross_entropy_of_that_bin():
    logits = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[3.0, 0.0, 7.0, 14.0]])
    expected = -logits.log_softmax(-1)[0, torch.arange(4), target[0].long()].mean()
    assert _dfl(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dfl_of_uniform_logits_is_log_bins_wherever_the_target_falls():
    assert _dfl(torch.zeros(2, 4, 16), torch.tensor([[0.5, 3.25, 9.9, 14.99]] * 2)).tolist() == pytest.approx(
        [math.log(16)] * 2
    )


def test_total_is_batch_times_weighted_parts():
    total, parts = DualDetectionLoss(INFO, aux_weight=0.25, lead_weight=1.0)(random_maps(), TARGETS)
    aux = sum(parts[f"aux/{k}"] for k in ("box", "cls", "dfl"))
    main = sum(parts[f"main/{k}"] for k in ("box", "cls", "dfl"))
    assert total.item() == pytest.approx(2 * (0.25 * aux + main).item(), rel=1e-6)


def test_branch_weights_scale_only_the_total_not_the_parts():
    maps = random_maps()
    _, base = DualDetectionLoss(INFO)(maps, TARGETS)
    total, parts = DualDetectionLoss(INFO, aux_weight=0.0, lead_weight=0.5)(maps, TARGETS)
    assert all(torch.equal(parts[k], base[k]) for k in base)
    assert total.item() == pytest.approx(
        2 * 0.5 * sum(base[f"main/{k}"] for k in ("box", "cls", "dfl")).item(), rel=1e-6
    )


def test_gains_scale_their_part():
    maps = random_maps()
    _, base = DualDetectionLoss(INFO)(maps, TARGETS)
    _, doubled = DualDetectionLoss(INFO, box=15.0, cls=1.0, dfl=3.0)(maps, TARGETS)
    for key in base:
        assert doubled[key].item() == pytest.approx(2 * base[key].item(), rel=1e-6)


def test_zero_aux_weight_sends_no_gradient_to_the_aux_branch():
    maps = random_maps()
    total, _ = DualDetectionLoss(INFO, aux_weight=0.0)(maps, TARGETS)
    total.backward()
    assert all(m.grad is None or m.grad.abs().sum() == 0 for m in maps[0])
    assert any(m.grad.abs().sum() > 0 for m in maps[1])


def positive_anchor_grads(maps: list) -> set[int]:
    """Anchors (flat over levels) whose distance logits received gradient: the box and DFL
    losses touch only foreground anchors, so this is the assignment's foreground."""
    flat = torch.cat([m.grad[:, :64].abs().sum(1).reshape(m.shape[0], -1) for m in maps], 1)
    return set(flat.nonzero()[:, 1].tolist()) | {-1}  # -1 keeps empty sets comparable


def test_lead_guided_trains_the_aux_branch_on_the_main_branch_assignment():
    aux, main = random_maps(seed=1)
    DualDetectionLoss(HeadInfo(NC, STRIDES, dual=False))(main, TARGETS)[0].backward()
    main_fg = positive_anchor_grads(main)
    DualDetectionLoss(HeadInfo(NC, STRIDES, dual=False))(aux, TARGETS)[0].backward()
    aux_own_fg = positive_anchor_grads(aux)
    assert main_fg != aux_own_fg  # the two branches disagree, so the modes are distinguishable

    for mode, expected in (("lead_guided", main_fg), ("independent", aux_own_fg)):
        for m in (*aux, *main):
            m.grad = None
        DualDetectionLoss(INFO, assign=mode)([aux, main], TARGETS)[0].backward()
        assert positive_anchor_grads(aux) == expected, mode
        assert positive_anchor_grads(main) == main_fg, mode


def test_empty_targets_give_a_finite_loss_with_zero_box_terms():
    total, parts = DualDetectionLoss(INFO)(random_maps(), torch.zeros(0, 6))
    assert torch.isfinite(total)
    assert parts["main/box"] == 0 and parts["main/dfl"] == 0 and parts["aux/box"] == 0
    assert parts["main/cls"] > 0
    total.backward()


def test_an_image_without_boxes_is_background_only():
    maps = random_maps()
    DualDetectionLoss(INFO)(maps, TARGETS[:1])[0].backward()  # only image 0 has a box
    for m in maps[1]:
        assert m.grad[1, :64].abs().sum() == 0  # no box/DFL gradient on image 1
        assert m.grad[1, 64:].abs().sum() > 0  # but its class logits are pushed to background


def test_single_branch_model_has_one_term():
    model = build_model("gelan-t", num_classes=NC).train()
    total, parts = DualDetectionLoss(model)(model(torch.rand(2, 3, SIZE, SIZE)), TARGETS)
    assert set(parts) == {"main/box", "main/cls", "main/dfl"}
    assert total.item() == pytest.approx(2 * sum(parts.values()).item(), rel=1e-6)


def test_gradient_reaches_both_branches_of_a_dual_model():
    model = build_model("yolov9-t", num_classes=NC).train()
    total, _ = DualDetectionLoss(model)(model(torch.rand(2, 3, SIZE, SIZE)), TARGETS)
    total.backward()
    head = model.head
    assert head.cv2[0][0].conv.weight.grad.abs().sum() > 0  # aux box tower
    assert head.cv4[0][0].conv.weight.grad.abs().sum() > 0  # main box tower
    assert model.layers[1].conv.weight.grad.abs().sum() > 0  # shared backbone


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([[0, 1, float("nan"), 0, 10, 10]]), "NaN"),
        (torch.tensor([[0, 1, 20.0, 0, 10, 10]]), "x2 < x1"),
        (torch.tensor([[0, NC, 0.0, 0, 10, 10]]), "class id"),
        (torch.tensor([[2, 0, 0.0, 0, 10, 10]]), "image index"),
        (torch.zeros(3, 5), r"\(M, 6\)"),
    ],
)
def test_bad_targets_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        DualDetectionLoss(INFO)(random_maps(), bad)


def test_wrong_head_maps_are_named():
    with pytest.raises(ValueError, match="aux_maps, main_maps"):
        DualDetectionLoss(INFO)(random_maps(dual=False), TARGETS)
    with pytest.raises(ValueError, match="train mode"):
        DualDetectionLoss(INFO)(torch.zeros(2, 4 + NC, 84), TARGETS)


def test_unknown_assign_mode_and_negative_weight_are_rejected():
    with pytest.raises(ValueError, match="assign"):
        DualDetectionLoss(INFO, assign="both")
    with pytest.raises(ValueError, match="aux_weight"):
        DualDetectionLoss(INFO, aux_weight=-1)


class PerImageMaps(nn.Module):
    """Head maps as parameters, one set per image, so a worker can take any subset of the batch."""

    def __init__(self, images: int) -> None:
        super().__init__()
        maps = random_maps(batch=images, seed=7)
        self.maps = nn.ParameterList([nn.Parameter(m.detach().clone()) for branch in maps for m in branch])

    def forward(self, index: torch.Tensor) -> list:
        maps = [m[index] for m in self.maps]
        return [maps[:3], maps[3:]]


BATCH_TARGETS = torch.cat([TARGETS, TARGETS + torch.tensor([2, 0, 0, 0, 0, 0])])  # 4 images


def worker_gradient(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(PerImageMaps(4))
    index = torch.arange(rank * 2, rank * 2 + 2)
    local = BATCH_TARGETS[(BATCH_TARGETS[:, 0] >= index[0]) & (BATCH_TARGETS[:, 0] <= index[-1])].clone()
    local[:, 0] -= index[0]
    DualDetectionLoss(INFO)(model(index), local)[0].backward()
    if rank == 0:
        out["grads"] = [p.grad.clone() for p in model.module.maps]
    # Without the barrier and the release of DDP's reducer first, a rank that leaves early can tear gloo's
    # threads down under the other one (std::terminate, SIGABRT: seen once in CI).
    dist.barrier()
    del model
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_with_half_the_batch_give_the_one_worker_gradient():
    single = PerImageMaps(4)
    DualDetectionLoss(INFO)(single(torch.arange(4)), BATCH_TARGETS)[0].backward()
    expected = [p.grad for p in single.maps]

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker_gradient, args=(2, free_port(), out), nprocs=2)
        grads = out["grads"]
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
