"""Reading WebDataset shards as one worker's stream of decoded samples.

Work split: a ``Partition`` says which shards one DataLoader worker of one rank reads and which of their
samples it keeps (every ``stride``-th from ``offset``, counting raw samples in read order). Whole shards go
to ranks and workers while there are enough of them; otherwise samples are split by index modulo.

Broken data never stops a run: an undecodable sample (bad JPEG, bad JSON, missing member) counts as
``corrupt_samples``, a shard that fails to open or read to the end (e.g. truncated) as ``shard_errors``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cv2
import numpy as np
import webdataset as wds

from pipeline import storage
from pipeline.data.augment import Labelled
from pipeline.data.manifest import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class DecodedSample(Labelled):
    """A decoded shard sample: image HxWx3 uint8 RGB, boxes (N, 4) float32 xyxy pixels, classes (N,) int64."""

    image_id: int


@dataclass(frozen=True)
class Partition:
    """Shards (indices into the URL list, in read order) one worker reads; it keeps raw sample k of that
    stream (0-based, corrupt samples included) when k % stride == offset."""

    shards: tuple[int, ...]
    stride: int = 1
    offset: int = 0


@dataclass
class ErrorCounts:
    """Problems one worker met so far; ``add`` logs a warning the first time each kind appears."""

    corrupt_samples: int = 0
    shard_errors: int = 0
    warned: set[str] = field(default_factory=set)

    def add(self, kind: str, detail: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if kind not in self.warned:
            self.warned.add(kind)
            log.warning("skipping bad data (%s, further ones are only counted): %s", kind, detail)

    def as_tuple(self) -> tuple[int, int]:
        return self.corrupt_samples, self.shard_errors


def partition(order: Sequence[int], rank: int, world_size: int, worker: int, num_workers: int) -> Partition:
    """The share of (``rank``, ``worker``) of the shards in ``order``.

    Ranks get shards ``order[rank::world_size]`` when there are at least ``world_size`` shards, else every
    rank reads all shards and keeps samples k % world_size == rank. Within a rank the same rule splits the
    rank's share among ``num_workers`` workers.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is outside num_workers {num_workers}")
    if not order:
        raise DataError("there are no shards to partition")
    if len(order) >= world_size:
        shards, stride, offset = tuple(order[rank::world_size]), 1, 0
    else:
        shards, stride, offset = tuple(order), world_size, rank
    if stride == 1 and len(shards) >= num_workers:
        return Partition(shards[worker::num_workers])
    # DecodedSample k of the rank's stream is sample stride*k + offset of the whole stream.
    return Partition(shards, stride * num_workers, offset + stride * worker)


def partition_size(part: Partition, shard_sizes: Sequence[int]) -> int:
    """Samples ``part`` yields when no sample is corrupt, from the manifest's samples per shard."""
    total = sum(shard_sizes[i] for i in part.shards)
    return len(range(part.offset, total, part.stride))


def decode_sample(raw: dict[str, Any]) -> DecodedSample:
    """Decode one webdataset sample dict (``jpg`` and ``json`` bytes). Raises DataError naming the sample."""
    where = f"sample {raw.get('__key__')} of {raw.get('__url__')}"
    if "jpg" not in raw or "json" not in raw:
        raise DataError(f"{where}: needs .jpg and .json members, has {sorted(k for k in raw if k[0] != '_')}")
    try:
        meta = json.loads(raw["json"])
        image_id = int(meta["image_id"])
        boxes = np.asarray(meta["boxes"], dtype=np.float32).reshape(-1, 4)
        classes = np.asarray(meta["classes"], dtype=np.int64).reshape(-1)
        size = (int(meta["height"]), int(meta["width"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: bad annotation JSON ({type(e).__name__}: {e})") from e
    if len(boxes) != len(classes):
        raise DataError(f"{where}: {len(boxes)} boxes but {len(classes)} classes")
    if not np.isfinite(boxes).all() or (classes < 0).any():
        raise DataError(f"{where}: non-finite box coordinates or negative class ids")
    image = cv2.imdecode(np.frombuffer(raw["jpg"], dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise DataError(f"{where}: the JPEG does not decode")
    if image.shape[:2] != size:
        raise DataError(f"{where}: image is {image.shape[:2]} (h, w) but the JSON says {size}")
    return DecodedSample(image=image, boxes=boxes, classes=classes, image_id=image_id)


def iter_samples(
    urls: Sequence[str], part: Partition, errors: ErrorCounts, shard_sizes: Sequence[int] | None = None
) -> Iterator[DecodedSample]:
    """One pass over ``part`` of the shards at ``urls``: its decodable samples in read order.

    Bad samples and shards are skipped and counted in ``errors``: one shard error per shard that fails to
    open or read, or (given the manifest's ``shard_sizes``) holds another number of samples than listed,
    which is how a tar cut at a member boundary shows up.
    """
    k = 0
    for shard in part.shards:
        failures: list[str] = []

        def keep_going(exn: Exception, failures: list[str] = failures) -> bool:
            failures.append(f"{type(exn).__name__}: {exn}")
            return True

        raw_count = 0
        for raw in tar_samples(urls[shard], keep_going):
            raw_count += 1
            mine = k % part.stride == part.offset
            k += 1
            if not mine:
                continue
            try:
                yield decode_sample(raw)
            except DataError as e:
                errors.add("corrupt_samples", str(e))
        if not failures and shard_sizes is not None and raw_count != shard_sizes[shard]:
            failures.append(
                f"holds {raw_count} samples but the manifest lists {shard_sizes[shard]} (truncated?)"
            )
        if failures:
            errors.add("shard_errors", f"{urls[shard]}: {failures[0]}")


def tar_samples(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """The samples (dicts of member bytes) of the tar at ``url``, streamed. Local paths and object-store
    URLs are opened by ``pipeline.storage`` (webdataset's own opener knows no s3://); ``pipe:`` commands,
    refused unless allowed when the manifest was read, by webdataset."""
    if url.startswith("pipe:"):
        yield from wds.tarfile_samples([{"url": url}], handler=handler)
        return
    try:
        stream = storage.open_input(url)
    except OSError as e:
        handler(e)
        return
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
    yield from wds.tariterators.group_by_keys(files, handler=handler)


def buffered_shuffle(stream: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[tuple[T, list[T]]]:
    """Each item of ``stream`` exactly once, in an order shuffled within a ``size``-item buffer, together
    with the buffer's other contents (valid until the next item is requested; used for mosaic partners).
    While the buffer drains at the end, the items drained before stand in for the ones that no longer come,
    so the last items of a stream have as many partners as the others."""
    if size < 1:
        raise ValueError(f"shuffle buffer size must be >= 1, got {size}")
    buffer: list[T] = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(len(buffer)))
        out, buffer[j] = buffer[j], item
        yield out, buffer
    rng.shuffle(buffer)
    drained: list[T] = []
    while buffer:
        out = buffer.pop()
        yield out, buffer + drained
        drained.append(out)


def shuffled_passes(
    passes: Iterable[Iterable[T]], size: int, rng: np.random.Generator
) -> Iterator[tuple[T, list[T]]]:
    """``buffered_shuffle`` of each pass in turn: a pass's items all come before any of the next pass's, so
    an epoch that takes one pass's worth of items takes each of them exactly once."""
    for one_pass in passes:
        yield from buffered_shuffle(one_pass, size, rng)


def shard_order(num_shards: int, seed: int, epoch: int, pass_index: int) -> list[int]:
    """Shard read order of one pass: a permutation fixed by (seed, epoch, pass), the same on every rank."""
    return [int(i) for i in np.random.default_rng([seed, epoch, pass_index]).permutation(num_shards)]
