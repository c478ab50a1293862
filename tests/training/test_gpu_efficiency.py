"""The hot path without needless host syncs, measured on the CPU: the step reads the device once, the
fixed-length loss equals the loss over the positive anchors, the foreach EMA equals the per-tensor formula,
a compiled run matches eager, and benchmarks/gpu.py --quick prints every figure it promises."""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import load_config
from pipeline.training import TrainingData, build_train_state, train_one_epoch
from pipeline.training.ema import ModelEMA
from pipeline.training.host_sync import HostSyncCounter
from pipeline.training.state import compile_for_training
from yolov9.boxes import bbox2dist, box_ciou, dist2bbox
from yolov9.loss import DualDetectionLoss, HeadInfo, _dfl

pytestmark = [pytest.mark.cost(70), pytest.mark.own_process]

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


def config(shards, *extra: str):
    return load_config(
        None,
        [
            "model.name=yolov9-t",
            f"data.root={shards}",
            "train.batch_size=2",
            "train.imgsz=64",
            "train.nominal_batch=2",
            "train.steps_per_epoch=3",
            "train.warmup_epochs=0",
            "train.warmup_min_steps=0",
            *extra,
        ],
    )


def batches(count: int) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
        targets = torch.tensor(
            [[0, 0, 10.0, 10.0, 30.0, 40.0], [1, 1, 20.0, 8.0, 60.0, 50.0], [1, 0, 0, 0, 16, 16]]
        )
        out.append((images, targets))
    return out


def test_a_train_step_reads_the_device_once(tiny_shards):
    state = build_train_state(config(tiny_shards), TrainingData.read(str(tiny_shards)), CPU)
    with HostSyncCounter(CPU) as counter:
        train_one_epoch(state, batches(3))
    # on a GPU run the targets are checked on the CPU, before their copy: those reads never wait for it
    device_reads = {site: n for site, n in counter.sites.items() if not site[1].startswith("_check_targets")}
    by_function = Counter()
    for (op, site), n in device_reads.items():
        by_function[op, site.split(" ")[0]] += n
    assert by_function == {
        ("tolist", "agree_on_step"): 3,  # the step's flags, once a step
        ("tolist", "stats"): 1,  # the loss sums, once an epoch
        ("item", "check_input"): 1,  # the model's largest stride, read on its first forward only
    }


def positive_anchor_loss(maps: list, targets: torch.Tensor, loss: DualDetectionLoss) -> dict[str, float]:
    """Box and DFL sums of the main branch over the positive anchors (fg_mask.nonzero()), as the
    reference computes them."""
    d = loss._decode(maps)
    a = loss._assign(d, targets)
    image, anchor = a.fg_mask.nonzero(as_tuple=True)
    weight = a.target_scores[image, anchor].sum(-1)
    stride, points = d["stride"][anchor], d["anchors"][anchor]
    dist_logits = d["dist"][image, :, :, anchor]
    pred = dist2bbox((dist_logits.softmax(-1) * torch.arange(16.0)).sum(-1), points)
    target = a.target_boxes[image, anchor] / stride
    box = ((1 - box_ciou(pred, target)) * weight).sum()
    dfl = (_dfl(dist_logits, bbox2dist(points, target, 16)) * weight).sum()
    norm = a.target_scores.sum().clamp(min=1)
    cls = F.binary_cross_entropy_with_logits(d["cls"], a.target_scores.transpose(1, 2), reduction="sum")
    return {
        "box": (7.5 * box / norm).item(),
        "dfl": (1.5 * dfl / norm).item(),
        "cls": (0.5 * cls / norm).item(),
    }


@pytest.mark.parametrize("seed", range(3))
def test_the_fixed_length_pair_list_gives_the_loss_of_the_positive_anchors(seed):
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, 64 + 3, 64 // s, 64 // s, generator=gen) for s in (8, 16, 32)]
    wh = 8 + 40 * torch.rand(7, 2, generator=gen)
    xy = (64 - wh) * torch.rand(7, 2, generator=gen)
    targets = torch.cat(
        [torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [1, 1.0]]), xy, xy + wh], 1
    )
    loss = DualDetectionLoss(HeadInfo(3, (8.0, 16.0, 32.0), dual=False))
    _, parts = loss(maps, targets)
    expected = positive_anchor_loss(maps, targets, loss)
    assert expected["box"] > 0
    for key in ("box", "dfl", "cls"):
        assert parts[f"main/{key}"].item() == pytest.approx(expected[key], rel=1e-5), key


def test_the_foreach_ema_update_equals_the_per_tensor_formula():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    ema = ModelEMA(model, decay=0.99, tau=3.0)
    expected = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for n in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.rand(2, 3, 8, 8))  # train mode: BatchNorm statistics and its counter move
        ema.update(model)
        d = 0.99 * (1 - math.exp(-n / 3.0))
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                expected[name].mul_(d).add_(value, alpha=1 - d)  # the per-tensor update it replaces
            else:
                expected[name] = value.clone()
    for name, value in ema.module.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert ema.module[1].num_batches_tracked.item() == 3


@pytest.mark.slow
def test_a_compiled_run_trains_like_the_eager_one(tiny_shards):
    """torch.compile's aot_eager backend: graph capture and the compiled backward, without Inductor's
    C++ build (about 10 minutes for yolov9-t on 2 cores; the GPU benchmark compiles with Inductor)."""
    data = TrainingData.read(str(tiny_shards))
    losses = {}
    for mode in ("eager", "compiled"):
        state = build_train_state(config(tiny_shards), data, CPU)
        if mode == "compiled":
            compile_for_training(state, backend="aot_eager")
        sums: list[float] = []
        train_one_epoch(
            state, batches(3), [lambda _, event, sums=sums: sums.append(event.loss_sums[0].item())]
        )
        losses[mode] = [b - a for a, b in zip([0.0, *sums], sums, strict=False)]  # per-step losses
    assert len(losses["compiled"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-4)


def test_train_compile_is_a_config_option(tiny_shards):
    state = build_train_state(
        config(tiny_shards, "train.compile=true"), TrainingData.read(str(tiny_shards)), CPU
    )
    assert isinstance(state.model, torch._dynamo.eval_frame.OptimizedModule)  # compiled lazily, on first use


PROMISED = {
    "gpu_train_step": {"images_per_s", "ms_per_step", "batch", "dtype", "mfu", "peak_memory_gb"},
    "gpu_host_syncs": {"host_reads_per_step", "host_read_sites"},
    "gpu_loader": {"workers", "samples_per_s"},
    "gpu_train_run": {"images_per_s", "loader_wait_fraction"},
    "gpu_validate": {"images_per_s", "conf"},
}


@pytest.mark.slow
def test_the_gpu_benchmark_quick_mode_prints_every_figure_on_a_cpu():
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    for bench, keys in PROMISED.items():
        mine = [line for line in lines if line["bench"] == bench]
        assert mine, bench
        assert all(keys <= set(line) for line in mine), bench
    steps = [line for line in lines if line["bench"] == "gpu_train_step"]
    assert {line["mode"] for line in steps} == {"eager", "compiled"}
    assert all(line["images_per_s"] > 0 for line in lines if "images_per_s" in line)
    assert all(line["samples_per_s"] > 0 for line in lines if line["bench"] == "gpu_loader")
    (run_line,) = [line for line in lines if line["bench"] == "gpu_train_run"]
    assert 0 <= run_line["loader_wait_fraction"] < 1
    # one deliberate read a step (the ranks' verdict), the epoch's loss sums, and the CPU-side target checks
    for line in lines:
        if line["bench"] == "gpu_host_syncs":
            sites = {site.split(" ")[1] for site in line["host_read_sites"]}
            assert sites <= {"agree_on_step", "stats", "_check_targets"}, sites
