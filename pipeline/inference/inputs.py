"""Where a batch job's images come from, as a Ray Dataset of ``{path, bytes}`` rows read in a stream: a
folder or an object-store prefix (every file below it; Ray Data lists and reads them in its tasks), a list
file (``.txt``: one path or URL per line), or a shard manifest (``*-manifest.json``: every sample of its
shards, named ``<shard URL>#<key>``).
"""

from __future__ import annotations

import json
from typing import Any

import ray.data

from pipeline import storage
from pipeline.data import DataError, read_manifest
from pipeline.data.shard_stream import tar_samples

MANIFEST_SUFFIX = "-manifest.json"
LIST_SUFFIX = ".txt"


def read_inputs(source: str) -> ray.data.Dataset:
    """Rows ``{path: str, bytes: bytes}``, ``path`` as the user would name the file (a URL stays a URL).
    DataError when ``source`` does not exist or a list file names nothing."""
    location = storage.locate(source)
    if not storage.exists(location):
        raise DataError(f"--source {source} does not exist")
    if str(source).endswith(MANIFEST_SUFFIX):
        urls = read_manifest(location).shard_urls
        return ray.data.from_items([{"url": u} for u in urls]).flat_map(_shard_rows)
    if str(source).endswith(LIST_SUFFIX) and storage.is_file(location):
        lines = storage.read_bytes(location).decode().splitlines()
        named = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        # a relative path is relative to the list file's folder (as YOLO's lists are to their root)
        paths = [p if storage.is_url(p) else str(storage.locate(storage.parent(location), p)) for p in named]
        if not paths:
            raise DataError(f"the list file {source} names no images")
        return _binary_files(paths)
    return _binary_files([str(location)])


def _binary_files(paths: list[str]) -> ray.data.Dataset:
    """The files at ``paths`` (all local, or all on one object store) as ``{path, bytes}`` rows."""
    remote = [p for p in paths if storage.is_url(p)]
    if remote and len(remote) != len(paths):
        raise DataError("a list file mixes local paths and URLs: give one kind")
    if not remote:
        return ray.data.read_binary_files(paths, include_paths=True)
    fs, _ = storage.filesystem(remote[0])
    within = [storage.filesystem(p)[1] for p in remote]
    scheme = remote[0].split("://", 1)[0]
    return ray.data.read_binary_files(within, include_paths=True, filesystem=fs).map_batches(
        _with_scheme, fn_kwargs={"scheme": scheme}, batch_format="numpy"
    )


def _with_scheme(batch: dict[str, Any], scheme: str) -> dict[str, Any]:
    """Ray Data names remote files by their path within the file system (``bucket/key``): back to URLs."""
    batch["path"] = [f"{scheme}://{p}" for p in batch["path"]]
    return batch


def _shard_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The image of every sample of one shard; a broken shard gives what it held up to the break."""
    rows = []
    for sample in tar_samples(row["url"], lambda exn: True):
        image = sample.get("jpg", b"")
        meta = sample.get("json")
        key = json.loads(meta).get("image_id", sample["__key__"]) if meta else sample["__key__"]
        rows.append({"path": f"{row['url']}#{key}", "bytes": image})
    return rows
