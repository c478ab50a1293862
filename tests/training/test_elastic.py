"""An elastic run (``ray.num_workers: [MIN, MAX]``) is laid out for MAX data ranks whatever its size: a worker
plays the data ranks of the missing ones (``rank, rank + world, ...``), one micro-batch each per step. So a
resize changes speed, not what a step holds: the same images in the same order give the same update on one
worker as on two, and an epoch cut by a resize still sees each image once.

The two-worker runs here are two processes over gloo with DDP, as Ray Train runs them; the run with Ray and
a node that goes away is ``test_elastic_cluster.py``.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline import names
from pipeline.config import load_config
from pipeline.data.loader import RanksLoader, make_train_loader
from pipeline.data.manifest import read_splits
from pipeline.training import TrainingData, build_train_state, train_one_epoch
from pipeline.training.ema import unwrap
from pipeline.training.progress import epoch_summary
from pipeline.training.state import data_ranks
from tests.conftest import free_port
from tests.training.test_step_equivalence import fixed_batches

CPU = torch.device("cpu")
BATCH, STEPS, NOMINAL = 2, 3, 4  # two data ranks of 2 images: a step holds the nominal batch, no accumulation


def elastic_config(shards):
    return load_config(
        None,
        [
            "model.name=yolov9-t",
            f"data.root={shards}",
            "ray.num_workers=[1, 2]",
            f"train.batch_size={BATCH}",
            f"train.nominal_batch={NOMINAL}",
            "train.imgsz=64",
            f"train.steps_per_epoch={STEPS}",
            "train.warmup_epochs=0",
            "train.warmup_min_steps=2",
        ],
    )


def rank_batches(num_classes: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per data rank (2), ``STEPS`` different batches of ``BATCH`` images with boxes."""
    first, second = fixed_batches(num_classes)  # two lists of 4 batches of 2 images
    return [first[:STEPS], second[:STEPS]]


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in unwrap(model).parameters()]


def two_workers(rank: int, shards: str, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = elastic_config(shards)
    state = build_train_state(
        cfg,
        TrainingData.read(shards),
        CPU,
        rank=rank,
        world=2,
        data_world=2,
        wrap=nn.parallel.DistributedDataParallel,
    )
    train_one_epoch(state, rank_batches(state.num_classes)[rank])
    if rank == 0:
        out["weights"] = weights(state.model)
    dist.barrier()  # see tests/yolov9/test_loss.py: no rank tears gloo down under the other
    state.model = None
    dist.destroy_process_group()


def test_a_worker_plays_the_data_ranks_of_the_workers_it_lacks():
    assert data_ranks(0, 1, 2) == (0, 1)
    assert [data_ranks(r, 3, 4) for r in range(3)] == [(0, 3), (1,), (2,)]
    assert data_ranks(1, 2, 2) == (1,)
    with pytest.raises(ValueError, match="3 workers cannot play 2 data ranks"):
        data_ranks(0, 3, 2)


def test_a_step_schedule_and_epoch_do_not_depend_on_the_workers_present(tiny_shards):
    cfg, data = elastic_config(tiny_shards), TrainingData.read(str(tiny_shards))
    alone = build_train_state(cfg, data, CPU, rank=0, world=1, data_world=2)
    full = build_train_state(cfg, data, CPU, rank=0, world=2, data_world=2)
    assert alone.ranks == (0, 1) and alone.global_batch == full.global_batch == BATCH * 2
    assert alone.schedule == full.schedule
    assert [g["weight_decay"] for g in alone.optimizer.param_groups] == [
        g["weight_decay"] for g in full.optimizer.param_groups
    ]


@pytest.mark.slow
def test_one_worker_playing_two_data_ranks_takes_the_step_two_workers_take(tiny_shards):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(two_workers, args=(str(tiny_shards), free_port(), out), nprocs=2)
        expected = out["weights"]

    cfg = elastic_config(tiny_shards)
    state = build_train_state(cfg, TrainingData.read(str(tiny_shards)), CPU, rank=0, world=1, data_world=2)
    before = weights(state.model)
    per_rank = rank_batches(state.num_classes)
    train_one_epoch(state, [[per_rank[0][i], per_rank[1][i]] for i in range(STEPS)])

    got = weights(state.model)
    moved = max((a - b).abs().max().item() for a, b in zip(got, before, strict=True))
    assert moved > 1e-3  # the steps did move the weights
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def test_an_epoch_cut_by_a_resize_sees_each_image_once(tiny_shards):
    """Two workers train 5 steps of the epoch; one worker goes on from step 5 playing both data ranks."""
    train, _ = read_splits(str(tiny_shards))
    steps = train.num_samples // (BATCH * 2)

    def loader(rank: int):
        return make_train_loader(
            train, batch_size=BATCH, imgsz=64, rank=rank, world_size=2, num_workers=0, epoch=1, seed=0,
            augment=elastic_config(tiny_shards).data.augment, mosaic=True, steps_per_epoch=steps,
            shuffle_buffer=8,
        )  # fmt: skip

    seen = []
    for rank in (0, 1):
        two = loader(rank)
        for i, _ in enumerate(two):
            if i == 5:
                break
            seen += two.last_image_ids()
    alone = RanksLoader([loader(0), loader(1)])
    for i, _ in enumerate(alone):
        if i >= 5:  # where a resumed epoch starts: the first batches are drawn and dropped
            seen += alone.last_image_ids()

    assert len(seen) == train.num_samples == 48
    assert sorted(seen) == sorted(set(seen))


def test_the_epoch_line_names_the_workers_and_a_resize_with_its_reason():
    epoch = {names.EPOCH: 3, names.MAP: 0.5, names.MAP50: 0.7, names.IMAGES_PER_S: 40.0}
    epoch[names.LOADER_WAIT] = 0.0
    assert " img/s on 2 workers loader-wait" in epoch_summary({**epoch, names.WORLD_SIZE: 2.0}, 8, 60)
    shrunk = epoch_summary({**epoch, names.WORLD_SIZE: 1.0, names.RESIZED_FROM: 2.0}, 8, 60)
    assert "on 1 worker (resized from 2: a worker was lost)" in shrunk
    grown = epoch_summary({**epoch, names.WORLD_SIZE: 2.0, names.RESIZED_FROM: 1.0}, 8, 60)
    assert "on 2 workers (resized from 1: room for more workers appeared)" in grown
