"""The manifest that describes one split of WebDataset shards, and its reader.

Layout of a shard directory ``DIR`` (a local folder or an object-store prefix such as ``s3://b/coco``)::

    DIR/<split>-000000.tar ...     samples <key>.jpg + <key>.json, key = 9-digit index within the split
    DIR/<split>-manifest.json      this module's Manifest
    DIR/val-coco.json              COCO ground truth of the stored val images (split "val" only)

Shard names in a manifest resolve relative to the manifest's own location, so a shard directory can be
copied anywhere (another folder, a bucket) as it is. A ``pipe:`` name runs a shell command to read the
shard: a manifest is data, so such names are refused unless the reader allows them (``data.allow_pipe``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.errors import PipelineError
from pipeline.storage import Location

FORMAT = "yolov9-ray-shards/1"
REQUIRED_KEYS = ("format", "split", "class_names", "shards", "source", "settings")
SHARD_KEYS = ("name", "samples", "boxes", "sha256")


class DataError(PipelineError, ValueError):
    """Input data that cannot be turned into (or read as) this project's shards; the message names it."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar file: ``name`` relative to the manifest's directory (or a URL), its counts and sha256 hex."""

    name: str
    samples: int
    boxes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A split's shards as listed by ``<split>-manifest.json`` at ``path`` (a local Path or a URL)."""

    path: Location
    split: str
    class_names: list[str]
    shards: list[ShardInfo]
    source: dict[str, Any]
    settings: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_boxes(self) -> int:
        return sum(s.boxes for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shard_urls(self) -> list[str]:
        """Shard locations: names relative to the manifest's folder joined to it (absolute local paths, or
        URLs beside a remote manifest); names that carry a scheme (s3://, pipe:...) are passed through."""
        folder = storage.parent(self.path)
        return [s.name if is_location(s.name) else str(storage.locate(folder, s.name)) for s in self.shards]

    @property
    def manifest_hash(self) -> str:
        """sha256 hex of the content identity (split, class names, shards with their hashes).

        Independent of where the shards lie and of how they were produced.
        """
        identity = {
            "split": self.split,
            "class_names": self.class_names,
            "shards": [asdict(s) for s in self.shards],
        }
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def is_location(name: str) -> bool:
    """True for shard names that are locations of their own (``s3://b/x.tar``, ``pipe:cmd``), not names
    relative to the manifest."""
    return "://" in name or name.startswith("pipe:")


def manifest_path(root: Location, split: str) -> Location:
    return storage.locate(root, f"{split}-manifest.json")


def coco_json_path(root: Location, split: str) -> Location:
    return storage.locate(root, f"{split}-coco.json")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_json_atomic(path: Location, payload: dict[str, Any]) -> None:
    """Write JSON to a local path or a URL so that a reader never sees half a file."""
    storage.write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())


def write_manifest(manifest: Manifest, report: dict[str, Any]) -> None:
    """Write ``manifest`` (plus the writer's problem ``report``) atomically to ``manifest.path``."""
    payload = {
        "format": FORMAT,
        "split": manifest.split,
        "class_names": list(manifest.class_names),
        "shards": [asdict(s) for s in manifest.shards],
        "num_samples": manifest.num_samples,
        "num_boxes": manifest.num_boxes,
        "source": manifest.source,
        "settings": manifest.settings,
        "report": report,
    }
    write_json_atomic(manifest.path, payload)


def load_json_object(path: Location, what: str) -> dict[str, Any]:
    """A JSON object read from ``path`` (a local path or a URL); DataError naming the file (and ``what``
    it is) otherwise. StorageError when an object store cannot be reached."""
    if not storage.is_file(path):
        raise DataError(f"{path}: {what} not found")
    try:
        data = json.loads(storage.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_manifest(path: Location, allow_pipe: bool = False) -> Manifest:
    """Read and check ``<split>-manifest.json`` at a local path or a URL.

    Raises DataError naming the file for a missing file, bad JSON, a foreign format marker, missing or
    mistyped keys, totals that disagree with the shard list, a listed local shard that does not exist, or
    (unless ``allow_pipe``) a ``pipe:`` shard name, which would run a shell command.
    """
    path = storage.locate(path)
    data = load_json_object(path, "manifest file")
    if data.get("format") != FORMAT:
        raise DataError(f"{path}: format marker is {data.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DataError(f"{path}: manifest lacks keys {missing}")
    names = data["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: class_names must be a non-empty list of strings")
    if not isinstance(data["source"], dict) or not isinstance(data["settings"], dict):
        raise DataError(f"{path}: source and settings must be JSON objects")
    if not isinstance(data["shards"], list) or not data["shards"]:
        raise DataError(f"{path}: shards must be a non-empty list")
    shards = [_shard_info(path, i, s) for i, s in enumerate(data["shards"])]
    piped = [s.name for s in shards if s.name.startswith("pipe:")]
    if piped and not allow_pipe:
        raise DataError(
            f"{path}: shard {piped[0]!r} is a pipe: URL, which runs a shell command; refused unless "
            "data.allow_pipe: true (set it only for manifests you wrote yourself)"
        )
    manifest = Manifest(
        path=path if isinstance(path, str) else path.resolve(),
        split=str(data["split"]),
        class_names=names,
        shards=shards,
        source=dict(data["source"]),
        settings=dict(data["settings"]),
    )
    for key in ("num_samples", "num_boxes"):
        if key in data and data[key] != getattr(manifest, key):
            raise DataError(f"{path}: {key} is {data[key]} but the shards add up to {getattr(manifest, key)}")
    # Remote shards are not asked for one by one here: a missing one counts as a shard error when read.
    for shard, url in zip(shards, manifest.shard_urls, strict=True):
        if not is_location(shard.name) and not storage.is_url(url) and not Path(url).is_file():
            raise DataError(f"{path}: listed shard {shard.name} does not exist ({url})")
    return manifest


def read_splits(root: Location, allow_pipe: bool = False) -> tuple[Manifest, Manifest]:
    """The train and val manifests of the shards at ``root`` (a local folder or a URL), checked to belong
    together: the val split's ground truth (``val-coco.json``) is there and both list the same classes."""
    train = read_manifest(manifest_path(root, "train"), allow_pipe)
    val = read_manifest(manifest_path(root, "val"), allow_pipe)
    if not storage.is_file(coco_json_path(root, "val")):
        raise DataError(
            f"{coco_json_path(root, 'val')} is missing: write the val split with jobs.make_shards"
        )
    if val.class_names != train.class_names:
        raise DataError(f"{val.path} and {train.path} list different class names")
    return train, val


def _shard_info(path: Location, index: int, entry: Any) -> ShardInfo:
    if not isinstance(entry, dict) or any(k not in entry for k in SHARD_KEYS):
        raise DataError(f"{path}: shards[{index}] must be an object with keys {list(SHARD_KEYS)}")
    if not isinstance(entry["name"], str) or not isinstance(entry["sha256"], str):
        raise DataError(f"{path}: shards[{index}] name and sha256 must be strings")
    counts = (entry["samples"], entry["boxes"])
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise DataError(f"{path}: shards[{index}] samples and boxes must be non-negative integers")
    return ShardInfo(
        name=entry["name"], samples=entry["samples"], boxes=entry["boxes"], sha256=entry["sha256"]
    )
