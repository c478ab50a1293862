"""The registered model as a Ray Serve application: an HTTP endpoint that batches requests onto its
replicas' model (a GPU each when asked), scales replicas with load, and follows an alias.

Routes: ``POST /`` detections (``pipeline.endpoint.request`` says what a request holds), answered as
``{"predictions": [{"boxes", "scores", "classes", "class_names"}, ...], "model": URI, "version": V}``
with boxes in the pixels of the images sent, what the pyfunc model answers; ``GET /healthz``;
``GET /version`` (the version answering, the alias it follows, the last version refused and why).

Following ``models:/NAME@alias``: every replica asks the registry every ``poll_s`` seconds which version the
alias names; a new one is loaded beside the old one, which answers until the new one is ready (no request
waits for a load or is dropped); a version that fails to load is logged with the reason and the old one
goes on answering.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.endpoint.request import Detection, Limits, RequestError, read_request
from pipeline.errors import PipelineError
from pipeline.inference.model import BatchModel, resolve_model
from pipeline.registry.serving import detect

log = logging.getLogger(__name__)
APP_NAME = "yolov9"


class EndpointOptionsError(PipelineError, ValueError):
    """Endpoint options no endpoint could run with; the message names them."""


@dataclass(frozen=True)
class EndpointOptions:
    """How the endpoint batches, scales and follows its model.

    ``max_batch_size`` requests (or fewer, after ``batch_wait_s`` seconds) share one forward pass;
    replicas scale between ``min_replicas`` and ``max_replicas`` to keep ``target_ongoing_requests`` per
    replica, one more after ``upscale_delay_s`` seconds over it, one fewer after ``downscale_delay_s``
    under it; ``gpu``: one GPU per replica; ``poll_s``: how often an alias is asked for its version
    (0: never).
    """

    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    cpus_per_replica: float = 1.0
    gpu: bool = False
    poll_s: float = 30.0
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        """EndpointOptionsError naming the first option no endpoint could run with."""
        if self.max_batch_size < 1 or self.batch_wait_s < 0:
            raise EndpointOptionsError("max_batch_size must be >= 1 and batch_wait_s >= 0")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise EndpointOptionsError(
                f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}"
            )
        if min(self.poll_s, self.upscale_delay_s, self.downscale_delay_s) < 0:
            raise EndpointOptionsError("poll_s, upscale_delay_s and downscale_delay_s must be >= 0")
        if self.target_ongoing_requests <= 0 or self.cpus_per_replica <= 0:
            raise EndpointOptionsError("target_ongoing_requests and cpus_per_replica must be > 0")


@dataclass(frozen=True)
class Followed:
    """What a model URI names: a registered model and alias to follow, or a fixed version or file."""

    uri: str
    name: str = ""
    alias: str = ""

    @classmethod
    def parse(cls, uri: str) -> Followed:
        if uri.startswith("models:/") and "@" in uri:
            name, _, alias = uri.removeprefix("models:/").partition("@")
            return cls(uri, name, alias)
        return cls(uri)

    def version_now(self, client: MlflowClient) -> str:
        """The version the alias names now ("" for a fixed URI or a file)."""
        return str(client.get_model_version_by_alias(self.name, self.alias).version) if self.alias else ""

    def version_uri(self, version: str) -> str:
        return f"models:/{self.name}/{version}" if self.alias else self.uri


@dataclass
class Loaded:
    """A model ready to answer: the network on its device and the resolved model it was built from."""

    model: torch.nn.Module
    source: BatchModel


class Detector:
    """One replica: its model, the batching of requests onto it, and the alias follower."""

    def __init__(self, model_uri: str, tracking_uri: str, options: EndpointOptions) -> None:
        self.followed = Followed.parse(model_uri)
        self.tracking_uri, self.options = tracking_uri, options
        self.device = torch.device("cuda" if options.gpu and torch.cuda.is_available() else "cpu")
        self.client = MlflowClient(tracking_uri)
        self.current = self._load(self.followed.version_now(self.client))
        self.refused: dict[str, str] = {}
        self.detect_batch.set_max_batch_size(options.max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(options.batch_wait_s)
        if self.followed.alias and options.poll_s > 0:
            threading.Thread(target=self._follow, name="alias-follower", daemon=True).start()

    def _load(self, version: str) -> Loaded:
        source = resolve_model(self.followed.version_uri(version), self.tracking_uri)
        return Loaded(source.build(self.device), source)

    def _follow(self) -> None:
        """Every ``poll_s``: load the alias's version when it moved. Any failure (the registry away, a
        version that does not load) is logged and the answering model stays: this thread never ends."""
        while True:
            time.sleep(self.options.poll_s)
            try:
                self._follow_once()
            except Exception as e:  # noqa: BLE001 -- whatever the registry or the load raises
                log.warning("cannot follow %s (%s: %s); version %s answers on", self.followed.uri,
                            type(e).__name__, e, self.current.source.version)  # fmt: skip

    def _follow_once(self) -> None:
        version = self.followed.version_now(self.client)
        if version in (self.current.source.version, self.refused.get("version")):
            return
        try:
            loaded = self._load(version)
        except Exception as e:  # noqa: BLE001 -- a download, a foreign model or a bad state dict alike
            self.refused = {"version": version, "error": f"{type(e).__name__}: {e}"}
            raise
        log.info("%s moved to version %s: it answers from now on", self.followed.uri, version)
        self.current, self.refused = loaded, {}

    def describe(self) -> dict[str, Any]:
        spec = self.current.source.spec
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "model": self.followed.uri,
            "version": self.current.source.version,
            "model_name": spec.model_name,
            "class_names": spec.class_names,
            "imgsz": spec.imgsz,
            "refused": self.refused,
            "options": asdict(self.options),
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def detect_batch(self, requests: list[Detection]) -> list[dict[str, Any]]:
        """One forward pass per group of requests with equal parameters, off the event loop."""
        current = self.current  # one model for the whole batch, even if the alias moves meanwhile
        return await asyncio.to_thread(_answer, current, requests)

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and path == "healthz":
            return JSONResponse({"status": "ok", "version": self.current.source.version})
        if request.method == "GET" and path == "version":
            return JSONResponse(self.describe())
        if request.method != "POST" or path:
            return JSONResponse(
                {
                    "error": f"{request.method} {request.url.path}: "
                    "POST / for detections, GET /healthz or /version"
                },
                status_code=404,
            )
        try:
            body = await _body(request, self.options.limits.max_body_bytes)
            content_type, query = request.headers.get("content-type", ""), dict(request.query_params)
            # decoding a large image takes tens of milliseconds: off the event loop other requests share
            detection = await asyncio.to_thread(read_request, body, content_type, query, self.options.limits)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return JSONResponse(await self.detect_batch(detection))


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, read no further than one byte over ``limit`` (read_request then refuses it):
    a client sending gigabytes does not fill the replica's memory."""
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


def _answer(current: Loaded, requests: list[Detection]) -> list[dict[str, Any]]:
    spec, source = current.source.spec, current.source
    groups: dict[tuple[float, float, int], list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.params_key()].append(i)
    answers: list[dict[str, Any]] = [{} for _ in requests]
    for indices in groups.values():
        images = [image for i in indices for image in requests[i].images]
        found = detect(current.model, images, spec.imgsz, spec.class_names, **requests[indices[0]].params)
        for i in indices:
            n = len(requests[i].images)
            answers[i] = {"predictions": found[:n], "model": source.uri, "version": source.version}
            found = found[n:]
    return answers


def endpoint(model_uri: str, tracking_uri: str, options: EndpointOptions) -> serve.Application:
    """The Serve application of ``model_uri`` (``models:/NAME@alias``, ``models:/NAME/V`` or a weights
    file) read from the registry at ``tracking_uri``."""
    options.check()
    if Path(model_uri).exists():
        model_uri = str(Path(model_uri).resolve())  # replicas may start in another folder
    deployment = serve.deployment(Detector, name="yolov9-detector").options(
        autoscaling_config={
            "min_replicas": options.min_replicas,
            "initial_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
        },
        max_ongoing_requests=max(2 * options.max_batch_size, int(2 * options.target_ongoing_requests)),
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": 1 if options.gpu else 0},
    )
    return deployment.bind(model_uri, tracking_uri, options)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application Ray Serve builds from a config file's ``import_path`` (``pipeline.endpoint.deployment:
    build_app``) and ``args``, as a RayService declares it: ``model`` (required), ``tracking_uri`` (default
    ``MLFLOW_TRACKING_URI``) and any EndpointOptions field (``max_batch_size``, ``max_replicas``, ``gpu``...;
    ``limits`` as ``max_body_bytes``, ``max_images``, ``max_pixels``). EndpointOptionsError names an
    argument it does not know or one it cannot use."""
    given = dict(args)
    model = str(given.pop("model", "") or "")
    tracking_uri = str(given.pop("tracking_uri", "") or os.environ.get("MLFLOW_TRACKING_URI", ""))
    if not model or not tracking_uri:
        raise EndpointOptionsError(
            "the application needs args.model and a tracking URI (args.tracking_uri or MLFLOW_TRACKING_URI)"
        )
    kinds = {f.name: f.type for f in fields(EndpointOptions) if f.name != "limits"}
    limit_kinds = {f.name: f.type for f in fields(Limits)}
    unknown = sorted(set(given) - set(kinds) - set(limit_kinds))
    if unknown:
        raise EndpointOptionsError(
            f"unknown application args {unknown}; known: model, tracking_uri, {sorted(kinds | limit_kinds)}"
        )
    try:
        values = {k: _typed(kinds[k], v) for k, v in given.items() if k in kinds}
        limits = Limits(**{k: _typed(limit_kinds[k], v) for k, v in given.items() if k in limit_kinds})
    except (TypeError, ValueError) as e:
        raise EndpointOptionsError(f"application args: {e}") from e
    return endpoint(model, tracking_uri, EndpointOptions(**values, limits=limits))


def _typed(kind: str, value: Any) -> Any:
    """A config value as its option's type (annotations are strings here: ``from __future__``)."""
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value
    return {"int": int, "float": float}[kind](value)


def run_endpoint(
    model_uri: str,
    tracking_uri: str,
    options: EndpointOptions,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
) -> None:
    """Serve ``model_uri`` at http://HOST:PORT/ on the attached Ray cluster (``address``, ``RAY_ADDRESS``) or
    a local instance, until SIGINT or SIGTERM. The model is resolved here first, so that a URI that names
    nothing is one clear error before anything starts."""
    import ray

    from pipeline.training.ray_train import ensure_ray

    options.check()
    first = resolve_model(model_uri, tracking_uri)
    started = not ray.is_initialized()
    ensure_ray(address)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(endpoint(model_uri, tracking_uri, options), name=APP_NAME, route_prefix="/")
        version = f" version {first.version}" if first.version else ""
        print(
            f"serving {model_uri}{version} at http://{host}:{port}/ (GET /healthz, /version; POST / images)",
            flush=True,
        )
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        if started:
            ray.shutdown()
