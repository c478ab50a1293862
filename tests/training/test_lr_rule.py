"""The learning-rate rule across cluster sizes: an image moves the weights by the same amount whether its
optimizer step holds fewer images than ``train.nominal_batch`` (accumulation), exactly as many, or more
(many workers: the step sums more gradients, which is the linear scaling of lr0 and weight decay).

One optimizer step is taken as the engine takes it (the dual loss per micro-batch, gradients accumulated
over ``accumulation_steps`` micro-batches, SGD built with the weight decay scaled by ``linear_scale``) on
head maps shared by copies of one image, so that every image's gradient is the same and the weights'
change divided by the images of the step is the per-image update. A step of ``workers`` x ``batch`` images
is computed in this one process: the loss makes that equal to what DDP over the workers computes
(``tests/yolov9/test_loss.py::test_two_workers_with_half_the_batch_give_the_one_worker_gradient``).
"""

import torch
from torch import nn

from pipeline.training.optimizer import accumulation_steps, build_sgd, linear_scale
from tests.yolov9.test_loss import INFO, random_maps
from yolov9.loss import DualDetectionLoss

NOMINAL = 4
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.937, 5e-4
BOXES = [[4.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0], [0.0, 0.0, 16.0, 16.0], [30.0, 2.0, 62.0, 28.0]]


class SharedMaps(nn.Module):
    """Dual-branch head maps as weights, the same for every image of a batch (copies of one image)."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ParameterList([nn.Parameter(m.detach().clone()) for b in random_maps(1) for m in b])

    def forward(self, images: int) -> list:
        maps = [m.expand(images, -1, -1, -1) for m in self.maps]
        return [maps[:3], maps[3:]]


def per_image_update(workers: int, batch: int) -> torch.Tensor:
    """The change of the weights in one optimizer step, divided by the images that step summed."""
    global_batch = workers * batch
    accumulate = accumulation_steps(NOMINAL, global_batch)
    model = SharedMaps()
    optimizer = build_sgd(model, LR, MOMENTUM, WEIGHT_DECAY * linear_scale(NOMINAL, global_batch))
    targets = torch.tensor([[i, c % 3, *box] for i in range(global_batch) for c, box in enumerate(BOXES)])
    loss_fn = DualDetectionLoss(INFO)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    for _ in range(accumulate):
        loss_fn(model(global_batch), targets)[0].backward()
    optimizer.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return (after - before) / (global_batch * accumulate)


def test_each_image_moves_the_weights_alike_for_1_2_and_4_workers():
    reference = per_image_update(workers=1, batch=4)  # the nominal batch in one step
    assert reference.abs().max() > 0
    # 2 micro-batches of 2; steps of 8 and 16 images. (Not a micro-batch of 1 image: the loss divides by the
    # micro-batch's summed target scores floored at 1, and one image of this set sums less than that.)
    for workers, batch in [(1, 2), (2, 4), (4, 4)]:
        got = per_image_update(workers, batch)
        assert torch.allclose(got, reference, rtol=1e-3, atol=1e-5 * reference.abs().max()), (workers, batch)


def test_past_the_nominal_batch_lr_and_weight_decay_scale_linearly():
    assert linear_scale(64, 64) == 1.0
    assert linear_scale(64, 16) == 1.0  # 4 micro-batches of 16
    assert linear_scale(64, 128) == 2.0  # the shipped COCO config: 8 workers x 16
    assert linear_scale(64, 512) == 8.0
