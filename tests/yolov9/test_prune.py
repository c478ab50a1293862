"""yolov9.prune: the deployable model is the dual model's main branch, fused, and nothing else."""

import pytest
import torch
from torch import nn

from yolov9 import build_model, prune
from yolov9.blocks import CBFuse, CBLinear, RepConvN
from yolov9.head import DDetect, DualDDetect
from yolov9.profile import gflops

pytestmark = [pytest.mark.own_process, pytest.mark.process_group("beside-main"), pytest.mark.cost(20)]

# Reference figures: the pruned model equals gelan-* fused, nc = 80, GFLOPs at 640x640.
PRUNED = {
    "yolov9-t": (2_407_632, 9.82),
    "yolov9-s": (7_105_888, 26.38),
    "yolov9-m": (19_978_672, 76.31),
    "yolov9-c": (25_288_768, 102.14),
    "yolov9-e": (57_345_920, 188.95),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def with_random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so fusion errors show."""
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.data.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
    return model.eval()


@pytest.mark.parametrize("name", PRUNED)
def test_pruned_model_has_reference_parameter_count(name):
    assert n_params(prune(build_model(name))) == PRUNED[name][0]


@pytest.mark.parametrize("name", PRUNED)
def test_pruned_model_equals_matching_gelan_fused(name):
    gelan = prune(build_model(name.replace("yolov9", "gelan")))
    assert n_params(gelan) == PRUNED[name][0]


@pytest.mark.slow
@pytest.mark.parametrize("name", PRUNED)
def test_pruned_model_has_reference_gflops_at_640(name):
    assert gflops(prune(build_model(name)), 640, 640) == pytest.approx(PRUNED[name][1], abs=0.005)


@pytest.mark.parametrize("name", ["yolov9-t", "yolov9-s", "yolov9-m", "yolov9-c", "yolov9-e"])
def test_pruned_output_equals_dual_eval_output(name):
    # Non-square, and large enough that every level has more than one cell in each direction.
    model = with_random_statistics(build_model(name))
    x = torch.rand(2, 3, 160, 224)
    with torch.no_grad():
        expected = model(x)
        got = prune(model)(x)
    assert got.shape == expected.shape == (2, 84, (20 * 28 + 10 * 14 + 5 * 7))
    assert (got - expected).abs().max().item() < 1e-3


@pytest.mark.slow
def test_pruned_output_equals_dual_eval_output_at_640x480():
    model = with_random_statistics(build_model("yolov9-c"), seed=1)
    x = torch.rand(1, 3, 480, 640)
    with torch.no_grad():
        expected = model(x)
        got = prune(model)(x)
    assert (got - expected).abs().max().item() < 1e-3


def test_pruning_drops_the_reversible_branch_of_c():
    pruned = prune(build_model("yolov9-c"))
    assert not any(isinstance(m, (CBLinear, CBFuse)) for m in pruned.modules())
    assert len(pruned.layers) == 24  # Silence + 22 main layers + head


def test_pruning_drops_the_auxiliary_neck_of_t():
    dual, pruned = build_model("yolov9-t"), prune(build_model("yolov9-t"))
    assert len(dual.layers) == 31 and len(pruned.layers) == 24


def test_pruning_keeps_the_routing_that_the_main_branch_of_e_reads():
    pruned = prune(build_model("yolov9-e"))
    assert sum(isinstance(m, CBLinear) for m in pruned.modules()) == 5
    assert sum(isinstance(m, CBFuse) for m in pruned.modules()) == 5


def test_pruned_model_is_single_branch_fused_and_in_eval_mode():
    pruned = prune(build_model("yolov9-s"))
    assert isinstance(pruned.head, DDetect) and not isinstance(pruned.head, DualDDetect)
    assert not pruned.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    assert all(m.fused is not None for m in pruned.modules() if isinstance(m, RepConvN))


def test_pruned_model_in_train_mode_returns_main_maps_only():
    model = build_model("yolov9-t", num_classes=3)
    pruned = prune(model).train()
    model.train()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        maps = pruned(x)
    assert [tuple(m.shape) for m in maps] == [(1, 67, 8, 8), (1, 67, 4, 4), (1, 67, 2, 2)]


def test_prune_leaves_the_input_model_untouched():
    model = build_model("yolov9-t", num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model)
    assert model.training and isinstance(model.head, DualDDetect)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
