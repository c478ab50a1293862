"""Files by location: a local path, or a URL of any file system pyarrow opens (``s3://``, ``gs://``,
``hdfs://``...). Shards, manifests, COCO ground truth, checkpoints and starting weights all go through here.

Credentials and endpoints come from the standard environment only, never from a config file: for S3
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or an instance/pod role), ``AWS_REGION``, and
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for an S3-compatible store (MinIO, Ceph, a test server);
for GCS ``GOOGLE_APPLICATION_CREDENTIALS``. Ray Train reads ``ray.storage_path`` through pyarrow the same
way, so checkpoints land where this module reads them back.

A local location is returned as a :class:`~pathlib.Path`, a URL as ``str``: ``Path`` would fold ``s3://``
into ``s3:/``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline.errors import PipelineError

Location = str | Path
REMOTE_READ_BUFFER = 8 * 2**20  # bytes per request when streaming from an object store
# pyarrow's type names of file systems whose URL scheme differs from the name
_SCHEMES = {"gcs": "gs"}


class StorageError(PipelineError, OSError):
    """A location that cannot be read or written; the message names it and why (not found, no such bucket,
    endpoint unreachable, no permission)."""


def is_url(location: Location) -> bool:
    """True for a URL of a remote file system (``s3://b/k``); False for local paths and ``file://`` URLs."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def locate(root: Location, *names: str) -> Location:
    """``root`` joined with ``names``: a ``Path`` for a local root, a URL for a remote one."""
    if not is_url(root):
        return Path(str(root).removeprefix("file://")).joinpath(*names)
    return "/".join([str(root).rstrip("/"), *(n.strip("/") for n in names)])


def parent(location: Location) -> Location:
    """The folder that holds ``location``."""
    if not is_url(location):
        return Path(str(location).removeprefix("file://")).parent
    scheme, rest = str(location).rstrip("/").split("://", 1)
    return f"{scheme}://{rest.rsplit('/', 1)[0]}" if "/" in rest else f"{scheme}://{rest}"


def filesystem(location: Location) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system of ``location`` and the path within it.

    S3 is built here rather than by ``FileSystem.from_uri`` so that the endpoint variables are honoured by
    every pyarrow version (the S3FileSystem constructor itself ignores ``AWS_ENDPOINT_URL``).
    """
    if not is_url(location):
        return pafs.LocalFileSystem(), str(Path(str(location).removeprefix("file://")).resolve())
    text = str(location)
    parts = urlsplit(text)
    if parts.scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = pafs.S3FileSystem(endpoint_override=endpoint) if endpoint else pafs.S3FileSystem()
        return fs, f"{parts.netloc}{parts.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(text)
    except (pafs.ArrowInvalid, OSError, ValueError) as e:
        raise StorageError(f"{text}: no file system for this URL ({e})") from e


def url_of(fs: pafs.FileSystem, path: str) -> str:
    """The location of ``path`` within ``fs`` as this module takes it (a URL for a remote file system):
    what Ray Train's ``Checkpoint.path`` (a path within its file system) becomes for MLflow tags and users."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = _SCHEMES.get(fs.type_name, fs.type_name)
    return f"{scheme}://{path.lstrip('/')}"


def _failure(location: Location, fs: pafs.FileSystem, path: str, error: Exception) -> StorageError:
    """A StorageError that says what is wrong with ``location`` in words a user acts on."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Could not resolve" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "default"
        return StorageError(f"{location}: cannot reach the object store (endpoint {endpoint}): {text}")
    if "ACCESS_DENIED" in text or "403" in text:
        return StorageError(f"{location}: access denied (check the AWS_* credentials): {text}")
    if isinstance(error, FileNotFoundError) and isinstance(fs, pafs.S3FileSystem):
        bucket = path.split("/", 1)[0]
        try:
            missing_bucket = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError:
            missing_bucket = False
        if missing_bucket:
            return StorageError(f"{location}: bucket {bucket!r} does not exist")
    if isinstance(error, FileNotFoundError):
        return StorageError(f"{location}: not found")
    return StorageError(f"{location}: {text}")


def _info(location: Location) -> pafs.FileInfo:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise _failure(location, fs, path, e) from e


def is_file(location: Location) -> bool:
    """Whether ``location`` is an existing file (StorageError when the store cannot be asked)."""
    return _info(location).type == pafs.FileType.File


def exists(location: Location) -> bool:
    """Whether a file or a folder is at ``location``."""
    return _info(location).type != pafs.FileType.NotFound


def is_dir(location: Location) -> bool:
    """Whether ``location`` is a folder (an object-store prefix that holds objects)."""
    return _info(location).type == pafs.FileType.Directory


def read_bytes(location: Location) -> bytes:
    """The whole file at ``location``. Raises StorageError naming it when it cannot be read."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise _failure(location, fs, path, e) from e


def open_input(location: Location) -> pafs.NativeFile:
    """A binary stream reading ``location`` front to back (what a tar reader needs), not seekable.

    Remote streams read ahead ``REMOTE_READ_BUFFER`` bytes at a time: unbuffered, every small read of the
    tar reader would be an HTTP range request of its own."""
    fs, path = filesystem(location)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            return fs.open_input_stream(path)
        return fs.open_input_stream(path, buffer_size=REMOTE_READ_BUFFER)
    except OSError as e:
        raise _failure(location, fs, path, e) from e


def write_bytes(location: Location, data: bytes) -> None:
    """Write ``data`` to ``location``; a reader never sees half a file. Locally the folder is created and
    the file is written beside and renamed; an object store makes an object visible only once complete."""
    fs, path = filesystem(location)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
            return
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise _failure(location, fs, path, e) from e


def make_dirs(location: Location) -> None:
    """Create the folder ``location`` (locally; object stores have no folders, so nothing there)."""
    if not is_url(location):
        Path(str(location).removeprefix("file://")).mkdir(parents=True, exist_ok=True)


def list_names(location: Location) -> list[str]:
    """Names (not paths) of the entries directly in the folder ``location``; [] when it does not exist."""
    fs, path = filesystem(location)
    try:
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise _failure(location, fs, path, e) from e
    return sorted(i.base_name for i in found)


def delete(location: Location) -> None:
    """Remove the file at ``location``."""
    fs, path = filesystem(location)
    try:
        fs.delete_file(path)
    except OSError as e:
        raise _failure(location, fs, path, e) from e


@contextmanager
def local_copy(location: Location) -> Iterator[Path]:
    """A local path holding what is at ``location`` (a file or a whole folder) for the ``with`` block.

    Local locations are yielded as they are; remote ones are downloaded into a temporary folder (the only
    local trace, removed afterwards). Raises StorageError when nothing is at ``location``.
    """
    if not is_url(location):
        yield Path(str(location).removeprefix("file://"))
        return
    fs, path = filesystem(location)
    info = _info(location)
    if info.type == pafs.FileType.NotFound:
        raise _failure(location, fs, path, FileNotFoundError(path))
    with tempfile.TemporaryDirectory(prefix="yolov9-ray-") as d:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        target = Path(d) / name
        if info.type == pafs.FileType.Directory:
            target.mkdir()
        try:
            pafs.copy_files(
                path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            )
        except OSError as e:
            raise _failure(location, fs, path, e) from e
        yield target
