"""Streaming loaders over real shard files: work split, equal batch counts, bad data skipped and counted."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.data.augment import AugmentConfig
from pipeline.data.loader import make_train_loader, make_val_loader
from pipeline.data.manifest import DataError, read_manifest
from pipeline.data.shard_stream import ErrorCounts, buffered_shuffle, iter_samples, partition, shard_order

NO_AUGMENT = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, translate=0, scale=0, fliplr=0, mosaic=0, mixup=0)
GREY_STEP = 12  # image i is a plain grey image of level 12 * i, so its id can be read back from pixels


def grey_jpeg(level: int, h: int = 64, w: int = 64) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), level, dtype=np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    return buf.tobytes()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_split(
    root: Path,
    shard_sizes: list[int],
    split: str = "train",
    bad_jpeg: tuple[int, ...] = (),
    h: int = 64,
    w: int = 64,
) -> Path:
    """Shards of plain grey h x w images (image_id = global index, one box each) and their manifest.

    Samples whose global index is in ``bad_jpeg`` get bytes that are not a JPEG."""
    shards, index = [], 0
    for s, size in enumerate(shard_sizes):
        path = root / f"{split}-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                key = f"{index:09d}"
                meta = {
                    "image_id": index,
                    "file_name": f"{key}.jpg",
                    "width": w,
                    "height": h,
                    "boxes": [[4.0, 8.0, 20.0, 30.0]],
                    "classes": [index % 3],
                }
                jpg = (
                    b"\xff\xd8 this is not a jpeg"
                    if index in bad_jpeg
                    else grey_jpeg(GREY_STEP * index, h, w)
                )
                add_member(tar, f"{key}.jpg", jpg)
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
                index += 1
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        shards.append({"name": path.name, "samples": size, "boxes": size, "sha256": sha})
    manifest = {
        "format": "yolov9-ray-shards/1",
        "split": split,
        "class_names": ["a", "b", "c"],
        "shards": shards,
        "source": {},
        "settings": {},
    }
    path = root / f"{split}-manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def ids_in(images: torch.Tensor) -> list[int]:
    """Image ids read back from the grey level at each image's centre."""
    s = images.shape[-1]
    return [round(int(v) / GREY_STEP) for v in images[:, 0, s // 2, s // 2]]


@pytest.mark.parametrize("num_shards", [1, 3, 4, 6])
def test_ranks_and_workers_together_read_every_sample_exactly_once(tmp_path, num_shards):
    sizes = [5, 3, 4, 2, 6, 1][:num_shards]
    manifest = read_manifest(write_split(tmp_path, sizes))
    order = shard_order(num_shards, seed=3, epoch=1, pass_index=0)
    seen = []
    for rank in range(2):
        for worker in range(2):
            part = partition(order, rank, 2, worker, 2)
            seen += [s.image_id for s in iter_samples(manifest.shard_urls, part, ErrorCounts())]
    assert sorted(seen) == list(range(sum(sizes)))


def test_shard_order_is_a_permutation_that_changes_with_the_epoch():
    orders = [shard_order(20, seed=0, epoch=e, pass_index=0) for e in range(2)]
    assert sorted(orders[0]) == list(range(20))
    assert orders[0] != orders[1]
    assert orders[0] == shard_order(20, seed=0, epoch=0, pass_index=0)


def test_buffered_shuffle_yields_each_item_once_and_shuffles():
    out = [item for item, _ in buffered_shuffle(range(50), 8, np.random.default_rng(0))]
    assert sorted(out) == list(range(50))
    assert out != list(range(50))


def test_val_loader_covers_the_split_exactly_once_over_two_ranks_with_two_workers(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [4, 3], split="val"))
    seen = []
    for rank in range(2):
        for images, metas in make_val_loader(manifest, 2, 64, rank, 2, num_workers=2):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
            assert [m["image_id"] for m in metas] == ids_in(images)
            seen += [m["image_id"] for m in metas]
    assert sorted(seen) == list(range(7))


def test_val_metas_describe_the_letterbox(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [1], split="val", h=32, w=64))
    ((images, metas),) = list(make_val_loader(manifest, 4, 128, 0, 1, num_workers=0))
    assert metas == [{"image_id": 0, "orig_shape": (32, 64), "ratio": 2.0, "pad": (0, 32)}]
    assert images[0, :, 31, 64].tolist() == [114] * 3  # padding above the 64-pixel-high resized image
    assert images[0, :, 32, 64].tolist() == [0] * 3  # image 0 is black


def test_train_first_pass_over_two_ranks_with_two_workers_sees_every_sample_once(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [2, 2, 2, 2]))
    seen = []
    for rank in range(2):
        loader = make_train_loader(
            manifest,
            batch_size=1,
            imgsz=64,
            rank=rank,
            world_size=2,
            num_workers=2,
            epoch=0,
            seed=0,
            augment=NO_AUGMENT,
            mosaic=False,
            steps_per_epoch=4,
            shuffle_buffer=1,
        )
        seen += [i for images, _ in loader for i in ids_in(images)]
    assert sorted(seen) == list(range(8))


def test_every_rank_yields_steps_per_epoch_batches_with_unequal_shards(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [9, 2, 1]))
    for rank in range(2):
        loader = make_train_loader(
            manifest,
            batch_size=3,
            imgsz=64,
            rank=rank,
            world_size=2,
            num_workers=0,
            epoch=0,
            seed=0,
            augment=AugmentConfig(),
            mosaic=True,
            steps_per_epoch=5,
        )
        batches = list(loader)
        assert len(batches) == len(loader) == 5
        assert all(images.shape == (3, 3, 64, 64) for images, _ in batches)


def test_train_targets_index_their_image_and_stay_inside_it(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [6]))
    loader = make_train_loader(
        manifest,
        batch_size=4,
        imgsz=64,
        rank=0,
        world_size=1,
        num_workers=0,
        epoch=0,
        seed=0,
        augment=AugmentConfig(mosaic=1.0, mixup=1.0),
        mosaic=True,
        steps_per_epoch=2,
    )
    for images, targets in loader:
        assert images.dtype == torch.uint8 and images.is_contiguous(memory_format=torch.channels_last)
        assert targets.dtype == torch.float32 and targets.shape[1] == 6 and len(targets) > 0
        assert set(targets[:, 0].tolist()) <= {0.0, 1.0, 2.0, 3.0}
        assert set(targets[:, 1].tolist()) <= {0.0, 1.0, 2.0}
        assert targets[:, 2:].min() >= 0 and targets[:, 2:].max() <= 64
        assert (targets[:, 4] > targets[:, 2]).all() and (targets[:, 5] > targets[:, 3]).all()


def test_unaugmented_train_batch_is_the_letterboxed_image_in_rgb(tmp_path):
    path = tmp_path / "train-000000.tar"
    write_split(tmp_path, [1])
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :, 2] = 200  # red: OpenCV encodes BGR arrays
    ok, buf = cv2.imencode(".png", image)  # lossless so the colour is exact; imdecode reads it all the same
    meta = {
        "image_id": 0,
        "file_name": "x",
        "width": 64,
        "height": 64,
        "boxes": [[1, 2, 30, 40]],
        "classes": [2],
    }
    with tarfile.open(path, "w") as tar:
        add_member(tar, "000000000.jpg", buf.tobytes())
        add_member(tar, "000000000.json", json.dumps(meta).encode())
    manifest_file = tmp_path / "train-manifest.json"
    manifest_json = json.loads(manifest_file.read_text())
    manifest_json["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_file.write_text(json.dumps(manifest_json))
    loader = make_train_loader(
        read_manifest(manifest_file),
        batch_size=1,
        imgsz=64,
        rank=0,
        world_size=1,
        num_workers=0,
        epoch=0,
        seed=0,
        augment=NO_AUGMENT,
        mosaic=True,
        steps_per_epoch=1,
    )
    ((images, targets),) = list(loader)
    assert images[0, :, 10, 10].tolist() == [200, 0, 0]
    assert targets.tolist() == [[0, 2, 1, 2, 30, 40]]


def test_same_seed_gives_the_same_batches(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [5, 5]))

    def run():
        return list(
            make_train_loader(
                manifest,
                batch_size=2,
                imgsz=64,
                rank=0,
                world_size=1,
                num_workers=0,
                epoch=2,
                seed=7,
                augment=AugmentConfig(),
                mosaic=True,
                steps_per_epoch=3,
            )
        )

    for (ia, ta), (ib, tb) in zip(run(), run(), strict=True):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [4], split="val", bad_jpeg=(2,)))
    loader = make_val_loader(manifest, 8, 64, 0, 1, num_workers=0)
    seen = [m["image_id"] for _, metas in loader for m in metas]
    assert seen == [0, 1, 3]
    assert loader.stats() == {"corrupt_samples": 1, "shard_errors": 0}


def test_bad_annotation_json_is_skipped_and_counted(tmp_path):
    path = write_split(tmp_path, [1], split="val")
    with tarfile.open(tmp_path / "val-000001.tar", "w") as tar:
        add_member(tar, "000000001.jpg", grey_jpeg(10))
        add_member(tar, "000000001.json", b"{not json")
    manifest_json = json.loads(path.read_text())
    manifest_json["shards"].append({"name": "val-000001.tar", "samples": 1, "boxes": 0, "sha256": "x"})
    path.write_text(json.dumps(manifest_json))
    loader = make_val_loader(read_manifest(path), 8, 64, 0, 1, num_workers=0)
    assert [m["image_id"] for _, metas in loader for m in metas] == [0]
    assert loader.stats() == {"corrupt_samples": 1, "shard_errors": 0}


@pytest.mark.parametrize("cut", [10240, 10240 + 700], ids=["at-a-member-boundary", "inside-a-member"])
def test_truncated_shard_is_counted_and_the_samples_before_the_cut_are_kept(tmp_path, cut):
    manifest = read_manifest(write_split(tmp_path, [2, 6], split="val"))
    shard = Path(manifest.shard_urls[1])
    shard.write_bytes(shard.read_bytes()[:cut])  # 2.5 KiB a sample: 1+2 blocks JPEG, 1+1 JSON
    loader = make_val_loader(manifest, 8, 64, 0, 1, num_workers=0)
    assert [m["image_id"] for _, metas in loader for m in metas] == [0, 1, 2, 3, 4, 5]
    assert loader.stats() == {"corrupt_samples": 0, "shard_errors": 1}


def test_train_loader_survives_a_truncated_shard(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [3, 3]))
    shard = Path(manifest.shard_urls[0])
    shard.write_bytes(shard.read_bytes()[:1000])
    loader = make_train_loader(
        manifest,
        batch_size=2,
        imgsz=64,
        rank=0,
        world_size=1,
        num_workers=0,
        epoch=0,
        seed=0,
        augment=AugmentConfig(),
        mosaic=True,
        steps_per_epoch=4,
    )
    assert len(list(loader)) == 4
    assert loader.stats()["shard_errors"] >= 1


def test_counts_from_several_workers_add_up(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [3, 3], split="val", bad_jpeg=(0, 4)))
    loader = make_val_loader(manifest, 2, 64, 0, 1, num_workers=2)
    assert sorted(m["image_id"] for _, metas in loader for m in metas) == [1, 2, 3, 5]
    assert loader.stats() == {"corrupt_samples": 2, "shard_errors": 0}


def test_split_where_nothing_decodes_raises_instead_of_spinning(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [2], bad_jpeg=(0, 1)))
    loader = make_train_loader(
        manifest,
        batch_size=1,
        imgsz=64,
        rank=0,
        world_size=1,
        num_workers=0,
        epoch=0,
        seed=0,
        augment=AugmentConfig(),
        mosaic=True,
        steps_per_epoch=1,
    )
    with pytest.raises(DataError, match="no decodable sample"):
        list(loader)


def test_rank_outside_the_world_is_rejected(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [2]))
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        make_val_loader(manifest, 1, 64, rank=2, world_size=2, num_workers=0)


def test_loaders_read_the_shard_writers_output(tiny_shards):
    val = read_manifest(tiny_shards / "val-manifest.json")
    loader = make_val_loader(val, 5, 128, 0, 1, num_workers=0)
    assert sum(len(metas) for _, metas in loader) == val.num_samples
    train = make_train_loader(
        read_manifest(tiny_shards / "train-manifest.json"), batch_size=4, imgsz=128, rank=0, world_size=1,
        num_workers=0, epoch=0, seed=0, augment=AugmentConfig(), mosaic=True, steps_per_epoch=2,
    )  # fmt: skip
    assert [tuple(images.shape) for images, _ in train] == [(4, 3, 128, 128)] * 2
    assert loader.stats() == train.stats() == {"corrupt_samples": 0, "shard_errors": 0}


def test_batches_made_in_a_worker_process_equal_the_in_process_ones(tmp_path):
    # A worker builds its batches in shared memory, the main process in ordinary memory; one worker
    # reads the same share with the same random stream as the main process would.
    manifest = read_manifest(write_split(tmp_path, [6]))

    def batches(num_workers: int) -> list:
        loader = make_train_loader(
            manifest, batch_size=3, imgsz=64, rank=0, world_size=1, num_workers=num_workers, epoch=0,
            seed=0, augment=AugmentConfig(), mosaic=True, steps_per_epoch=2,
        )  # fmt: skip
        return list(loader)

    in_process, from_worker = batches(0), batches(1)
    for (images_a, targets_a), (images_b, targets_b) in zip(in_process, from_worker, strict=True):
        assert images_b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images_a, images_b) and torch.equal(targets_a, targets_b)


def train_loader(manifest, num_workers: int, epoch: int, mosaic: bool = True):
    return make_train_loader(
        manifest, batch_size=2, imgsz=64, rank=0, world_size=1, num_workers=num_workers, epoch=epoch,
        seed=3, augment=AugmentConfig(), mosaic=mosaic, steps_per_epoch=4,
    )  # fmt: skip


def test_a_loader_moved_to_the_next_epoch_gives_that_epochs_batches(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [5, 5]))
    kept = train_loader(manifest, num_workers=2, epoch=0)
    list(kept)
    kept.set_epoch(1, mosaic=False)
    for (ia, ta), (ib, tb) in zip(kept, train_loader(manifest, 2, epoch=1, mosaic=False), strict=True):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)


def test_train_workers_are_started_once_for_all_epochs(tmp_path):
    manifest = read_manifest(write_split(tmp_path, [5, 5]))
    loader = train_loader(manifest, num_workers=2, epoch=0)
    before = {p.pid for p in multiprocessing.active_children()}
    list(loader)
    workers = {p.pid for p in multiprocessing.active_children()} - before
    loader.set_epoch(1, mosaic=True)
    list(loader)
    assert len(workers) == 2
    assert {p.pid for p in multiprocessing.active_children()} - before == workers


def test_a_val_loader_has_no_epochs(tmp_path):
    loader = make_val_loader(
        read_manifest(write_split(tmp_path, [4], split="val")), 2, 64, 0, 1, num_workers=0
    )
    with pytest.raises(TypeError, match="only a train loader"):
        loader.set_epoch(1, mosaic=False)
