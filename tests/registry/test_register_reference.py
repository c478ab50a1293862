"""A reference checkpoint file registered and used for prediction straight away (real sqlite MLflow store).

The fixture ``gelan-t-nc3.pt`` (written by the reference implementation, random weights, 3 classes) is
verified on val shards of three classes: its measured mAP is tagged, whatever it is.
"""

import json

import pytest
from mlflow.tracking import MlflowClient

from jobs import predict
from pipeline import names
from pipeline.data import DataError
from pipeline.data.synthetic import SYNTHETIC_CLASSES
from pipeline.errors import RegistrationError
from pipeline.registry.register import register_reference
from pipeline.weights.pretrained import sha256_of
from pipeline.weights.sources import resolve_weights
from tests.conftest import GELAN_T_NC3, val_jpegs

pytestmark = pytest.mark.slow
REFERENCE = GELAN_T_NC3


def test_a_reference_file_is_registered_with_its_measured_map_and_sha256(tmp_path, three_class_shards):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = register_reference(REFERENCE, "reference-det", uri, three_class_shards, imgsz=128)
    version = MlflowClient(uri).get_model_version("reference-det", result.version)
    assert version.tags[names.LINEAGE_SHA256_TAG] == sha256_of(REFERENCE)
    assert version.tags["model_name"] == "gelan-t"
    assert float(version.tags["map50_95"]) == pytest.approx(result.verification.map50_95)
    assert result.verification.output_max_rel_diff <= 1e-4  # pruned (fused) = the file's model
    # the registered version leads back to the file: a training run can start from it
    assert resolve_weights("models:/reference-det@champion", uri) == str(REFERENCE)


def test_a_reference_file_for_other_classes_is_refused_before_anything_is_logged(tmp_path, tiny_shards):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RegistrationError, match="predicts 3 classes, .* lists 4"):
        register_reference(REFERENCE, "reference-det", uri, tiny_shards, imgsz=128)
    assert MlflowClient(uri).search_registered_models() == []


def test_predict_reads_a_reference_file_directly(tmp_path, three_class_shards, capsys):
    images = val_jpegs(three_class_shards, tmp_path / "images")
    out = tmp_path / "out"
    argv = ["--model", str(REFERENCE), "--source", str(tmp_path / "images"), "--out", str(out)]
    assert predict.main([*argv, "--imgsz", "128", "--conf", "0.0", "--max-det", "5"]) == 0
    detections = json.loads((out / "detections.json").read_text())
    assert sorted(detections) == sorted(images)
    for det in detections.values():  # conf 0: every image gets its max_det boxes
        assert len(det["boxes"]) == 5 and set(det["class_names"]) <= set(SYNTHETIC_CLASSES[:3]) | {
            "0",
            "1",
            "2",
        }
    assert (out / sorted(images)[0]).is_file()


def test_predict_on_a_folder_skips_a_file_that_is_not_an_image_and_names_it(
    tmp_path, three_class_shards, capsys
):
    images = val_jpegs(three_class_shards, tmp_path / "images")
    (tmp_path / "images" / "notes.jpg").write_bytes(b"\xff\xd8\xff a JPEG header and nothing after it")
    out = tmp_path / "out"
    argv = ["--model", str(REFERENCE), "--source", str(tmp_path / "images"), "--out", str(out)]
    assert predict.main([*argv, "--imgsz", "128"]) == 0
    assert sorted(json.loads((out / "detections.json").read_text())) == sorted(images)
    assert not (out / "notes.jpg").exists()
    assert f"in {len(images)} images, 1 bad files skipped (notes.jpg) ->" in capsys.readouterr().out


def test_predict_on_a_folder_where_nothing_decodes_is_an_error_naming_a_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"not an image")
    argv = ["--model", str(REFERENCE), "--source", str(tmp_path / "images"), "--out", str(tmp_path / "o")]
    with pytest.raises(DataError, match="none of the 1 files decodes as an image \\(first: a.jpg\\)"):
        predict.main(argv)
