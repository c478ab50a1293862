"""The reference's published weights by name: ``yolov9-c``, ``gelan-c``, ``yolov9-c-converted`` ... (or the
same with ``.pt``) wherever a weights file is taken (``model.weights``, ``jobs.predict --model``,
``jobs.register --weights``, ``jobs.serve --model``), when no local file has that name.

The file is downloaded once, from the reference repository's v0.1 release assets (``YOLOV9_RAY_WEIGHTS_URL``
overrides the base address: a mirror, a test server), into the cache folder (``YOLOV9_RAY_CACHE``, else
``$XDG_CACHE_HOME/yolov9-ray``, else ``~/.cache/yolov9-ray``). It is written under a temporary name and
renamed only once it is whole and the safe importer has read it as the layout its name says, so a cut
download or a wrong file never counts as the file.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import PipelineError
from yolov9.reference import load_reference_checkpoint

RELEASE_URL = "https://github.com/WongKinYiu/yolov9/releases/download/v0.1"
URL_ENV = "YOLOV9_RAY_WEIGHTS_URL"
CACHE_ENV = "YOLOV9_RAY_CACHE"
TIMEOUT_S = 60.0
# name -> the layout the safe importer must find in it ("-converted": the dual model with its auxiliary
# branch removed, which is the GELAN of the same size)
PUBLISHED = {
    **{f"yolov9-{s}": f"yolov9-{s}" for s in "tsmce"},
    **{f"yolov9-{s}-converted": f"gelan-{s}" for s in "tsmce"},
    **{f"gelan-{s}": f"gelan-{s}" for s in "smce"},
}


class PublishedWeightsError(PipelineError, ValueError):
    """A published file that cannot be had: not downloadable here, cut short, or not what its name says."""


def published_name(text: str) -> str | None:
    """The published name ``text`` stands for (``yolov9-c`` or ``yolov9-c.pt``), or None: another name,
    or a local file of that name exists (a file the user has wins)."""
    name = text.removesuffix(".pt")
    if name not in PUBLISHED or Path(text).exists():
        return None
    return name


def cache_folder() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "yolov9-ray"


def published_weights(text: str) -> str:
    """``text`` itself, or for a published name the path of its file in the cache, downloaded first if it
    is not there yet. Raises PublishedWeightsError naming the address and the cache path."""
    name = published_name(text)
    if name is None:
        return text
    target = cache_folder() / f"{name}.pt"
    if not target.is_file():
        _download(name, target)
    return str(target)


def _download(name: str, target: Path) -> None:
    url = f"{os.environ.get(URL_ENV) or RELEASE_URL}/{name}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        _fetch(url, partial, target)
        try:
            layout = load_reference_checkpoint(partial).reference_info.layout
        except (ValueError, OSError) as e:  # refused global, corrupt file, unknown layout
            raise PublishedWeightsError(f"{url} is not a readable reference checkpoint: {e}") from e
        if layout != PUBLISHED[name]:
            raise PublishedWeightsError(
                f"{url} holds a {layout} model, not the {PUBLISHED[name]} its name says"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _fetch(url: str, partial: Path, target: Path) -> None:
    """``url`` into ``partial``, whole (as long as the server said) or PublishedWeightsError."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, partial.open("wb") as out:
            expected = int(response.headers.get("Content-Length") or -1)
            while block := response.read(1 << 20):
                out.write(block)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise PublishedWeightsError(
            f"cannot download the published weights from {url} ({type(e).__name__}: {e}); fetch that file "
            f"where there is network and put it at {target} (the cache folder is set by {CACHE_ENV})"
        ) from e
    if expected >= 0 and partial.stat().st_size != expected:
        raise PublishedWeightsError(
            f"the download of {url} stopped at {partial.stat().st_size} of {expected} bytes"
        )
