"""The training loader's random stream, pinned: for a given seed, epoch and rank, the images it picks and
what augmentation makes of them are what they were when recorded here.

The demo's mAP depends on which images a step sees and how they are warped and coloured; a change to the
shard order, the shuffle buffer, the draws of mosaic/affine/colour/flip/mixup or their order changes
every later batch. That may be right, but it must be a decision: such a change fails here, and the
commit that makes it records the new values below beside the ``benchmarks/quality.py`` lines that show
the mAP before and after.

What is recorded per batch: the images' ids (exact), each image's mean per RGB channel (to 0.05 of a
grey level: pixel rounding may differ by one level between CPUs), the box count, the sum of all box
coordinates (pixels) and of the class ids.
"""

import pytest

from pipeline.data import read_manifest
from pipeline.data.augment import AugmentConfig
from pipeline.data.loader import make_train_loader
from pipeline.data.manifest import manifest_path

# (image ids, per-image channel means, boxes, sum of xyxy, sum of classes) per batch; seed 0, epoch 1,
# rank 0 of 1, batch 2, 64 px, shuffle buffer 8, the default augmentation (mixup 0.15), tiny_shards
RECORDED = {
    "mosaic": [
        ([44, 45], [[96.38, 93.04, 89.67], [119.23, 104.13, 113.32]], 22, 2927.39, 23),
        ([38, 37], [[173.72, 171.56, 160.22], [127.36, 126.95, 125.81]], 12, 1559.88, 16),
    ],
    "no mosaic": [
        ([44, 37], [[199.47, 197.17, 198.3], [131.25, 114.99, 122.47]], 9, 1210.4, 9),
        ([40, 42], [[83.06, 81.6, 72.69], [98.27, 102.87, 105.71]], 6, 706.49, 10),
    ],
}


@pytest.mark.parametrize("mosaic", ["mosaic", "no mosaic"])
def test_a_seed_and_epoch_give_the_recorded_batches(tiny_shards, mosaic):
    loader = make_train_loader(
        read_manifest(manifest_path(str(tiny_shards), "train")),
        batch_size=2,
        imgsz=64,
        rank=0,
        world_size=1,
        num_workers=0,
        epoch=1,
        seed=0,
        augment=AugmentConfig(),
        mosaic=mosaic == "mosaic",
        steps_per_epoch=2,
        shuffle_buffer=8,
    )
    for (images, targets), (ids, means, boxes, coordinates, classes) in zip(
        loader, RECORDED[mosaic], strict=True
    ):
        assert loader.last_image_ids() == ids
        assert images.float().mean((2, 3)).tolist() == [pytest.approx(m, abs=0.05) for m in means]
        assert len(targets) == boxes
        assert float(targets[:, 2:].sum()) == pytest.approx(coordinates, abs=0.05)
        assert int(targets[:, 1].sum()) == classes
