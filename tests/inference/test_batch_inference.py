"""Batch inference with Ray Data (`python -m jobs.predict --batch`): the answers of the single-image path,
bad files listed and not fatal, a rerun that skips what is written, and every path in a bucket of a real S3
server (moto, 127.0.0.1). One local Ray instance; the model is a reference-format file (random weights
with raised class biases: many low-score detections on every image, as in
tests/evaluation/test_coco_protocol.py)."""

import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.predict import main as predict_main
from pipeline.data import DataError
from pipeline.inference.batch import BatchOptions, fit_to_cluster, run_batch_inference
from pipeline.inference.model import resolve_model
from pipeline.registry.file_detector import FileDetector
from pipeline.registry.serving import encode_jpeg
from tests.conftest import val_jpegs
from tests.evaluation.test_coco_protocol import IMGSZ, write_checkpoint
from tests.s3_server import S3Server, s3_environment

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cost(60)]

CLASSES = ["a", "b", "c"]
CONF = 0.02  # above the test model's many equal-score (0.014) boxes, whose NMS ties float noise decides
MAX_PIXELS = 300 * 300  # the "huge" image below is 400 x 400
BUCKET = "photos"


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Server:
    """The S3 server, its AWS_* environment set before the Ray instance starts (its workers inherit it)."""
    with s3_environment(tmp_path_factory.mktemp("s3"), BUCKET) as server:
        yield server


@pytest.fixture(scope="session")
def local_ray(s3, local_ray):
    return local_ray


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint", CLASSES)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_shards) -> Path:
    """The synthetic val images as JPEG files, plus a PNG, an empty file, a text file and a 400x400 image."""
    folder = tmp_path_factory.mktemp("photos")
    val_jpegs(tiny_shards, folder / "images")
    images = folder / "images"
    first = cv2.imread(str(sorted(images.glob("*.jpg"))[0]))
    cv2.imwrite(str(images / "as-png.png"), first)
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image")
    wide = cv2.resize(first, (200, 90))  # other sizes: the letterbox and its inverse are part of the answer
    (images / "wide.jpg").write_bytes(encode_jpeg(cv2.cvtColor(wide, cv2.COLOR_BGR2RGB)))
    (images / "huge.jpg").write_bytes(encode_jpeg(np.full((400, 400, 3), 90, np.uint8)))
    return images


def options() -> BatchOptions:
    return BatchOptions(batch_size=4, min_actors=1, max_actors=2, conf=CONF, max_pixels=MAX_PIXELS)


def read_parts(folder) -> pd.DataFrame:
    parts = sorted(Path(folder).glob("part-*.parquet"))
    return pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)


@pytest.fixture(scope="module")
def batch_run(local_ray, photos, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    model = resolve_model(str(model_dir), "sqlite:///unused.db", IMGSZ)
    summary = run_batch_inference(str(photos), str(out), model, options(), coco_json=True)
    return out, summary


def test_every_image_gets_the_answer_of_the_single_image_path(batch_run, photos, model_dir):
    out, _ = batch_run
    rows = read_parts(out / "detections").set_index("path")
    single = FileDetector(model_dir, IMGSZ)
    good = sorted(p for p in photos.iterdir() if p.name not in ("empty.jpg", "notes.txt", "huge.jpg"))
    assert sorted(rows.index) == [str(p) for p in good]
    compared = 0
    for path in good:
        expected = single.predict(pd.DataFrame({"image": [path.read_bytes()]}), {"conf": CONF}).iloc[0]
        got = rows.loc[str(path)]
        want, have = detections(expected), detections(got)
        assert len(have) == len(want), path.name
        # both in NMS order (score descending); equal scores within float noise may come in either order
        for d in (want, have):
            d[:] = d[np.lexsort((d[:, 0], d[:, 5], -d[:, 4].round(4)))]
        np.testing.assert_allclose(have[:, :4], want[:, :4], atol=0.02, err_msg=path.name)
        np.testing.assert_allclose(have[:, 4], want[:, 4], atol=1e-4, err_msg=path.name)
        assert (have[:, 5] == want[:, 5]).all(), path.name
        compared += len(want)
        image = cv2.imread(str(path))
        assert (got["height"], got["width"]) == image.shape[:2]
    assert compared >= 2 * len(good)  # the comparison was over real detections, not empty lists


def test_bad_files_are_listed_with_their_reason_and_do_not_stop_the_job(batch_run):
    out, summary = batch_run
    bad = read_parts(out / "bad_files").set_index("path")["reason"].to_dict()
    names = {Path(p).name: reason for p, reason in bad.items()}
    assert names["empty.jpg"] == "empty file"
    assert names["notes.txt"] == "not a decodable image"
    assert names["huge.jpg"].startswith("too large: 400x400")
    assert summary.bad_files == 3 and summary.bad_reasons == {
        "empty file": 1,
        "not a decodable image": 1,
        "too large": 1,
    }


def test_the_coco_json_holds_every_detection_with_its_score(batch_run):
    out, summary = batch_run
    coco = json.loads((out / "detections-coco.json").read_text())
    assert len(coco["images"]) == summary.images and len(coco["annotations"]) == summary.detections
    assert [c["name"] for c in coco["categories"]] == CLASSES
    assert all(0 <= a["score"] <= 1 and a["bbox"][2] >= 0 for a in coco["annotations"])


def test_a_rerun_into_the_same_output_answers_nothing_twice(batch_run, photos, model_dir):
    out, first = batch_run
    before = sorted(p.name for p in (out / "detections").iterdir())
    model = resolve_model(str(model_dir), "sqlite:///unused.db", IMGSZ)
    again = run_batch_inference(str(photos), str(out), model, options())
    assert again.images == 0 and again.bad_files == 0 and again.skipped == first.images + first.bad_files
    assert sorted(p.name for p in (out / "detections").iterdir()) == before


def test_the_job_reads_and_writes_a_bucket_and_prints_its_summary(batch_run, photos, model_dir, s3, capsys):
    out, first = batch_run
    fs = s3_fs(s3)
    for path in sorted(photos.iterdir()):
        with fs.open_output_stream(f"{BUCKET}/in/{path.name}") as f:
            f.write(path.read_bytes())
    command = [
        "--model", str(model_dir), "--imgsz", str(IMGSZ), "--conf", str(CONF),
        "--max-pixels", str(MAX_PIXELS), "--batch-size", "4",
        "--source", f"s3://{BUCKET}/in/", "--out", f"s3://{BUCKET}/out/",
    ]  # fmt: skip
    assert predict_main(command) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{first.images} images, {first.detections} detections, 3 bad files"), line
    keys = s3.keys(BUCKET)
    assert "out/detections/part-00000.parquet" in keys and "out/bad_files/part-00000.parquet" in keys
    with fs.open_input_file(f"{BUCKET}/out/detections/part-00000.parquet") as f:
        table = pq.read_table(io.BytesIO(f.read()))
    assert all(p.startswith(f"s3://{BUCKET}/in/") for p in table.column("path").to_pylist())


def test_a_list_file_and_a_shard_manifest_are_sources_too(
    batch_run, photos, model_dir, tiny_shards, tmp_path
):
    model = resolve_model(str(model_dir), "sqlite:///unused.db", IMGSZ)
    listed = sorted(str(p) for p in photos.glob("*.jpg") if p.name not in ("empty.jpg", "huge.jpg"))
    # relative to the list's folder, wherever the job runs
    (tmp_path / "list.txt").write_text("\n".join(os.path.relpath(p, tmp_path) for p in listed) + "\n")
    from_list = run_batch_inference(str(tmp_path / "list.txt"), str(tmp_path / "a"), model, options())
    assert from_list.images == len(listed) and from_list.bad_files == 0
    from_shards = run_batch_inference(
        str(tiny_shards / "val-manifest.json"), str(tmp_path / "b"), model, options()
    )
    assert from_shards.images == 12  # the tiny set's val split
    paths = read_parts(tmp_path / "b" / "detections")["path"]
    assert all("val-" in p and "#" in p for p in paths)


def detections(row) -> np.ndarray:
    """One image's answer as (n, 6) [x1, y1, x2, y2, score, class] (Parquet gives arrays of arrays, the
    pyfunc model lists)."""
    boxes = np.asarray([list(b) for b in row["boxes"]], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(list(row["scores"]), dtype=np.float64).reshape(-1, 1)
    classes = np.asarray(list(row["classes"]), dtype=np.float64).reshape(-1, 1)
    return np.concatenate([boxes, scores, classes], axis=1)


def s3_fs(server: S3Server):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=server.endpoint, access_key="testing", secret_key="testing", region="us-east-1"
    )


def test_model_actors_leave_a_cpu_for_the_readers():
    fitted = fit_to_cluster(BatchOptions(min_actors=2, max_actors=4), {"CPU": 3.0})
    assert (fitted.min_actors, fitted.max_actors) == (2, 2)
    assert fit_to_cluster(BatchOptions(min_actors=1, max_actors=2), {"CPU": 2.0}).max_actors == 1


def test_gpu_actors_on_a_cluster_without_gpus_are_refused():
    with pytest.raises(DataError, match="no GPU"):
        fit_to_cluster(BatchOptions(gpu=True), {"CPU": 8.0})


def test_a_registered_version_is_resolved_to_its_spec_weights_and_number(tmp_path):
    import base64

    import torch

    from pipeline.registry.promotion import Target
    from pipeline.registry.register import log_and_register
    from pipeline.registry.serving import SPEC_ARTIFACT, WEIGHTS_ARTIFACT, ModelSpec, pruned_architecture
    from pipeline.registry.source import CheckpointSource
    from pipeline.registry.verify import Verification

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = ModelSpec("gelan-t", 3, CLASSES, IMGSZ)
    torch.manual_seed(0)
    pruned = pruned_architecture(spec).eval()
    torch.save(pruned.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "spec.json").write_text(spec.to_json())
    example = base64.b64encode(encode_jpeg(np.full((32, 32, 3), 90, np.uint8))).decode()
    log_and_register(
        Target(uri, "batch-det", "registry", force=True),
        CheckpointSource(checkpoint=tmp_path),
        {"map50_95": "0.1", "dataset.val_manifest_hash": "h"},
        Verification(output_max_rel_diff=0.0, map50_95=0.1, map50=0.2, recorded_map50_95=0.1),
        {WEIGHTS_ARTIFACT: str(tmp_path / "weights.pt"), SPEC_ARTIFACT: str(tmp_path / "spec.json")},
        exports=[],
        example=example,
    )
    model = resolve_model("models:/batch-det@champion", uri)
    assert (model.spec, model.version, model.uri) == (spec, "1", "models:/batch-det@champion")
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert torch.equal(model.build(torch.device("cpu"))(x), pruned(x))
