"""model.sync_bn on CPU workers: BatchNorm over the union of the workers' micro-batches, as one process
with the whole batch computes it (two processes over gloo, as Ray Train's CPU workers run)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.training.sync_bn import CrossWorkerBatchNorm2d, sync_batchnorm
from tests.conftest import free_port

IMAGES = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0)) * 3 + 1
# The loss weights every output element: a sum of squares after BatchNorm would be a constant of the input
# (its gradient is zero, compared as rounding noise).
LOSS_WEIGHTS = torch.randn(16, 5, 8, 8, generator=torch.Generator().manual_seed(1))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5, affine=False)
    ).to(memory_format=torch.channels_last)


def worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = nn.parallel.DistributedDataParallel(sync_batchnorm(small_net(), torch.device("cpu")))
    half = IMAGES[rank * 8 : rank * 8 + 8].contiguous(memory_format=torch.channels_last)
    output = model(half)
    (output * LOSS_WEIGHTS[rank * 8 : rank * 8 + 8]).sum().backward()
    out[rank] = {
        "output": output.detach().clone(),
        "grads": [p.grad.clone() for p in model.parameters()],
        "buffers": {k: v.clone() for k, v in model.module.state_dict().items()},
    }
    dist.barrier()  # see tests/yolov9/test_loss.py: no rank tears gloo down under the other
    del model
    dist.destroy_process_group()


def test_two_workers_with_half_the_batch_each_normalise_train_and_track_as_one_with_all_of_it():
    single = small_net()
    output = single(IMAGES.contiguous(memory_format=torch.channels_last))
    (output * LOSS_WEIGHTS).sum().backward()

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(free_port(), out), nprocs=2)
        ranks = [out[0], out[1]]
    torch.testing.assert_close(torch.cat([r["output"] for r in ranks]), output.detach(), rtol=1e-4, atol=1e-5)
    # DDP averages the two workers' gradients; one process with the whole batch has their sum. A bias
    # followed by BatchNorm has a zero gradient in exact arithmetic: rounding noise, so the tolerance is
    # relative to the largest gradient.
    largest = max(p.grad.abs().max() for p in single.parameters())
    for got, want in zip(ranks[0]["grads"], single.parameters(), strict=True):
        torch.testing.assert_close(got * 2, want.grad, rtol=1e-4, atol=1e-5 * largest)
    for name, want in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["buffers"][name], want, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(ranks[1]["buffers"][name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_the_conversion_keeps_the_parameters_buffers_and_checkpoint_keys():
    model = small_net()
    params, keys = list(model.parameters()), list(model.state_dict())
    converted = sync_batchnorm(model, torch.device("cpu"))
    assert [type(m) for m in converted if isinstance(m, nn.BatchNorm2d)] == [CrossWorkerBatchNorm2d] * 2
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
    assert list(converted.state_dict()) == keys


def test_alone_it_is_batchnorm():
    plain, converted = small_net(), sync_batchnorm(small_net(), torch.device("cpu"))
    images = IMAGES.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(converted(images), plain(images))
    torch.testing.assert_close(converted.state_dict(), plain.state_dict())


def test_an_elastic_run_with_sync_bn_is_refused_naming_the_key():
    # a worker playing two data ranks runs two forwards where the others run one: the gathers would not pair
    with pytest.raises(ConfigError, match=r"model.sync_bn .*fixed number of workers"):
        load_config(None, ["model.sync_bn=true", "ray.num_workers=[1, 2]"])
