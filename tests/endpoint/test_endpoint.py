"""The registered model served by `python -m jobs.serve` as typed (its own local Ray instance, Ray Serve on
127.0.0.1), asked over HTTP like a client would: answers equal the pyfunc model's, bad requests get a 4xx
and the replica keeps answering, and the endpoint follows its alias as it moves, refusing a version that
does not load. The model is a reference-format file (random weights, 3 classes) registered in a sqlite
store; the answers' values are compared with the pyfunc model's on the same images, whatever they are."""

import base64
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.synthetic import SYNTHETIC_CLASSES
from pipeline.registry.register import register_reference
from tests.conftest import GELAN_T_NC3, free_port, start_group, stop_group, val_jpegs, wait_until_serving
from tests.waiting import wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_process, pytest.mark.cost(75)]

REFERENCE = GELAN_T_NC3
NAME = "det"
MAX_BODY_MB = 1
ANSWER_PARAMS = {"conf": 0.001, "iou": 0.45, "max_det": 10}  # random weights: scores ~0.001-0.005


@pytest.fixture(scope="module")
def store(tmp_path_factory, three_class_shards) -> str:
    """A sqlite tracking store where version 1 of ``det`` is the champion."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    register_reference(REFERENCE, NAME, uri, three_class_shards, imgsz=128)
    MlflowClient(uri).set_registered_model_alias(NAME, "champion", "1")
    return uri


LOGS: list[Path] = []  # the server's log, for the failure messages of waits


def wait_for(condition, what: str, timeout_s: float) -> None:
    """wait_until, failing with the end of the server's log."""
    try:
        wait_until(condition, what, timeout_s)
    except TimeoutError as e:
        raise AssertionError(f"{e}; the server's log ends:\n{LOGS[-1].read_text()[-4000:]}") from None


@pytest.fixture(scope="module")
def endpoint(store, tmp_path_factory) -> str:
    """`python -m jobs.serve --model models:/det@champion` typed in a fresh folder; its URL."""
    folder = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = store
    command = [
        sys.executable, "-m", "jobs.serve", "--model", f"models:/{NAME}@champion", "--port", str(port),
        "--poll-s", "1", "--max-batch-size", "4", "--max-body-mb", str(MAX_BODY_MB),
        "--max-replicas", "2", "--target-ongoing", "1", "--upscale-delay-s", "1",
    ]  # fmt: skip
    log = folder / "serve.log"
    LOGS.append(log)
    with log.open("wb") as out:
        server = start_group(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(port, server, log, timeout_s=300, path="/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(server)
    assert server.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def images(three_class_shards, tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("images") / "val"
    return {name: (folder / name).read_bytes() for name in sorted(val_jpegs(three_class_shards, folder))}


def call(url: str, body: bytes = b"", content_type: str = "application/json", method: str = "POST"):
    """(status, answer JSON) of one request."""
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method)
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def as_json(images: list[bytes], params: dict | None = None) -> bytes:
    split = {"columns": ["image"], "data": [[base64.b64encode(i).decode()] for i in images]}
    return json.dumps({"dataframe_split": split, "params": params or {}}).encode()


def test_the_endpoint_answers_what_the_pyfunc_model_answers(endpoint, store, images):
    status, answer = call(endpoint, as_json(list(images.values()), ANSWER_PARAMS))
    assert status == 200, answer
    mlflow.set_tracking_uri(store)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    expected = pyfunc.predict(pd.DataFrame({"image": list(images.values())}), params=ANSWER_PARAMS)
    assert answer["version"] == "1" and len(answer["predictions"]) == len(images)
    assert sum(len(p["boxes"]) for p in answer["predictions"]) > 0  # a comparison of something
    for got, want in zip(answer["predictions"], expected.to_dict("records"), strict=True):
        assert sorted(got["class_names"]) == sorted(want["class_names"])
        # boxes of equal score may come in either order: compare them sorted
        got_boxes = sorted(zip(got["scores"], got["boxes"], strict=True))
        want_boxes = sorted(zip(want["scores"], [list(b) for b in want["boxes"]], strict=True))
        assert [s for s, _ in got_boxes] == pytest.approx([s for s, _ in want_boxes], abs=1e-5)
        assert sum((b for _, b in got_boxes), []) == pytest.approx(
            sum((b for _, b in want_boxes), []), abs=0.1
        )


def test_raw_image_bytes_are_answered_with_the_query_strings_parameters(endpoint, images):
    status, answer = call(f"{endpoint}/?conf=0.001&max_det=2", next(iter(images.values())), "image/jpeg")
    assert status == 200, answer
    (prediction,) = answer["predictions"]
    assert len(prediction["boxes"]) == 2 and answer["model"] == f"models:/{NAME}/1"


def test_health_and_version_routes(endpoint):
    assert call(f"{endpoint}/healthz", method="GET") == (200, {"status": "ok", "version": "1"})
    status, described = call(f"{endpoint}/version", method="GET")
    assert status == 200 and described["model"] == f"models:/{NAME}@champion"
    assert described["class_names"] == list(SYNTHETIC_CLASSES[:3]) and described["imgsz"] == 128


def test_bad_requests_get_a_4xx_with_a_message_and_good_ones_are_still_answered(endpoint, images):
    jpeg = next(iter(images.values()))
    bad = [
        ((b"not an image", "image/jpeg"), 400, "do not decode"),
        ((b"", "image/jpeg"), 400, "empty"),
        ((jpeg[: len(jpeg) // 2], "image/jpeg"), 400, "do not decode"),
        ((b"\xff" * (MAX_BODY_MB * 2**20 + 10), "image/jpeg"), 413, "over the limit"),
        ((as_json([jpeg], {"confidence": 0.5}), "application/json"), 400, "confidence"),
        ((b"x", "text/plain"), 415, "Content-Type"),
    ]
    for _ in range(3):
        for (body, content_type), status, message in bad:
            got, answer = call(endpoint, body, content_type)
            assert got == status and message in answer["error"], (status, answer)
        assert call(endpoint, jpeg, "image/jpeg")[0] == 200


def asking(endpoint: str, body: bytes, clients: int):
    """``clients`` threads posting ``body`` until the returned event is set; their (status, answer)s."""
    answers, stop = [], threading.Event()

    def keep_asking():
        while not stop.is_set():
            answers.append(call(endpoint, body, "image/jpeg"))

    threads = [threading.Thread(target=keep_asking) for _ in range(clients)]
    for t in threads:
        t.start()
    return answers, stop, threads


def settled_on(endpoint: str, version: str, calls: int = 10) -> bool:
    """Whether ``calls`` /version answers in a row (from whichever replicas) name ``version``."""
    return all(call(f"{endpoint}/version", method="GET")[1]["version"] == version for _ in range(calls))


def test_a_second_replica_is_added_under_load(endpoint, images):
    answers, stop, threads = asking(endpoint, next(iter(images.values())), clients=4)
    replicas = set()
    try:
        wait_for(
            lambda: (
                replicas.add(call(f"{endpoint}/version", method="GET")[1]["replica"]) or len(replicas) == 2
            ),
            "a second replica (max 2, 1 request in flight each, 4 clients)",
            180,
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert answers and all(status == 200 for status, _ in answers)


def test_the_endpoint_follows_its_alias_without_dropping_a_request(
    endpoint, store, three_class_shards, images
):
    version = str(register_reference(REFERENCE, NAME, store, three_class_shards, imgsz=128).version)
    answers, stop, threads = asking(endpoint, next(iter(images.values())), clients=1)
    try:
        MlflowClient(store).set_registered_model_alias(NAME, "champion", version)
        wait_for(lambda: settled_on(endpoint, version), f"every replica on version {version}", 60)
        wait_for(lambda: answers[-1][1].get("version") == version, "an answer of the new version", 30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    assert {a["version"] for _, a in answers} <= {"1", version}


def test_a_version_that_does_not_load_is_refused_and_the_answering_one_goes_on(
    endpoint, store, images, tmp_path
):
    client = MlflowClient(store)
    answering = str(client.get_model_version_by_alias(NAME, "champion").version)
    wait_for(lambda: settled_on(endpoint, answering), f"every replica on version {answering}", 60)
    (tmp_path / "empty").mkdir()
    broken = str(client.create_model_version(NAME, source=str(tmp_path / "empty")).version)
    client.set_registered_model_alias(NAME, "champion", broken)
    try:
        described = {}

        def refused_by_this_replica() -> bool:
            described.update(call(f"{endpoint}/version", method="GET")[1])
            return described["refused"].get("version") == broken

        wait_for(refused_by_this_replica, f"version {broken} refused", 60)
        assert described["version"] == answering and "not a yolov9-ray model" in described["refused"]["error"]
        status, answer = call(endpoint, next(iter(images.values())), "image/jpeg")
        assert status == 200 and answer["version"] == answering
    finally:
        client.set_registered_model_alias(NAME, "champion", answering)
