"""Streaming train and val loaders over WebDataset shards: local paths, any URL ``pipeline.storage`` opens
(s3://, gs://, ...), and ``pipe:`` commands where the manifest was read with them allowed.

Which shards and samples each DataLoader worker of each rank reads, and how they are read and decoded:
``shard_stream.py``.

Train: each worker streams its partition through a shuffle buffer of DECODED samples (mosaic partners are
drawn from that buffer, so each image is decoded about once per pass) and restarts with a new shard order
when it runs dry, so every rank yields exactly ``steps_per_epoch`` batches. The buffer is drained at the end
of each pass before the next one is read: where a rank's share fills its batches exactly (shards that
split evenly over the ranks), an epoch trains each image exactly once, also when a resize cut it.
Val: letterbox only, each sample exactly once over all ranks and workers.

Broken data never stops a run (``shard_stream.ErrorCounts``): workers send their running counts along with
each batch; ``Loader.stats()`` sums the latest ones.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.augment import AugmentConfig, augment_train_sample
from pipeline.data.letterbox import letterbox
from pipeline.data.manifest import DataError, Manifest
from pipeline.data.shard_stream import (
    DecodedSample,
    ErrorCounts,
    Partition,
    iter_samples,
    partition,
    partition_size,
    shard_order,
    shuffled_passes,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_Counts = tuple[int, int]  # (corrupt samples, shard errors) a worker met so far


@dataclass(frozen=True)
class _ValSpec:
    urls: tuple[str, ...]
    shard_sizes: tuple[int, ...]
    batch_size: int
    imgsz: int
    rank: int
    world_size: int


@dataclass(frozen=True)
class _TrainSpec(_ValSpec):
    epoch: int
    seed: int
    augment: AugmentConfig
    mosaic: bool
    steps: int
    shuffle_buffer: int


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def train_passes(
    spec: _TrainSpec, worker: int, num_workers: int, errors: ErrorCounts
) -> Iterator[Iterator[DecodedSample]]:
    """Endless passes of one worker, each a stream of samples: pass 0 over its partition, then passes over
    new shard orders (resampling, for a rank whose share is smaller than its batches need). Raises
    DataError, once a whole pass has been read, if it yielded nothing decodable."""
    everything = False
    for pass_index in itertools.count():
        order = shard_order(len(spec.urls), spec.seed, spec.epoch, pass_index)
        part = (
            Partition(tuple(order))
            if everything
            else partition(order, spec.rank, spec.world_size, worker, num_workers)
        )
        produced = [False]

        def samples(part: Partition = part, produced: list[bool] = produced) -> Iterator[DecodedSample]:
            for sample in iter_samples(spec.urls, part, errors, spec.shard_sizes):
                produced[0] = True
                yield sample

        yield samples()
        if not produced[0]:
            if everything or part.stride == 1:
                raise DataError(
                    f"worker {worker} of rank {spec.rank} found no decodable sample in its shards "
                    f"({errors.corrupt_samples} corrupt samples, {errors.shard_errors} shard errors so far)"
                )
            # Fewer samples than ranks x workers left this worker's modulo share empty: it resamples from
            # all shards rather than stall the rank.
            everything = True


def _batch_quota(steps: int, worker: int, num_workers: int) -> int:
    return steps // num_workers + (1 if worker < steps % num_workers else 0)


def _new_batch(batch_size: int, imgsz: int) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised (B, imgsz, imgsz, 3) uint8 batch: the tensor and a numpy view to fill it through.

    Images stay HWC (NHWC in memory): the tensor handed on is its (B, 3, H, W) permuted view, which is the
    channels-last layout the model runs in, so no transposing copy is ever made. In a DataLoader worker the
    batch is allocated in shared memory, so sending it to the main process copies nothing.
    """
    shape = (batch_size, imgsz, imgsz, 3)
    if get_worker_info() is None:
        batch = torch.empty(shape, dtype=torch.uint8)
    else:
        # Allocated in shared memory from the start, as torch's default_collate does in workers:
        # share_memory_() on a finished batch would copy it (28 ms for 16 x 640 x 640 x 3).
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        batch = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)
    return batch, batch.numpy()


def _images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """Same-size HxWx3 RGB uint8 images -> (B, 3, H, W) uint8 tensor, channels-last in memory."""
    batch, view = _new_batch(len(images), images[0].shape[0])
    for slot, image in zip(view, images, strict=True):
        slot[...] = image
    return batch.permute(0, 3, 1, 2)


def _targets(boxes: list[np.ndarray], classes: list[np.ndarray]) -> torch.Tensor:
    """Per-image (N_i, 4) boxes and (N_i,) classes -> (M, 6) float32 rows [index in batch, class, xyxy]."""
    rows = [
        np.column_stack([np.full(len(b), i, dtype=np.float32), c.astype(np.float32), b])
        for i, (b, c) in enumerate(zip(boxes, classes, strict=True))
    ]
    return torch.from_numpy(np.concatenate(rows).astype(np.float32).reshape(-1, 6))


class _TrainStream(IterableDataset):
    """The epoch and the mosaic switch live in a shared-memory tensor, not in the spec: DataLoader workers
    that persist across epochs hold a copy of this object made when they started, and read the current
    epoch from that tensor each time an iteration starts."""

    def __init__(self, spec: _TrainSpec) -> None:
        self.spec = spec
        self._epoch_mosaic = torch.tensor([spec.epoch, int(spec.mosaic)], dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, mosaic: bool) -> None:
        self._epoch_mosaic[0], self._epoch_mosaic[1] = epoch, int(mosaic)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, _Counts, list[int]]]:
        epoch, mosaic = self._epoch_mosaic.tolist()
        spec = replace(self.spec, epoch=epoch, mosaic=bool(mosaic))
        worker, num_workers = _worker()
        errors = ErrorCounts()
        rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, worker, 1])
        first = partition(
            shard_order(len(spec.urls), spec.seed, spec.epoch, 0),
            spec.rank,
            spec.world_size,
            worker,
            num_workers,
        )
        # A buffer larger than one pass would only hold repeats of the same images.
        size = max(1, min(spec.shuffle_buffer, partition_size(first, spec.shard_sizes)))
        samples = shuffled_passes(train_passes(spec, worker, num_workers, errors), size, rng)
        for _ in range(_batch_quota(spec.steps, worker, num_workers)):
            batch, slots = _new_batch(spec.batch_size, spec.imgsz)
            boxes, classes, ids = [], [], []
            for slot in slots:
                main, partners = next(samples)
                ids.append(main.image_id)
                out = augment_train_sample(
                    main, partners, spec.imgsz, spec.augment, spec.mosaic, rng, dst=slot
                )
                boxes.append(out.boxes)
                classes.append(out.classes)
            yield batch.permute(0, 3, 1, 2), _targets(boxes, classes), worker, errors.as_tuple(), ids


class _ValStream(IterableDataset):
    def __init__(self, spec: _ValSpec) -> None:
        self.spec = spec

    def __iter__(
        self,
    ) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]], int, tuple[int, int], list[int]]]:  # noqa: E501
        spec = self.spec
        worker, num_workers = _worker()
        errors = ErrorCounts()
        order = list(range(len(spec.urls)))
        part = partition(order, spec.rank, spec.world_size, worker, num_workers)
        images: list[np.ndarray] = []
        metas: list[dict[str, Any]] = []
        for sample in iter_samples(spec.urls, part, errors, spec.shard_sizes):
            image, ratio, pad = letterbox(sample.image, spec.imgsz)
            images.append(image)
            h, w = sample.image.shape[:2]
            metas.append({"image_id": sample.image_id, "orig_shape": (h, w), "ratio": ratio, "pad": pad})
            if len(images) == spec.batch_size:
                yield _images_to_tensor(images), metas, worker, errors.as_tuple(), _ids(metas)
                images, metas = [], []
        if images:
            yield _images_to_tensor(images), metas, worker, errors.as_tuple(), _ids(metas)


def _ids(metas: list[dict[str, Any]]) -> list[int]:
    return [m["image_id"] for m in metas]


class Loader:
    """Iterable over batches of a DataLoader whose workers send (a, b, worker_id, error counts, image ids).

    Yields (a, b); ``stats()`` = {"corrupt_samples", "shard_errors"} summed over the workers' latest counts;
    ``last_image_ids()`` the image ids of the batch yielded last (of a train batch: each image's main
    sample, mosaic partners aside). ``len()`` is the number of batches when known in advance (train:
    steps_per_epoch). A train loader is iterated once per epoch, after ``set_epoch``; its workers start on
    the first iteration and stay up until the loader is dropped.
    """

    def __init__(self, dataloader: DataLoader, length: int | None) -> None:
        self._dataloader = dataloader
        self._length = length
        self._counts: dict[int, tuple[int, int]] = {}
        self._ids: list[int] = []

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self._counts = {}
        if self._dataloader.num_workers > 0:
            # Workers are forked when iteration starts. OpenCV's thread pool does not survive a fork (a worker
            # that touches it can hang for good), and one thread per worker is what we want anyway: shut the
            # pool down here so that the workers inherit none.
            cv2.setNumThreads(1)
        for a, b, worker, counts, ids in self._dataloader:
            self._counts[int(worker)] = tuple(int(c) for c in counts)
            self._ids = [int(i) for i in ids]
            yield a, b

    def set_epoch(self, epoch: int, mosaic: bool) -> None:
        """Epoch (shard order, augmentation draws) and mosaic switch of the next iteration (train only)."""
        dataset = self._dataloader.dataset
        if not isinstance(dataset, _TrainStream):
            raise TypeError("only a train loader has epochs")
        dataset.set_epoch(epoch, mosaic)

    def last_image_ids(self) -> list[int]:
        return list(self._ids)

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("this loader's length is not known before iterating")
        return self._length

    def stats(self) -> dict[str, int]:
        totals = [sum(c[i] for c in self._counts.values()) for i in range(2)]
        return {"corrupt_samples": totals[0], "shard_errors": totals[1]}


class RanksLoader:
    """The train loaders of several data ranks that one worker plays (an elastic run on fewer workers than
    its data ranks): each step yields a list of one (images, targets) micro-batch per rank, in rank order.
    ``set_epoch``, ``last_image_ids`` (all ranks' images), ``stats`` (summed) and ``len`` as ``Loader``."""

    def __init__(self, loaders: list[Loader]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[list[tuple[Any, Any]]]:
        for batches in zip(*self.loaders, strict=True):
            yield list(batches)

    def set_epoch(self, epoch: int, mosaic: bool) -> None:
        for loader in self.loaders:
            loader.set_epoch(epoch, mosaic)

    def last_image_ids(self) -> list[int]:
        return [i for loader in self.loaders for i in loader.last_image_ids()]

    def __len__(self) -> int:
        return len(self.loaders[0])

    def stats(self) -> dict[str, int]:
        counts = [loader.stats() for loader in self.loaders]
        return {k: sum(c[k] for c in counts) for k in counts[0]}


def _dataloader(dataset: IterableDataset, num_workers: int, persistent: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=_identity,
    )


def _identity(batch: T) -> T:
    return batch


def _check_common(manifest: Manifest, batch_size: int, imgsz: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if imgsz < 32 or imgsz % 32:
        raise ValueError(f"imgsz must be a positive multiple of 32, got {imgsz}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if manifest.num_samples == 0:
        raise DataError(f"{manifest.path}: the split lists no samples")


def make_train_loader(
    manifest: Manifest,
    *,
    batch_size: int,
    imgsz: int,
    rank: int,
    world_size: int,
    num_workers: int,
    epoch: int,
    seed: int,
    augment: AugmentConfig,
    mosaic: bool,
    steps_per_epoch: int,
    shuffle_buffer: int = 256,
) -> Loader:
    """Augmented training batches of one rank, exactly ``steps_per_epoch`` of (images uint8 (B, 3, imgsz,
    imgsz) RGB, targets float32 (M, 6) [index in batch, class, x1, y1, x2, y2] pixels of the imgsz x imgsz
    image) per iteration. Shard order and augmentation are fixed by (seed, epoch, rank). The first iteration
    is ``epoch``'s; ``Loader.set_epoch`` moves it on, and the worker processes persist across epochs."""
    _check_common(manifest, batch_size, imgsz, num_workers)
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    spec = _TrainSpec(
        urls=tuple(manifest.shard_urls),
        shard_sizes=tuple(s.samples for s in manifest.shards),
        batch_size=batch_size,
        imgsz=imgsz,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        seed=seed,
        augment=augment,
        mosaic=mosaic,
        steps=steps_per_epoch,
        shuffle_buffer=shuffle_buffer,
    )
    partition(list(range(len(spec.urls))), rank, world_size, 0, max(num_workers, 1))  # fail early on bad ids
    # A worker with no batch to make would still start and read shards; don't spawn it.
    workers = min(num_workers, steps_per_epoch)
    return Loader(_dataloader(_TrainStream(spec), workers, persistent=True), steps_per_epoch)


def make_val_loader(
    manifest: Manifest, batch_size: int, imgsz: int, rank: int, world_size: int, num_workers: int
) -> Loader:
    """Letterboxed batches of (images uint8 (B, 3, imgsz, imgsz) RGB, metas) covering this rank's share of
    the split; over all ranks every sample comes exactly once. metas[i] = {"image_id", "orig_shape": (h, w),
    "ratio", "pad": (left, top)} maps boxes back with ``unletterbox_boxes``."""
    _check_common(manifest, batch_size, imgsz, num_workers)
    spec = _ValSpec(
        urls=tuple(manifest.shard_urls),
        shard_sizes=tuple(s.samples for s in manifest.shards),
        batch_size=batch_size,
        imgsz=imgsz,
        rank=rank,
        world_size=world_size,
    )
    partition(list(range(len(spec.urls))), rank, world_size, 0, max(num_workers, 1))  # fail early on bad ids
    return Loader(_dataloader(_ValStream(spec), num_workers), None)
