"""The reference's published weights by name, from a local HTTP server on 127.0.0.1 standing in for the
release address (YOLOV9_RAY_WEIGHTS_URL): downloaded once into the cache, never a partial or wrong file
counted as the file, one clear error without network, and the name taken where weights are."""

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from jobs import predict
from pipeline.config import load_config
from pipeline.weights.published import CACHE_ENV, URL_ENV, PublishedWeightsError, published_weights
from pipeline.weights.sources import resolve_weights
from tests.conftest import free_port, val_jpegs

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "reference-checkpoints"
YOLOV9_T = (FIXTURES / "yolov9-t.pt").read_bytes()  # the reference's format, layout yolov9-t
GELAN_T = (FIXTURES / "gelan-t-nc3.pt").read_bytes()


class Release:
    """What the server serves: ``files`` by name; ``cut`` names files sent with their full length announced
    but only half of their bytes; ``requests`` counts what was asked."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[str] = []


@pytest.fixture
def release(monkeypatch, tmp_path):
    served = Release()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- the name http.server calls
            name = self.path.rsplit("/", 1)[-1]
            served.requests.append(name)
            if name not in served.files:
                self.send_error(404)
                return
            data = served.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if name in served.cut else data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{server.server_address[1]}/v0.1")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_published_name_is_downloaded_once_into_the_cache(release, tmp_path):
    release.files["yolov9-t.pt"] = YOLOV9_T
    first = published_weights("yolov9-t")
    again = published_weights("yolov9-t.pt")
    assert first == again == str(tmp_path / "cache" / "yolov9-t.pt")
    assert release.requests == ["yolov9-t.pt"]
    assert hashlib.sha256(Path(first).read_bytes()).hexdigest() == hashlib.sha256(YOLOV9_T).hexdigest()


def test_a_local_file_of_that_name_wins_and_other_names_pass_through(release, tmp_path):
    (tmp_path / "yolov9-t.pt").write_bytes(b"mine")
    assert published_weights("yolov9-t.pt") == "yolov9-t.pt"
    assert published_weights("models:/det@champion") == "models:/det@champion"
    assert published_weights("yolov9-q") == "yolov9-q"
    assert release.requests == []


def test_a_download_cut_short_leaves_nothing_in_the_cache(release, tmp_path):
    release.files["yolov9-t.pt"] = YOLOV9_T
    release.cut.add("yolov9-t.pt")
    with pytest.raises(PublishedWeightsError, match="yolov9-t.pt"):
        published_weights("yolov9-t")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_file_that_is_not_the_layout_its_name_says_is_refused_and_not_kept(release, tmp_path):
    release.files["yolov9-c.pt"] = GELAN_T
    with pytest.raises(PublishedWeightsError, match="holds a gelan-t model, not the yolov9-c its name says"):
        published_weights("yolov9-c")
    assert list((tmp_path / "cache").iterdir()) == []


def test_without_network_the_error_names_the_address_and_where_to_put_the_file(monkeypatch, tmp_path):
    port = free_port()  # nothing listens there
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{port}/v0.1")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(PublishedWeightsError) as e:
        published_weights("gelan-c")
    message = str(e.value)
    assert (
        f"http://127.0.0.1:{port}/v0.1/gelan-c.pt" in message
        and str(tmp_path / "cache" / "gelan-c.pt") in message
    )


def test_model_weights_by_name_resolve_to_the_cached_file(release, tmp_path):
    release.files["yolov9-t.pt"] = YOLOV9_T
    cfg = load_config(None, ["model.weights=yolov9-t"])
    assert cfg.model.weights == "yolov9-t"  # a name, not made a path of the current folder
    assert resolve_weights(cfg.model.weights, f"sqlite:///{tmp_path / 'mlflow.db'}") == str(
        tmp_path / "cache" / "yolov9-t.pt"
    )


def test_predict_takes_a_published_name(release, tmp_path, tiny_shards, capsys):
    release.files["yolov9-t.pt"] = YOLOV9_T
    images = val_jpegs(tiny_shards, tmp_path / "images")
    argv = ["--model", "yolov9-t", "--source", "images", "--out", "out", "--imgsz", "128", "--conf", "0.0"]
    assert predict.main([*argv, "--max-det", "3"]) == 0
    assert f"in {len(images)} images -> out" in capsys.readouterr().out
    assert release.requests == ["yolov9-t.pt"]
