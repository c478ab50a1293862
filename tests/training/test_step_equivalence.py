"""What a training step computes, pinned: the engine's real step (``train_one_epoch``) against the recipe
written out plainly here, on fixed batches without augmentation, to float tolerance.

The recipe, as the README states it: forward in train mode, the dual loss (the sum over the micro-batch's
images), backward; gradients accumulated over micro-batches until a step holds the nominal batch (ramping
from 1 during warmup; an epoch's last batch always steps); the gradient norm clipped; Nesterov SGD with
three groups (biases and BatchNorm weights undecayed, the other weights decayed by ``weight_decay`` times
the images the step sums over ``nominal_batch``); during warmup the bias group's lr falls from
``warmup_bias_lr``, the others rise from 0 and momentum rises from ``warmup_momentum``, all towards
``lr0`` times the epoch's linear factor; after each optimizer step the EMA blends every floating tensor of
the state dict with decay ``ema_decay * (1 - exp(-updates / ema_tau))`` and copies the counters.

A change to any of that (the loss's scale, the accumulation, the clipping, the groups, the schedule, the
EMA) fails here, in CI, instead of in a user's mAP. A change meant to alter it rewrites the plain loop
below, in the same commit, and shows ``benchmarks/quality.py`` before and after.
"""

import copy
import math

import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.training import TrainingData, build_train_state, train_one_epoch
from yolov9 import build_model
from yolov9.loss import DualDetectionLoss

CPU = torch.device("cpu")
IMGSZ, BATCH, STEPS, EPOCHS = 64, 2, 4, 2
NOMINAL = 5  # accumulation round(5 / 2) = 2: a step sums 4 images, so weight decay x 0.8
WARMUP = 4
LR0, LRF, MOMENTUM, WEIGHT_DECAY = 0.02, 0.1, 0.9, 0.05  # large decay: its scale shows in the weights
WARMUP_BIAS_LR, WARMUP_MOMENTUM = 0.1, 0.8
CLIP = 2.0  # below the gradient norms of these batches: every optimizer step clips
EMA_DECAY, EMA_TAU = 0.9999, 3.0
SEED = 3


def recipe_config(shards):
    return load_config(
        None,
        [
            "model.name=yolov9-t",
            f"data.root={shards}",
            f"train.seed={SEED}",
            f"train.epochs={EPOCHS}",
            f"train.batch_size={BATCH}",
            f"train.nominal_batch={NOMINAL}",
            f"train.imgsz={IMGSZ}",
            f"train.steps_per_epoch={STEPS}",
            f"train.lr0={LR0}",
            f"train.lrf={LRF}",
            f"train.momentum={MOMENTUM}",
            f"train.weight_decay={WEIGHT_DECAY}",
            "train.warmup_epochs=0",
            f"train.warmup_min_steps={WARMUP}",
            f"train.warmup_bias_lr={WARMUP_BIAS_LR}",
            f"train.warmup_momentum={WARMUP_MOMENTUM}",
            f"train.clip_grad_norm={CLIP}",
            f"train.ema_decay={EMA_DECAY}",
            f"train.ema_tau={EMA_TAU}",
        ],
    )


def fixed_batches(num_classes: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per epoch, ``STEPS`` batches of uint8 images (B, 3, 64, 64) with 1-3 boxes each (xyxy pixels)."""
    g = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(EPOCHS):
        batches = []
        for _ in range(STEPS):
            images = torch.randint(0, 256, (BATCH, 3, IMGSZ, IMGSZ), dtype=torch.uint8, generator=g)
            rows = []
            for i in range(BATCH):
                for _ in range(int(torch.randint(1, 4, (), generator=g))):
                    x1, y1 = torch.randint(0, 40, (2,), generator=g).tolist()
                    w, h = torch.randint(8, 24, (2,), generator=g).tolist()
                    cls = int(torch.randint(0, num_classes, (), generator=g))
                    rows.append([i, cls, x1, y1, x1 + w, y1 + h])
            batches.append((images, torch.tensor(rows, dtype=torch.float32)))
        epochs.append(batches)
    return epochs


def warmup(step: int, start: float, end: float) -> float:
    return start + (end - start) * min(step / WARMUP, 1.0)


def plain_training(cfg, num_classes: int, epochs) -> tuple[nn.Module, nn.Module, list[float]]:
    """The recipe of the module docstring in one loop: (model, EMA model, gradient norms before clipping)."""
    torch.manual_seed(SEED)  # the same initial weights the engine draws (rank 0)
    model = build_model("yolov9-t", num_classes=num_classes).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval()
    loss_fn = DualDetectionLoss(model, **cfg.loss.__dict__)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias") and p.requires_grad]
    norms = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    taken = {id(p) for p in biases + norms}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    images_per_step = BATCH * round(NOMINAL / BATCH)
    optimizer = torch.optim.SGD(
        [
            {"params": biases, "weight_decay": 0.0},
            {"params": weights, "weight_decay": WEIGHT_DECAY * images_per_step / NOMINAL},
            {"params": norms, "weight_decay": 0.0},
        ],
        lr=LR0,
        momentum=MOMENTUM,
        nesterov=True,
    )
    model.train()
    step, window, updates, grad_norms = 0, 0, 0, []
    for epoch, batches in enumerate(epochs):
        target = LR0 * ((1 - epoch / EPOCHS) * (1 - LRF) + LRF)
        for i, (images, targets) in enumerate(batches):
            for group, start in zip(optimizer.param_groups, (WARMUP_BIAS_LR, 0.0, 0.0), strict=True):
                group["lr"] = warmup(step, start, target)
                group["momentum"] = warmup(step, WARMUP_MOMENTUM, MOMENTUM)
            loss, _ = loss_fn(model(images.to(memory_format=torch.channels_last).float() / 255), targets)
            loss.backward()
            window += 1
            accumulate = max(1, round(warmup(step, 1.0, NOMINAL / BATCH)))
            step += 1
            if window >= accumulate or i == len(batches) - 1:
                grad_norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
                optimizer.step()
                optimizer.zero_grad()
                window, updates = 0, updates + 1
                d = EMA_DECAY * (1 - math.exp(-updates / EMA_TAU))
                with torch.no_grad():
                    source = model.state_dict()
                    for name, value in ema.state_dict().items():
                        if value.dtype.is_floating_point:
                            value.mul_(d).add_(source[name], alpha=1 - d)
                        else:
                            value.copy_(source[name])
    return model, ema, grad_norms


@pytest.fixture(scope="module")
def trained(tiny_shards):
    """The engine's state and the plain loop's (model, EMA, gradient norms), each after the same batches."""
    cfg = recipe_config(tiny_shards)
    data = TrainingData.read(str(tiny_shards))
    epochs = fixed_batches(data.train.num_classes)
    state = build_train_state(cfg, data, CPU)
    for epoch, batches in enumerate(epochs):
        state.epoch = epoch
        train_one_epoch(state, batches)
    return state, plain_training(cfg, data.train.num_classes, epochs)


def assert_same_tensors(engine: dict, plain: dict) -> None:
    assert engine.keys() == plain.keys()
    for name, value in engine.items():
        torch.testing.assert_close(
            value, plain[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_the_recipe_in_this_test_moves_the_weights_and_clips_every_step(trained):
    state, (model, _, grad_norms) = trained
    # accumulation 1, 1, 2, 2 in warmup, then 2; each epoch's last batch steps: steps after batches
    # 1, 2, 4 | 6, 8 (1-based), five optimizer steps
    assert len(grad_norms) == 5 and state.ema.updates == 5
    assert min(grad_norms) > CLIP
    torch.manual_seed(SEED)
    initial = build_model("yolov9-t", num_classes=state.num_classes)
    moved = [(p - q).abs().max() for p, q in zip(model.parameters(), initial.parameters(), strict=True)]
    assert max(moved) > 1e-3


def test_the_engine_step_trains_the_weights_the_recipe_gives(trained):
    state, (model, _, _) = trained
    assert_same_tensors(state.model.state_dict(), model.state_dict())


def test_the_engine_ema_is_the_recipes_ema(trained):
    state, (_, ema, _) = trained
    assert_same_tensors(state.ema.module.state_dict(), ema.state_dict())
